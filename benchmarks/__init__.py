"""mpbatch's benchmarks: thin scripts over the library, each run as `python -m benchmarks.NAME`
from the repository root, results as CSV under benchmarks/results/ (README.md beside this)."""
