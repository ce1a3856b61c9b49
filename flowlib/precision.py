"""Mixed precision for the coupling networks (opt-in: ``TrainConfig(precision="bf16")``).

Inside :func:`conditioner_precision` a GLOW affine coupling runs its conditioner network (the Linear or
convolution layers that predict shift and scale) under :func:`torch.autocast` in that dtype, and casts the
two outputs back to the input's dtype before anything else uses them. Everything a likelihood depends on
exactly stays in the model's dtype (float32): the affine step and its log-determinant, ActNorm, the LU
1x1 convolution and its log-determinant, the prior and the loss. Only gradient-recording passes (training
steps) change: an evaluation (validation, test bits/dim) is computed in float32 whatever the setting, so
reported numbers never carry bf16 rounding. MAF's MADE networks are not affected.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

__all__ = ["PRECISIONS", "conditioner_dtype", "conditioner_precision"]

#: ``TrainConfig.precision`` -> the conditioners' autocast dtype (None: the model's own dtype)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}

_DTYPE: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("conditioner_dtype", default=None)


def conditioner_dtype() -> torch.dtype | None:
    """The autocast dtype for coupling conditioners in a gradient-recording pass, or None."""
    return _DTYPE.get() if torch.is_grad_enabled() else None


@contextlib.contextmanager
def conditioner_precision(precision: str | torch.dtype | None):
    """Run the coupling conditioners of training passes in ``precision`` (``"bf16"``, ``"fp32"``, a dtype
    or None) inside the block."""
    if isinstance(precision, str):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        precision = PRECISIONS[precision]
    dtype = precision
    token = _DTYPE.set(dtype)
    try:
        yield
    finally:
        _DTYPE.reset(token)
