"""§1 Branch-point selection: the criteria and allocation rules, and ``select_branch_points``.

docs/algorithm.md §1 (selection). A criterion ranks candidate tokens (``BRANCH_CRITERIA``), an allocation decides
how many points each prompt group gets (``ALLOCATIONS``), and ``select_branch_points`` checks its inputs
(``_check_selection_inputs``) and picks (``_pick_points``: stable sorts by the criterion's keys, then a greedy pass
with the soft ``min_distance``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from ._checks import _check_finite_on_mask, _check_floating, _check_same_device, _check_same_shape, _check_tensor
from .registry import get_allocation, get_branch_criterion, register_allocation, register_branch_criterion
from .score import BranchingScore

#: meaning of ``BranchPoints.fallback`` (a criterion's tier is its code: lower tiers are picked first)
FALLBACK_CODES = {0: "strict", 1: "bs_fill", 2: "entropy", 3: "random", 4: "duplicate", 5: "no_candidate",
                  6: "surprisal", 7: "hint", 8: "hint_fill", 9: "tool_result"}
FALLBACK_TOOL_RESULT = 9
"""The code of a branch forked online, right after a random tool result of its root (`branch_schedule="online"`)."""
_NON_CANDIDATE_TIER = 99


class BranchPoints(NamedTuple):
    """Chosen branch points, all (P,).

    root:     long, row index of the root rollout the branch continues.
    position: long, token s kept as the last prefix token; **−1 means "no candidate: resample this branch from the
              prompt" (no shared prefix, so the branch gives its root no prefix credit).**
    strict:   bool, ``fallback == 0``.
    fallback: long, how the point was chosen (``FALLBACK_CODES``): 0 strict (z_H>0 ∧ z_Ω>0), 1 BS fill, 2 entropy
              (fill, or the "entropy" criterion), 3 random, 4 duplicate of an earlier point, 5 no candidate,
              6 surprisal, 7 hint, 8 hint fill, 9 forked online after a tool result.
    score:    float, BS at the point (0 when position is −1 or no scores were given).
    """

    root: torch.Tensor
    position: torch.Tensor
    strict: torch.Tensor
    fallback: torch.Tensor
    score: torch.Tensor


class BranchContext(NamedTuple):
    """What a criterion that declares ``needs_context`` gets besides the scores (keyword ``context=``).

    logp:           (B, T) float, the current policy's log-prob of each sampled completion token (0 off the model mask).
    completion_ids: B unpadded token-id lists, row order of ``candidates``.
    model_mask:     B lists, 1 on model-written tokens, 0 on tool output.
    inputs:         B dataset rows (dicts) the roots were generated from, extra columns included.
    tokenizer:      the processing class, to decode ``completion_ids``.
    keep_token:     True when a branch keeps its chosen token s and continues after it; False when it re-decides s.
    """

    logp: torch.Tensor
    completion_ids: Sequence[Sequence[int]]
    model_mask: Sequence[Sequence[int]]
    inputs: Sequence[dict[str, Any]]
    tokenizer: Any
    keep_token: bool


@register_branch_criterion("bs", needs_omega=True)
def _criterion_bs(scores, entropy_key, candidates, generator):
    """Branching Score: strict (z_H>0 ∧ z_Ω>0) by BS, then BS>0 by BS, then by entropy (the paper)."""
    if scores is None:
        raise ValueError("criterion 'bs' needs `scores` (the BranchingScore of the roots).")
    bs = scores.scores
    # Degenerate rows (z_Ω ≡ 0) have no strict candidate (docs/algorithm.md §1: strict needs z_Ω > 0): the whole row
    # is the entropy fallback, so `fallback`/`strict` report how often Ω actually informed a pick.
    strict = (scores.z_entropy > 0) & (scores.z_omega > 0) & ~scores.degenerate[:, None]
    tier = torch.where(strict, 0, torch.where((bs > 0) & ~scores.degenerate[:, None], 1, 2))
    primary = torch.where(tier < 2, bs, entropy_key)
    secondary = torch.where(tier < 2, entropy_key, torch.zeros_like(entropy_key))
    return tier, primary, secondary


@register_branch_criterion("entropy")
def _criterion_entropy(scores, entropy_key, candidates, generator):
    """Entropy alone (ablation)."""
    return torch.full_like(candidates, 2, dtype=torch.long), entropy_key, torch.zeros_like(entropy_key)


@register_branch_criterion("surprisal", needs_context=True)
def _criterion_surprisal(scores, entropy_key, candidates, generator, *, context: BranchContext):
    """Surprisal, −log p of the sampled token (ablation): the least expected choices first."""
    _check_tensor("context.logp", context.logp, 2)
    _check_same_shape("candidates", candidates, **{"context.logp": context.logp})
    _check_finite_on_mask("context.logp", context.logp, candidates, "pass finite log-probs on candidate tokens.")
    surprisal = -context.logp.to(torch.float64)
    return torch.full_like(candidates, 6, dtype=torch.long), surprisal, entropy_key


def hint_ranking(hints: Sequence[int | None], candidates: torch.Tensor, generator: torch.Generator | None = None):
    """Ranking keys for a criterion that knows where each root should branch (e.g. a task's first wrong token).

    ``hints[b]`` is the token index to branch at in row b (as ``BranchPoints.position``), or None where the task
    names none. A hinted row's candidates rank by distance to the hint, nearest first (ties: the earlier token),
    all with code 7 ("hint"); rows without a hint rank at random after every hinted candidate (code 8,
    "hint_fill"). Returns ``(tier, primary, secondary)`` as a criterion does.
    """
    _check_tensor("candidates", candidates, 2)
    B, T = candidates.shape
    if len(hints) != B:
        raise ValueError(f"`hints` has {len(hints)} entries, expected one per row ({B}).")
    has = torch.tensor([h is not None for h in hints], dtype=torch.bool, device=candidates.device)
    target = torch.tensor([-1 if h is None else int(h) for h in hints], dtype=torch.float64,
                          device=candidates.device)
    distance = (torch.arange(T, dtype=torch.float64, device=candidates.device)[None, :] - target[:, None]).abs()
    keys = torch.rand(candidates.shape, generator=generator, dtype=torch.float64).to(candidates.device)
    tier = torch.where(has[:, None], 7, 8).expand(B, T).to(torch.long)
    primary = torch.where(has[:, None], -distance, keys)
    return tier, primary, torch.zeros_like(primary)


@register_branch_criterion("random")
def _criterion_random(scores, entropy_key, candidates, generator):
    """Uniform over candidates (ablation)."""
    # Uniform subset without replacement: rank candidates by i.i.d. uniform keys drawn on the CPU (reproducible
    # across devices for one seed). Uses the global RNG when `generator` is None.
    keys = torch.rand(candidates.shape, generator=generator, dtype=torch.float64).to(candidates.device)
    return torch.full_like(candidates, 3, dtype=torch.long), keys, torch.zeros_like(keys)


def _greedy_pick(ranked: list[tuple[int, int]], quota: int, min_distance: int) -> list[int]:
    """Indices into ``ranked`` ((row, pos) in rank order) accepted greedily with per-row spacing ≥ min_distance;
    then, if fewer than ``quota``, the skipped ones in rank order (min_distance is soft, see module docstring)."""
    if min_distance <= 1:
        return list(range(min(quota, len(ranked))))
    chosen: list[int] = []
    skipped: list[int] = []
    taken: dict[int, list[int]] = {}
    for i, (row, pos) in enumerate(ranked):
        if len(chosen) == quota:
            break
        if all(abs(pos - p) >= min_distance for p in taken.get(row, ())):
            chosen.append(i)
            taken.setdefault(row, []).append(pos)
        else:
            skipped.append(i)
    return chosen + skipped[: quota - len(chosen)]


def select_branch_points(
    scores: BranchingScore | None,
    candidates: torch.Tensor,
    num_branches: int,
    *,
    criterion: str = "bs",
    pooled: bool = False,
    group_size: int = 1,
    min_distance: int = 0,
    generator: torch.Generator | None = None,
    entropy: torch.Tensor | None = None,
    allocation: str = "uniform",
    rewards: torch.Tensor | None = None,
    context: BranchContext | None = None,
) -> BranchPoints:
    """Choose branch points, docs/algorithm.md §1 (selection) and the ablation criteria.

    Ranking (``criterion``, from ``BRANCH_CRITERIA``):
      * "bs": strict candidates (z_H>0 ∧ z_Ω>0) by BS desc (code 0); then candidates with BS>0 by BS desc (code 1);
        then the rest by entropy desc (code 2). A degenerate row has BS = z_H and no strict candidate, so it ranks
        by entropy alone, all code 2.
      * "entropy": by entropy desc (code 2).
      * "surprisal": by −log p of the sampled token desc, from ``context.logp`` (code 6).
      * "random": uniform over candidates, drawn from ``generator`` (code 3); reproducible for a seeded generator.
      * a registered rule that declares ``needs_context`` is also given ``context=``; ``hint_ranking`` builds the
        keys of a rule that knows each root's branch point (codes 7 and 8).
    Ties: BS ties by entropy desc, then lower token index, then lower row. Everything else is deterministic.
    (The "none" ablation — no branching — is ``num_branches=0``, which returns empty tensors.)

    Per-root mode (``pooled=False``): each root gets exactly K = ``num_branches`` points, P = B·K, ordered
    root-major, each root's points in rank order. Pooled mode: rows come in contiguous groups of ``group_size``
    roots of one prompt; each group gets its top ``group_size·K`` points over all its candidates, ordered by group
    then rank, so roots of one prompt may get unequal numbers of points. Per-root mode equals pooled mode with
    ``group_size=1``; ``group_size`` is ignored unless ``pooled``.

    ``min_distance``: two points of one root are ≥ this many tokens apart (greedy in rank order). The constraint is
    relaxed, in rank order, before any point is duplicated.
    Duplicates: only when a root (a group, when pooled) has fewer candidates than points asked for; its chosen
    points are then cycled in rank order (code 4). No candidate at all: the K points (``group_size·K`` when
    pooled, spread root-major over the group's roots) get ``position = −1`` — resample from the prompt — code 5.

    Args:
        scores: ``BranchingScore`` of the B roots, or None (allowed for "random", and for "entropy" with ``entropy``).
        candidates: (B, T) bool from ``branch_candidates``.
        num_branches: K ≥ 0, branch points per root.
        entropy: optional (B, T) floating entropy key that replaces ``scores.z_entropy`` for entropy ranking. In
            pooled mode values are compared across roots, so z-scores are usually the right key.
        allocation: how many points each group gets (``ALLOCATIONS``; "uniform": ``group_size·K`` per group;
            "need": per-root counts from the roots' rewards, ``need_allocation``). A rule that declares
            ``needs_rewards`` gets ``rewards`` and ``group_size`` = N roots per prompt (rows in contiguous prompt
            groups, pooled or not) and returns per-root counts summing to B·K; per-root mode takes each root's
            count, pooled mode each group's sum. Either way P = B·K.
        rewards: (B,) scalar reward of each root, for allocations that declare ``needs_rewards``.
        context: ``BranchContext`` of the B roots, for criteria that declare ``needs_context``.

    Returns:
        ``BranchPoints`` of length P (B·K per-root; B·K in pooled mode too, since every group asks for
        group_size·K). Tensors live on ``candidates.device``.

    Complexity: three (B, T) stable sorts, then a python loop over groups touching at most
    group_size·K·max(1, 2·min_distance − 1) ranked candidates each (≈0.1 s at B=64, T=8192 on one CPU thread).
    """
    rule = get_branch_criterion(criterion)
    alloc_rule = get_allocation(allocation)
    entropy_key = _check_selection_inputs(scores, candidates, num_branches, criterion, pooled, group_size,
                                          min_distance, entropy)
    B, T = candidates.shape
    device = candidates.device
    gs = group_size if pooled else 1
    if B * num_branches == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return BranchPoints(empty, empty.clone(), empty.bool(), empty.clone(), torch.zeros(0, device=device))
    if rule.needs_context:
        if context is None:
            raise ValueError(f"criterion {criterion!r} needs `context` (a BranchContext of the roots).")
        tier, primary, secondary = rule(scores, entropy_key, candidates, generator, context=context)
    else:
        tier, primary, secondary = rule(scores, entropy_key, candidates, generator)
    if alloc_rule.needs_rewards:
        counts = _checked_counts(alloc_rule, rewards, candidates, group_size, num_branches)
        quotas = [sum(counts[g * gs : (g + 1) * gs]) for g in range(B // gs)]
    else:
        quotas = alloc_rule(B // gs, gs, num_branches)
    roots, positions, codes = _pick_points(tier, primary, secondary, candidates, gs, quotas, num_branches,
                                           min_distance)
    root_t = torch.tensor(roots, dtype=torch.long, device=device)
    pos_t = torch.tensor(positions, dtype=torch.long, device=device)
    code_t = torch.tensor(codes, dtype=torch.long, device=device)
    if scores is None:
        score_t = torch.zeros(len(roots), dtype=torch.float32, device=device)
    else:
        score_t = scores.scores[root_t, pos_t.clamp(min=0)]
        score_t = torch.where(pos_t >= 0, score_t, torch.zeros((), dtype=score_t.dtype, device=device))
    return BranchPoints(root_t, pos_t, code_t == 0, code_t, score_t)


def _check_selection_inputs(scores, candidates, num_branches, criterion, pooled, group_size, min_distance,
                            entropy) -> torch.Tensor | None:
    """Every check of ``select_branch_points``; returns the (B, T) float64 entropy key ranks fall back on."""
    _check_tensor("candidates", candidates, 2)
    if candidates.dtype != torch.bool:
        raise ValueError(f"`candidates` must be a bool tensor (from branch_candidates), got {candidates.dtype}.")
    if scores is not None:
        if not isinstance(scores, BranchingScore):
            raise TypeError(f"`scores` must be a BranchingScore or None, got {type(scores).__name__}.")
        _check_same_shape(
            "candidates", candidates, **{"scores.scores": scores.scores, "scores.z_entropy": scores.z_entropy,
                                         "scores.z_omega": scores.z_omega}
        )
        if scores.degenerate.shape != candidates.shape[:1]:
            raise ValueError(
                f"`scores.degenerate` has shape {tuple(scores.degenerate.shape)}, expected ({candidates.shape[0]},)."
            )
    if entropy is not None:
        _check_tensor("entropy", entropy, 2)
        _check_same_shape("candidates", candidates, entropy=entropy)
        _check_floating(entropy=entropy)
    _check_same_device(
        candidates=candidates,
        scores=None if scores is None else scores.scores,
        degenerate=None if scores is None else scores.degenerate,
        entropy=entropy,
    )
    if num_branches < 0:
        raise ValueError(f"`num_branches` must be >= 0, got {num_branches}.")
    if min_distance < 0:
        raise ValueError(f"`min_distance` must be >= 0, got {min_distance}.")
    B, T = candidates.shape
    gs = group_size if pooled else 1
    if gs < 1 or B % gs:
        raise ValueError(f"`group_size` must be >= 1 and divide the number of rows {B}, got {group_size}.")
    if entropy is not None:
        _check_finite_on_mask("entropy", entropy, candidates, "pass finite entropies on candidate tokens.")
        return entropy.to(torch.float64)
    if scores is not None:
        return scores.z_entropy.to(torch.float64)
    if criterion == "random" or get_branch_criterion(criterion).needs_context:
        return torch.zeros(B, T, dtype=torch.float64, device=candidates.device)
    raise ValueError(f"criterion {criterion!r} needs `scores` or `entropy`.")


def _pick_points(tier, primary, secondary, candidates, gs: int, quotas: list[int], num_branches: int,
                 min_distance: int) -> tuple[list[int], list[int], list[int]]:
    """The selection itself: rank each group's candidates by (tier asc, primary desc, secondary desc, token, row),
    take its quota greedily with the soft ``min_distance``, cycle (code 4) when short, −1 (code 5) when empty."""
    B, T = candidates.shape
    device = candidates.device
    tier = torch.where(candidates, tier.to(torch.long), _NON_CANDIDATE_TIER)
    primary = primary.to(torch.float64)
    secondary = secondary.to(torch.float64)

    # Group layout (G, T, gs) flattened position-major, so that the identity order already breaks ties by lower token
    # index then lower row; then stable sorts from the least to the most significant key.
    G = B // gs

    def flat(x):
        return x.reshape(G, gs, T).transpose(1, 2).reshape(G, T * gs)

    order = torch.arange(T * gs, device=device).expand(G, -1)
    for key, descending in ((flat(secondary), True), (flat(primary), True), (flat(tier), False)):
        _, idx = torch.sort(key.gather(1, order), dim=1, descending=descending, stable=True)
        order = order.gather(1, idx)
    n_cand = flat(candidates).sum(1).tolist()
    window = min(T * gs, max(quotas) * max(1, 2 * min_distance - 1))
    top = order[:, :window].tolist()
    tier_flat = flat(tier).gather(1, order[:, :window]).tolist()

    roots: list[int] = []
    positions: list[int] = []
    codes: list[int] = []
    for g in range(G):
        quota = quotas[g]
        n = min(n_cand[g], window)
        ranked = [(f % gs, f // gs) for f in top[g][:n]]
        if not ranked:
            for j in range(quota):
                roots.append(g * gs + (j * gs) // quota)  # spread root-major (uniform: j // K)
                positions.append(-1)
                codes.append(5)
            continue
        picked = _greedy_pick(ranked, quota, min_distance)
        for j in range(quota):
            i = picked[j % len(picked)]
            roots.append(g * gs + ranked[i][0])
            positions.append(ranked[i][1])
            codes.append(tier_flat[g][i] if j < len(picked) else 4)
    return roots, positions, codes


@register_allocation("uniform")
def _allocate_uniform(num_groups: int, group_size: int, num_branches: int) -> list[int]:
    """B points per root: each group of ``group_size`` roots gets ``group_size·B`` (the paper's allocation)."""
    return [group_size * num_branches] * num_groups


def _checked_counts(rule, rewards, candidates, group_size: int, num_branches: int) -> list[int]:
    """Per-root counts of an allocation that reads the roots' rewards, checked to keep P = B·K."""
    B = candidates.shape[0]
    if rewards is None:
        raise ValueError(f"allocation {rule.name!r} needs `rewards`: the (B,) scalar reward of each root.")
    _check_tensor("rewards", rewards, 1)
    _check_floating(rewards=rewards)
    if rewards.shape[0] != B:
        raise ValueError(f"`rewards` has {rewards.shape[0]} rows, expected one per root ({B}).")
    if group_size < 1 or B % group_size:
        raise ValueError(f"`group_size` must be >= 1 and divide the number of rows {B}, got {group_size}.")
    counts = [int(c) for c in rule(rewards.detach().cpu().double(), group_size, num_branches)]
    if len(counts) != B or sum(counts) != B * num_branches or min(counts) < 0:
        raise ValueError(f"allocation {rule.name!r} returned {len(counts)} counts summing to {sum(counts)}; "
                         f"expected {B} non-negative counts summing to {B * num_branches}.")
    return counts


def _largest_remainder(total: int, weights: torch.Tensor, tie_key: torch.Tensor) -> torch.Tensor:
    """Integers ∝ ``weights`` (≥ 0, not all 0) summing to ``total`` (Hamilton's rule): floors, then one more each
    to the largest remainders, ties to the smaller ``tie_key`` then the lower index."""
    share = total * weights / weights.sum()
    base = share.floor().long()
    left = total - int(base.sum())
    if left:
        rem = share - base.double()
        order = sorted(range(len(weights)), key=lambda i: (-round(float(rem[i]), 12), float(tie_key[i]), i))
        base[order[:left]] += 1
    return base


NEED_FLOOR = 0.25
"""``need``: a prompt whose rewards are split as widely as the batch allows gets this fraction of the branches of a
prompt whose rewards all agree."""


def need_allocation(rewards: torch.Tensor, group_size: int, num_branches: int, *,
                    floor: float = NEED_FLOOR, atol: float = 1e-6) -> torch.Tensor:
    """Branches where they are needed (docs/algorithm.md §9, after DEEP-GRPO / DATPO): (R,) long counts per root,
    summing to R·K, for R = G·N roots in contiguous prompt groups of N = ``group_size``.

    1. Spread of group g: V_g = Var_g(r) / ((max r − min r)/2)², the variance of its N rewards relative to the
       largest variance rewards in this batch's range can have (0: all agree, so GRPO learns nothing from g;
       1: half at each end of the range). Every V_g = 0 when the whole batch agrees.
    2. Group quotas ∝ w_g = 1 − (1 − floor)·V_g (1 for an all-agreeing group, ``floor`` for a widest split),
       rounded by largest remainder to the fixed total R·K (ties: lower group).
    3. Within a group, its quota ∝ u_i = 2 for a failed root (reward below the group's best), 1 otherwise (every
       root of an agreeing group), by largest remainder (ties: lower reward, then lower index); the selection
       criterion then puts a root's branches at its highest-scoring points.

    Args:
        rewards: (R,) floating, each root's scalar reward (weighted sum over reward functions), finite.
        group_size: N ≥ 1 roots per prompt; R % N == 0.
        num_branches: K ≥ 0, the uniform rule's branches per root (the budget: R·K in all).
    Returns: (R,) long on CPU.
    """
    _check_tensor("rewards", rewards, 1)
    _check_floating(rewards=rewards)
    if not torch.isfinite(rewards).all():
        raise ValueError("`rewards` must be finite (weighted sums of the roots' rewards).")
    R = rewards.shape[0]
    if group_size < 1 or R % group_size:
        raise ValueError(f"`group_size` must be >= 1 and divide the number of roots {R}, got {group_size}.")
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"`floor` must be in (0, 1], got {floor}.")
    r = rewards.detach().cpu().double()
    G, total = R // group_size, R * num_branches
    if total == 0:
        return torch.zeros(R, dtype=torch.long)
    groups = r.view(G, group_size)
    span = float(r.max() - r.min())
    if span <= atol:
        spread = torch.zeros(G, dtype=torch.float64)
    else:
        spread = (groups.var(dim=1, unbiased=False) / (span / 2) ** 2).clamp(0.0, 1.0)
    quotas = _largest_remainder(total, 1.0 - (1.0 - floor) * spread, torch.zeros(G))
    counts = torch.zeros(R, dtype=torch.long)
    for g in range(G):
        rg = groups[g]
        failed = rg < rg.max() - atol
        counts[g * group_size : (g + 1) * group_size] = _largest_remainder(
            int(quotas[g]), torch.where(failed, 2.0, 1.0).double(), rg)
    return counts


def groups_all_equal(rewards: torch.Tensor, group: torch.Tensor, num_groups: int, *,
                     atol: float = 1e-6) -> torch.Tensor:
    """(G,) bool: every reward of prompt group g agrees (max − min ≤ ``atol``), the groups GRPO learns nothing from.

    Args: rewards (X,) floating; group (X,) long in [0, G), each value's prompt group (a group with no value
    counts as agreeing); num_groups: G.
    """
    _check_tensor("rewards", rewards, 1)
    _check_same_shape("rewards", rewards, group=group)
    r = rewards.double()
    hi = torch.full((num_groups,), -torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(
        0, group, r, reduce="amax")
    lo = torch.full((num_groups,), torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(
        0, group, r, reduce="amin")
    return (hi - lo <= atol) | (hi < lo)


@register_allocation("need", needs_rewards=True)
def _allocate_need(rewards: torch.Tensor, group_size: int, num_branches: int) -> list[int]:
    """Branches where needed: more to prompts whose roots' rewards all agree, failed roots first (§9)."""
    return need_allocation(rewards, group_size, num_branches).tolist()
