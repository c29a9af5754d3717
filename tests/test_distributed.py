"""Two CPU processes (gloo) compute the same APPO advantages as one process on the same global batch."""

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "dist" / "advantages_run.py"


def _run(cmd, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]


def _load(prefix):
    rows = {}
    for path in sorted(glob.glob(f"{prefix}.rank*.json")):
        rows.update(json.load(open(path)))
    return rows


@pytest.mark.skipif(shutil.which("accelerate") is None and not Path(sys.executable).with_name("accelerate").exists(),
                    reason="accelerate launcher not installed")
def test_two_processes_match_one_process(tmp_path):
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    one, two = tmp_path / "one" / "adv", tmp_path / "two" / "adv"
    one.parent.mkdir()
    two.parent.mkdir()
    _run([sys.executable, str(SCRIPT), str(one), "8"], tmp_path)
    # accelerate's own multi-process launch (torch.distributed.run underneath; gloo backend on CPU)
    _run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533", str(SCRIPT),
          str(two), "4"], tmp_path)
    a, b = _load(one), _load(two)
    assert len(glob.glob(f"{two}.rank*.json")) == 2  # both ranks trained
    assert a.keys() == b.keys() and len(a) == 4  # 2 prompts x N=2 roots in the global batch
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
