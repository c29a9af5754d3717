"""APPOConfig: defaults from the spec and construction-time errors that name the fix."""

import warnings

import pytest

from trl_appo.config import APPOConfig


def make(**kw):
    base = dict(output_dir="/tmp/appo-test", bf16=False, use_cpu=True, report_to="none")
    base.update(kw)
    return APPOConfig(**base)


def test_defaults_follow_spec():
    c = make(num_generations=16, num_branches=3, per_device_train_batch_size=16, steps_per_generation=4)
    assert (c.num_generations, c.num_roots, c.num_branches) == (16, 4, 3)  # paper's best split, when asked for
    assert c.delta == 3.0 and c.epsilon == 0.2 and c.epsilon_high == 0.28  # §4 dual-clip and clip range
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
    with pytest.raises(ValueError, match="divisible by num_generations|multiple of num_generations"):
        make(num_generations=16, per_device_train_batch_size=8, steps_per_generation=1)


def test_micro_batch_must_hold_whole_root_rows():
    # M=16, N=4: 4 root rows per 16 slots; a micro-batch of 2 slots would hold half a root.
    with pytest.raises(ValueError, match="multiple of 4"):
        make(num_generations=16, num_branches=3, per_device_train_batch_size=2, steps_per_generation=8,
             gradient_accumulation_steps=8, branch_schedule="per_generation")


def test_completion_budget_must_leave_room_to_branch():
    with pytest.raises(ValueError, match="max_completion_length=10 leaves no room"):
        make(per_device_train_batch_size=16, max_completion_length=10)


def test_criterion_none_rejects_branch_settings_and_means_grpo():
    with pytest.raises(ValueError, match="branch_criterion='none'"):
        make(per_device_train_batch_size=16, branch_criterion="none", num_branches=3)
    c = make(num_generations=16, per_device_train_batch_size=16, branch_criterion="none")
    assert (c.num_roots, c.num_branches) == (16, 0)
    assert c.future_kl is False  # the GRPO baseline is exactly GRPO: no future-KL multiplier either


def test_per_update_with_one_optimizer_step_warns_omega_degenerate():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make(per_device_train_batch_size=16, steps_per_generation=1)
    assert any("Ω is degenerate" in str(w.message) for w in caught)


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


def test_trl_default_shape_builds_and_unset_steps_per_generation_makes_omega_live():
    c = make()  # TRL's defaults: M=8, per_device_train_batch_size=8, GA=1
    assert c.num_generations == 8 and c.num_roots * (1 + c.num_branches) == 8 and c.num_roots >= 2
    assert c.steps_per_generation == 4 and c.branch_schedule == "per_update"
    assert any("steps_per_generation was unset" in n for n in c.appo_notes)
    assert make(steps_per_generation=2).steps_per_generation == 2  # a value the user set is kept
    assert make(generation_batch_size=16).steps_per_generation == 2  # ... and one TRL derives


@pytest.mark.parametrize("M,bs,expected", [(2, 8, (2, 0)), (3, 3, (3, 0)), (4, 4, (2, 1)), (8, 8, (4, 1)),
                                           (16, 8, (8, 1)), (8, 3, (8, 0))])
def test_default_split_always_leaves_two_roots(M, bs, expected):
    from trl_appo.config import default_split

    assert default_split(M, bs) == expected


def test_small_budget_runs_without_branching_and_warns():
    with pytest.warns(UserWarning, match="without branching"):
        c = make(num_generations=2, per_device_train_batch_size=2)
    assert (c.num_roots, c.num_branches, c.branching) == (2, 0, False)


def test_from_grpo_converts_an_existing_config():
    from trl import GRPOConfig

    g = GRPOConfig(output_dir="/tmp/appo-test", bf16=False, use_cpu=True, report_to="none", learning_rate=3e-6,
                   num_generations=4, per_device_train_batch_size=4, max_completion_length=64, beta=0.02)
    c = APPOConfig.from_grpo(g, branch_loss="suffix")
    assert isinstance(c, APPOConfig)
    assert (c.learning_rate, c.num_generations, c.max_completion_length, c.beta) == (3e-6, 4, 64, 0.02)
    assert c.branch_loss == "suffix" and c.steps_per_generation == 4  # TRL's derived spg=GA counts as unset
    assert APPOConfig.from_grpo(make(steps_per_generation=2)).steps_per_generation == 2


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
