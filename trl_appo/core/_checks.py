"""Argument checks shared by the core functions. Every message names the argument and says how to fix it."""

from __future__ import annotations

import torch


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


def _lookup(registry, kind: str, name: str):
    if name not in registry:
        raise ValueError(f"Unknown {kind} {name!r}; valid: {sorted(registry)}.")
    return registry[name]
