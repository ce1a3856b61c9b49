"""One helper that checks any bijector or model the same way (in the spirit of zuko's tests).

* ``inverse(forward(x)) == x`` in float64,
* the log-det of both directions equals ``slogdet`` of the autograd Jacobian (float64),
* gradients reach every parameter,
* a ``state_dict`` round trip reproduces the outputs.
"""

from __future__ import annotations

import copy

import torch

from flowlib.checks import jacobian_logdet, perturb  # noqa: F401  (re-exported for tests)


def check_jacobian_logdet(fn, x: torch.Tensor, logdet: torch.Tensor, atol: float = 1e-6) -> None:
    """``logdet[i]`` must equal ``log|det J|`` of ``fn`` at sample ``i`` (fn maps a batch to a batch)."""
    reference = jacobian_logdet(fn, x)
    assert torch.all(torch.isfinite(reference)), "Jacobian is singular"
    assert torch.allclose(reference, logdet, atol=atol, rtol=0), (
        f"log|det J| from autograd {reference.tolist()} != reported {logdet.tolist()}"
    )


def check_bijector(make, x: torch.Tensor, *, train_batch: torch.Tensor | None = None) -> torch.nn.Module:
    """Full check of a bijector with ``forward(x) -> (y, logdet)`` and ``inverse(y) -> (x, logdet)``.

    ``make()`` builds a fresh instance. ``train_batch`` (if given) is passed once in training mode first
    (data-dependent initialisation, running statistics).
    """
    torch.manual_seed(0)
    layer = make().double()
    if train_batch is not None:
        layer.train()
        layer(train_batch.double())
    perturb(layer)
    layer.eval()
    x = x.double()

    y, ld = layer(x)
    assert ld.shape == (x.shape[0],), f"logdet must be per sample, got shape {tuple(ld.shape)}"
    x_rec, ld_inv = layer.inverse(y)
    assert torch.allclose(x_rec, x, atol=1e-8, rtol=0), f"inverse error {(x_rec - x).abs().max():.3e}"
    assert torch.allclose(ld + ld_inv, torch.zeros_like(ld), atol=1e-8)

    check_jacobian_logdet(lambda v: layer(v)[0], x, ld)
    check_jacobian_logdet(lambda v: layer.inverse(v)[0], y, ld_inv)

    check_gradients(layer, lambda: (layer(x)[0].pow(2).sum() + layer(x)[1].sum()))
    check_state_dict(layer, make, lambda m: m(x)[0])
    return layer


def check_gradients(module: torch.nn.Module, loss_fn) -> None:
    module.zero_grad()
    loss_fn().backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient reaches: {missing}"


def check_state_dict(module: torch.nn.Module, make, output_fn) -> None:
    clone = make().to(dtype=next(module.parameters()).dtype)
    clone.load_state_dict(copy.deepcopy(module.state_dict()))
    clone.train(module.training)
    assert torch.equal(output_fn(module), output_fn(clone)), "state_dict round trip changed the outputs"
