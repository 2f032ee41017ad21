#!/usr/bin/env bash
# A changing folder and a hostile first night, reproduced against one checkout (TREE,
# default: this one), with the project's .venv. A changed folder (swap, count, a finished run), two processes on one OUT,
# an exception inside the model, a full disk. Before/after transcripts:
# benchmarks/results/changed_folder_reproductions_{before,after}.txt, made with
#   TREE=<checkout of ac748b2> bash benchmarks/reproduce_changed_folder.sh   (before)
#   bash benchmarks/reproduce_changed_folder.sh                             (after)
set -u
HERE=$(cd "$(dirname "$0")/.." && pwd)
TREE=${TREE:-$HERE}
PY=${PY:-$HERE/.venv/bin/python}
W=$(mktemp -d)
cat > $W/boom.py <<'PYEOF'
import os
from pathlib import Path

from tiny_models import TinyCNN


class Boom(TinyCNN):
    def forward(self, x):
        if any(Path(os.environ["BOOM_WHEN"]).glob("part-*.h5")):
            raise RuntimeError("simulated fault inside the model's forward")
        return super().forward(x)


def make():
    return Boom()
PYEOF
export PYTHONPATH="$TREE:$TREE/tests:$W"
# the kill points: tests/crashing_cli.py now, the store itself before
KILLER=cli; [ -f "$TREE/tests/crashing_cli.py" ] && KILLER=crashing_cli
cd "$TREE"
mk() { $PY -c "
import numpy as np, sys; from PIL import Image
Image.fromarray(np.random.default_rng(int(sys.argv[2])).integers(0,255,(36,40,3),dtype=np.uint8)).save(sys.argv[1])" "$@"; }
ARGS="--model tiny_models:make_tiny_cnn --size 32 --workers 0 --quiet --iterations 4 --mask-size 8 --batch-size 2 --step 128 --baselines center"
paths() { $PY -c "import h5py,sys; f=h5py.File(sys.argv[1]); print([p.decode() for p in f['path'][:f.attrs['rows']]])" "$1"; }
mkdir $W/d; for i in 0 1 2 3 4 5; do mk $W/d/img0$i.png $i; done
echo "== 2a. same-count swap after a kill"
MPBATCH_KILL_AT=after-commit:1 $PY -m $KILLER run $W/d -o $W/o1 $ARGS >/dev/null 2>&1; echo "killed: exit $?"
rm $W/d/img05.png; mk $W/d/img00a.png 9
$PY -m cli run $W/d -o $W/o1 $ARGS 2>&1 | grep -v "^time:"; echo "exit ${PIPESTATUS[0]}"; echo -n "paths: "; paths $W/o1/masks.h5
echo "== 2b. a changed count after a kill"
MPBATCH_KILL_AT=after-commit:1 $PY -m $KILLER run $W/d -o $W/o2 $ARGS >/dev/null 2>&1
mk $W/d/img06.png 10
$PY -m cli run $W/d -o $W/o2 $ARGS 2>&1 | grep -v "^time:"; echo "exit ${PIPESTATUS[0]}"; echo -n "paths: "; paths $W/o2/masks.h5
echo "== 2c. a finished run whose folder then changes (one image swapped)"
$PY -m cli run $W/d -o $W/o3 $ARGS >/dev/null 2>&1
rm $W/d/img03.png; mk $W/d/img03b.png 11
$PY -m cli run $W/d -o $W/o3 $ARGS 2>&1 | grep -v "^time:"; echo "exit ${PIPESTATUS[0]}"; echo -n "paths: "; paths $W/o3/masks.h5
echo "== 3. two processes on one OUT (the first one slow), then --overwrite"
$PY -m cli run $W/d -o $W/o4 $ARGS --iterations 1000000 >/dev/null 2>$W/first.err & FIRST=$!
for i in $(seq 1 100); do [ -f $W/o4/masks.h5 ] && break; sleep 0.2; done; sleep 2
$PY -m cli run $W/d -o $W/o4 $ARGS --iterations 1000000 2>&1 | tail -2; echo "second: exit ${PIPESTATUS[0]}"
timeout 120 $PY -m cli run $W/d -o $W/o4 $ARGS --overwrite 2>&1 | tail -2 | cut -c1-200; echo "--overwrite: exit ${PIPESTATUS[0]}"
kill -TERM $FIRST; wait $FIRST; echo "first: exit $? ($(tail -1 $W/first.err | cut -c1-160))"
echo "== 4. an exception inside the model's forward (after the first batch)"
BOOM_WHEN=$W/o5/.masks.parts $PY -m cli run $W/d -o $W/o5 ${ARGS/tiny_models:make_tiny_cnn/boom:make} > $W/boom.err 2>&1; echo "exit $?, $(wc -l < $W/boom.err) lines, traceback: $(grep -c Traceback $W/boom.err)"; tail -2 $W/boom.err | cut -c1-250
echo "== 3b. a full disk (every file over 64 kB refused: RLIMIT_FSIZE, EFBIG)"
$PY -c "
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (64000, 64000))
sys.argv = ['cli'] + sys.argv[1:]
runpy.run_module('cli', run_name='__main__')" run $W/d -o $W/o6 $ARGS > $W/full.err 2>&1; echo "exit $?, $(wc -l < $W/full.err) lines"; tail -1 $W/full.err | cut -c1-250
$PY -m cli run $W/d -o $W/o6 $ARGS 2>&1 | grep -v "^time:" | tail -2; echo "rerun: exit ${PIPESTATUS[0]}"
rm -rf $W
