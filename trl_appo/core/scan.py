"""Discounted suffix sum: the O(T) reverse scan both Ω (docs/algorithm.md §1) and FutureKL (§4) need."""

from __future__ import annotations

import torch

from ._checks import (
    _as_bool_mask,
    _check_floating,
    _check_gamma,
    _check_same_device,
    _check_same_shape,
    _check_tensor,
    _compute_dtype,
)

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
