# Shared by the GPU scripts (source it after setting OUT): the repository root as the working
# directory, PYTHON (the project's .venv, else python3), the summary file, and
#   step NAME LIMIT_S COMMAND...   run with a timeout, log to OUT/NAME.log, record the outcome
#   finish                         print the failed steps; exit 1 if any, else 0
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
failed=()

# step NAME LIMIT_S COMMAND...: run with a timeout, log to OUT/NAME.log, record the outcome
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS rc=0
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    local took=$((SECONDS - start))
    if [[ $rc -eq 0 ]]; then
        echo "$name: ok in ${took}s" | tee -a "$SUMMARY"
    else
        local why="rc=$rc"
        [[ $rc -eq 124 || $rc -eq 137 ]] && why="timed out after ${limit}s"
        echo "$name: FAILED ($why) after ${took}s" | tee -a "$SUMMARY"
        failed+=("$name")
    fi
    tail -n 25 "$OUT/$name.log" || true
}

finish() {
    if [[ ${#failed[@]} -gt 0 ]]; then
        echo "failed steps: ${failed[*]}" | tee -a "$SUMMARY"
        exit 1
    fi
    echo "all steps passed" | tee -a "$SUMMARY"
}
