"""Budget accounting: what each optimizer step spent, so APPO and GRPO runs compare at equal compute.

Every optimizer step of `APPOTrainer` logs, under ``appo/budget/`` (TRL-style names, as ``num_tokens`` and
``completions/mean_length``), what it spent:

* ``decoded_tokens_roots`` / ``decoded_tokens_branches``: model tokens the policy decoded (tool output and a
  branch's copied prefix are not decoded), summed over all ranks;
* ``tool_calls_roots`` / ``tool_calls_branches``: tool calls run, summed over all ranks;
* ``seconds_generate`` (the rollout engine: decoding and tool execution, roots and branches), ``seconds_score``
  (no-grad forwards and bookkeeping around generation: TRL's old/reference log-probs, APPO's scoring forward,
  credit, branch loss rows), ``seconds_reward`` (the reward functions, roots and branches) and ``seconds_train``
  (the rest of the optimizer step's wall time: loss forward, backward, optimizer), on this rank; the four add up
  to the step's wall seconds;

and cumulative totals since the start of training, ``appo/budget/total_<kind>`` for each kind above plus
``appo/budget/total_decoded_tokens``, ``appo/budget/total_tool_calls`` and ``appo/budget/total_seconds``, so a
benchmark plots learning against decoded tokens, tool calls or wall seconds from the log history alone.

A step logs what was spent during it: when one generation batch serves several optimizer steps, the step that
generated it carries its tokens and the others carry none. Under GRPO (``branch_criterion="none"``) the same keys
are logged, the branch ones 0. Evaluation is not counted.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import torch

PREFIX = "appo/budget/"
KINDS = ("decoded_tokens_roots", "decoded_tokens_branches", "tool_calls_roots", "tool_calls_branches",
         "seconds_generate", "seconds_score", "seconds_reward", "seconds_train")
_MEASURED_SECONDS = ("seconds_generate", "seconds_score", "seconds_reward")
_SUMS = {"decoded_tokens": ("decoded_tokens_roots", "decoded_tokens_branches"),
         "tool_calls": ("tool_calls_roots", "tool_calls_branches"),
         "seconds": ("seconds_generate", "seconds_score", "seconds_reward", "seconds_train")}


def rollout_spend(rollouts: Sequence, gather, device) -> tuple[float, float]:
    """(decoded model tokens, tool calls) of `rollouts`, summed over all ranks (collective: every rank calls it).

    A branch's copied prefix (``prefix_length`` tokens) was decoded by its root, not by the branch.
    """
    local = torch.tensor([float(sum(sum(r.model_mask[r.prefix_length:]) for r in rollouts)),
                          float(sum(r.tool_stats.calls for r in rollouts))], device=device)
    decoded, calls = gather(local.unsqueeze(0)).sum(dim=0).tolist()
    return decoded, calls


class BudgetMeter:
    """Counts what the current optimizer step spends (`add`, `timed`, `remainder`) and closes it (`end_step`)."""

    def __init__(self):
        self.pending = dict.fromkeys(KINDS, 0.0)
        self.totals = dict.fromkeys(KINDS, 0.0)
        self._step_start: float | None = None

    def add(self, kind: str, amount: float) -> None:
        if kind not in self.pending:
            raise KeyError(f"unknown budget kind {kind!r}; valid: {KINDS}")
        self.pending[kind] += float(amount)

    def _measured(self) -> float:
        return sum(self.pending[k] for k in _MEASURED_SECONDS)

    @contextlib.contextmanager
    def timed(self, kind: str):
        """Add the wall seconds of the block to ``kind``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(kind, time.perf_counter() - start)

    @contextlib.contextmanager
    def remainder(self, kind: str):
        """Add to ``kind`` the block's wall seconds not already counted inside it (by `timed` or an inner
        `remainder`): e.g. a hook that generates and rewards, whose remaining time is scoring."""
        start, before = time.perf_counter(), self._measured()
        try:
            yield
        finally:
            inner = self._measured() - before
            self.add(kind, max(0.0, time.perf_counter() - start - inner))

    def start_step(self) -> None:
        self._step_start = time.perf_counter()

    def end_step(self) -> dict[str, float]:
        """Close the optimizer step: ``seconds_train`` is its wall time not spent generating, scoring or rewarding.
        Returns this step's ``appo/budget/<kind>`` values and the cumulative ``appo/budget/total_*``."""
        now = time.perf_counter()
        wall = now - self._step_start if self._step_start is not None else self._measured()
        self.pending["seconds_train"] += max(0.0, wall - self._measured())
        step = self.pending
        for k in KINDS:
            self.totals[k] += step[k]
        out = {f"{PREFIX}{k}": v for k, v in step.items()}
        out.update({f"{PREFIX}total_{k}": v for k, v in self.totals.items()})
        out.update({f"{PREFIX}total_{name}": sum(self.totals[k] for k in kinds) for name, kinds in _SUMS.items()})
        self.pending = dict.fromkeys(KINDS, 0.0)
        self._step_start = None
        return out
