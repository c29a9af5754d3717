"""§4 Loss: the future-aware advantage multiplier ``future_kl_weights`` and its forms (``FUTURE_KL_FORMS``).

docs/algorithm.md §4.
"""

from __future__ import annotations

import math
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
from .registry import get_future_kl_form, register_future_kl_form
from .scan import discounted_suffix_sum


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
    """1 + b·f (the paper)."""
    return 1.0 + weight * f


@register_future_kl_form("fipo")
def _form_fipo(f: torch.Tensor, weight: float) -> torch.Tensor:
    """f alone (FIPO)."""
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
