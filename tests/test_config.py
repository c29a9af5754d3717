"""APPOConfig: defaults from the spec and construction-time errors that name the fix."""

import warnings

import pytest

from trl_appo.config import APPOConfig


def make(**kw):
    base = dict(output_dir="/tmp/appo-test", bf16=False, use_cpu=True, report_to="none")
    base.update(kw)
    return APPOConfig(**base)


def test_defaults_follow_spec():
    c = make(per_device_train_batch_size=16, steps_per_generation=4)
    assert (c.num_generations, c.num_roots, c.num_branches) == (16, 4, 3)  # paper's best split
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
        make(per_device_train_batch_size=8)


def test_micro_batch_must_hold_whole_root_rows():
    # M=16, N=4: 4 root rows per 16 slots; a micro-batch of 2 slots would hold half a root.
    with pytest.raises(ValueError, match="multiple of 4"):
        make(per_device_train_batch_size=2, steps_per_generation=8, gradient_accumulation_steps=8,
             branch_schedule="per_generation")


def test_completion_budget_must_leave_room_to_branch():
    with pytest.raises(ValueError, match="max_completion_length=10 leaves no room"):
        make(per_device_train_batch_size=16, max_completion_length=10)


def test_criterion_none_rejects_branch_settings_and_means_grpo():
    with pytest.raises(ValueError, match="branch_criterion='none'"):
        make(per_device_train_batch_size=16, branch_criterion="none", num_branches=3)
    c = make(per_device_train_batch_size=16, branch_criterion="none")
    assert (c.num_roots, c.num_branches) == (16, 0)


def test_per_update_with_one_optimizer_step_warns_omega_degenerate():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make(per_device_train_batch_size=16)
    assert any("Ω is degenerate" in str(w.message) for w in caught)


def test_per_update_groups_must_fit_one_optimizer_step():
    with pytest.raises(ValueError, match="one optimizer step"):
        make(per_device_train_batch_size=8, gradient_accumulation_steps=1, steps_per_generation=4)
    with pytest.raises(ValueError, match="straddle"):
        make(per_device_train_batch_size=16, gradient_accumulation_steps=2, steps_per_generation=3)


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
