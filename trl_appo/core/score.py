"""§1 Branching Score (where to branch): ``branching_score`` and the candidate rule ``branch_candidates``.

docs/algorithm.md §1. BS = z(H)·z(Ω) per model token, with the degenerate-Ω rule; which tokens may be branched at.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import (
    _LOGP_FIX,
    _as_bool_mask,
    _check_finite_on_mask,
    _check_floating,
    _check_same_device,
    _check_same_shape,
    _check_tensor,
    _compute_dtype,
)
from .scan import discounted_suffix_sum


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

