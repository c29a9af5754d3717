"""§3 Credit: the per-token root advantage ``branch_credit``, and the branch advantage rules (``BRANCH_ADVANTAGES``).

docs/algorithm.md §3 (prefix credit from branches × procedure-level scaling) and §9 (the advantage of a branch's
own loss row with ``branch_loss="suffix"``: ``"dual_group"`` Â_b, or ``"local"`` ``fork_advantages``). Changing
the credit formula means changing this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import (
    _as_bool_mask,
    _check_floating,
    _check_gamma,
    _check_same_device,
    _check_tensor,
    _compute_dtype,
    _lookup,
)
from .advantages import _nanstd, scalar_rewards
from .registry import SCALE_REWARDS, register_branch_advantage
from .scan import _suffix_scan


def branch_credit(
    root_advantages: torch.Tensor,
    branch_advantages: torch.Tensor,
    branch_root: torch.Tensor,
    branch_position: torch.Tensor,
    branch_score: torch.Tensor,
    model_mask: torch.Tensor,
    *,
    rho: float = 0.9,
    lam: float = 1.0,
    prefix_credit: bool = True,
    procedure_scale: bool = True,
) -> torch.Tensor:
    """Per-token advantage of the roots, docs/algorithm.md §3.

    A_{i,t} = (Â_i + mean_{b∈C_{i,t}} Â_b) · S_{i,t}, C_{i,t} = branches of root i with s_b ≥ t (s_b = −1 never
    qualifies: such a branch shares no prefix), S_{i,t} = mean_{b∈C_{i,t}} (1 + λ · BS_b⁺ / max BS⁺ · ρ^{s_b−t}),
    S = 1 when C_{i,t} is empty; max BS⁺ over all given points with s_b ≥ 0 (the term is 0 when it is 0).
    Distances s_b − t count every token, tool tokens included. Duplicated points count once per branch rollout.

    Vectorised as suffix sums over tokens: scatter Â_b, 1 and BS_b⁺/max BS⁺ to (root, s_b), then reverse cumulative
    sums (the last one discounted by ρ with ``discounted_suffix_sum``). O(R·T + P) time and memory — no (R, P, T)
    tensor.

    Args:
        root_advantages: (R,) floating Â_i.
        branch_advantages: (P,) floating Â_b.
        branch_root: (P,) integer root row of each branch.
        branch_position: (P,) integer branch point s_b in [−1, T).
        branch_score: (P,) floating BS_b at the point.
        model_mask: (R, T) bool/0-1; the output is 0 off it.
        rho: ρ in [0, 1] (``reward_scale_discount``, 0.9). lam: λ (``procedure_scale_weight``, 1.0).
        prefix_credit: False drops the mean_b Â_b term. procedure_scale: False sets S = 1.

    Returns:
        (R, T) in float32 (float64 if an input is float64), zero off ``model_mask``.
    """
    rho = _check_credit_inputs(root_advantages, branch_advantages, branch_root, branch_position, branch_score,
                               model_mask, rho)
    R, T = model_mask.shape
    on = _as_bool_mask("model_mask", model_mask)
    dtype = _compute_dtype(root_advantages, branch_advantages, branch_score)
    device = model_mask.device
    zero = torch.zeros((), dtype=dtype, device=device)

    adv = root_advantages.to(dtype)[:, None].expand(R, T)
    shared = branch_position >= 0
    root_ix = branch_root[shared]
    pos_ix = branch_position[shared]
    flat_ix = root_ix * T + pos_ix

    def scatter(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(R * T, dtype=dtype, device=device)
        return out.index_add_(0, flat_ix, values.to(dtype)).view(R, T)

    count = scatter(torch.ones_like(pos_ix, dtype=dtype))
    count = count.flip(-1).cumsum(-1).flip(-1)  # |C_{i,t}| (exact: small integers)
    has = count > 0
    safe = count.clamp(min=1)
    if prefix_credit:
        total = scatter(branch_advantages[shared]).flip(-1).cumsum(-1).flip(-1)
        adv = adv + torch.where(has, total / safe, zero)
    if procedure_scale:
        pos_score = branch_score[shared].to(dtype).clamp(min=0)
        max_score = pos_score.max() if pos_score.numel() else zero
        if float(max_score) > 0:
            w = scatter(pos_score / max_score)
            discounted = _suffix_scan(w, rho)  # Σ_{b∈C} w_b ρ^{s_b − t}
            adv = adv * torch.where(has, 1.0 + lam * discounted / safe, torch.ones((), dtype=dtype, device=device))
    return torch.where(on, adv, zero)


def _check_credit_inputs(root_advantages, branch_advantages, branch_root, branch_position, branch_score,
                         model_mask, rho) -> float:
    """Every check of ``branch_credit``; returns ρ as a float."""
    _check_tensor("root_advantages", root_advantages, 1)
    for name, t in (
        ("branch_advantages", branch_advantages),
        ("branch_root", branch_root),
        ("branch_position", branch_position),
        ("branch_score", branch_score),
    ):
        _check_tensor(name, t, 1)
        if t.shape != branch_advantages.shape:
            raise ValueError(
                f"`{name}` has shape {tuple(t.shape)} but `branch_advantages` has {tuple(branch_advantages.shape)}."
            )
    _check_tensor("model_mask", model_mask, 2)
    _check_same_device(
        root_advantages=root_advantages,
        branch_advantages=branch_advantages,
        branch_root=branch_root,
        branch_position=branch_position,
        branch_score=branch_score,
        model_mask=model_mask,
    )
    _check_floating(root_advantages=root_advantages, branch_advantages=branch_advantages, branch_score=branch_score)
    for name, t in (("branch_root", branch_root), ("branch_position", branch_position)):
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"`{name}` must be an integer tensor, got {t.dtype}.")
    R, T = model_mask.shape
    if root_advantages.shape[0] != R:
        raise ValueError(f"`root_advantages` has {root_advantages.shape[0]} rows but `model_mask` has {R}.")
    rho = _check_gamma("rho", rho)
    P = branch_advantages.shape[0]
    _as_bool_mask("model_mask", model_mask)  # a mask of another dtype raises here
    if model_mask.device.type != "meta" and P:
        if bool(((branch_root < 0) | (branch_root >= R)).any()):
            raise ValueError(f"`branch_root` must index rows in [0, {R}), got {branch_root.tolist()}.")
        if bool(((branch_position < -1) | (branch_position >= T)).any()):
            raise ValueError(f"`branch_position` must be in [-1, {T}), got {branch_position.tolist()}.")
        for name, t in (("branch_advantages", branch_advantages), ("branch_score", branch_score)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"`{name}` has non-finite values; compute it with dual_group_advantages/branching_score.")
    if model_mask.device.type != "meta" and R and not bool(torch.isfinite(root_advantages).all()):
        raise ValueError("`root_advantages` has non-finite values; compute it with dual_group_advantages.")
    return rho


def fork_advantages(
    root_rewards: torch.Tensor,
    branch_rewards: torch.Tensor,
    branch_root: torch.Tensor,
    branch_shared_end: torch.Tensor,
    num_roots: int,
    *,
    scale_rewards: str = "group",
) -> torch.Tensor:
    """Local advantage of each branch: the value of its fork, R_b − V(fork) (docs/algorithm.md, "branch loss").

    Not in the paper (its branches get no loss). The fork of branch b is the node after its shared prefix 0..e_b
    (e_b = ``branch_shared_end``). V(fork) is the mean reward of every rollout through that node: root i = b's root,
    and the branches of root i whose shared prefix contains b's (e_b' ≥ e_b; b itself included). A branch that
    shares nothing (e_b = −1) forks at the prompt: V = the mean over the prompt's roots and branches. This is
    TreeRL's V(child) − V(parent) with one leaf per child. The difference is divided by the std of the prompt's
    M rewards (``scale_rewards='group'``), of all rewards (``'batch'``), or not at all (``'none'``), with TRL's
    Bessel-corrected std + 1e-4, so its scale matches GRPO's advantages. Unscored (NaN) rollouts are left out of
    V and the std; a NaN-rewarded branch gets 0.

    Args:
        root_rewards: (R,) floating scalar rewards (see ``scalar_rewards``), R = G·num_roots, prompts contiguous.
        branch_rewards: (P,) floating, in the same prompt order as their roots (any order within a prompt).
        branch_root: (P,) integer root row of each branch.
        branch_shared_end: (P,) integer last shared token, in [−1, T).
        num_roots: N ≥ 1.

    Returns:
        (P,) advantages in the rewards' dtype.
    """
    for name, t in (("root_rewards", root_rewards), ("branch_rewards", branch_rewards),
                    ("branch_root", branch_root), ("branch_shared_end", branch_shared_end)):
        _check_tensor(name, t, 1)
    _check_floating(root_rewards=root_rewards, branch_rewards=branch_rewards)
    _lookup(dict.fromkeys(SCALE_REWARDS), "scale_rewards", scale_rewards)
    R, P = root_rewards.shape[0], branch_rewards.shape[0]
    if num_roots < 1 or R % num_roots:
        raise ValueError(f"`root_rewards` has {R} rows, not a multiple of num_roots={num_roots}.")
    if branch_root.shape[0] != P or branch_shared_end.shape[0] != P:
        raise ValueError("`branch_root` and `branch_shared_end` need one entry per branch.")
    if P == 0:
        return branch_rewards.new_zeros(0)
    if bool(((branch_root < 0) | (branch_root >= R)).any()):
        raise ValueError(f"`branch_root` must index rows in [0, {R}), got {branch_root.tolist()}.")
    root = branch_root.long()
    end = branch_shared_end.long()
    prompt_of_branch = root // num_roots
    G = R // num_roots
    # (P, P) "b' passes through b's fork": same root and a shared prefix at least as long. Small: P = G·N·B rows.
    same_root = root[:, None] == root[None, :]
    through = same_root & (end[None, :] >= end[:, None])
    at_prompt = end < 0
    through = torch.where(at_prompt[:, None], prompt_of_branch[:, None] == prompt_of_branch[None, :], through)
    valid_b = ~torch.isnan(branch_rewards)
    rb = torch.nan_to_num(branch_rewards, nan=0.0)
    rr = torch.nan_to_num(root_rewards, nan=0.0)
    valid_r = ~torch.isnan(root_rewards)
    w = through & valid_b[None, :]
    total = (w * rb[None, :]).sum(dim=1)
    count = w.sum(dim=1).to(rb.dtype)
    # Roots through the fork: b's own root, or every root of the prompt when b forks at the prompt.
    root_prompt = torch.arange(R, device=root.device) // num_roots
    roots_through = torch.where(at_prompt[:, None], prompt_of_branch[:, None] == root_prompt[None, :],
                                root[:, None] == torch.arange(R, device=root.device)[None, :]) & valid_r[None, :]
    total = total + (roots_through * rr[None, :]).sum(dim=1)
    count = count + roots_through.sum(dim=1).to(rb.dtype)
    value = total / count.clamp(min=1)
    adv = branch_rewards - value
    if scale_rewards != "none":
        if scale_rewards == "group":
            joint = torch.full((G, num_roots + P), float("nan"), dtype=rb.dtype, device=rb.device)
            joint[:, :num_roots] = root_rewards.view(G, num_roots)
            joint[prompt_of_branch, num_roots + torch.arange(P, device=root.device)] = branch_rewards
            std = _nanstd(joint, dim=1)[prompt_of_branch]
        else:
            std = _nanstd(torch.cat([root_rewards, branch_rewards]))
        adv = adv / (torch.nan_to_num(std, nan=0.0) + 1e-4)
    return torch.where(valid_b, adv, torch.zeros((), dtype=adv.dtype, device=adv.device))


@dataclass(frozen=True)
class BranchAdvantageInputs:
    """What a branch-advantage rule may read, over the whole (gathered) batch of every rank.

    root_rewards: (R, F) rewards per function, each prompt's N roots contiguous; branch_rewards: (P, F).
    reward_weights: (F,). dual_group_advantage: (P,) Â_b from ``dual_group_advantages``.
    branch_root: (P,) global root row of each branch and branch_shared_end: (P,) its last shared token, both only
    for rules that declare ``needs_fork_points`` (else None).
    """

    root_rewards: torch.Tensor
    branch_rewards: torch.Tensor
    reward_weights: torch.Tensor
    dual_group_advantage: torch.Tensor
    num_roots: int
    scale_rewards: str
    branch_root: torch.Tensor | None = None
    branch_shared_end: torch.Tensor | None = None


@register_branch_advantage("dual_group")
def _branch_advantage_dual_group(inputs: BranchAdvantageInputs) -> torch.Tensor:
    """Â_b of the branch's dual group (§3), the same advantage that credits its root's prefix."""
    return inputs.dual_group_advantage


@register_branch_advantage("local", needs_fork_points=True)
def _branch_advantage_local(inputs: BranchAdvantageInputs) -> torch.Tensor:
    """R_b − V(fork), the value of the branch's own fork (``fork_advantages``)."""
    return fork_advantages(
        scalar_rewards(inputs.root_rewards, inputs.reward_weights),
        scalar_rewards(inputs.branch_rewards, inputs.reward_weights),
        inputs.branch_root, inputs.branch_shared_end, inputs.num_roots, scale_rewards=inputs.scale_rewards,
    )
