"""Smoke test of benchmarks/compare.py --quick: it runs end to end and writes a JSON of the documented shape.

Not a pass/fail benchmark: only the structure is checked (keys, one entry per criterion, ratios to GRPO present).
~15 s on 2 idle cores with one torch thread (the script's default), so it stays in the default suite.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compare.py"


def test_compare_quick_writes_results(tmp_path):
    out, plot = tmp_path / "compare.json", tmp_path / "curves.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--plot", str(plot),
         "--workdir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("command", "settings", "warm_start", "machine", "cost", "learning", "analysis", "wall_seconds"):
        assert key in result, key

    cost = result["cost"]["criteria"]
    assert set(cost) == {"grpo", "appo_bs_per_update", "appo_bs_per_generation", "entropy", "random"}
    for name, row in cost.items():
        for key in ("wall_s_per_step", "decoded_tokens_per_step", "root_decoded_tokens_per_step",
                    "branch_decoded_tokens_per_step", "forward_passes_per_step", "generate_calls_per_step",
                    "logps_calls_per_step", "peak_rss_mib"):
            assert isinstance(row[key], (int, float)), (name, key)
        ratios = row["ratio_to_grpo"]
        for key in ("wall_s_per_step", "decoded_tokens_per_step", "forward_passes_per_step", "peak_rss_mib"):
            assert ratios[key] is not None and ratios[key] > 0, (name, key)
    assert all(math.isclose(v, 1.0) for v in cost["grpo"]["ratio_to_grpo"].values() if v is not None)
    assert cost["grpo"]["branch_decoded_tokens_per_step"] == 0
    assert cost["appo_bs_per_update"]["branch_decoded_tokens_per_step"] > 0

    learning = result["learning"]
    assert set(learning["summary"]) == set(result["settings"]["learn_criteria"])
    for name, runs in learning["runs"].items():
        assert len(runs) == len(result["settings"]["seeds"])
        curve = runs[0]["curve"]
        assert curve[0]["step"] == 0 and curve[-1]["step"] == result["settings"]["learn_steps"]
        assert all(0.0 <= p["pass@1"] <= 1.0 for p in curve)
    assert "appo_bs_per_update" in result["analysis"]
    assert plot.exists() and plot.stat().st_size > 0


def test_learning_quick_runs_every_kind_of_variant(tmp_path):
    """benchmarks/learning.py --quick: GRPO, the paper's APPO and a suffix variant run and are aggregated."""
    script = ROOT / "benchmarks" / "learning.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    variants = "grpo,appo_paper_n4b1,suffix_local_resample_n4b1"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--variants", variants, "--out-dir", str(tmp_path / "runs"),
         "--results-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    agg = json.loads((tmp_path / "learning_quick.json").read_text())
    assert set(agg["variants"]) == set(variants.split(","))
    for run in agg["runs"]:
        assert [c["step"] for c in run["curve"]] == [0, 2]
        assert all(0.0 <= c["pass@1"] <= 1.0 and c["decoded_tokens"] >= 0 for c in run["curve"])
    suffix = next(r for r in agg["runs"] if r["variant"] == "suffix_local_resample_n4b1")
    assert suffix["appo_metrics"]["appo/branch_loss_tokens"] > 0  # branch rows really reached the loss
    assert (tmp_path / "learning_curves_v2_quick.png").stat().st_size > 0
