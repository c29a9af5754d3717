"""APPOConfig: defaults from the spec and construction-time errors that name the fix."""

import dataclasses

import pytest

from trl_appo.config import APPOConfig


def make(**kw):
    base = dict(output_dir="/tmp/appo-test", bf16=False, use_cpu=True, report_to="none")
    base.update(kw)
    return APPOConfig(**base)


def test_defaults_follow_spec():
    c = make(num_generations=16, num_branches=3, per_device_train_batch_size=16, steps_per_generation=4)
    assert (c.num_generations, c.num_roots, c.num_branches) == (16, 4, 3)  # paper's best split, when asked for
    assert c.delta is None and c.epsilon == 0.2 and c.epsilon_high is None  # GRPOConfig's: the paper's are a preset
    assert c.future_kl_normalize is True
    assert c.future_kl_decay == 64 and c.future_kl_weight == 1.0 and c.future_kl_safety_thresh == 6.0
    assert c.reward_scale_discount == 0.9 and c.procedure_scale_weight == 1.0
    assert c.branch_criterion == "bs" and c.branch_schedule == "per_update"


def test_every_appo_field_has_help_text():
    from dataclasses import fields

    from trl import GRPOConfig

    grpo = {f.name for f in fields(GRPOConfig)}
    for f in fields(APPOConfig):
        if f.name not in grpo or f.name in ("num_generations", "epsilon_high", "delta"):
            assert f.metadata.get("help"), f"{f.name} has no help text"


def test_budget_must_split_into_roots_and_branches():
    with pytest.raises(ValueError, match=r"num_roots·\(1\+num_branches\)"):
        make(per_device_train_batch_size=16, num_roots=3)
    with pytest.raises(ValueError, match="not divisible"):
        make(num_generations=10, per_device_train_batch_size=10, num_branches=3)


def test_generation_batch_must_hold_whole_groups():
    with pytest.raises(ValueError, match="whole groups of num_generations=16: set per_device_train_batch_size=16, "
                                         "or steps_per_generation=2"):
        make(num_generations=16, per_device_train_batch_size=8, steps_per_generation=1)


def test_micro_batch_must_hold_whole_root_rows():
    # M=16, N=4: 4 root rows per 16 slots; a micro-batch of 2 slots would hold half a root.
    with pytest.raises(ValueError, match="multiple of 4"):
        make(num_generations=16, num_branches=3, per_device_train_batch_size=2, steps_per_generation=8,
             gradient_accumulation_steps=8, branch_schedule="per_generation")


def test_completion_budget_must_leave_room_to_branch_when_branches_are_asked_for():
    with pytest.raises(ValueError, match="max_completion_length=10 leaves no room"):
        make(per_device_train_batch_size=16, max_completion_length=10, num_branches=1)


def test_grpo_shape_without_room_to_branch_runs_without_branching_and_says_so_once():
    # num_generations=4, batch 6, max_completion_length=8: a shape GRPOConfig accepts (TRL's own test module).
    c = make(num_generations=4, per_device_train_batch_size=6, steps_per_generation=2, max_completion_length=8)
    assert (c.num_roots, c.num_branches, c.branching) == (4, 0, False)
    assert c.steps_per_generation == 2 and c.generation_batch_size == 12  # as set
    notes = [n for n in c.appo_notes if "no room to branch" in n]
    assert len(notes) == 1 and "max_completion_length >= 18" in notes[0] and "\n" not in notes[0]


def test_criterion_none_rejects_branch_settings_and_means_grpo():
    with pytest.raises(ValueError, match="branch_criterion='none'"):
        make(per_device_train_batch_size=16, branch_criterion="none", num_branches=3)
    c = make(num_generations=16, per_device_train_batch_size=16, branch_criterion="none")
    assert (c.num_roots, c.num_branches) == (16, 0)
    assert c.future_kl is False  # the GRPO baseline is exactly GRPO: no future-KL multiplier either


def test_per_update_with_one_optimizer_step_notes_omega_degenerate_with_the_fix():
    c = make(per_device_train_batch_size=16, steps_per_generation=1)
    notes = [n for n in c.appo_notes if "Ω is degenerate" in n]
    assert len(notes) == 1 and "falls back to entropy" in notes[0] and "steps_per_generation=4" in notes[0]
    assert not any("Ω is degenerate" in n for n in make(steps_per_generation=2).appo_notes)


def test_per_update_groups_must_fit_one_optimizer_step():
    with pytest.raises(ValueError, match="one optimizer step"):
        make(num_generations=16, per_device_train_batch_size=8, gradient_accumulation_steps=1, steps_per_generation=4,
             branch_schedule="per_update")
    with pytest.raises(ValueError, match="straddle"):
        make(per_device_train_batch_size=16, gradient_accumulation_steps=2, steps_per_generation=3,
             branch_schedule="per_update")
    # unset, the schedule falls back to per_generation for such shapes, and says so
    c = make(per_device_train_batch_size=16, gradient_accumulation_steps=2, steps_per_generation=3)
    assert c.branch_schedule == "per_generation" and any("per_generation" in n for n in c.appo_notes)


@pytest.mark.parametrize("field,value", [("branch_criterion", "bogus"), ("branch_schedule", "sometimes"),
                                         ("omega_reference", "oracle"), ("future_kl_form", "x"),
                                         ("tool_protocol", "xml")])
def test_unknown_choices_list_valid_ones(field, value):
    with pytest.raises(ValueError, match="choose one of"):
        make(per_device_train_batch_size=16, **{field: value})


def test_config_docs_are_generated_from_the_help_text():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gen_config_docs.py"
    res = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr + res.stdout


def test_trl_default_shape_builds_and_keeps_grpo_steps_per_generation():
    c = make()  # TRL's defaults: M=8, per_device_train_batch_size=8, GA=1
    assert c.num_generations == 8 and c.num_roots * (1 + c.num_branches) == 8 and c.num_roots >= 2
    assert c.steps_per_generation == 1 and c.generation_batch_size == 8 and c.branch_schedule == "per_update"
    assert any("N=4 roots" in n for n in c.appo_notes)  # the default split, said once
    assert make(steps_per_generation=2).steps_per_generation == 2  # a value the user set is kept
    assert make(generation_batch_size=16).steps_per_generation == 2  # ... and one TRL derives
    # M = 3 leaves no split: nothing else changes either
    c = make(num_generations=3, per_device_train_batch_size=3)
    assert (c.num_branches, c.steps_per_generation, c.generation_batch_size) == (0, 1, 3)


@pytest.mark.parametrize("M,bs,expected", [(2, 8, (2, 0)), (3, 3, (3, 0)), (4, 4, (2, 1)), (8, 8, (4, 1)),
                                           (16, 8, (8, 1)), (8, 3, (8, 0))])
def test_default_split_always_leaves_two_roots(M, bs, expected):
    from trl_appo.config import default_split

    assert default_split(M, bs) == expected


def test_small_budget_runs_without_branching_and_says_so():
    c = make(num_generations=2, per_device_train_batch_size=2)
    assert (c.num_roots, c.num_branches, c.branching) == (2, 0, False)
    assert sum("without branching" in n for n in c.appo_notes) == 1


def test_from_grpo_converts_an_existing_config():
    from trl import GRPOConfig

    g = GRPOConfig(output_dir="/tmp/appo-test", bf16=False, use_cpu=True, report_to="none", learning_rate=3e-6,
                   num_generations=4, per_device_train_batch_size=4, max_completion_length=64, beta=0.02)
    c = APPOConfig.from_grpo(g, branch_loss="suffix")
    assert isinstance(c, APPOConfig)
    assert (c.learning_rate, c.num_generations, c.max_completion_length, c.beta) == (3e-6, 4, 64, 0.02)
    assert c.branch_loss == "suffix" and c.steps_per_generation == 1  # GRPO's, unchanged
    assert APPOConfig.from_grpo(make(steps_per_generation=2)).steps_per_generation == 2


SWAP_SHAPES = [
    dict(),  # TRL's defaults
    dict(num_generations=4, per_device_train_batch_size=8, beta=0.04, learning_rate=5e-4, max_tool_calling_iterations=2),
    dict(num_generations=4, per_device_train_batch_size=6, steps_per_generation=2, max_completion_length=8),
    dict(num_generations=3, per_device_train_batch_size=3),
    dict(num_generations=8, per_device_train_batch_size=4, gradient_accumulation_steps=2),
    dict(num_generations=8, per_device_train_batch_size=8, generation_batch_size=32, num_iterations=2),
    dict(num_generations=16, per_device_train_batch_size=16, steps_per_generation=4, epsilon_high=0.3, delta=2.0),
]


def _fields(config, names):
    return {n: getattr(config, n) for n in names}


@pytest.mark.parametrize("kw", SWAP_SHAPES, ids=[str(i) for i in range(len(SWAP_SHAPES))])
def test_pure_swap_keeps_every_grpo_field_and_both_routes_agree(kw):
    from trl import GRPOConfig

    kw = dict(output_dir="/tmp/appo-test", bf16=False, use_cpu=True, report_to="none", **kw)
    grpo = GRPOConfig(**kw)
    swapped = APPOConfig(**kw)
    converted = APPOConfig.from_grpo(GRPOConfig(**kw))
    grpo_names = [f.name for f in dataclasses.fields(GRPOConfig)]
    # every GRPOConfig field, set or defaulted, is what GRPOConfig itself gives (epsilon_high, delta,
    # steps_per_generation and generation_batch_size included)
    assert _fields(swapped, grpo_names) == _fields(grpo, grpo_names)
    # and the two documented swap routes give the same config, APPO fields included
    all_names = [f.name for f in dataclasses.fields(APPOConfig)]
    assert _fields(converted, all_names) == _fields(swapped, all_names)
    assert converted.appo_notes == swapped.appo_notes


def test_paper_preset_holds_the_papers_settings_and_takes_overrides():
    c = APPOConfig.paper(output_dir="/tmp/appo-test", bf16=False, use_cpu=True, report_to="none")
    assert (c.num_generations, c.num_roots, c.num_branches) == (16, 4, 3)
    assert (c.epsilon, c.epsilon_high, c.delta, c.beta, c.learning_rate) == (0.2, 0.28, 3.0, 0.0, 1e-6)
    assert (c.branch_loss, c.branch_point_token, c.branch_criterion, c.branch_schedule) == (
        "none", "keep", "bs", "per_update")
    assert c.dual_groups and c.prefix_credit and c.procedure_scale and c.future_kl
    assert c.future_kl_weight == 1.0 and c.future_kl_normalize is False  # the paper's unnormalised weight
    assert c.tool_protocol == "tags" and 3 <= c.max_tool_calls <= 6
    assert c.steps_per_generation == 8 * c.gradient_accumulation_steps
    assert not any("Ω is degenerate" in n for n in c.appo_notes)
    c = APPOConfig.paper(output_dir="/tmp/appo-test", bf16=False, use_cpu=True, report_to="none",
                         gradient_accumulation_steps=2, per_device_train_batch_size=8, learning_rate=1e-5)
    assert (c.steps_per_generation, c.learning_rate, c.epsilon_high) == (16, 1e-5, 0.28)


@pytest.mark.parametrize("kw,match", [({"temperature": -1}, "temperature"), ({"temperature": 0}, "temperature"),
                                      ({"learning_rate": "fast"}, "learning_rate"),
                                      ({"learning_rate": [1, 2]}, "learning_rate")])
def test_numbers_that_cannot_train_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_max_tool_calls_and_trl_iterations_are_one_budget():
    assert make(max_tool_calling_iterations=3).max_tool_calls == 3
    assert make(max_tool_calls=2).max_tool_calling_iterations == 2
    with pytest.raises(ValueError, match="one budget"):
        make(max_tool_calls=2, max_tool_calling_iterations=3)


def test_online_schedule_needs_random_points_uniform_allocation_and_a_tool_call_limit():
    ok = make(num_generations=8, per_device_train_batch_size=8, num_branches=1, branch_schedule="online",
              branch_criterion="random", max_tool_calls=4)
    assert ok.branch_schedule == "online" and ok.branching
    with pytest.raises(ValueError, match="before any score exists.*set branch_criterion='random'"):
        make(num_generations=8, per_device_train_batch_size=8, branch_schedule="online", max_tool_calls=4)
    with pytest.raises(ValueError, match="branch_allocation='need' cannot place branches"):
        make(num_generations=8, per_device_train_batch_size=8, branch_schedule="online", branch_criterion="random",
             branch_allocation="need", max_tool_calls=4)
    with pytest.raises(ValueError, match="set max_tool_calls"):
        make(num_generations=8, per_device_train_batch_size=8, branch_schedule="online", branch_criterion="random")
    # GRPO (no branching) ignores the schedule, as it does the others
    assert not make(num_generations=8, per_device_train_batch_size=8, branch_schedule="online",
                    branch_criterion="none").branching
