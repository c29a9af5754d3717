"""The offline demo: its pieces (trajectory text, summary numbers, report files, SFT transcripts) fast, and the
`--quick` run end to end (slow: TRL import + SmolLM2 + SFT + APPO, about 1-2 min on 2 cores)."""

import json
import math

import pytest
import torch

from trl_appo import demo
from trl_appo.sft import sft_warm_start, tag_transcript_example


def _record(step=1, reward=0.0, branch_reward=1.0, degenerate=False, tool=True):
    tokens = ["<python>", "print", "(", "4", "*", "5", ")", "</python>", " <result>", "\n20\n", "</result>",
              "<answer>", "\\boxed{", "2", "0", "}", "</answer>"]
    n = len(tokens)
    mask = [1] * 8 + ([0] * 3 if tool else [1] * 3) + [1] * 6
    return {
        "step": step, "group": 0, "tokens": tokens, "token_text": tokens, "model_mask": mask,
        "entropy_z": [0.0] * n, "omega_z": [0.0] * n, "bs": [0.1 * i for i in range(n)], "degenerate": degenerate,
        "reward": reward,
        "branches": [
            {"position": 11, "strict": True, "fallback": 0, "score": 1.1, "reward": branch_reward, "text": "\\boxed{20}"},
            {"position": 3, "strict": False, "fallback": 1, "score": 0.3, "reward": reward, "text": "5)</python>"},
        ],
    }


def test_format_trajectory_marks_branch_points_after_their_token():
    text = demo.format_trajectory(_record())
    assert "<answer>⟨BP1⟩\\boxed{" in text  # rank 1 = highest score, right after the kept token
    assert "print(4⟨BP2⟩*5)" in text
    assert "⟨BP1⟩ after token 11 '<answer>'" in text and "branch reward +1.00" in text
    coloured = demo.format_trajectory(_record(), color=True)
    assert "\033[1;35m⟨BP1⟩\033[0m" in coloured and "\033[2m" in coloured  # markers bold, tool output dimmed


def test_format_trajectory_marks_a_resampled_point_before_its_token():
    text = demo.format_trajectory({**_record(), "point_token": "resample"})
    assert "⟨BP1⟩<answer>\\boxed{" in text and "print(⟨BP2⟩4*5)" in text  # the branch re-decided that token
    assert "⟨BP1⟩ at token 11 '<answer>'" in text


def test_format_trajectory_shows_question_and_gold():
    rec = {**_record(), "question": "What is 4 * 5?", "answer": "20"}
    assert "question: 'What is 4 * 5?'  gold answer: '20'" in demo.format_trajectory(rec)


def test_format_trajectory_without_branch_points():
    rec = _record()
    rec["branches"] = [{"position": -1, "strict": False, "fallback": 3, "score": 0.0, "reward": 0.0, "text": "x"}]
    assert "no branch point" in demo.format_trajectory(rec)


def test_pick_record_prefers_branches_that_changed_the_reward():
    same = _record(reward=1.0, branch_reward=1.0)
    changed = _record(reward=0.0, branch_reward=1.0)
    assert demo.pick_record([same, changed]) is changed


def test_summarize_branch_trees_numbers():
    recs = [_record(reward=0.0, branch_reward=1.0), _record(reward=1.0, branch_reward=1.0, degenerate=True, tool=False)]
    s = demo.summarize_branch_trees(recs)
    assert s["roots"] == 2 and s["branch_points_per_root"] == 2.0
    assert s["root_reward_mean"] == 0.5
    assert s["branch_reward_mean"] == pytest.approx((1 + 0 + 1 + 1) / 4)
    # record 1: position 11 is 1 token after the tool output (8..10), position 3 is 5 away -> 1 of 2 near.
    assert s["near_tool_frac"] == pytest.approx(1 / 4)
    assert s["omega_degenerate_frac"] == 0.5 and s["roots_using_tool_frac"] == 0.5
    assert s["branch_beats_root_frac"] == pytest.approx(1 / 4)
    assert math.isnan(demo.summarize_branch_trees([])["root_reward_mean"])


def test_tag_transcript_masks_tool_output_like_the_engine(tiny_tokenizer):
    completion = "<python>print(4*5)</python> <result>\n20\n</result><answer>\\boxed{20}</answer>"
    ex = tag_transcript_example(tiny_tokenizer, "What is 4 * 5?\n", completion)
    from trl_appo.rollout import TagProtocol

    # the result block is exactly what TagProtocol appends, encoded on its own, and carries no loss
    result_ids = tiny_tokenizer(" <result>\n20\n</result>", add_special_tokens=False)["input_ids"]
    start = ex.loss_mask.index(0)
    assert ex.completion_ids[start : start + len(result_ids)] == result_ids
    assert ex.loss_mask[start : start + len(result_ids)] == [0] * len(result_ids)
    assert sum(1 for m in ex.loss_mask if m == 0) == len(result_ids)
    assert ex.completion_ids[-1] == tiny_tokenizer.eos_token_id and ex.loss_mask[-1] == 1
    assert TagProtocol(tiny_tokenizer).result_template.format(content="20") == " <result>\n20\n</result>"


def test_sft_warm_start_lowers_the_loss(tiny_tokenizer, tiny_model):
    ex = [tag_transcript_example(tiny_tokenizer, f"What is {a} * 7?\n",
                                 f"<python>print({a}*7)</python> <result>\n{a * 7}\n</result>"
                                 f"<answer>\\boxed{{{a * 7}}}</answer>") for a in range(10, 30)]
    evals = []
    hist = sft_warm_start(tiny_model, tiny_tokenizer, ex, steps=30, batch_size=8, lr=3e-3, progress=False,
                          eval_fn=lambda: evals.append(1) or 0.5, eval_every=10)
    assert len(hist.loss) == 30 and sum(hist.loss[-5:]) < sum(hist.loss[:5])
    assert [s for s, _ in hist.evals] == [10, 20, 30] and not tiny_model.training


def test_write_report_produces_every_file(tmp_path):
    pytest.importorskip("matplotlib")
    log = [{"step": i, "reward": 0.1 * i, "appo/branch_reward": 0.2} for i in range(1, 6)]
    numbers = demo.summarize_branch_trees([_record()])
    part_a = demo.PartResult("A: real", ran=True, seconds=3.0, numbers=dict(numbers), record=_record(),
                             log_history=log, output_dir="x")
    part_b = demo.PartResult("B: tiny", ran=True, seconds=4.0, record=_record(), log_history=log, output_dir="y",
                             numbers={**numbers, "sft_steps": 1, "sft_seconds": 1.0, "appo_steps": 5, "appo_seconds": 2.0,
                                      "heldout_before": {"pass@1": 0.4, "mean_reward": 0.1},
                                      "heldout_after": {"pass@1": 0.6, "mean_reward": 0.5}})
    report = demo.write_report(tmp_path, [part_a, part_b], demo.DemoSettings.quick(), wall=7.0, quick=True)
    for name in ("report.md", "trajectory.html", "trajectory.png", "smollm2_trajectory.html", "learning_curve.png",
                 "metrics.json"):
        assert (report / name).exists(), name
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["parts"]["B: tiny"]["heldout_after"]["pass@1"] == 0.6
    md = (report / "report.md").read_text()
    assert "⟨BP1⟩" in md and "heldout_before" in md


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    rc = demo.main(["--quick", "--no-progress", "--output-dir", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "APPO demo: what happened" in out and "⟨BP1⟩" in out and "held-out Pass@1" in out
    report = tmp_path / "report"
    for name in ("report.md", "trajectory.html", "trajectory.png", "learning_curve.png", "metrics.json"):
        assert (report / name).exists(), name
    metrics = json.loads((report / "metrics.json").read_text())
    b = next(v for k, v in metrics["parts"].items() if k.startswith("B"))
    assert b["ran"] and b["branch_points_per_root"] > 0
    assert 0.0 <= b["heldout_after_grpo"]["pass@1"] <= 1.0  # GRPO from the same warm start, beside APPO
    assert list((tmp_path / "tiny" / "branch_trees").glob("step_*.jsonl"))
    assert (tmp_path / "tiny" / "final" / "config.json").exists()  # saved for `trl-appo eval`


@pytest.mark.parametrize("steps", [1, 3, 5, 10])
def test_sft_warm_start_runs_for_very_few_steps(tiny_tokenizer, tiny_model, steps):
    # OneCycleLR with pct_start=0.1 has an empty warm-up at <= 10 steps (ZeroDivisionError before the fix).
    ex = [tag_transcript_example(tiny_tokenizer, "What is 3 * 7?\n", "<answer>\\boxed{21}</answer>")]
    hist = sft_warm_start(tiny_model, tiny_tokenizer, ex, steps=steps, batch_size=2, progress=False)
    assert len(hist.loss) == steps


def test_learning_curve_shows_both_trainers_held_out_pass_at_1():
    # Training reward can rank the trainers the other way round from held-out Pass@1: the picture shows both.
    log = [{"step": i, "reward": 0.1 * i} for i in range(1, 4)]
    part_b = demo.PartResult("B: tiny", ran=True, log_history=log, baseline_log_history=log,
                             numbers={"heldout_before": {"pass@1": 0.3}, "heldout_after": {"pass@1": 0.570},
                                      "heldout_after_grpo": {"pass@1": 0.629}})
    curves, note = demo.learning_curves({"B": part_b})
    labels = " | ".join(curves)
    assert "APPO: held-out Pass@1 0.570" in labels and "GRPO" in labels and "Pass@1 0.629" in labels
    assert "0.300" in note and "training reward" in note


def test_sft_warm_start_stops_partway_through_a_longer_schedule(tiny_tokenizer):
    # A warm start taken before the schedule anneals (the learning benchmark's regimes): training the first 6
    # steps of a 20-step one-cycle schedule gives exactly the weights the 20-step run has after its 6th step.
    from trl_appo.testing import build_tiny_model

    ex = [tag_transcript_example(tiny_tokenizer, f"What is {a} * 7?\n", f"<answer>\\boxed{{{a * 7}}}</answer>")
          for a in range(10, 20)]
    weights = []

    def snapshot(model):
        return torch.cat([p.detach().flatten().clone() for p in model.parameters()])

    partial = build_tiny_model(tiny_tokenizer, seed=3)
    sft_warm_start(partial, tiny_tokenizer, ex, steps=6, schedule_steps=20, batch_size=4, lr=3e-3, seed=1,
                   progress=False)
    full = build_tiny_model(tiny_tokenizer, seed=3)
    sft_warm_start(full, tiny_tokenizer, ex, steps=20, batch_size=4, lr=3e-3, seed=1, progress=False,
                   eval_fn=lambda: weights.append(snapshot(full)) or 0.0, eval_every=6)
    assert torch.equal(snapshot(partial), weights[0])  # the 20-step run after step 6
    short = build_tiny_model(tiny_tokenizer, seed=3)
    sft_warm_start(short, tiny_tokenizer, ex, steps=6, batch_size=4, lr=3e-3, seed=1, progress=False)
    assert not torch.equal(snapshot(short), weights[0])  # a 6-step schedule anneals: other weights
    with pytest.raises(ValueError, match="schedule_steps"):
        sft_warm_start(short, tiny_tokenizer, ex, steps=6, schedule_steps=5, progress=False)
