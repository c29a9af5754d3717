"""Pure tensor mathematics of APPO (docs/algorithm.md §1, §3, §4). Torch only: no model, tokenizer or trainer.

What this module owns, one function per idea:

* ``discounted_suffix_sum``  — the O(T) discounted reverse scan both Ω (§1) and FutureKL (§4) need.
* ``branching_score``        — §1 Branching Score BS = z(H)·z(Ω) per model token, with the degenerate-Ω rule.
* ``branch_candidates``      — §1 which tokens may be branched at.
* ``select_branch_points``   — §1 top-B selection (per root or pooled per prompt), fills, min distance.
* ``dual_group_advantages``  — §3 root / branch advantages, centred and scaled exactly as TRL's GRPOTrainer.
* ``branch_credit``          — §3 per-token root advantage: prefix credit from branches × procedure scaling.
* ``future_kl_weights``      — §4 the future-aware advantage multiplier (forms "appo" and "fipo").

Criteria, future-KL forms, reward scalings and aggregations are picked by name from small registries
(``BRANCH_CRITERIA``, ``FUTURE_KL_FORMS``, ``SCALE_REWARDS``, ``MULTI_OBJECTIVE_AGGREGATIONS``), as in verl's
``core_algos``; an unknown name raises ``ValueError`` listing the valid ones.

Conventions shared by every function:

* ``B`` rows (rollouts), ``T`` completion tokens, masks ``(B, T)`` bool or 0/1 numbers (1 = model token).
* Values at masked-out positions (tool output, template glue, padding) are never read: they may hold anything,
  including NaN. Non-finite log-probs / entropies *on model tokens* raise ``ValueError``.
* Arithmetic runs in float32, or float64 when an input is float64 (bf16 log-probs are upcast: a sum over
  thousands of bf16 values in bf16 is meaningless). Outputs use that compute dtype.
* Nothing returns NaN, including for empty batches, empty rows, singleton or zero-variance groups.

Deviations from the paper / public release (see docs/algorithm.md §8), stated once here:

* Suffix sums are a blocked O(T) scan (release: a T×T decay matrix per row, O(T²) time and memory).
* Selection fills (§1 "fill by descending BS, then by descending entropy") are read as tiers: strict candidates
  (z_H>0 and z_Ω>0) by BS, then the remaining candidates with BS>0 by BS, then the rest by entropy. In a
  degenerate row (Ω constant) BS := z_H and no candidate is strict: the row ranks by entropy alone and every
  pick is reported as the entropy fallback (code 2), so "strict" counts only picks Ω actually informed.
* ``min_distance`` is soft: it is relaxed (in rank order) before any point is duplicated, so duplicates
  happen only when a root (a group, when pooled) has fewer candidates than points asked for.
* The procedure-level factor multiplies the *advantage* (release: the reward, where it cancels).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = [
    "BRANCH_CRITERIA",
    "FALLBACK_CODES",
    "BRANCH_ADVANTAGES",
    "FUTURE_KL_FORMS",
    "MULTI_OBJECTIVE_AGGREGATIONS",
    "SCALE_REWARDS",
    "BranchPoints",
    "BranchingScore",
    "FutureKLWeights",
    "branch_candidates",
    "branch_credit",
    "branching_score",
    "discounted_suffix_sum",
    "dual_group_advantages",
    "fork_advantages",
    "future_kl_weights",
    "NO_BRANCHING",
    "OMEGA_CRITERIA",
    "get_branch_criterion",
    "get_future_kl_form",
    "register_branch_criterion",
    "register_future_kl_form",
    "scalar_rewards",
    "select_branch_points",
    "uses_omega",
]


# --------------------------------------------------------------------------------------------------------------
# Validation helpers. Every message names the argument and says how to fix it.
# --------------------------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}.")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D, got shape {tuple(t.shape)}.")
    return t


def _check_same_shape(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.shape != ref.shape:
            raise ValueError(
                f"`{name}` has shape {tuple(t.shape)} but `{ref_name}` has shape {tuple(ref.shape)}; "
                "pass tensors aligned on the same (rows, completion tokens) grid."
            )


def _check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    device = items[0][1].device
    for name, t in items[1:]:
        if t.device != device:
            raise ValueError(
                f"`{name}` is on {t.device} but `{items[0][0]}` is on {device}; move all inputs to one device."
            )
    return device


def _check_floating(**tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise ValueError(f"`{name}` must be a floating tensor, got {t.dtype}; cast it with `.float()`.")


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _as_bool_mask(name: str, mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        return mask != 0
    raise ValueError(f"`{name}` must be bool or numeric 0/1, got {mask.dtype}.")


def _check_finite_on_mask(name: str, t: torch.Tensor, mask: torch.Tensor, fix: str) -> None:
    if t.device.type == "meta" or t.numel() == 0:
        return
    bad = ~torch.isfinite(t) & mask
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"`{name}` has a non-finite value ({t[row, col].item()}) at row {row}, token {col} on a model token; "
            f"{fix}"
        )


def _check_gamma(name: str, gamma: float) -> float:
    gamma = float(gamma)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1] (a discount), got {gamma}.")
    return gamma


_LOGP_FIX = "compute log-probs in float32 and make sure the sampled token has non-zero probability, or mask it out."


# --------------------------------------------------------------------------------------------------------------
# Registries (selection by name, as verl's core_algos).
# --------------------------------------------------------------------------------------------------------------

# A branch criterion maps (scores, entropy_key, candidates, generator) to ranking keys (tier, primary, secondary),
# each (B, T). Candidates are ranked by tier ascending, then primary descending, then secondary descending, then
# lower token index, then lower row. The tier is also the point's fallback code (0 strict, 1 BS fill, 2 entropy,
# 3 random). Non-candidates are dropped by the caller.
BranchCriterionFn = Callable[
    ["BranchingScore | None", "torch.Tensor | None", torch.Tensor, "torch.Generator | None"],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor],
]
BRANCH_CRITERIA: dict[str, BranchCriterionFn] = {}

FutureKLFormFn = Callable[[torch.Tensor, float], torch.Tensor]
FUTURE_KL_FORMS: dict[str, FutureKLFormFn] = {}

SCALE_REWARDS = ("group", "batch", "none")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")

#: meaning of ``BranchPoints.fallback``
FALLBACK_CODES = {0: "strict", 1: "bs_fill", 2: "entropy", 3: "random", 4: "duplicate", 5: "no_candidate"}
_NON_CANDIDATE_TIER = 99


def register_branch_criterion(name: str):
    """Decorator: register a branch-selection criterion under ``name`` (see ``BranchCriterionFn``)."""

    def deco(fn: BranchCriterionFn) -> BranchCriterionFn:
        BRANCH_CRITERIA[name] = fn
        return fn

    return deco


def register_future_kl_form(name: str):
    """Decorator: register a future-KL form ``fn(f, weight) -> multiplier`` under ``name``."""

    def deco(fn: FutureKLFormFn) -> FutureKLFormFn:
        FUTURE_KL_FORMS[name] = fn
        return fn

    return deco


def _lookup(registry, kind: str, name: str):
    if name not in registry:
        raise ValueError(f"Unknown {kind} {name!r}; valid: {sorted(registry)}.")
    return registry[name]


NO_BRANCHING = "none"
"""The criterion name that turns branching off (M independent roots: GRPO on the same budget)."""

OMEGA_CRITERIA = frozenset({"bs"})
"""Criteria that rank by the Branching Score, so Ω (and its reference log-probs) must be computed."""


def uses_omega(name: str) -> bool:
    """Whether criterion ``name`` reads Ω (only then are Ω-reference log-probs computed and BS metrics logged)."""
    return name in OMEGA_CRITERIA


def get_branch_criterion(name: str) -> BranchCriterionFn:
    """The registered branch criterion ``name`` ("bs", "entropy", "random"); ``ValueError`` listing the valid ones."""
    return _lookup(BRANCH_CRITERIA, "branch criterion", name)


def get_future_kl_form(name: str) -> FutureKLFormFn:
    """The registered future-KL form ``name`` ("appo", "fipo"); ``ValueError`` listing the valid ones."""
    return _lookup(FUTURE_KL_FORMS, "future-KL form", name)


# --------------------------------------------------------------------------------------------------------------
# Discounted suffix sum (the O(T) scan of §1 and §4).
# --------------------------------------------------------------------------------------------------------------

_SCAN_BLOCK = 128


def _discount_matrix(n: int, gamma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n, n) upper-triangular D[i, k] = gamma^(k - i) for k >= i, else 0. Exponents are >= 0: no overflow."""
    idx = torch.arange(n, device=device)
    expo = (idx[None, :] - idx[:, None]).to(dtype)
    upper = expo >= 0
    return torch.where(upper, torch.pow(torch.tensor(gamma, dtype=dtype, device=device), expo.clamp(min=0)), 0.0)


def _suffix_scan(y: torch.Tensor, gamma: float) -> torch.Tensor:
    """out[n, t] = sum_{k>=t} gamma^(k-t) y[n, k] for y (N, T), in O(N·T·block) time and O(N·T + block²) memory.

    Blocked scan: a (block × block) decay matrix inside each block, then the per-block heads are themselves a
    discounted suffix sum with gamma^block (recursion depth log_block T). gamma^-T never appears, so gamma < 1 at
    T = 8192 is safe (the cumulative-sum trick y·gamma^k / gamma^t would overflow).
    """
    n_rows, T = y.shape
    if T == 0 or n_rows == 0:
        return y.clone()
    if gamma == 1.0:
        return y.flip(-1).cumsum(-1).flip(-1)
    block = min(_SCAN_BLOCK, T)
    n_blocks = -(-T // block)
    pad = n_blocks * block - T
    if pad:
        y = torch.nn.functional.pad(y, (0, pad))
    decay = _discount_matrix(block, gamma, y.dtype, y.device)
    local = y.view(n_rows, n_blocks, block) @ decay.T  # suffix sums inside each block
    if n_blocks > 1:
        heads = _suffix_scan(local[..., 0], gamma**block)  # full suffix sum from each block's start
        carry = torch.zeros_like(heads)
        carry[:, :-1] = heads[:, 1:]
        tail = torch.pow(
            torch.tensor(gamma, dtype=y.dtype, device=y.device),
            torch.arange(block, 0, -1, device=y.device, dtype=y.dtype),
        )  # gamma^(block - i): distance from position i to the next block's start
        local = local + carry[..., None] * tail
    return local.reshape(n_rows, n_blocks * block)[:, :T]


def discounted_suffix_sum(x: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted suffix sum, docs/algorithm.md §1 (Ω exponent) and §4 (FutureKL).

    ``out[b, t] = Σ_{k≥t} gamma^(k−t) · mask[b, k] · x[b, k]``

    Args:
        x: (B, T) floating. Values where ``mask`` is 0 are ignored (may be NaN/inf).
        mask: (B, T) bool or 0/1 numbers. Non-bool masks act as weights ``mask[b, k]`` on finite values.
        gamma: discount in [0, 1]. The distance k − t counts every token, masked ones included.

    Returns:
        (B, T) in float32 (float64 if ``x`` is float64). Also defined at masked positions (the suffix sum seen
        from there). O(T) work per row via a blocked reverse scan; never a T×T matrix. Handles B=0, T=0, gamma=1.
    """
    _check_tensor("x", x, 2)
    _check_tensor("mask", mask, 2)
    _check_same_shape("x", x, mask=mask)
    _check_same_device(x=x, mask=mask)
    _check_floating(x=x)
    gamma = _check_gamma("gamma", gamma)
    dtype = _compute_dtype(x)
    on = _as_bool_mask("mask", mask)
    weights = mask.to(dtype) if mask.dtype != torch.bool else on.to(dtype)
    y = torch.where(on, x.to(dtype) * weights, torch.zeros((), dtype=dtype, device=x.device))
    return _suffix_scan(y, gamma)


# --------------------------------------------------------------------------------------------------------------
# §1 Branching Score
# --------------------------------------------------------------------------------------------------------------


class BranchingScore(NamedTuple):
    """Output of ``branching_score``; every tensor is (B, T) and zero off the model-token mask, except ``degenerate``.

    scores:     BS_t = z(H)_t · z(Ω)_t, or z(H)_t in a degenerate row.
    z_entropy:  z-normalised entropy over the row's model tokens.
    z_omega:    z-normalised Ω (0 in a degenerate row).
    omega:      Ω_t itself, in [1 − ε_Ω, 1 + ε_Ω].
    degenerate: (B,) bool: Ω constant over the row's model tokens (or the row has none) → ranked by entropy alone.
    """

    scores: torch.Tensor
    z_entropy: torch.Tensor
    z_omega: torch.Tensor
    omega: torch.Tensor
    degenerate: torch.Tensor


def _masked_z(x: torch.Tensor, on: torch.Tensor, eps: float, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Row z-score over ``on`` with population std: ((x − mean) / (std + eps)), 0 off mask and where std < tol.

    Returns (z (B, T), flat (B,) bool: std < tol or no masked token).
    """
    w = on.to(x.dtype)
    count = w.sum(-1, keepdim=True)
    safe = count.clamp(min=1)
    xm = torch.where(on, x, torch.zeros((), dtype=x.dtype, device=x.device))
    mean = xm.sum(-1, keepdim=True) / safe
    centred = torch.where(on, x - mean, torch.zeros((), dtype=x.dtype, device=x.device))
    std = (centred.square().sum(-1, keepdim=True) / safe).sqrt()
    flat = (std < tol) | (count == 0)
    # A constant row would otherwise turn 1-ulp rounding of its mean into z-scores of order ulp/eps.
    z = torch.where(flat, torch.zeros((), dtype=x.dtype, device=x.device), centred / (std + eps))
    return z, flat.squeeze(-1)


def branching_score(
    entropy: torch.Tensor,
    logp_current: torch.Tensor,
    logp_reference: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    omega_clip: float = 0.2,
    eps: float = 1e-6,
    log_ratio_clamp: float = 20.0,
    degenerate_tol: float = 1e-6,
) -> BranchingScore:
    """Branching Score, docs/algorithm.md §1.

    Ω_t = clip(exp(clamp(Σ_{k≥t} γ^{k−t} m_k (logp_current_k − logp_reference_k), ±log_ratio_clamp)),
    1 − omega_clip, 1 + omega_clip); z(x) = (x − mean) / (std + eps) over the row's model tokens (population std);
    BS_t = z(H)_t · z(Ω)_t.

    Degenerate Ω: if std(Ω) over the row's model tokens is < ``degenerate_tol`` (π_θ = π_ref_Ω, e.g. the first
    update after generation, or every Ω clipped to the same bound), z(Ω) := 0, ``degenerate`` is True and
    ``scores`` := z(H) (entropy branching). Likewise z(H) := 0 when the entropy is constant over the row. A row
    with no model token is all zeros and degenerate.

    Args:
        entropy: (B, T) floating, entropy of the full next-token distribution at each completion token.
        logp_current: (B, T) floating, log π_θ of the sampled tokens.
        logp_reference: (B, T) floating, log π_ref_Ω of the sampled tokens (behaviour policy by default).
        mask: (B, T) bool/0-1, model tokens. Off-mask values of the three tensors are never read.
        gamma: Ω discount γ in [0, 1] (default 1).
        omega_clip: ε_Ω (default 0.2).
        eps: z-score epsilon (default 1e-6).
        log_ratio_clamp: clamp of Ω's exponent before exp (default 20).
        degenerate_tol: std below which a signal counts as constant (default 1e-6).

    Returns:
        ``BranchingScore`` (all (B, T), zero off mask; ``degenerate`` (B,) bool). Never NaN.
    """
    for name, t in (("entropy", entropy), ("logp_current", logp_current), ("logp_reference", logp_reference)):
        _check_tensor(name, t, 2)
    _check_tensor("mask", mask, 2)
    _check_same_shape(
        "entropy", entropy, logp_current=logp_current, logp_reference=logp_reference, mask=mask
    )
    _check_same_device(entropy=entropy, logp_current=logp_current, logp_reference=logp_reference, mask=mask)
    _check_floating(entropy=entropy, logp_current=logp_current, logp_reference=logp_reference)
    if not 0.0 <= omega_clip < 1.0:
        raise ValueError(f"`omega_clip` (ε_Ω) must be in [0, 1), got {omega_clip}.")
    on = _as_bool_mask("mask", mask)
    _check_finite_on_mask("entropy", entropy, on, "compute entropies in float32 from finite logits, or mask it out.")
    _check_finite_on_mask("logp_current", logp_current, on, _LOGP_FIX)
    _check_finite_on_mask("logp_reference", logp_reference, on, _LOGP_FIX)
    dtype = _compute_dtype(entropy, logp_current, logp_reference)
    zero = torch.zeros((), dtype=dtype, device=entropy.device)

    log_ratio = torch.where(on, logp_current.to(dtype) - logp_reference.to(dtype), zero)
    gain = discounted_suffix_sum(log_ratio, on, gamma).clamp(-log_ratio_clamp, log_ratio_clamp)
    omega = torch.where(on, gain.exp().clamp(1.0 - omega_clip, 1.0 + omega_clip), zero)

    z_entropy, _ = _masked_z(torch.where(on, entropy.to(dtype), zero), on, eps, degenerate_tol)
    z_omega, degenerate = _masked_z(omega, on, eps, degenerate_tol)
    scores = torch.where(degenerate[:, None], z_entropy, z_entropy * z_omega)
    return BranchingScore(scores, z_entropy, z_omega, omega, degenerate)


def branch_candidates(
    model_mask: torch.Tensor,
    completion_lengths: torch.Tensor,
    max_completion_length: int,
    min_branch_tokens: int = 1,
    whitespace_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokens that may be branched at, docs/algorithm.md §1 candidate rules.

    A branch keeps tokens 0..s and resamples from s+1, so token s is a candidate iff
    model token ∧ not whitespace-only ∧ s < length − 1 (not the final token: nothing left to resample)
    ∧ max_completion_length − (s + 1) ≥ min_branch_tokens (enough budget left for the continuation).

    Args:
        model_mask: (B, T) bool/0-1, 1 = generated by the policy.
        completion_lengths: (B,) integer, real length of each completion (≤ T; right padding beyond).
        max_completion_length: whole-completion budget M_len (prefix included for branches).
        min_branch_tokens: minimum continuation budget (≥ 0).
        whitespace_mask: optional (B, T) bool, True where the token decodes to whitespace only.

    Returns:
        (B, T) bool.
    """
    _check_tensor("model_mask", model_mask, 2)
    _check_tensor("completion_lengths", completion_lengths, 1)
    if completion_lengths.shape[0] != model_mask.shape[0]:
        raise ValueError(
            f"`completion_lengths` has {completion_lengths.shape[0]} rows but `model_mask` has {model_mask.shape[0]}."
        )
    if completion_lengths.is_floating_point() or completion_lengths.dtype == torch.bool:
        raise ValueError(f"`completion_lengths` must be an integer tensor, got {completion_lengths.dtype}.")
    if whitespace_mask is not None:
        _check_tensor("whitespace_mask", whitespace_mask, 2)
        _check_same_shape("model_mask", model_mask, whitespace_mask=whitespace_mask)
    _check_same_device(model_mask=model_mask, completion_lengths=completion_lengths, whitespace_mask=whitespace_mask)
    if min_branch_tokens < 0:
        raise ValueError(f"`min_branch_tokens` must be >= 0, got {min_branch_tokens}.")
    B, T = model_mask.shape
    if completion_lengths.device.type != "meta" and B and (
        bool((completion_lengths < 0).any()) or bool((completion_lengths > T).any())
    ):
        raise ValueError(f"`completion_lengths` must lie in [0, T={T}], got {completion_lengths.tolist()}.")
    pos = torch.arange(T, device=model_mask.device)
    cand = _as_bool_mask("model_mask", model_mask)
    cand = cand & (pos[None, :] < completion_lengths[:, None] - 1)
    cand = cand & (max_completion_length - (pos[None, :] + 1) >= min_branch_tokens)
    if whitespace_mask is not None:
        cand = cand & ~_as_bool_mask("whitespace_mask", whitespace_mask)
    return cand


# --------------------------------------------------------------------------------------------------------------
# §1 Branch-point selection
# --------------------------------------------------------------------------------------------------------------


class BranchPoints(NamedTuple):
    """Chosen branch points, all (P,).

    root:     long, row index of the root rollout the branch continues.
    position: long, token s kept as the last prefix token; **−1 means "no candidate: resample this branch from the
              prompt" (no shared prefix, so the branch gives its root no prefix credit).**
    strict:   bool, ``fallback == 0``.
    fallback: long, how the point was chosen (``FALLBACK_CODES``): 0 strict (z_H>0 ∧ z_Ω>0), 1 BS fill, 2 entropy
              (fill, or the "entropy" criterion), 3 random, 4 duplicate of an earlier point, 5 no candidate.
    score:    float, BS at the point (0 when position is −1 or no scores were given).
    """

    root: torch.Tensor
    position: torch.Tensor
    strict: torch.Tensor
    fallback: torch.Tensor
    score: torch.Tensor


@register_branch_criterion("bs")
def _criterion_bs(scores, entropy_key, candidates, generator):
    if scores is None:
        raise ValueError("criterion 'bs' needs `scores` (the BranchingScore of the roots).")
    bs = scores.scores
    # Degenerate rows (z_Ω ≡ 0) have no strict candidate (spec §1: strict needs z_Ω > 0): the whole row is the
    # entropy fallback, so `fallback`/`strict` report how often Ω actually informed a pick.
    strict = (scores.z_entropy > 0) & (scores.z_omega > 0) & ~scores.degenerate[:, None]
    tier = torch.where(strict, 0, torch.where((bs > 0) & ~scores.degenerate[:, None], 1, 2))
    primary = torch.where(tier < 2, bs, entropy_key)
    secondary = torch.where(tier < 2, entropy_key, torch.zeros_like(entropy_key))
    return tier, primary, secondary


@register_branch_criterion("entropy")
def _criterion_entropy(scores, entropy_key, candidates, generator):
    return torch.full_like(candidates, 2, dtype=torch.long), entropy_key, torch.zeros_like(entropy_key)


@register_branch_criterion("random")
def _criterion_random(scores, entropy_key, candidates, generator):
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
) -> BranchPoints:
    """Choose branch points, docs/algorithm.md §1 (selection) and the ablation criteria.

    Ranking (``criterion``, from ``BRANCH_CRITERIA``):
      * "bs": strict candidates (z_H>0 ∧ z_Ω>0) by BS desc (code 0); then candidates with BS>0 by BS desc (code 1);
        then the rest by entropy desc (code 2). A degenerate row has BS = z_H and no strict candidate, so it ranks
        by entropy alone, all code 2.
      * "entropy": by entropy desc (code 2).
      * "random": uniform over candidates, drawn from ``generator`` (code 3); reproducible for a seeded generator.
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

    Returns:
        ``BranchPoints`` of length P (B·K per-root; B·K in pooled mode too, since every group asks for
        group_size·K). Tensors live on ``candidates.device``.

    Complexity: three (B, T) stable sorts, then a python loop over groups touching at most
    group_size·K·max(1, 2·min_distance − 1) ranked candidates each (≈0.1 s at B=64, T=8192 on one CPU thread).
    """
    fn = get_branch_criterion(criterion)
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
    device = candidates.device
    if entropy is not None:
        _check_finite_on_mask("entropy", entropy, candidates, "pass finite entropies on candidate tokens.")
        entropy_key = entropy.to(torch.float64)
    elif scores is not None:
        entropy_key = scores.z_entropy.to(torch.float64)
    elif criterion == "random":
        entropy_key = torch.zeros(B, T, dtype=torch.float64, device=device)
    else:
        raise ValueError(f"criterion {criterion!r} needs `scores` or `entropy`.")

    P = B * num_branches
    if P == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return BranchPoints(empty, empty.clone(), empty.bool(), empty.clone(), torch.zeros(0, device=device))

    tier, primary, secondary = fn(scores, entropy_key, candidates, generator)
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
    quota = gs * num_branches
    window = min(T * gs, quota * max(1, 2 * min_distance - 1))
    top = order[:, :window].tolist()
    tier_flat = flat(tier).gather(1, order[:, :window]).tolist()

    roots: list[int] = []
    positions: list[int] = []
    codes: list[int] = []
    for g in range(G):
        n = min(n_cand[g], window)
        ranked = [(f % gs, f // gs) for f in top[g][:n]]
        if not ranked:
            for j in range(quota):
                roots.append(g * gs + j // num_branches)
                positions.append(-1)
                codes.append(5)
            continue
        picked = _greedy_pick(ranked, quota, min_distance)
        for j in range(quota):
            i = picked[j % len(picked)]
            roots.append(g * gs + ranked[i][0])
            positions.append(ranked[i][1])
            codes.append(tier_flat[g][i] if j < len(picked) else 4)

    root_t = torch.tensor(roots, dtype=torch.long, device=device)
    pos_t = torch.tensor(positions, dtype=torch.long, device=device)
    code_t = torch.tensor(codes, dtype=torch.long, device=device)
    if scores is None:
        score_t = torch.zeros(P, dtype=torch.float32, device=device)
    else:
        score_t = scores.scores[root_t, pos_t.clamp(min=0)]
        score_t = torch.where(pos_t >= 0, score_t, torch.zeros((), dtype=score_t.dtype, device=device))
    return BranchPoints(root_t, pos_t, code_t == 0, code_t, score_t)


# --------------------------------------------------------------------------------------------------------------
# §3 Dual-group advantages
# --------------------------------------------------------------------------------------------------------------


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
        num_branches: branches per prompt (N·B) ≥ 0.

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


# --------------------------------------------------------------------------------------------------------------
# §3 Per-token credit: prefix credit from branches × procedure-level scaling
# --------------------------------------------------------------------------------------------------------------


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
    on = _as_bool_mask("model_mask", model_mask)
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


BRANCH_ADVANTAGES = ("dual_group", "local")


def scalar_rewards(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor) -> torch.Tensor:
    """(B, F) rewards per function → (B,) weighted ``nansum``, NaN where every function returned None (as TRL)."""
    _check_tensor("rewards_per_func", rewards_per_func, 2)
    _check_tensor("reward_weights", reward_weights, 1)
    rewards = (rewards_per_func * reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
    return rewards


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


# --------------------------------------------------------------------------------------------------------------
# §4 Future-aware advantage weights
# --------------------------------------------------------------------------------------------------------------


class FutureKLWeights(NamedTuple):
    """Output of ``future_kl_weights``; all (B, T), detached.

    multiplier: Ã/A — ``1 + weight·f`` ("appo") or ``f`` ("fipo") on model tokens, **1.0 off the mask** so that
                ``advantages * multiplier`` is harmless there (the loss mask removes those tokens anyway).
    f:          the clipped future factor f_t (0 off the mask).
    future_kl:  FutureKL_t = Σ_{k≥t} γ_F^{k−t} m_k δ_k over kept tokens (0 off the mask).
    """

    multiplier: torch.Tensor
    f: torch.Tensor
    future_kl: torch.Tensor


@register_future_kl_form("appo")
def _form_appo(f: torch.Tensor, weight: float) -> torch.Tensor:
    return 1.0 + weight * f


@register_future_kl_form("fipo")
def _form_fipo(f: torch.Tensor, weight: float) -> torch.Tensor:
    return f


def future_kl_weights(
    logp_current: torch.Tensor,
    logp_old: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    decay: float = 64.0,
    clip: float = 0.2,
    clip_high_only: bool = True,
    weight: float = 1.0,
    safety_thresh: float = 6.0,
    dual_clip_c: float | None = 3.0,
    form: str = "appo",
    log_ratio_clamp: float = 20.0,
    normalize: bool = False,
) -> FutureKLWeights:
    """Future-aware advantage multiplier, docs/algorithm.md §4.

    δ_k = clamp(logp_current_k − logp_old_k, ±log_ratio_clamp); tokens with δ_k > ln c (c = ``dual_clip_c``) are
    left out of the sum (None: none left out); FutureKL_t = Σ_{k≥t} γ_F^{k−t} m_k δ_k with γ_F = 2^(−1/decay);
    f_t = clip(exp(FutureKL_t), 1 if ``clip_high_only`` else 1 − ε_f, 1 + ε_f); where A_t < 0 and exp(δ_t) >
    ``safety_thresh``, f_t is capped at 1; multiplier = 1 + b·f ("appo") or f ("fipo"). Unnormalised (the paper),
    with b = 1 and f ≥ 1 every advantage is at least doubled relative to plain PPO; ``normalize=True`` divides the
    multiplier by its on-policy value form(f = 1) (1 + b for "appo"), so it is exactly 1 when π_θ = π_old and the
    relative weights of off-policy tokens are unchanged.

    Args:
        logp_current: (B, T) floating log π_θ (gradients are not propagated: everything here is detached).
        logp_old: (B, T) floating log π_old.
        mask: (B, T) bool/0-1, model tokens of the loss.
        advantages: (B,) or (B, T) floating A.
        decay: half-life in tokens (> 0, inf allowed → γ_F = 1). clip: ε_f. weight: b.

    Returns:
        ``FutureKLWeights`` (multiplier 1 off mask; f and future_kl 0 off mask).
    """
    form_fn = get_future_kl_form(form)
    _check_tensor("logp_current", logp_current, 2)
    _check_tensor("logp_old", logp_old, 2)
    _check_tensor("mask", mask, 2)
    _check_tensor("advantages", advantages)
    _check_same_shape("logp_current", logp_current, logp_old=logp_old, mask=mask)
    if advantages.dim() == 1:
        if advantages.shape[0] != logp_current.shape[0]:
            raise ValueError(
                f"`advantages` has {advantages.shape[0]} rows but `logp_current` has {logp_current.shape[0]}."
            )
    elif advantages.shape != logp_current.shape:
        raise ValueError(
            f"`advantages` must be (B,) or (B, T) = {tuple(logp_current.shape)}, got {tuple(advantages.shape)}."
        )
    _check_same_device(logp_current=logp_current, logp_old=logp_old, mask=mask, advantages=advantages)
    _check_floating(logp_current=logp_current, logp_old=logp_old, advantages=advantages)
    if not decay > 0:
        raise ValueError(f"`decay` must be > 0 tokens, got {decay}.")
    if not 0.0 <= clip < 1.0:
        raise ValueError(f"`clip` (ε_f) must be in [0, 1), got {clip}.")
    if dual_clip_c is not None and not dual_clip_c > 0:
        raise ValueError(f"`dual_clip_c` must be > 0 or None, got {dual_clip_c}.")
    on = _as_bool_mask("mask", mask)
    _check_finite_on_mask("logp_current", logp_current, on, _LOGP_FIX)
    _check_finite_on_mask("logp_old", logp_old, on, _LOGP_FIX)
    dtype = _compute_dtype(logp_current, logp_old, advantages)
    zero = torch.zeros((), dtype=dtype, device=logp_current.device)
    gamma_f = 2.0 ** (-1.0 / decay)

    with torch.no_grad():
        delta = torch.where(on, logp_current.detach().to(dtype) - logp_old.detach().to(dtype), zero)
        delta = delta.clamp(-log_ratio_clamp, log_ratio_clamp)
        keep = on if dual_clip_c is None else on & (delta <= math.log(dual_clip_c))
        future_kl = torch.where(on, discounted_suffix_sum(delta, keep, gamma_f), zero)
        low = 1.0 if clip_high_only else 1.0 - clip
        f = future_kl.clamp(-log_ratio_clamp, log_ratio_clamp).exp().clamp(low, 1.0 + clip)
        adv = advantages.detach().to(dtype)
        if adv.dim() == 1:
            adv = adv[:, None]
        unsafe = (adv < 0) & (delta.exp() > safety_thresh)
        f = torch.where(unsafe, f.clamp(max=1.0), f)
        f = torch.where(on, f, zero)
        mult = form_fn(f, weight)
        if normalize:
            mult = mult / form_fn(torch.ones((), dtype=dtype, device=f.device), weight)
        multiplier = torch.where(on, mult, torch.ones((), dtype=dtype, device=f.device))
    return FutureKLWeights(multiplier, f, future_kl)
