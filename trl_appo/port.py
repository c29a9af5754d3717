"""`StepPort`: everything the APPO step (`trl_appo.branching.branch_and_credit`) needs from whoever runs it.

The step reads no trainer attribute and calls no trainer method: it talks to a port. `APPOTrainer` implements
it once (`trl_appo.trainer.TrainerPort`); a test implements it with plain tensors and no model
(tests/test_branching.py). Shapes: R roots on this rank, C completion tokens, P branches on this rank, F reward
functions; ``*_all`` = gathered over ranks in rank order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch


class StepPort(Protocol):
    """What the step needs: forwards of the policy and the references, the rollout engine, the reward functions,
    the collectives, and a few facts about the tokenizer."""

    device: torch.device
    rank: int  # this process's index: its rows are [rank·R, (rank+1)·R) of a gathered tensor
    pad_token_id: int
    eos_token_ids: Sequence[int]  # a branch ending with one of these (or pad) was not truncated
    reward_weights: torch.Tensor  # (F,)
    generator: torch.Generator  # the "random" criterion's draws (its state is checkpointed by the trainer)
    global_step: int  # optimizer steps so far (stamped on branch-tree records)
    tokenizer: Any  # decodes branch-tree records

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate `tensor` of every rank along dim 0 (collective: every rank calls it in the same order)."""

    def policy_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                     compute_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """No-grad (rows, C) log-probs of the sampled tokens under the current policy, and full-vocabulary
        entropies when asked."""

    def reference_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        logits_to_keep: int) -> torch.Tensor:
        """No-grad (rows, C) log-probs under the reference model (beta > 0 or a PEFT base)."""

    def omega_reference_logps(self, rows: Mapping[str, Any], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              logits_to_keep: int, logp_current: torch.Tensor) -> torch.Tensor:
        """(R, C) log π_ref_Ω of the roots' tokens (paper §3.1): the behaviour policy's, the reference model's, or
        `logp_current` itself when Ω is degenerate by construction (the policy has not moved since sampling)."""

    def whitespace_table(self) -> torch.Tensor:
        """(V,) bool on `device`: the token decodes to whitespace only (never a branch point)."""

    def fork_environments(self, inputs: list[dict]) -> AbstractContextManager[tuple[list | None, list]]:
        """A context for the branches of these roots' input rows (one per branch): yields (sessions, prompts).

        With TRL environments (`environment_factory`): one freshly reset instance per branch, as its root's was
        (`trl_appo.rollout.environments`), as the engine's session keys, and the prompts as TRL built them for
        those instances (`reset`'s observation appended); `branch_rewards` inside the block reads these
        instances. Without: (None, each row's prompt)."""

    def rollout(self, prompt_ids: list[list[int]], prefixes: list, sessions: list | None = None) -> list:
        """Continue each prefix (`trl_appo.rollout.Prefix`, or None: from the prompt) through the training
        rollout engine, one row each, on `sessions` (from `fork_environments`; None: a fresh one per row); returns
        `trl_appo.rollout.Rollout` objects. A prefix's executed tool calls are replayed into its session."""

    def branch_rewards(self, inputs: list[dict], prompts: list, completions: list,
                       completion_ids: list[list[int]]) -> torch.Tensor:
        """(P_all, F) rewards of the branch rows from the user's reward functions, gathered over ranks."""
