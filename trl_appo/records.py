"""The branch-tree record: one JSON line per root of an APPO step (``APPOConfig(log_branch_trees=True)``).

This module owns the format: the keys a record must have (``REQUIRED_KEYS``), how one is built from the step's
tensors (``build_records``), written (``write_branch_trees``) and recognised (``is_record``), and the one
"near a tool call" rule (``near_tool``) that the trainer's ``appo/branch_near_tool_frac``, the demo's summary and
`trl-appo inspect` share. `trl_appo.viz` reads and draws records; it imports nothing else from here.

A record::

    step, group                    optimizer step, prompt group within the batch
    question, answer               decoded prompt, the row's gold answer (ground_truth / solution / answer)
    tokens, token_text             the root's completion tokens (vocabulary pieces, decoded one by one)
    model_mask                     1 on policy tokens, 0 on tool output / template glue (unpadded)
    entropy_z, omega_z, bs         §1 z-scored entropy, z-scored Ω, Branching Score per token
    degenerate                     Ω constant over the row (ranked by entropy alone)
    point_token                    "keep" (a branch kept token s) or "resample" (re-decided it)
    reward                         the root's weighted reward
    credit                         §3 per-token advantage A_{i,t} it is trained with (before the future-KL weight)
    branches                       [{position, strict, fallback, score, reward, text}] of its branch points
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["NEAR_TOOL_WINDOW", "REQUIRED_KEYS", "build_records", "is_record", "near_tool", "write_branch_trees"]

REQUIRED_KEYS = ("tokens", "model_mask", "bs", "branches")
"""Keys every branch-tree record has (readers may rely on these; the others are optional for them)."""

NEAR_TOOL_WINDOW = 3
"""A branch point is near a tool call when a tool-output token lies within this many tokens of it."""


def near_tool(model_mask: Sequence[int], position: int, window: int = NEAR_TOOL_WINDOW) -> bool:
    """Whether a non-model token (tool output, template glue) lies within `window` tokens of `position`.

    `model_mask` is the completion's own mask, unpadded (padding beyond the completion is no tool output).
    A position of −1 (a branch that shares no prefix) is never near a tool.
    """
    if position < 0:
        return False
    lo, hi = max(0, position - window), min(len(model_mask), position + window + 1)
    return any(int(m) == 0 for m in model_mask[lo:hi])


def is_record(record: Any) -> bool:
    """A branch-tree record: a JSON object with every key of ``REQUIRED_KEYS``."""
    return isinstance(record, Mapping) and all(k in record for k in REQUIRED_KEYS)


def build_records(*, tokenizer, step: int, point_token: str, prompt_ids: Sequence[Sequence[int]],
                  completion_ids: Sequence[Sequence[int]], model_masks: Sequence[Sequence[int]],
                  groups: Sequence[int], inputs: Sequence[Mapping[str, Any]], scores, root_rewards,
                  points, branch_rewards, branch_texts: Sequence[str], credit) -> list[dict[str, Any]]:
    """One record per root (see the module docstring).

    Args:
        prompt_ids, completion_ids, model_masks: per root, unpadded. groups: each root's prompt group.
        inputs: each root's dataset row (for its gold answer).
        scores: ``core.BranchingScore`` of the roots, (R, T) tensors. root_rewards: (R,) weighted rewards.
        points: ``core.BranchPoints`` (P,). branch_rewards: (P,) weighted rewards. branch_texts: each branch's
            decoded continuation (after its prefix). credit: (R, T) per-token advantages.
    """
    out = []
    for r, ids in enumerate(completion_ids):
        sel = (points.root == r).nonzero().flatten().tolist()
        n = len(ids)
        row = inputs[r]
        gold = next((row[k] for k in ("ground_truth", "solution", "answer") if row.get(k) is not None), None)
        out.append({
            "step": step,
            "group": int(groups[r]),
            "question": tokenizer.decode(prompt_ids[r], skip_special_tokens=True).strip(),
            "answer": gold if gold is None or isinstance(gold, (str, int, float)) else str(gold),
            "tokens": tokenizer.convert_ids_to_tokens(ids),
            "token_text": [tokenizer.decode([t]) for t in ids],
            "model_mask": list(model_masks[r]),
            "entropy_z": scores.z_entropy[r, :n].tolist(),
            "omega_z": scores.z_omega[r, :n].tolist(),
            "bs": scores.scores[r, :n].tolist(),
            "degenerate": bool(scores.degenerate[r]),
            "point_token": point_token,
            "reward": float(root_rewards[r]),
            "credit": credit[r, :n].tolist(),
            "branches": [
                {"position": int(points.position[j]), "strict": bool(points.strict[j]),
                 "fallback": int(points.fallback[j]), "score": float(points.score[j]),
                 "reward": float(branch_rewards[j]), "text": branch_texts[j]}
                for j in sel
            ],
        })
    return out


def write_branch_trees(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Write records as JSON lines to `path` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
