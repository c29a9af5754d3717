"""Budget accounting (trl_appo.budget, issue 15 item 1): per-step spend, the seconds split, cumulative totals."""

import pytest

from trl_appo import budget
from trl_appo.budget import KINDS, PREFIX, BudgetMeter


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(budget.time, "perf_counter", c)
    return c


def test_a_step_splits_its_wall_seconds_and_nested_remainders_count_once(clock):
    meter = BudgetMeter()
    meter.start_step()
    with meter.remainder("seconds_score"):  # 10 s hook: 4 s generating, 1 s rewarding, an inner 3 s step
        with meter.timed("seconds_generate"):
            clock.now += 4
        with meter.timed("seconds_reward"):
            clock.now += 1
        with meter.remainder("seconds_score"):  # inner: 1 s generating, 2 s of its own
            with meter.timed("seconds_generate"):
                clock.now += 1
            clock.now += 2
        clock.now += 2
    clock.now += 5  # loss, backward, optimizer
    meter.add("decoded_tokens_roots", 30)
    meter.add("tool_calls_branches", 2)
    out = meter.end_step()
    assert out[PREFIX + "seconds_generate"] == 5
    assert out[PREFIX + "seconds_reward"] == 1
    assert out[PREFIX + "seconds_score"] == 4  # 2 inner + 2 outer
    assert out[PREFIX + "seconds_train"] == 5
    assert out[PREFIX + "total_seconds"] == 15 == clock.now
    assert out[PREFIX + "decoded_tokens_roots"] == 30 and out[PREFIX + "decoded_tokens_branches"] == 0
    assert set(out) == {PREFIX + k for k in KINDS} | {PREFIX + "total_" + k for k in KINDS} | {
        PREFIX + "total_decoded_tokens", PREFIX + "total_tool_calls", PREFIX + "total_seconds"}


def test_totals_accumulate_over_steps_and_each_step_starts_empty(clock):
    meter = BudgetMeter()
    for tokens in (10, 0, 7):
        meter.start_step()
        meter.add("decoded_tokens_roots", tokens)
        meter.add("decoded_tokens_branches", 1)
        clock.now += 2
        out = meter.end_step()
        assert out[PREFIX + "decoded_tokens_roots"] == tokens
        assert out[PREFIX + "seconds_train"] == 2
    assert out[PREFIX + "total_decoded_tokens_roots"] == 17
    assert out[PREFIX + "total_decoded_tokens"] == 20
    assert out[PREFIX + "total_seconds"] == 6
    with pytest.raises(KeyError, match="unknown budget kind"):
        meter.add("tokens", 1)


def test_rollout_spend_counts_only_decoded_model_tokens():
    from types import SimpleNamespace

    import torch

    root = SimpleNamespace(model_mask=[1, 1, 0, 0, 1], prefix_length=0, tool_stats=SimpleNamespace(calls=1))
    branch = SimpleNamespace(model_mask=[1, 1, 0, 0, 1, 1], prefix_length=4, tool_stats=SimpleNamespace(calls=0))
    decoded, calls = budget.rollout_spend([root, branch], lambda t: t, torch.device("cpu"))
    assert (decoded, calls) == (5.0, 1.0)  # 3 of the root + the branch's 2 after its copied 4-token prefix
