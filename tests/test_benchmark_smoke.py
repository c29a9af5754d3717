"""Smoke test of benchmarks/compare.py --quick: it runs end to end and writes a JSON of the documented shape.

Not a pass/fail benchmark: only the structure is checked (keys, one entry per criterion, ratios to GRPO present).
~15 s on 2 idle cores with one torch thread (the script's default), so it stays in the default suite.
"""

import json
import math
import os
import statistics
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


def _learning_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_learning", ROOT / "benchmarks" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_learning_chain_tool_reward_and_failure_modes():
    """The regimes' in-process tool runs the chain's `r=...; print(r)` programs and counts them; the binary reward
    and the failure classes read a rollout as documented."""
    learning = _learning_module()
    tool = learning.ArithmeticPython()
    assert tool("r=3471*29\nprint(r)") == "100659"
    assert tool("print(347*29)") == "10063"
    assert tool("import os").startswith("Error")
    assert tool.calls == 3
    gold = "<python>r=3471*29\nprint(r)</python> <result>\n100659\n</result>"
    row = {"ground_truth": "101177", "_gold_outputs": ["100659", "101177"]}
    right = gold + "<python>r=100659+518\nprint(r)</python> <result>\n101177\n</result><answer>\\boxed{101177}</answer>"
    assert learning.binary_answer_reward(completions=[right, right.replace("{101177}", "{101178}")],
                                         ground_truth=["101177", "101177"]) == [1.0, 0.0]
    assert learning.chain_failure_mode(right, 1.0, row) == "correct"
    assert learning.chain_failure_mode(right.replace("{101177}", "{101178}"), 0.0, row) == "miscopy"
    wrong = right.replace("100659+518", "100695+518").replace("101177\n", "101213\n")
    assert learning.chain_failure_mode(wrong, 0.0, row) == "wrong_step"
    assert learning.chain_failure_mode(gold + "<answer>\\boxed{100659}</answer>", 0.0, row) == "few_calls"
    assert learning.chain_failure_mode(gold, 0.0, row) == "format"
    rows = learning._rows_with_gold([{"prompt": [{"role": "user", "content": "3471 *29 +518 ="}]}],
                                    learning.Settings(regime="deep"))
    assert rows[0]["_gold_outputs"] == ["100659", "101177"]


def test_learning_compares_paired_runs_at_the_smaller_spend_of_the_pair():
    """Δ at equal decoded tokens / training seconds: both curves read (linearly) at the smaller of the two totals."""
    learning = _learning_module()

    def run(xs, ys):
        return {"curve": [{"decoded_tokens": x, "train_seconds": x, "pass@1": y} for x, y in zip(xs, ys)]}

    appo, grpo = run([0, 100, 200], [0.1, 0.2, 0.3]), run([0, 150, 300], [0.1, 0.1, 0.4])
    # APPO spent less (200): GRPO at 200 is 0.1 + (0.4 - 0.1) * 50 / 150 = 0.2, so Δ = 0.3 - 0.2.
    assert math.isclose(learning._diff_at_equal("decoded_tokens", appo, grpo), 0.1)
    # The other way round (GRPO's spend is smaller): APPO read at GRPO's total.
    assert math.isclose(learning._diff_at_equal("train_seconds", grpo, appo), 0.2 - 0.3)
    assert learning._diff_at_equal("decoded_tokens", run([0], [0.1]), grpo) is None  # nothing spent yet


def test_learning_regimes_quick_in_one_process(tmp_path):
    """`--regime deep|hard|oracle --quick`: each regime's warm start, GRPO and GRPO at 2x M train and evaluate, the
    report carries Pass@k, decoded tokens, tool calls and the best-lr table, and calibration writes its JSON."""
    code = f"""
import sys, json
from pathlib import Path
sys.argv = ["learning"]
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
import learning
tmp = Path({str(tmp_path)!r})
for regime in ("deep", "hard", "oracle"):
    learning.main(["--quick", "--regime", regime, "--variants", "grpo,grpo_2xm", "--num-generations", "2",
                   "--workers", "0", "--out-dir", str(tmp / regime), "--results-dir", str(tmp),
                   "--cache-dir", str(tmp / "cache")])
learning.main(["--quick", "--regime", "oracle", "--calibrate", "--results-dir", str(tmp), "--cache-dir",
               str(tmp / "cache")])
for split in ("heldout", "train"):
    learning.main(["--quick", "--regime", "oracle", "--branch-points", "--split", split, "--results-dir", str(tmp),
                   "--cache-dir", str(tmp / "cache")])
# the budget-matched tree at M = 4 beside GRPO (same seed: the step-0 evaluation is made once and reused)
learning.main(["--quick", "--regime", "deep", "--variants", "grpo,appo_tokens", "--num-generations", "4",
               "--workers", "0", "--out-dir", str(tmp / "deep4"), "--results-dir", str(tmp / "r4"),
               "--cache-dir", str(tmp / "cache")])
# where to branch: the oracle (first wrong token) and surprisal criteria at equal branch counts
learning.main(["--quick", "--regime", "oracle", "--variants", "appo_pergen_oracle,appo_pergen_surprisal",
               "--num-generations", "4", "--workers", "0", "--out-dir", str(tmp / "oracle4"),
               "--results-dir", str(tmp / "ro"), "--cache-dir", str(tmp / "cache")])
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for regime in ("deep", "hard", "oracle"):
        agg = json.loads((tmp_path / f"learning_{regime}_quick.json").read_text())
        assert set(agg["variants"]) == {"grpo__m2__lr0.0001", "grpo_2xm__m2__lr0.0001"}
        assert agg["variants"]["grpo_2xm__m2__lr0.0001"]["M"] == 4  # twice the budget
        by_step = agg["variants"]["grpo__m2__lr0.0001"]["pass1_by_step"]  # the mean curve, per evaluation
        assert list(by_step) == ["0", "2"] and math.isclose(
            by_step["2"], statistics.fmean(r["curve"][-1]["pass@1"] for r in agg["runs"] if r["variant"] == "grpo"))
        for run in agg["runs"]:
            assert run["regime"] == regime and [c["step"] for c in run["curve"]] == [0, 2]
            for c in run["curve"]:
                assert 0.0 <= c["pass@1"] <= c["pass@2"] <= 1.0
                assert c["decoded_tokens"] >= 0 and c["tool_calls"] >= 0 and c["train_seconds"] >= 0
            assert run["curve"][-1]["decoded_tokens"] > 0  # the roots' decoded tokens reached the report
        assert set(agg["best_lr"]) == {"grpo__m2", "grpo_2xm__m2"}
        assert (tmp_path / f"learning_curves_{regime}_quick.png").stat().st_size > 0
    runs = {r["variant"]: r for r in json.loads((tmp_path / "r4" / "learning_deep_quick.json").read_text())["runs"]}
    assert runs["appo_tokens"]["appo_metrics"]["appo/leaves_per_prompt"] == 6  # N = 2 roots + N·B = 4 branches
    assert runs["appo_tokens"]["curve"][0] == runs["grpo"]["curve"][0]  # one cached step-0 evaluation
    # TRL's share of groups with no signal is kept for both methods (GRPO: M rollouts; APPO: roots, beside
    # APPO's before/after-branching figures)
    assert 0.0 <= runs["grpo"]["appo_metrics"]["frac_reward_zero_std"] <= 1.0
    assert 0.0 <= runs["appo_tokens"]["appo_metrics"]["appo/groups_all_equal_after"] <= 1.0
    assert runs["appo_tokens"]["curve"][-1]["decoded_tokens"] > 0
    assert len(list((tmp_path / "cache").glob("eval0_*.json"))) >= 1
    crit = {r["variant"]: r for r in json.loads((tmp_path / "ro" / "learning_oracle_quick.json").read_text())["runs"]}
    assert 0.0 <= crit["appo_pergen_oracle"]["appo_metrics"]["appo/branch_hint_frac"] <= 1.0
    assert crit["appo_pergen_surprisal"]["appo_metrics"]["appo/leaves_per_prompt"] == 6
    bps = json.loads((tmp_path / "branch_points_quick.json").read_text())
    assert bps["oracle__branch_points"]["split"] == "heldout" and bps["oracle__branch_points__train"]["split"] == "train"
    bp = bps["oracle__branch_points"]
    assert bp["rollouts"] == 4 and set(bp["criteria"]) == {"entropy", "surprisal", "random"}
    for figures in bp["criteria"].values():
        assert 0.0 <= figures["exact@1"] <= figures["before@1"] <= figures["any_before@2"] <= 1.0
        assert 0.0 <= figures["branch_success"] <= 1.0  # the branches were generated and rewarded
    cal = json.loads((tmp_path / "calibration_regimes_quick.json").read_text())["oracle__sft10__heldout2"]
    assert 0.0 <= cal["heldout"]["frac_prompts_none_correct"] <= 1.0
    assert cal["first_wrong_token"]["rollouts"] == 4


def test_bench_speed_quick_reports_every_variant_against_grpo(tmp_path):
    """`bench_speed.py --quick`: each variant's seconds per step with its ratio to the GRPO run of the same repeat,
    decoded tokens, leaves per prompt (the token budget trains 12 per prompt at M = 8) and the time breakdown."""
    out = tmp_path / "speed.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_speed.py"), "--quick", "--regime", "tiny", "--steps", "4",
         "--repeats", "1", "--out", str(out), "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"grpo", "appo_swap", "appo_tokens_update", "appo_tokens_generation", "appo_tokens_online"}
    assert summary["grpo"]["ratio_to_grpo"] == 1.0 and summary["grpo"]["leaves_per_prompt"] == 8
    assert summary["appo_swap"]["leaves_per_prompt"] == 8  # equal M: N roots + N·B branches = M
    for name in ("appo_tokens_update", "appo_tokens_generation", "appo_tokens_online"):
        assert summary[name]["leaves_per_prompt"] == 12, name  # M = 8 tokens' worth: 4 roots + 8 branches
    assert summary["appo_tokens_generation"]["shape"]["branch_schedule"] == "per_generation"
    assert summary["appo_tokens_update"]["shape"]["branch_schedule"] == "per_update"
    assert summary["appo_tokens_online"]["shape"]["branch_schedule"] == "online"
    for name, row in summary.items():
        assert row["seconds_per_step"] > 0 and row["decoded_tokens_per_step"] > 0, name
        assert row["seconds_generate"] > 0 and row["seconds_train"] > 0, name


def test_learning_pairs_each_criterion_with_random_branch_points_by_seed():
    """The criteria table: Δ against `appo_pergen_random` of the same M, lr and seed, final and over the last 3
    evaluations; GRPO and unpaired seeds are left out."""
    learning = _learning_module()

    def run(variant, seed, ys):
        return {"variant": variant, "seed": seed, "label": f"{variant}__m4__lr5e-05",
                "curve": [{"pass@1": y} for y in ys]}

    by = {"appo_pergen_oracle__m4__lr5e-05": [run("appo_pergen_oracle", 1, [0.5, 0.6, 0.7, 0.8]),
                                              run("appo_pergen_oracle", 0, [0.5, 0.5, 0.5, 0.6]),
                                              run("appo_pergen_oracle", 2, [0.5, 0.5, 0.5, 0.5])],
          "appo_pergen_random__m4__lr5e-05": [run("appo_pergen_random", 0, [0.5, 0.4, 0.5, 0.5]),
                                              run("appo_pergen_random", 1, [0.5, 0.6, 0.6, 0.6])],
          "grpo__m4__lr5e-05": [run("grpo", 0, [0.5, 0.9, 0.9, 0.9])]}
    out = learning.paired_vs(by, "appo_pergen_random")
    assert list(out) == ["appo_pergen_oracle__m4__lr5e-05"]
    d = out["appo_pergen_oracle__m4__lr5e-05"]
    assert d["seeds"] == [0, 1] and d["against"] == "appo_pergen_random__m4__lr5e-05"
    assert [round(x, 6) for x in d["diff_final_per_seed"]] == [0.1, 0.2]
    # last 3: seed 0 (0.5+0.5+0.6)/3 - (0.4+0.5+0.5)/3 = 0.2/3; seed 1 (0.6+0.7+0.8)/3 - 0.6 = 0.1
    assert [round(x, 6) for x in d["diff_last3_per_seed"]] == [round(0.2 / 3, 6), 0.1]
    assert math.isclose(d["diff_final"][0], 0.15)
