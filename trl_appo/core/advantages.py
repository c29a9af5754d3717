"""§3 Dual-group advantages Â_i (roots) and Â_b (branches), centred and scaled exactly as TRL's GRPOTrainer.

docs/algorithm.md §3. ``_grpo_advantages`` is TRL 1.16's advantage block op for op; ``dual_group_advantages``
applies it to each prompt's roots and branches (two groups, or one joint group without ``dual_groups``).
"""

from __future__ import annotations

import torch

from ._checks import _check_floating, _check_same_device, _check_tensor, _lookup
from .registry import MULTI_OBJECTIVE_AGGREGATIONS, SCALE_REWARDS


def _nanstd(tensor: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """TRL 1.16 ``trl.trainer.utils.nanstd``, op for op (Bessel-corrected; NaN for fewer than 2 values)."""
    mean = torch.nanmean(tensor, dim=dim, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)
    correction = count / (count - 1)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    variance *= correction
    std = torch.sqrt(variance)
    if keepdim:
        return std
    return std.squeeze(dim) if dim is not None else std.squeeze()


def _grpo_advantages(
    rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor,
    num_generations: int,
    scale_rewards: str,
    multi_objective_aggregation: str,
) -> torch.Tensor:
    """TRL 1.16 ``GRPOTrainer._generate_and_score_completions`` advantage block, op for op (rows in contiguous groups
    of ``num_generations``). Keep in sync with TRL; tests/test_core.py holds a verbatim copy as reference."""
    device = rewards_per_func.device
    if rewards_per_func.shape[0] == 0:
        return rewards_per_func.new_zeros(0)
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    if multi_objective_aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
        mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
        if scale_rewards in ["group", "none"]:
            if num_generations > 1:
                std_rewards = _nanstd(rewards.view(-1, num_generations), dim=1)
                std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
            else:
                std_rewards = torch.zeros_like(rewards)
        else:  # batch
            std_rewards = _nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = rewards - mean_grouped_rewards
        if scale_rewards != "none":
            advantages = advantages / (std_rewards + 1e-4)
    else:  # normalize_then_sum
        num_funcs = rewards_per_func.shape[1]
        grouped = rewards_per_func.view(-1, num_generations, num_funcs)
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = _nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
        reward_k = (grouped - mean_k) / (std_k + 1e-4)
        reward_k = reward_k.view(-1, num_funcs)
        rewards = (reward_k * reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        std_rewards = _nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def dual_group_advantages(
    root_rewards_per_func: torch.Tensor,
    branch_rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor,
    num_roots: int,
    num_branches: int,
    *,
    scale_rewards: str = "group",
    dual_groups: bool = True,
    multi_objective_aggregation: str = "sum_then_normalize",
    branch_prompt: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual-group advantages Â_i (roots) and Â_b (branches), docs/algorithm.md §3.

    Roots and branches come from different policies, so with ``dual_groups`` each prompt's N roots form one group
    and its N·B branches another, each centred and scaled exactly as TRL 1.16's GRPOTrainer does: weighted
    ``nansum`` over reward functions, all-NaN (unscorable) rows get NaN reward (excluded from the baseline) and
    advantage 0, TRL's Bessel-corrected ``nanstd`` + 1e-4, ``scale_rewards`` in {"group", "batch", "none"},
    ``multi_objective_aggregation`` in {"sum_then_normalize", "normalize_then_sum"}. With branching off this is
    GRPO's advantage bit for bit. Singleton or zero-std groups give 0. "batch" statistics (and the global
    normalisation of "normalize_then_sum") are taken over the roots and over the branches separately with
    ``dual_groups``, and over all rows together without; like TRL, pass the rows of the whole (gathered) batch.

    With ``dual_groups=False`` a prompt's roots and branches form a single group of N + N·B.

    Args:
        root_rewards_per_func: (R, F) floating, R = G·num_roots, each prompt's roots contiguous. NaN = not scored.
        branch_rewards_per_func: (P, F) floating, P = G·num_branches, each prompt's branches contiguous.
        reward_weights: (F,) floating.
        num_roots: N ≥ 1, roots per prompt.
        num_branches: branches per prompt (N·B) ≥ 0; with ``branch_prompt``, their average (P = G·num_branches).
        branch_prompt: optional (P,) integer prompt index in [0, G) of each branch, for allocations that give
            prompts unequal numbers of branches (``"need"``, docs/algorithm.md §9). Each prompt's branches (in any
            order) then form its group, padded to the largest with unscored (NaN) rows, which TRL's normalisation
            leaves out of means, stds and Bessel counts: the same advantages as groups of their own sizes.

    Returns:
        (root_adv (R,), branch_adv (P,)), in the rewards' dtype.
    """
    _check_tensor("root_rewards_per_func", root_rewards_per_func, 2)
    _check_tensor("branch_rewards_per_func", branch_rewards_per_func, 2)
    _check_tensor("reward_weights", reward_weights, 1)
    _check_floating(
        root_rewards_per_func=root_rewards_per_func,
        branch_rewards_per_func=branch_rewards_per_func,
        reward_weights=reward_weights,
    )
    _check_same_device(
        root_rewards_per_func=root_rewards_per_func,
        branch_rewards_per_func=branch_rewards_per_func,
        reward_weights=reward_weights,
    )
    if root_rewards_per_func.dtype != branch_rewards_per_func.dtype:
        raise ValueError(
            f"`root_rewards_per_func` is {root_rewards_per_func.dtype} but `branch_rewards_per_func` is "
            f"{branch_rewards_per_func.dtype}; cast both to one dtype (TRL uses float32)."
        )
    F = reward_weights.shape[0]
    for name, t in (("root_rewards_per_func", root_rewards_per_func), ("branch_rewards_per_func", branch_rewards_per_func)):
        if t.shape[1] != F:
            raise ValueError(f"`{name}` has {t.shape[1]} reward functions but `reward_weights` has {F}.")
    _lookup(dict.fromkeys(SCALE_REWARDS), "scale_rewards", scale_rewards)
    _lookup(dict.fromkeys(MULTI_OBJECTIVE_AGGREGATIONS), "multi_objective_aggregation", multi_objective_aggregation)
    if num_roots < 1 or num_branches < 0:
        raise ValueError(f"need num_roots >= 1 and num_branches >= 0, got {num_roots} and {num_branches}.")
    R, P = root_rewards_per_func.shape[0], branch_rewards_per_func.shape[0]
    if R % num_roots:
        raise ValueError(f"`root_rewards_per_func` has {R} rows, not a multiple of num_roots={num_roots}.")
    G = R // num_roots
    if P != G * num_branches:
        raise ValueError(
            f"`branch_rewards_per_func` has {P} rows but {G} prompts × num_branches={num_branches} = "
            f"{G * num_branches} were expected."
        )
    if branch_prompt is not None:
        return _dual_group_advantages_by_prompt(root_rewards_per_func, branch_rewards_per_func, reward_weights,
                                                num_roots, branch_prompt, G, scale_rewards=scale_rewards,
                                                dual_groups=dual_groups,
                                                multi_objective_aggregation=multi_objective_aggregation)
    args = (reward_weights, scale_rewards, multi_objective_aggregation)
    if dual_groups or num_branches == 0:
        root_adv = _grpo_advantages(root_rewards_per_func, reward_weights, num_roots, *args[1:])
        branch_adv = (
            _grpo_advantages(branch_rewards_per_func, reward_weights, num_branches, *args[1:])
            if num_branches
            else branch_rewards_per_func.new_zeros(0)
        )
        return root_adv, branch_adv
    joint = torch.cat(
        [root_rewards_per_func.view(G, num_roots, F), branch_rewards_per_func.view(G, num_branches, F)], dim=1
    ).view(G * (num_roots + num_branches), F)
    adv = _grpo_advantages(joint, reward_weights, num_roots + num_branches, *args[1:]).view(G, -1)
    return adv[:, :num_roots].reshape(R), adv[:, num_roots:].reshape(P)


def scalar_rewards(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor) -> torch.Tensor:
    """(B, F) rewards per function → (B,) weighted ``nansum``, NaN where every function returned None (as TRL)."""
    _check_tensor("rewards_per_func", rewards_per_func, 2)
    _check_tensor("reward_weights", reward_weights, 1)
    rewards = (rewards_per_func * reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
    return rewards


def _dual_group_advantages_by_prompt(root_rewards_per_func, branch_rewards_per_func, reward_weights, num_roots: int,
                                     branch_prompt: torch.Tensor, num_prompts: int, **kwargs):
    """``dual_group_advantages`` with each prompt's own branches (``branch_prompt``): padded with NaN rows to equal
    groups, computed by the equal-group path, unpadded."""
    _check_tensor("branch_prompt", branch_prompt, 1)
    P, F = branch_rewards_per_func.shape
    G = num_prompts
    if branch_prompt.shape[0] != P:
        raise ValueError(f"`branch_prompt` has {branch_prompt.shape[0]} entries, expected one per branch ({P}).")
    prompt = branch_prompt.to(branch_rewards_per_func.device).long()
    if P and bool(((prompt < 0) | (prompt >= G)).any()):
        raise ValueError(f"`branch_prompt` must be in [0, {G}), got {prompt.tolist()}.")
    counts = torch.bincount(prompt, minlength=G)
    width = int(counts.max()) if P else 0
    order = torch.argsort(prompt, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(prompt)
    slot[order] = torch.arange(P, device=prompt.device) - starts[prompt[order]]
    padded = branch_rewards_per_func.new_full((G, width, F), float("nan"))
    padded[prompt, slot] = branch_rewards_per_func
    root_adv, padded_adv = dual_group_advantages(root_rewards_per_func, padded.view(G * width, F), reward_weights,
                                                 num_roots, width, **kwargs)
    return root_adv, padded_adv.view(G, width)[prompt, slot]
