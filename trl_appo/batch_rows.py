"""Rows of TRL's batch dict (what `_generate_and_score_completions` returns and `_compute_loss` reads).

Concatenate, select, append (re-padded) and split per-row columns, and count the loss's tokens. Used by the
trainer to carry the APPO step's branch rows into TRL's loss, and by the step to build its roots' view.
"""

from __future__ import annotations

from typing import Any

import torch

# Columns of TRL's batch dict that are per-row tensors padded on the right along the completion axis, and the
# value their padding takes.
_COMPLETION_COLUMNS = {
    "completion_ids": None,  # the pad token id
    "completion_mask": 0,
    "tool_mask": 0,
    "advantages": 0.0,
    "old_per_token_logps": 0.0,
    "ref_per_token_logps": 0.0,
    "sampling_per_token_logps": 0.0,
    "importance_sampling_ratio": 1.0,
}
_PROMPT_COLUMNS = {"prompt_ids": None, "prompt_mask": 0}



def cat_rows(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate per-row values of TRL batch dicts of equal widths (tensors on dim 0, lists by extension)."""
    out = {}
    for key, first in chunks[0].items():
        if first is None:
            out[key] = None
        elif isinstance(first, torch.Tensor) and first.ndim == 0:
            out[key] = first
        elif isinstance(first, torch.Tensor):
            out[key] = torch.cat([c[key] for c in chunks], dim=0)
        else:
            out[key] = [x for c in chunks for x in c[key]]
    return out


def take_rows(batch: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """Select rows of a TRL batch dict (0-d tensors and None pass through)."""
    out = {}
    for key, val in batch.items():
        if val is None or (isinstance(val, torch.Tensor) and val.ndim == 0):
            out[key] = val
        elif isinstance(val, torch.Tensor):
            out[key] = val[index.to(val.device)]
        else:
            out[key] = [val[i] for i in index.tolist()]
    return out


def _pad_to(t: torch.Tensor, width: int, value, side: str) -> torch.Tensor:
    if t.ndim < 2 or t.shape[1] >= width:
        return t
    fill = t.new_full((t.shape[0], width - t.shape[1], *t.shape[2:]), value)
    return torch.cat([fill, t] if side == "left" else [t, fill], dim=1)


def append_rows(batch: dict[str, Any], extra: dict[str, Any], pad_token_id: int) -> dict[str, Any]:
    """Loss rows of `batch` followed by the rows of `extra`, re-padded to common widths.

    Only the columns TRL's loss reads are kept (the trainer's `appo_*` columns describe roots only); 0-d tensors
    (``num_items_in_batch``) come from `batch`. A column `batch` has and `extra` lacks raises: a loss row must
    never silently miss, say, its old log-probs.
    """
    out = {}
    widths = {}
    for cols, side in ((_PROMPT_COLUMNS, "left"), (_COMPLETION_COLUMNS, "right")):
        present = [k for k in cols if batch.get(k) is not None]
        w = max([batch[k].shape[1] for k in present if batch[k].ndim > 1 and batch[k].shape[1] > 1]
                + [extra[k].shape[1] for k in present if k in extra and extra[k].ndim > 1 and extra[k].shape[1] > 1]
                + [1])
        widths[side] = w
        for k in present:
            if k not in extra:
                raise KeyError(f"branch rows lack the loss column {k!r}")
            value = pad_token_id if cols[k] is None else cols[k]
            a, b = batch[k], extra[k].to(batch[k].device, batch[k].dtype)
            if a.ndim > 1 and a.shape[1] == 1 and b.ndim > 1 and b.shape[1] == 1:  # sequence-level ratios (B, 1)
                out[k] = torch.cat([a, b])
                continue
            out[k] = torch.cat([_pad_to(a, w, value, side), _pad_to(b, w, value, side)])
    for k, v in batch.items():
        if k not in out and isinstance(v, torch.Tensor) and v.ndim == 0:
            out[k] = v
    return out


def split_rows(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """Split every per-row column into `parts` contiguous pieces of equal size (0-d tensors shared)."""
    n = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim > 0)
    size = n // parts
    return [take_rows(batch, torch.arange(i * size, (i + 1) * size)) for i in range(parts)]


def loss_tokens(batch: dict[str, Any]) -> torch.Tensor:
    """Number of tokens the loss counts in `batch` (completion mask × tool mask), a 0-d tensor."""
    mask = batch["completion_mask"]
    if batch.get("tool_mask") is not None:
        mask = mask * batch["tool_mask"]
    return mask.sum()


ROW_MEAN_LOSSES = ("grpo", "sapo", "dr_grpo", "luspo")
"""TRL loss types normalised by the micro-batch's rows (a mean over sequences, or rows × max_completion_length)."""
TOKEN_MEAN_LOSSES = ("bnpo",)
"""TRL loss types normalised by the micro-batch's loss tokens."""
ITEM_COUNT_LOSSES = ("dapo", "cispo", "vespo")
"""TRL loss types normalised by `num_items_in_batch` (the generation batch's loss tokens): no rescaling needed."""


def loss_sub_batches(batch: dict[str, Any], max_rows: int, loss_type: str) -> list[dict[str, Any]]:
    """Split a loss micro-batch into contiguous sub-batches of at most `max_rows` rows, each with the 0-d column
    ``appo_loss_scale``: the factor that makes the sum of the sub-batches' TRL losses (and gradients) equal the
    whole micro-batch's, for TRL's `loss_type` normaliser (its share of the rows for row means, of the loss tokens
    for ``bnpo``, 1 for the ``num_items_in_batch`` losses). A batch of at most `max_rows` rows comes back whole,
    without the column."""
    n = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim > 0)
    if n <= max_rows:
        return [batch]
    if loss_type not in (*ROW_MEAN_LOSSES, *TOKEN_MEAN_LOSSES, *ITEM_COUNT_LOSSES):
        raise ValueError(f"loss_type={loss_type!r}: no known normaliser to split a micro-batch of {n} rows into "
                         f"forwards of at most {max_rows}; use rollout_budget='rollouts'.")
    total_tokens = loss_tokens(batch).float().clamp(min=1.0)
    parts = []
    for index in torch.arange(n).tensor_split(-(-n // max_rows)):
        part = take_rows(batch, index)
        if loss_type in ROW_MEAN_LOSSES:
            scale = torch.tensor(len(index) / n)
        elif loss_type in TOKEN_MEAN_LOSSES:
            scale = loss_tokens(part).float().cpu() / total_tokens.cpu()
        else:
            scale = torch.tensor(1.0)
        part["appo_loss_scale"] = scale.to(batch["completion_mask"].device)
        parts.append(part)
    return parts
