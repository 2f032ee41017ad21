#!/usr/bin/env bash
# The second night, tried as a hostile user would: a finished run that resumes over a grown
# folder and is killed, a resume after `evaluate` rescored the run, a comparison cache whose
# code changed or whose entry is damaged, OUT inside DATA, a file name that is not UTF-8, a
# stop signal while the reports are written, a rerun straight after SIGKILL, `show` and
# `report` on a live or half-made run, and the smaller edges (--limit, evaluate's paths).
# Run against one checkout (TREE, default: this one) with the project's .venv. Transcripts:
# benchmarks/results/second_night_reproductions_{before,after}.txt, made with
#   TREE=<checkout of e039714> bash benchmarks/reproduce_second_night.sh   (before)
#   bash benchmarks/reproduce_second_night.sh                             (after)
set -u
HERE=$(cd "$(dirname "$0")/.." && pwd)
TREE=${TREE:-$HERE}
PY=${PY:-$HERE/.venv/bin/python}
W=$(mktemp -d)
export PYTHONPATH="$TREE:$TREE/tests:$W"
cd "$TREE"
mk() { $PY -c "
import numpy as np, sys; from PIL import Image
Image.fromarray(np.random.default_rng(int(sys.argv[2])).integers(0,255,(36,40,3),dtype=np.uint8)).save(sys.argv[1])" "$@"; }
ARGS="--model tiny_models:make_tiny_cnn --size 32 --workers 0 --quiet --iterations 3 --mask-size 8 --batch-size 2 --step 128 --baselines center"
clean() { sed -e "s#$W#\$W#g" | grep -v "^time:" | cut -c1-700; }
# rows of a mask file, and whether the masks of a saved first night are still there bitwise
rows() { $PY - "$@" <<'PYEOF'
import sys, h5py, numpy as np
try:
    f = h5py.File(sys.argv[1], "r")
except OSError as e:
    print("rows: unreadable:", str(e)[:80]); sys.exit()
n = int(f.attrs["rows"]); paths = [p.decode() if isinstance(p, bytes) else p for p in f["path"][:n]] if "path" in f else []
line = f"rows: {n}, distinct paths {len(set(paths))}"
if len(sys.argv) > 2:
    first = np.load(sys.argv[2]); masks = dict(zip(paths, f["masks"][:n]))
    same = sum(np.array_equal(masks.get(p), first[p]) for p in first.files)
    line += f"; first night's masks bitwise kept: {same} of {len(first.files)}"
print(line)
PYEOF
}
save_masks() { $PY -c "
import sys, h5py, numpy as np
f = h5py.File(sys.argv[1], 'r'); n = int(f.attrs['rows'])
np.savez(sys.argv[2], **{p.decode(): m for p, m in zip(f['path'][:n], f['masks'][:n])})" "$1" "$2"; }

echo "== 1. a finished run, resumed over a grown folder, killed after 2 new batches, rerun"
mkdir $W/d1; for i in 0 1 2 3; do mk $W/d1/img0$i.png $i; done
$PY -m cli run $W/d1 -o $W/o1 $ARGS 2>&1 | clean; save_masks $W/o1/masks.h5 $W/first1.npz
for i in 4 5 6 7 8 9; do mk $W/d1/img0$i.png $i; done
MPBATCH_KILL_AT=after-commit:2 $PY -m crashing_cli run $W/d1 -o $W/o1 $ARGS >/dev/null 2>&1; echo "killed: exit $?"
$PY -m cli run $W/d1 -o $W/o1 $ARGS 2>&1 | clean; echo "exit ${PIPESTATUS[0]}"; rows $W/o1/masks.h5 $W/first1.npz

echo "== 2. evaluate with another protocol, then a resume over a grown folder"
mkdir $W/d2; for i in 0 1 2; do mk $W/d2/img0$i.png $i; done
$PY -m cli run $W/d2 -o $W/o2 $ARGS 2>&1 | clean; save_masks $W/o2/masks.h5 $W/first2.npz
$PY -m cli evaluate $W/o2 --step 64 --baselines center --workers 0 --quiet 2>&1 | clean
mk $W/d2/img03.png 3
for attempt in 1 2; do
  $PY -m cli run $W/d2 -o $W/o2 $ARGS 2>&1 | tail -1 | clean; echo "resume $attempt: exit ${PIPESTATUS[0]}"
done
$PY -m cli run $W/d2 -o $W/o2 ${ARGS/--step 128/--step 64} 2>&1 | tail -1 | clean; echo "with evaluate's --step 64: exit ${PIPESTATUS[0]}"
rows $W/o2/masks.h5 $W/first2.npz

echo "== 3. the comparison cache after the centre map's code changed"
cat > $W/changed_centre.py <<'PYEOF'
# `mpbatch` with the centre baseline's formula changed (a stand-in for an edited scoring.py)
import dataclasses
try:
    from pipeline.metrics import comparisons
except ImportError:  # the tree before pipeline/ moved into sub-packages
    from pipeline import comparisons
centre = comparisons.get_comparison("center")
comparisons._REGISTRY["center"] = dataclasses.replace(centre, maps=lambda r: 1 - centre.maps(r))
from cli import main
main()
PYEOF
$PY -m cli run $W/d2 -o $W/o3a $ARGS --comparison-cache $W/cache >/dev/null 2>&1
$PY -m changed_centre run $W/d2 -o $W/o3b $ARGS --comparison-cache $W/cache >/dev/null 2>&1
$PY -m changed_centre run $W/d2 -o $W/o3c $ARGS >/dev/null 2>&1
$PY -c "
import pandas as pd, sys
a, b, c = (pd.read_csv(f'{sys.argv[1]}/{o}/report.csv')['center_deletion_auc'].round(4).tolist() for o in ('o3a', 'o3b', 'o3c'))
print('first code:', a); print('changed code, cache:', b); print('changed code, no cache:', c)
print('stale scores served' if b == a and b != c else 'the changed code was scored')" $W

echo "== 4. one damaged cache entry"
entry=$(find $W/cache -name '*.npz' | head -1); head -c 40 "$entry" > $W/t && cat $W/t > "$entry"
$PY -m cli run $W/d2 -o $W/o4 $ARGS --comparison-cache $W/cache 2>&1 | tail -1 | clean; echo "exit ${PIPESTATUS[0]}"

echo "== 5. -o inside DATA, run twice"
mkdir $W/d5; for i in 0 1; do mk $W/d5/img0$i.png $i; done
for attempt in 1 2; do $PY -m cli run $W/d5 -o $W/d5/out $ARGS >/dev/null 2>&1; echo "run $attempt: exit $?"; done
$PY -m cli show $W/d5/out -o $W/d5/out/figures >/dev/null 2>&1
$PY -m cli run $W/d5 -o $W/d5/out $ARGS 2>&1 | clean; rows $W/d5/out/masks.h5

echo "== 6. a file name that is not UTF-8"
mkdir $W/d6; for i in 0 1; do mk $W/d6/img0$i.png $i; done
$PY -c "import os,sys,shutil; shutil.copy(sys.argv[1]+'/img00.png', os.fsencode(sys.argv[1])+b'/bad\xff\xfe.png')" $W/d6
for attempt in 1 2; do $PY -m cli run $W/d6 -o $W/o6 $ARGS 2>&1 | tail -1 | clean; echo "run $attempt: exit ${PIPESTATUS[0]}"; done
rows $W/o6/masks.h5; cat $W/o6/failures.csv 2>&1 | clean

echo "== 7. SIGTERM while the reports are written"
cat > $W/slow_reports.py <<'PYEOF'
# `mpbatch` whose report phase takes 3 s, so a signal can land inside it
import time
try:
    from pipeline.commands import run
except ImportError:  # the tree before pipeline/ moved into sub-packages
    from pipeline import run
written = run.write_run_reports
def slow(*args, **kwargs):
    open(__import__("os").environ["REPORTS_STARTED"], "w").close(); time.sleep(3)
    return written(*args, **kwargs)
run.write_run_reports = slow
from cli import main
main()
PYEOF
REPORTS_STARTED=$W/started $PY -m slow_reports run $W/d2 -o $W/o7 $ARGS > $W/o7.log 2>&1 & P=$!
for i in $(seq 1 300); do [ -f $W/started ] && break; sleep 0.1; done; kill -TERM $P; wait $P; echo "exit $?"
tail -1 $W/o7.log | clean; ls $W/o7 | tr '\n' ' '; echo
$PY -m cli run $W/d2 -o $W/o7 $ARGS 2>&1 | tail -1 | clean; echo "rerun: exit ${PIPESTATUS[0]}"; ls $W/o7 | tr '\n' ' '; echo

echo "== 8. a rerun straight after SIGKILL (2 DataLoader workers)"
$PY -m cli run $W/d1 -o $W/o8 ${ARGS/--workers 0/--workers 2} --iterations 100000 >/dev/null 2>&1 & P=$!
for i in $(seq 1 300); do [ -d $W/o8/.masks.parts ] || [ -f $W/o8/masks.h5 ] && break; sleep 0.1; done; sleep 3
kill -KILL $P; wait $P 2>/dev/null
timeout 60 $PY -m cli run $W/d1 -o $W/o8 ${ARGS/--workers 0/--workers 2} --overwrite 2>&1 | tail -1 | clean; echo "rerun (--overwrite: refused only while the lock is held): exit ${PIPESTATUS[0]}"

echo "== 9. show during a live run; report without summary.csv"
$PY -m cli run $W/d1 -o $W/o9 $ARGS --iterations 100000 >/dev/null 2>&1 & P=$!
for i in $(seq 1 300); do [ -f $W/o9/masks.h5 ] && break; sleep 0.1; done; sleep 2
$PY -m cli show $W/o9 -o $W/o9fig 2>&1 | tail -1 | clean; echo "show: exit ${PIPESTATUS[0]}"
$PY -m cli report $W/o9 -o $W/o9cmp.csv 2>&1 | tail -1 | clean; echo "report: exit ${PIPESTATUS[0]}"
kill -TERM $P; wait $P

echo "== smaller: --limit -1 and --limit 0"
$PY -m cli run $W/d1 -o $W/s1 $ARGS --limit -1 2>&1 | tail -1 | clean; echo "--limit -1: exit ${PIPESTATUS[0]}"
$PY -m cli run $W/d1 -o $W/s2 $ARGS --limit 0 2>&1 | tail -1 | clean; echo "--limit 0: exit ${PIPESTATUS[0]}"
echo "== smaller: evaluate a maps file that lists a path twice; one with fixed-length byte paths"
$PY -c "
import h5py, numpy as np, sys
with h5py.File(sys.argv[1] + '/twice.h5', 'w') as f:
    f['path'] = np.array(['img00.png', 'img00.png'], dtype=object).astype(h5py.string_dtype())
    f['saliency'] = np.random.default_rng(0).random((2, 8, 8)).astype('f4')
with h5py.File(sys.argv[1] + '/bytes.h5', 'w') as f:
    f['path'] = np.array(['img00.png', 'img01.png'], dtype='S')
    f['saliency'] = np.random.default_rng(0).random((2, 8, 8)).astype('f4')" $W
for maps in twice bytes; do
  $PY -m cli evaluate $W/$maps.h5 --data $W/d2 -o $W/e_$maps --model tiny_models:make_tiny_cnn --size 32 --workers 0 --quiet --step 128 --baselines center 2>&1 | tail -1 | clean
  echo "$maps: exit ${PIPESTATUS[0]}"
done
rm -rf $W
