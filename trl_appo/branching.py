"""The APPO step, top to bottom: score the roots, pick branch points, branch, reward, credit, build loss rows.

`APPOTrainer` calls :func:`branch_and_credit` on a batch of whole prompt groups of N root rows (TRL's batch dict,
as `_generate_and_score_completions` returns it, plus the `appo_*` columns the trainer adds) at the time the
schedule says (right after the roots, or before each optimizer step). In order:

1. **Roots' view.** Rows sorted so each prompt's roots are contiguous (`RootView`), once.
2. **Score** (paper §3.1, Branching Score): one no-grad forward of the current policy gives full-vocabulary
   entropies and log-probs; Ω against the behaviour policy (or the reference); `core.branching_score`.
3. **Points**: `core.branch_candidates` + `core.select_branch_points` (B per root, or pooled).
4. **Branch** (paper §3.2): each prefix continues through the trainer's rollout engine (same tools, stop rules,
   budget). `branch_point_token="keep"` keeps the chosen token s and resamples from s+1 (public release);
   `"resample"` keeps 0..s−1 and re-decides s itself. The shared prefix ends at `shared_end` (s or s−1).
5. **Reward** the branches with the user's reward functions, on prefix + continuation.
6. **Credit** (paper §3.3): dual-group advantages over the gathered batch (`core.dual_group_advantages`), the
   roots' per-token advantages (`core.branch_credit`, credit up to `shared_end`), this rank's slice.
7. **Branch rows for the loss** (`branch_loss="suffix"`, beyond the paper; docs/algorithm.md): each branch's own
   tokens after its prefix, with its advantage (`"dual_group"`: Â_b; `"local"`: `core.fork_advantages`), the
   copied prefix masked out of the loss, and everything TRL's loss reads for those rows (old log-probs when the
   batch is off-policy, reference log-probs when beta > 0, sampling log-probs, importance ratios).

Metrics (`appo/*`) and the branch-tree JSONL (`branch_tree_records`) are computed here from the same values.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import core

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


# ---------------------------------------------------------------------------------------------- batch plumbing


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


# ---------------------------------------------------------------------------------------------- the step


@dataclass
class RootView:
    """The roots of one batch, sorted so each prompt's N roots are contiguous (`order` undoes the sort)."""

    rows: dict[str, Any]
    order: torch.Tensor
    model_mask: torch.Tensor  # (R, C) 1 on policy tokens
    lengths: torch.Tensor  # (R,)
    prompt_ids: list[list[int]]  # unpadded
    completion_ids: list[list[int]]
    completion_model_mask: list[list[int]]
    completion_logprobs: list[list[float]] | None

    @classmethod
    def of(cls, batch: dict[str, Any]) -> RootView:
        order = torch.argsort(batch["appo_group"].cpu(), stable=True)
        rows = take_rows(batch, order)
        c_ids, c_mask, p_ids, p_mask = (rows["completion_ids"], rows["completion_mask"], rows["prompt_ids"],
                                        rows["prompt_mask"])
        model_mask = c_mask * rows["tool_mask"] if rows.get("tool_mask") is not None else c_mask
        lengths = c_mask.sum(dim=1)
        n = lengths.tolist()
        sampling = rows.get("sampling_per_token_logps")
        return cls(
            rows=rows, order=order, model_mask=model_mask, lengths=lengths,
            prompt_ids=[p_ids[i][p_mask[i].bool()].tolist() for i in range(len(n))],
            completion_ids=[c_ids[i][: n[i]].tolist() for i in range(len(n))],
            completion_model_mask=[model_mask[i][: n[i]].tolist() for i in range(len(n))],
            completion_logprobs=None if sampling is None else [sampling[i][: n[i]].tolist() for i in range(len(n))],
        )


def shared_end(position: torch.Tensor, keep_token: bool) -> torch.Tensor:
    """Last token a branch shares with its root: s when the chosen token is kept, s − 1 when it is resampled."""
    return position if keep_token else torch.where(position >= 0, position - 1, position)


def prefixes_at(view: RootView, points: core.BranchPoints, keep_token: bool):
    """The engine's start of each branch: its root's prompt ids and a `Prefix` (None: start from the prompt)."""
    from .rollout import Prefix

    prompts, prefixes = [], []
    for r, e in zip(points.root.tolist(), shared_end(points.position, keep_token).tolist(), strict=True):
        prompts.append(view.prompt_ids[r])
        if e < 0:
            prefixes.append(None)  # nothing shared: the branch starts from the prompt
        else:
            logp = view.completion_logprobs
            prefixes.append(Prefix(view.completion_ids[r][: e + 1], view.completion_model_mask[r][: e + 1],
                                   None if logp is None else logp[r][: e + 1]))
    return prompts, prefixes


@dataclass
class StepOutput:
    """What one APPO step produced for this rank (the batch's `advantages` are rewritten in place)."""

    branch_rows: dict[str, Any] | None  # loss rows of the branches (branch_loss="suffix"), else None
    records: list[dict[str, Any]]  # branch trees (only when the trainer asked for them)


@torch.no_grad()
def branch_and_credit(trainer, batch: dict[str, Any], *, for_loss: bool, want_records: bool = False) -> StepOutput:
    """One APPO step on `batch` (whole prompt groups of N roots): writes per-token root advantages into
    ``batch["advantages"]`` and returns the branches' loss rows when `for_loss` and ``branch_loss="suffix"``."""
    args = trainer.args
    mode = "train" if trainer.model.training else "eval"
    device = trainer.accelerator.device
    N, B = args.num_roots, args.num_branches
    keep_token = args.branch_point_token == "keep"
    t0 = time.perf_counter()

    # 1-2. Roots' view; score every model token with the current policy (paper §3.1).
    view = RootView.of(batch)
    rows, model_mask = view.rows, view.model_mask
    input_ids = torch.cat([rows["prompt_ids"], rows["completion_ids"]], dim=1)
    attention_mask = torch.cat([rows["prompt_mask"], rows["completion_mask"]], dim=1)
    C = rows["completion_ids"].size(1)
    logp_current, entropy = trainer._policy_logps(input_ids, attention_mask, C, compute_entropy=True)
    logp_reference = trainer._omega_reference_logps(rows, input_ids, attention_mask, C, logp_current)
    mask_f = model_mask.float()
    bs = core.branching_score(entropy.float() * mask_f, logp_current.float() * mask_f,
                              logp_reference.float() * mask_f, mask_f, gamma=args.branch_gamma,
                              omega_clip=args.omega_clip)

    # 3. Branch points.
    candidates = core.branch_candidates(
        model_mask.bool(), view.lengths, args.max_completion_length, args.min_branch_tokens,
        whitespace_mask=trainer._whitespace_table(device)[rows["completion_ids"]] & rows["completion_mask"].bool(),
    )
    pts = core.select_branch_points(
        bs, candidates, B, criterion=args.branch_criterion, pooled=args.branch_selection == "pooled", group_size=N,
        min_distance=args.branch_min_distance, generator=trainer._appo_generator, entropy=entropy,
    )
    ends = shared_end(pts.position, keep_token)
    t_score = time.perf_counter()

    # 4. Branch through the same engine (paper §3.2).
    branch_prompt_ids, prefixes = prefixes_at(view, pts, keep_token)
    branches = trainer._appo_engine.run(branch_prompt_ids, prefixes=prefixes, group_size=1)
    t_gen = time.perf_counter()

    # 5. Reward the branches on the full trajectory (prefix + continuation); gathered across ranks.
    branch_inputs = [copy.copy(rows["appo_inputs"][r]) for r in pts.root.tolist()]
    branch_prompts = [row["prompt"] for row in branch_inputs]
    completions = trainer._completions_for_rewards(branch_prompts, branches)
    branch_rewards = trainer._branch_rewards(mode, branch_inputs, branch_prompts, completions,
                                             [b.completion_ids for b in branches])
    t_reward = time.perf_counter()

    # 6. Credit (paper §3.3) over the gathered batch, then this rank's slice.
    gather = trainer.accelerator.gather
    root_rewards = gather(rows["appo_root_rewards"].to(device))
    weights = trainer.reward_weights.to(device)
    root_adv_all, branch_adv_all = core.dual_group_advantages(
        root_rewards, branch_rewards.to(device), weights, N, N * B, scale_rewards=trainer.scale_rewards,
        dual_groups=args.dual_groups, multi_objective_aggregation=trainer.multi_objective_aggregation,
    )
    rank, R, P = trainer.accelerator.process_index, len(view.prompt_ids), len(branches)
    root_adv = root_adv_all[rank * R : (rank + 1) * R]
    branch_adv = branch_adv_all[rank * P : (rank + 1) * P]
    credit = core.branch_credit(
        root_adv, branch_adv, pts.root.to(device), ends.to(device), pts.score.to(device), model_mask.to(device),
        rho=args.reward_scale_discount, lam=args.procedure_scale_weight, prefix_credit=args.prefix_credit,
        procedure_scale=args.procedure_scale,
    )
    advantages = torch.empty_like(credit)
    advantages[view.order.to(device)] = credit
    batch["advantages"] = advantages

    # 7. The branches' own tokens as loss rows (beyond the paper).
    branch_rows = None
    if for_loss and args.branch_loss == "suffix":
        if args.branch_advantage == "local":
            where = torch.stack([pts.root.to(device) + rank * R, ends.to(device)], dim=1)
            where_all = gather(where)
            suffix_adv_all = core.fork_advantages(
                core.scalar_rewards(root_rewards, weights), core.scalar_rewards(branch_rewards.to(device), weights),
                where_all[:, 0], where_all[:, 1], N, scale_rewards=trainer.scale_rewards,
            )
            suffix_adv = suffix_adv_all[rank * P : (rank + 1) * P]
        else:
            suffix_adv = branch_adv
        branch_rows = build_branch_rows(trainer, view, pts, branches, suffix_adv)

    if trainer.log_completions:
        trained = suffix_adv if branch_rows is not None else branch_adv
        log_branch_completions(trainer, view, pts, branch_prompts, completions, branch_rewards, trained, credit)

    _log_metrics(trainer, mode, view, bs, pts, branches, branch_rewards, root_rewards, weights, credit,
                 timings=(t_score - t0, t_gen - t_score, t_reward - t_gen), branch_rows=branch_rows)
    records = branch_tree_records(trainer, view, bs, pts, branches, branch_rewards, credit) if want_records else []
    return StepOutput(branch_rows=branch_rows, records=records)


def build_branch_rows(trainer, view: RootView, pts: core.BranchPoints, branches, advantages: torch.Tensor):
    """TRL loss rows for the branches: the root's prompt, the branch's whole completion, the loss mask zero on the
    copied prefix and equal to the model mask after it, and every column TRL's loss reads for the roots' rows."""
    from trl.trainer.utils import pad

    device = trainer.accelerator.device
    rows = view.rows
    pad_id = trainer._tokenizer.pad_token_id
    multiple = trainer.pad_to_multiple_of
    roots = pts.root.tolist()
    prompt_ids = rows["prompt_ids"][pts.root.to(rows["prompt_ids"].device)]
    prompt_mask = rows["prompt_mask"][pts.root.to(rows["prompt_mask"].device)]

    def right(seqs, value, dtype=None):
        return pad([torch.tensor(s, dtype=dtype) for s in seqs], padding_value=value, padding_side="right",
                   pad_to_multiple_of=multiple).to(device)

    completion_ids = right([b.completion_ids for b in branches], pad_id, torch.long)
    completion_mask = right([[1] * len(b.completion_ids) for b in branches], 0, torch.long)
    loss_mask = right([[0] * b.prefix_length + list(b.model_mask[b.prefix_length:]) for b in branches], 0, torch.long)
    if trainer.mask_truncated_completions:
        ends = [*trainer.eos_token_ids, pad_id]
        kept = torch.tensor([bool(b.completion_ids) and b.completion_ids[-1] in ends for b in branches],
                            device=device).unsqueeze(1).long()
        completion_mask, loss_mask = completion_mask * kept, loss_mask * kept
    out: dict[str, Any] = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "tool_mask": loss_mask,
        "advantages": advantages.to(device).float().unsqueeze(1).expand(-1, completion_ids.size(1)).contiguous(),
    }
    C = completion_ids.size(1)
    need_old = rows.get("old_per_token_logps") is not None
    need_ref = rows.get("ref_per_token_logps") is not None
    if need_old or need_ref:
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        if need_old:  # branches were sampled by the current weights: their behaviour log-probs are these
            out["old_per_token_logps"], _ = trainer._policy_logps(input_ids, attention_mask, C)
        if need_ref:
            out["ref_per_token_logps"] = trainer._reference_logps(input_ids, attention_mask, C)
    if rows.get("sampling_per_token_logps") is not None:
        out["sampling_per_token_logps"] = right(
            [b.logprobs if b.logprobs is not None else [0.0] * len(b.completion_ids) for b in branches], 0.0,
            torch.float32)
    ratio = rows.get("importance_sampling_ratio")
    if ratio is not None:  # vLLM's sampler ≈ the trainer's for fresh branch rows: no correction (ratio 1)
        out["importance_sampling_ratio"] = ratio.new_ones((len(roots), 1 if ratio.shape[1] == 1 else C))
    return out


# ---------------------------------------------------------------------------------------------- what is logged


def mark_logged_roots(trainer, num_local_rows: int) -> torch.Tensor:
    """TRL has just added this batch's roots (all ranks, in rank order) to its completions table: mark them as
    roots and return each local row's position in that table, so its advantage can show the trained credit later."""
    logs, procs = trainer._logs, trainer.accelerator.num_processes
    added = num_local_rows * procs
    logs["extra"]["appo_row"].extend(["root"] * added)
    logs["extra"]["appo_point"].extend([-1] * added)
    start = trainer._appo_logged_rows + trainer.accelerator.process_index * num_local_rows
    trainer._appo_logged_rows += added
    return torch.arange(start, start + num_local_rows, device=trainer.accelerator.device)


def log_branch_completions(trainer, view, pts, prompts, completions, branch_rewards, advantages, credit) -> None:
    """Add the branches to TRL's completions table (``appo_row="branch"``, ``appo_point`` = its point, its reward
    and the advantage it is trained with, or Â_b when branches only give credit), and show each root's trained
    credit (the mean of A_{i,t} over its model tokens) in the roots' ``advantage`` column."""
    from accelerate.utils import gather_object

    logs, gather = trainer._logs, trainer.accelerator.gather
    total_before = trainer._appo_logged_rows
    index = view.rows.get("appo_log_index")
    if index is not None:  # the roots' rows, where they are still in the (bounded) table
        on = view.model_mask.to(credit.device).float()
        mean_credit = (credit * on).sum(dim=1) / on.sum(dim=1).clamp(min=1)
        pairs = gather(torch.stack([index.to(credit.device).float(), mean_credit.float()], dim=1))
        offset = total_before - len(logs["advantages"])
        for i, value in pairs.tolist():
            pos = int(i) - offset
            if 0 <= pos < len(logs["advantages"]):
                logs["advantages"][pos] = value
    g_prompts, g_completions = gather_object(list(prompts)), gather_object(list(completions))
    n = len(g_prompts)
    logs["prompt"].extend(g_prompts)
    logs["completion"].extend(g_completions)
    for i, name in enumerate(trainer.reward_func_names):
        logs["rewards"][name].extend(branch_rewards[:, i].tolist())
    logs["advantages"].extend(gather(advantages.float()).tolist())
    points = gather(pts.position.to(trainer.accelerator.device)).tolist()
    for column, values in logs["extra"].items():
        if column == "appo_row":
            values.extend(["branch"] * n)
        elif column == "appo_point":
            values.extend(points)
        else:  # a column the user's reward functions log for roots (branch values are kept out of the table)
            values.extend([None] * n)
    trainer._appo_logged_rows += n


def _near_tool(mm: torch.Tensor, r: int, s: int, length: int) -> bool:
    lo, hi = max(0, s - 3), min(mm.shape[1], s + 4)
    return bool((mm[r, lo:hi] == 0).any() and lo < length)


def _log_metrics(trainer, mode, view, bs, pts, branches, branch_rewards, root_rewards, weights, credit, timings,
                 branch_rows):
    m = trainer._metrics[mode]
    gather = trainer.accelerator.gather
    device = trainer.accelerator.device
    pts = core.BranchPoints(*(x.cpu() for x in pts))
    R = len(view.completion_ids)
    valid = pts.position >= 0
    lengths = torch.tensor([max(len(c), 1) for c in view.completion_ids]).float()
    rel = (pts.position.float() / lengths[pts.root]).masked_fill(~valid, float("nan"))
    mm = view.model_mask.cpu()
    near_tool = torch.tensor([s >= 0 and _near_tool(mm, r, s, int(lengths[r]))
                              for r, s in zip(pts.root.tolist(), pts.position.tolist(), strict=True)], dtype=torch.bool)
    nan = float("nan")
    local = torch.tensor(
        [
            len(branches) / max(R, 1),
            torch.nanmean(rel).item() if valid.any() else nan,
            near_tool[valid].float().mean().item() if valid.any() else nan,
            (pts.fallback == 0).float().mean().item() if len(pts.fallback) else nan,
            bs.degenerate.float().mean().item() if bs.degenerate.numel() else nan,
            pts.score.abs()[valid].mean().item() if valid.any() else nan,
            sum(sum(b.model_mask[b.prefix_length:]) for b in branches),
            float(mm.sum()),
            (pts.fallback == 4).float().mean().item() if len(pts.fallback) else nan,
            (pts.fallback == 5).float().mean().item() if len(pts.fallback) else nan,
            float(loss_tokens(branch_rows)) if branch_rows is not None else 0.0,
        ],
        device=device,
    )
    g = gather(local.unsqueeze(0))
    names = ["branch_points_per_root", "branch_position_rel", "branch_near_tool_frac", "branch_strict_frac",
             "omega_degenerate_frac", "bs_abs_mean"]
    if not core.uses_omega(trainer.args.branch_criterion):  # Ω and BS are not computed for these criteria
        names = names[:3]
    for i, name in enumerate(names):
        m[f"appo/{name}"].append(torch.nanmean(g[:, i]).item())
    m["appo/branch_decoded_tokens"].append(g[:, 6].sum().item())
    m["appo/root_model_tokens"].append(g[:, 7].sum().item())
    # Duplicated points only when a root has fewer eligible tokens than B, and this is logged (paper §3.1 read).
    m["appo/branch_duplicate_frac"].append(torch.nanmean(g[:, 8]).item())
    m["appo/branch_no_candidate_frac"].append(torch.nanmean(g[:, 9]).item())
    if branch_rows is not None:
        m["appo/branch_loss_tokens"].append(g[:, 10].sum().item())
    br = (branch_rewards.to(device) * weights.unsqueeze(0)).nansum(dim=1)
    rr = (root_rewards.to(device) * weights.unsqueeze(0)).nansum(dim=1)
    m["appo/branch_reward"].append(br.mean().item())
    m["appo/root_reward"].append(rr.mean().item())
    on = view.model_mask.bool().to(credit.device)
    prefix_mag = credit.abs()[on].mean() if on.any() else credit.new_zeros(())
    m["appo/credit_abs_mean"].append(gather(prefix_mag.reshape(1)).mean().item())
    for name, secs in zip(("score", "generate", "reward"), timings, strict=True):
        m[f"appo/seconds_{name}_branches"].append(secs)
    trainer._log_rollout_metrics(branches, mode, prefix="appo/branch")


def branch_tree_records(trainer, view: RootView, bs, pts, branches, branch_rewards, credit) -> list[dict[str, Any]]:
    """One JSON-able record per root: its tokens, mask, scores, reward, the per-token advantage it is trained with
    (``credit``: §3's A_{i,t}, before the loss-time future-KL weight) and its branches (`trl-appo inspect`)."""
    tok = trainer._tokenizer
    weights = trainer.reward_weights.cpu()
    root_rewards = (view.rows["appo_root_rewards"].cpu() * weights).nansum(dim=1)
    br = (branch_rewards[: len(branches)].cpu() * weights).nansum(dim=1)
    out = []
    for r, ids in enumerate(view.completion_ids):
        sel = (pts.root == r).nonzero().flatten().tolist()
        n = len(ids)
        row = view.rows["appo_inputs"][r]
        gold = next((row[k] for k in ("ground_truth", "solution", "answer") if row.get(k) is not None), None)
        out.append({
            "step": trainer.state.global_step,
            "group": int(view.rows["appo_group"][r]),
            "question": tok.decode(view.prompt_ids[r], skip_special_tokens=True).strip(),
            "answer": gold if gold is None or isinstance(gold, (str, int, float)) else str(gold),
            "tokens": tok.convert_ids_to_tokens(ids),
            "token_text": [tok.decode([t]) for t in ids],
            "model_mask": view.completion_model_mask[r],
            "entropy_z": bs.z_entropy[r, :n].tolist(),
            "omega_z": bs.z_omega[r, :n].tolist(),
            "bs": bs.scores[r, :n].tolist(),
            "degenerate": bool(bs.degenerate[r]),
            "point_token": trainer.args.branch_point_token,  # "keep": the branch kept token s; "resample": re-decided it
            "reward": float(root_rewards[r]),
            "credit": credit[r, :n].tolist(),
            "branches": [
                {"position": int(pts.position[j]), "strict": bool(pts.strict[j]), "fallback": int(pts.fallback[j]),
                 "score": float(pts.score[j]), "reward": float(br[j]),
                 "text": tok.decode(branches[j].completion_ids[branches[j].prefix_length:])}
                for j in sel
            ],
        })
    return out


def write_branch_trees(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
