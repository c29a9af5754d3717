#!/bin/bash
# Run TRL's own tests/test_grpo_trainer.py against GRPOTrainer or APPOTrainer, offline. NOT part of the test suite.
#
# usage: scripts/trl_grpo_tests/run.sh grpo|appo OUTNAME [pytest args...]
#   TRL_REPO  a git directory of huggingface/trl (default /work/.mirror/huggingface+trl/repo)
#   TRL_REV   revision to take the tests from (default HEAD; use the tag of the installed trl where it exists)
#   WORK      scratch directory (default /tmp/trl_tests); PY the python (default: python on PATH)
# TRL's test code is copied to $WORK at run time and never committed. Its hub models and datasets are replaced by
# tiny stand-ins built offline (build_hub.py), the Qwen token ids its scripted completions hard-code are rewritten
# into the stand-in tokenizer's ids (remap_ids.py), and for `appo` the import line is swapped to
# `from trl_appo import APPOConfig as GRPOConfig, APPOTrainer as GRPOTrainer`. Results: $WORK/OUTNAME.log and .xml.
set -eu
V=$1; OUT=$2; shift 2
HERE=$(cd "$(dirname "$0")" && pwd); REPO=$(cd "$HERE/../.." && pwd)
TRL_REPO=${TRL_REPO:-/work/.mirror/huggingface+trl/repo}; TRL_REV=${TRL_REV:-HEAD}
WORK=${WORK:-/tmp/trl_tests}; PY=${PY:-python}
mkdir -p "$WORK"
[ -f "$WORK/hub/remap.json" ] || (cd "$WORK" && OMP_NUM_THREADS=1 "$PY" "$HERE/build_hub.py" hub > /dev/null 2>&1)
P=$WORK/pkg_$OUT/tests; rm -rf "$WORK/pkg_$OUT"; mkdir -p "$P"; touch "$P/__init__.py"
git --git-dir="$TRL_REPO" show "$TRL_REV:tests/testing_utils.py" > "$WORK/testing_utils.orig.py"
git --git-dir="$TRL_REPO" show "$TRL_REV:tests/conftest.py" > "$WORK/conftest.orig.py"
git --git-dir="$TRL_REPO" show "$TRL_REV:tests/test_grpo_trainer.py" > "$WORK/test_grpo_trainer.orig.py"
"$PY" "$HERE/prepare_testing_utils.py" "$WORK/testing_utils.orig.py" "$P/testing_utils.py" \
  "$WORK/conftest.orig.py" "$P/conftest.py"
"$PY" "$HERE/remap_ids.py" "$WORK/hub/remap.json" "$WORK/test_grpo_trainer.orig.py" "$P/test_grpo_trainer.py"
if [ "$V" = appo ]; then
  OLD='^from trl import GRPOConfig, GRPOTrainer$'
  NEW='from trl_appo import APPOConfig as GRPOConfig, APPOTrainer as GRPOTrainer'
  sed -i "s/$OLD/$NEW/" "$P/test_grpo_trainer.py"
  grep -q "^from trl_appo import APPOConfig as GRPOConfig" "$P/test_grpo_trainer.py" || { echo "swap failed"; exit 1; }
fi
cd "$WORK/hub"  # the tests' hub ids resolve to the stand-in folders here
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONPATH="$REPO" \
  "$PY" -m pytest -p no:cacheprovider -q -rfE --no-header --tb=line --junitxml="$WORK/$OUT.xml" \
  "$P/test_grpo_trainer.py" "$@" > "$WORK/$OUT.log" 2>&1 || true
tail -1 "$WORK/$OUT.log"
