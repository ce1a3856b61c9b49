"""Numerical checks a reader (notebook 02) and the test suite run on any bijector or model.

Each function *measures* an error and returns it; tests assert on the numbers, notebooks print them.
"""

from __future__ import annotations

import torch
from torch.autograd.functional import jacobian

__all__ = ["inverse_error", "jacobian_logdet", "logdet_error", "model_report", "perturb"]


def jacobian_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """``log|det J|`` of ``fn`` at each sample of ``x`` from the full autograd Jacobian (slogdet).

    ``fn`` maps a batch to a batch (any shapes); each sample's map is flattened to R^D -> R^D.
    """
    out = []
    for i in range(x.shape[0]):
        shape = x[i].shape

        def one(v, shape=shape):
            return fn(v.view(1, *shape)).reshape(-1)

        jac = jacobian(one, x[i].reshape(-1))
        sign, value = torch.linalg.slogdet(jac)
        out.append(value if sign != 0 else torch.tensor(float("-inf"), dtype=value.dtype))
    return torch.stack(out)


def logdet_error(fn, x: torch.Tensor, logdet: torch.Tensor) -> float:
    """Largest ``|reported log-det - autograd log|det J||`` over the batch (``logdet`` may carry a graph:
    only its value is used)."""
    return (jacobian_logdet(fn, x) - logdet.detach()).abs().max().item()


def inverse_error(layer, x: torch.Tensor) -> float:
    """Largest ``|inverse(forward(x)) - x|`` of a bijector."""
    with torch.no_grad():
        y, _ = layer(x)
        return float((layer.inverse(y)[0] - x).abs().max())


def model_report(model, x: torch.Tensor) -> dict:
    """Reconstruction and log-det errors of a model's encode/decode on ``x`` (use float64, small D)."""
    enc = model.encode(x)
    rec = (model.decode(enc.z) - x).detach().abs().max().item()
    fwd = logdet_error(lambda v: model.encode(v).flat(), x, enc.logdet)
    inv = logdet_error(lambda v: model.decode(v), enc.flat().detach(), -enc.logdet)
    return {"reconstruction_error": rec, "logdet_error_encode": fwd, "logdet_error_decode": inv}


def perturb(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add seeded Gaussian noise to every parameter, moving layers away from their identity initialisation
    so that checks and pictures show a non-trivial map."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(dtype=p.dtype, device=p.device))
    return module
