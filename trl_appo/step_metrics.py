"""The APPO step's metrics (``appo/*``): computed from the step's own values, summed or averaged over all ranks.

Returned as ``{name: value}``; the trainer appends them to TRL's metrics (one value per step, averaged by TRL at
logging time). ``gather`` is the collective of the run (``accelerator.gather``): every rank calls these functions
in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import core
from .batch_rows import loss_tokens
from .records import near_tool

Gather = Callable[[torch.Tensor], torch.Tensor]


def rollout_metrics(rollouts: Sequence, gather: Gather, device, prefix: str, with_tools: bool) -> dict[str, float]:
    """Tool use and decoded tokens of `rollouts` (a branch's copied prefix is not decoded), summed over all ranks.

    ``prefix`` is ``"appo/root"`` or ``"appo/branch"``; with tools, TRL's own ``tools/*`` names are filled too
    (``<prefix>/tools/*`` for branches). Empty when no rank has a rollout.
    """
    local = torch.tensor(
        [
            float(len(rollouts)),
            float(sum(r.tool_stats.calls for r in rollouts)),
            float(sum(r.tool_stats.failures for r in rollouts)),
            float(sum(sum(r.model_mask[r.prefix_length :]) for r in rollouts)),
        ],
        device=device,
    )
    n, calls, fails, decoded = gather(local.unsqueeze(0)).sum(dim=0).tolist()
    if n == 0:
        return {}
    out = {}
    if with_tools:  # TRL's names and meaning, here per rollout group (roots; branches add theirs)
        trl_name = "tools" if prefix == "appo/root" else f"{prefix}/tools"
        out[f"{trl_name}/call_frequency"] = calls / n
        out[f"{trl_name}/failure_frequency"] = fails / calls if calls else 0.0
    out[f"{prefix}/tool_calls_per_rollout"] = calls / n
    out[f"{prefix}/tool_failure_rate"] = fails / calls if calls else 0.0
    out[f"{prefix}/decoded_tokens"] = decoded
    return out


def late_fork_frac(forks: Sequence, gather: Gather, device) -> float:
    """Share of online forks (`rollout.Fork`, all ranks) that were late: their root ended before their tool result, so
    they forked at its last one and decoded in generate calls of their own (``appo/branch_late_frac``)."""
    local = torch.tensor([[float(sum(f.late for f in forks)), float(len(forks))]], device=device)
    late, total = gather(local).sum(dim=0).tolist()
    return late / total if total else 0.0


def step_metrics(*, view, scores, points, branches, branch_rewards, root_rewards, weights, credit, timings,
                 branch_rows, uses_omega: bool, gather: Gather, device, hinted: bool = False) -> dict[str, float]:
    """The step's ``appo/*`` metrics.

    Args:
        view: the step's `RootView` (this rank's roots). scores: ``core.BranchingScore``. points: ``BranchPoints``.
        branches: this rank's branch rollouts. branch_rewards: (P_all, F) and root_rewards: (R_all, F), gathered.
        weights: (F,) reward weights. credit: (R, T) per-token advantages. timings: seconds (score, generate,
        reward). branch_rows: the branch loss rows or None. uses_omega: the criterion reads Ω (else Ω/BS metrics
        are left out: they are not computed). hinted: the criterion reads the roots' context (``needs_context``),
        so the share of points it placed by a hint (code 7) is logged.
    """
    out: dict[str, float] = {}
    pts = core.BranchPoints(*(x.cpu() for x in points))
    R = len(view.completion_ids)
    valid = pts.position >= 0
    lengths = torch.tensor([max(len(c), 1) for c in view.completion_ids]).float()
    rel = (pts.position.float() / lengths[pts.root]).masked_fill(~valid, float("nan"))
    mm = view.model_mask.cpu()
    near = torch.tensor([near_tool(view.completion_model_mask[r], s)
                         for r, s in zip(pts.root.tolist(), pts.position.tolist(), strict=True)], dtype=torch.bool)
    nan = float("nan")
    local = torch.tensor(
        [
            len(branches) / max(R, 1),
            torch.nanmean(rel).item() if valid.any() else nan,
            near[valid].float().mean().item() if valid.any() else nan,
            (pts.fallback == 0).float().mean().item() if len(pts.fallback) else nan,
            scores.degenerate.float().mean().item() if scores.degenerate.numel() else nan,
            pts.score.abs()[valid].mean().item() if valid.any() else nan,
            sum(sum(b.model_mask[b.prefix_length:]) for b in branches),
            float(mm.sum()),
            (pts.fallback == 4).float().mean().item() if len(pts.fallback) else nan,
            (pts.fallback == 5).float().mean().item() if len(pts.fallback) else nan,
            float(loss_tokens(branch_rows)) if branch_rows is not None else 0.0,
            (pts.fallback == 7).float().mean().item() if len(pts.fallback) else nan,
        ],
        device=device,
    )
    g = gather(local.unsqueeze(0))
    names = ["branch_points_per_root", "branch_position_rel", "branch_near_tool_frac", "branch_strict_frac",
             "omega_degenerate_frac", "bs_abs_mean"]
    if not uses_omega:  # Ω and BS are not computed for these criteria
        names = names[:3]
    for i, name in enumerate(names):
        out[f"appo/{name}"] = torch.nanmean(g[:, i]).item()
    out["appo/branch_decoded_tokens"] = g[:, 6].sum().item()
    out["appo/root_model_tokens"] = g[:, 7].sum().item()
    # Duplicated points only when a root has fewer eligible tokens than B, and this is logged (paper §3.1 read).
    out["appo/branch_duplicate_frac"] = torch.nanmean(g[:, 8]).item()
    out["appo/branch_no_candidate_frac"] = torch.nanmean(g[:, 9]).item()
    if branch_rows is not None:
        out["appo/branch_loss_tokens"] = g[:, 10].sum().item()
    if hinted:  # a criterion that knows where to branch (core.hint_ranking): how many points it named
        out["appo/branch_hint_frac"] = torch.nanmean(g[:, 11]).item()
    br = (branch_rewards.to(device) * weights.unsqueeze(0)).nansum(dim=1)
    rr = (root_rewards.to(device) * weights.unsqueeze(0)).nansum(dim=1)
    out["appo/branch_reward"] = br.mean().item()
    out["appo/root_reward"] = rr.mean().item()
    on = view.model_mask.bool().to(credit.device)
    prefix_mag = credit.abs()[on].mean() if on.any() else credit.new_zeros(())
    out["appo/credit_abs_mean"] = gather(prefix_mag.reshape(1)).mean().item()
    for name, secs in zip(("score", "generate", "reward"), timings, strict=True):
        out[f"appo/seconds_{name}_branches"] = secs
    return out


def budget_metrics(roots: dict, branches: Sequence, *, trained_branches: bool, num_roots: int, gather: Gather,
                   device) -> dict[str, float]:
    """What the step's trees cost and train (docs/algorithm.md §9, budget-matched trees), over all ranks.

    ``appo/leaves_per_prompt``: rows trained per prompt (roots, plus branches when they are loss rows).
    ``appo/branch_cost_fraction``: decoded model tokens of a branch over a root's (means), the measured c of
    `expected_branch_cost`. ``appo/rollout_budget_spent``: decoded model tokens per prompt in full rollouts' worth
    (mean root tokens), M when rollout_budget='tokens' plans right.

    Args:
        roots: the step's batch of root rows (TRL's batch dict). branches: this rank's branch rollouts.
        trained_branches: the branches are loss rows. num_roots: N.
    """
    mask = roots["completion_mask"] * roots["tool_mask"] if roots.get("tool_mask") is not None else (
        roots["completion_mask"])
    local = torch.tensor([float(mask.shape[0]), float(mask.sum()), float(len(branches)),
                          float(sum(sum(b.model_mask[b.prefix_length:]) for b in branches))], device=device)
    n_roots, root_tokens, n_branches, branch_tokens = gather(local.unsqueeze(0)).sum(dim=0).tolist()
    if n_roots == 0:
        return {}
    prompts = n_roots / num_roots
    per_root = root_tokens / n_roots
    out = {"appo/leaves_per_prompt": (n_roots + (n_branches if trained_branches else 0)) / prompts}
    if per_root > 0:
        out["appo/rollout_budget_spent"] = (root_tokens + branch_tokens) / per_root / prompts
        if n_branches:
            out["appo/branch_cost_fraction"] = branch_tokens / n_branches / per_root
    return out


def agreement_metrics(root_rewards: torch.Tensor, branch_rewards: torch.Tensor, weights: torch.Tensor,
                      branch_prompt: torch.Tensor, num_roots: int) -> dict[str, float]:
    """Fraction of prompt groups whose scalar rewards all agree (GRPO learns nothing from them), over the roots
    (``appo/groups_all_equal_before``) and over roots and branches (``appo/groups_all_equal_after``).

    root_rewards: (R_all, F) and branch_rewards: (P_all, F), gathered; branch_prompt: (P_all,) each branch's prompt.
    """
    device = root_rewards.device
    rr = (root_rewards * weights.unsqueeze(0)).nansum(dim=1)
    br = (branch_rewards.to(device) * weights.unsqueeze(0)).nansum(dim=1)
    G = rr.shape[0] // num_roots
    root_prompt = torch.arange(rr.shape[0], device=device) // num_roots
    before = core.groups_all_equal(rr, root_prompt, G)
    after = core.groups_all_equal(torch.cat([rr, br]), torch.cat([root_prompt, branch_prompt.to(device).long()]), G)
    return {"appo/groups_all_equal_before": before.float().mean().item() if G else 0.0,
            "appo/groups_all_equal_after": after.float().mean().item() if G else 0.0}
