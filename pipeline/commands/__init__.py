"""The commands: each one's orchestration (`run`, `evaluate`, `sanity`, `merge`), what they
are asked and record (configuration), the one batch loop (batching) and stop signals. The only
place that ties file I/O to the algorithms, which take and return tensors."""
