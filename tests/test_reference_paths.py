"""Every layer and model computes the same on its fast path (fused autograd nodes, in-place evaluation,
scratch buffers, weight caches, folded ActNorm, incremental MAF decoding) as on its plain PyTorch reference
(``with flowlib.fast_paths.disabled():``): values to 1e-12 in float64, training gradients to 1e-5 in float32
(issue 17, item 6)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from flowlib import fast_paths, fused, scratch
from flowlib.bijectors import (
    MADE,
    ActNorm,
    AffineCoupling,
    BatchNormFlow,
    InvertibleConv1x1,
    InvertibleLinear,
    MaskedAffineAutoregressive,
    cached_weights,
)
from flowlib.distill import distillation_loss
from flowlib.models import MAF, Glow
from flowlib.selfnorm import SelfNormFC, SelfNormLinear, exact_logdet_values, selfnorm_loss

IMAGE = (4, 4, 4)  # (C, H, W) for the image layers

LAYERS = {
    "coupling (mlp)": (lambda: AffineCoupling(6, 16), (6,)),
    "coupling (official)": (lambda: AffineCoupling(6, 16, conditioner="official"), (6,)),
    "coupling (image)": (lambda: AffineCoupling(4, 8, image=True), IMAGE),
    "MADE": (lambda: MADE(5, 16, layers=2), (5,)),
    "MADE, 3 layers, D = 1 column unused": (lambda: MADE(7, 4, layers=3), (7,)),
    "MAF transform": (lambda: MaskedAffineAutoregressive(5, 16), (5,)),
    "MAF transform, D = 63": (lambda: MaskedAffineAutoregressive(63, 32), (63,)),
    "batch norm": (lambda: BatchNormFlow(5), (5,)),
    "actnorm": (lambda: ActNorm(4), IMAGE),
    "invertible linear": (lambda: InvertibleLinear(6), (6,)),
    "invertible 1x1 conv": (lambda: InvertibleConv1x1(4), IMAGE),
}

FUSED_NODES = (fused.AffineCouplingFn, fused.MadeAffineFn, fused.BatchNormFn, fused.SelfNormDenseFn)

MODELS = {
    "MAF": (lambda: MAF(5, depth=3, hidden=16), (5,)),
    "Glow (tabular, mlp)": (lambda: Glow((6,), depth=2, hidden=16), (6,)),
    "Glow (tabular, official)": (lambda: Glow((6,), depth=3, hidden=8, conditioner="official"), (6,)),
    "Glow (image)": (lambda: Glow((1, 8, 8), levels=2, depth=2, hidden=8), (1, 8, 8)),
}


def _randomised(module: torch.nn.Module, dtype, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """``module`` in ``dtype`` with every parameter (zero-initialised output layers included) random."""
    module = module.to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=dtype))
    return module


def _x(shape, n=32, dtype=torch.float64, seed=1):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _close(a, b, tol):
    """``a`` equals ``b`` to ``tol`` relative to the larger magnitude (absolute below 1)."""
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    assert a.shape == b.shape
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= tol * scale, f"differ by {err:.3g} (scale {scale:.3g}, tolerance {tol})"


def _both(module, fn):
    """``fn`` on two copies of ``module``: the fast path's result and the reference's, and the copies."""
    fast, ref = copy.deepcopy(module), copy.deepcopy(module)
    out_fast = fn(fast)
    with fast_paths.disabled():
        out_ref = fn(ref)
    return out_fast, out_ref, fast, ref


@pytest.mark.parametrize("grad", [True, False], ids=["training pass", "evaluation pass"])
@pytest.mark.parametrize("training", [True, False], ids=["train mode", "eval mode"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_every_layer_computes_the_same_on_both_paths_in_float64(name, training, grad):
    make, shape = LAYERS[name]
    layer = _randomised(make(), torch.float64).train(training)
    x = _x(shape)
    if isinstance(layer, BatchNormFlow):  # running averages away from their initial values
        with torch.no_grad():
            layer.running_mean.copy_(torch.linspace(-1, 1, 5, dtype=torch.float64))
            layer.running_var.copy_(torch.linspace(0.5, 2, 5, dtype=torch.float64))
    reversible = isinstance(layer, (MaskedAffineAutoregressive, BatchNormFlow))
    for kwargs in ([{}, {"reversed_features": True}] if reversible else [{}]):
        with torch.set_grad_enabled(grad):
            out_fast, out_ref, fast, ref = _both(layer, lambda m, kw=kwargs: m(x, **kw))
        if isinstance(layer, MADE):
            _close(out_fast, out_ref, 1e-12)
            continue
        _close(out_fast[0], out_ref[0], 1e-12)
        _close(out_fast[1], out_ref[1], 1e-12)
        for a, b in zip(fast.state_dict().values(), ref.state_dict().values()):  # running averages
            _close(a.double(), b.double(), 1e-12)
        if hasattr(layer, "inverse"):
            y = out_fast[0].detach()
            inv_fast, inv_ref, _, _ = _both(layer.eval(), lambda m, y=y: m.inverse(y))
            _close(inv_fast[0], inv_ref[0], 1e-12)
            _close(inv_fast[1], inv_ref[1], 1e-12)
            layer.train(training)


def _initialised(name):
    make, shape = MODELS[name]
    model = _randomised(make(), torch.float64, std=0.05)  # small enough for decoding to stay finite
    model.train()
    with torch.no_grad():
        model.log_prob(_x(shape, n=64, seed=5))  # ActNorm's data-dependent initialisation (GLOW)
    return model, shape


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_encodes_decodes_and_scores_the_same_on_both_paths_in_float64(name):
    model, shape = _initialised(name)
    x = _x(shape)
    for training in (True, False):
        model.train(training)
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                (lp_fast, enc_fast), (lp_ref, enc_ref), _, _ = _both(
                    model, lambda m: (m.log_prob(x), m.encode(x)))
            _close(lp_fast, lp_ref, 1e-12)
            for a, b in zip(enc_fast.latents, enc_ref.latents, strict=True):
                _close(a, b, 1e-12)
    model.eval()
    noise = model.sample_noise(16, generator=torch.Generator().manual_seed(2))
    for grad in (True, False):
        with torch.set_grad_enabled(grad), cached_weights(model):
            s_fast, s_ref, _, _ = _both(model, lambda m: m.sample(noise=noise, temperature=0.7))
        _close(s_fast, s_ref, 1e-12)


def _grads(module):
    return {k: p.grad for k, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(MODELS))
def test_a_float32_training_step_has_the_same_gradients_on_both_paths(name):
    model, shape = _initialised(name)
    model = model.float().train()
    x = _x(shape, n=64, dtype=torch.float32)
    noise = model.sample_noise(8, generator=torch.Generator().manual_seed(3))

    def step(m):
        loss = -m.log_prob(x).mean() + 0.1 * m.sample(noise=noise, temperature=0.7).square().mean()
        loss.backward()
        return loss.detach()

    loss_fast, loss_ref, fast, ref = _both(model, step)
    _close(loss_fast, loss_ref, 1e-5)
    g_fast, g_ref = _grads(fast), _grads(ref)
    assert g_fast.keys() == g_ref.keys() == {k for k, p in model.named_parameters() if p.requires_grad}
    for k in g_fast:
        _close(g_fast[k], g_ref[k], 1e-5)


@pytest.mark.parametrize("method", ["ilkd", "skd"])
def test_a_distilled_float32_step_has_the_same_gradients_on_both_paths(method):
    teacher, _ = _initialised("Glow (tabular, official)")  # 3 steps
    student, _ = _initialised("Glow (tabular, mlp)")  # 2 steps
    teacher, student = teacher.float().eval(), student.float().train()
    x = _x((6,), n=64, dtype=torch.float32)

    def step(m):
        out = distillation_loss(teacher, m, x, method=method, generator=torch.Generator().manual_seed(4))
        out.total.backward()
        return out.total.detach()

    loss_fast, loss_ref, fast, ref = _both(student, step)
    _close(loss_fast, loss_ref, 1e-5)
    for k, g in _grads(fast).items():
        _close(g, _grads(ref)[k], 1e-5)


def test_disabled_turns_off_every_fast_path_and_restores_the_setting(monkeypatch):
    maf, glow = _initialised("MAF")[0].train(), _initialised("Glow (tabular, mlp)")[0]
    image = _initialised("Glow (image)")[0]

    def refuse(*args, **kwargs):
        raise AssertionError("a fused node ran with the fast paths disabled")

    for node in FUSED_NODES:
        monkeypatch.setattr(node, "apply", refuse)
    monkeypatch.setattr(fused.AffineCouplingFn, "compute", refuse)
    monkeypatch.setattr(fused, "mix_channels", refuse)
    monkeypatch.setattr(fused, "channels_last_conv_stack", refuse)
    snf = SelfNormFC(5, layers=2).train()
    with fast_paths.disabled():
        assert not fast_paths.enabled()
        with fast_paths.disabled():  # nested
            pass
        assert not fast_paths.enabled()
        (-maf.log_prob(_x((5,))).mean() - glow.log_prob(_x((6,))).mean()).backward()
        image.log_prob(_x((1, 8, 8))).mean().backward()
        image.eval()
        with torch.no_grad():
            image.decode(image.encode(_x((1, 8, 8))).z)
        (-snf.log_prob(_x((5,), dtype=torch.float32)).mean() + selfnorm_loss(snf)).backward()
        with torch.no_grad():
            arena = scratch.Arena()
            with scratch.using(arena, 32):
                assert scratch.out((32, 5), _x((5,))) is None  # no scratch buffers
    assert fast_paths.enabled()
    with pytest.raises(AssertionError, match="fused node ran"):  # and back on afterwards
        maf.log_prob(_x((5,)))


def test_the_switch_is_per_thread():
    seen = {}
    with fast_paths.disabled():
        worker = threading.Thread(target=lambda: seen.setdefault("other", fast_paths.enabled()))
        worker.start()
        worker.join()
        seen["this"] = fast_paths.enabled()
    assert seen == {"other": True, "this": False}


def test_reference_methods_use_no_fast_path_even_with_the_fast_paths_on(monkeypatch):
    coupling = _randomised(AffineCoupling(6, 16), torch.float64)
    transform = _randomised(MaskedAffineAutoregressive(5, 16), torch.float64)
    norm = _randomised(BatchNormFlow(5), torch.float64)
    dense = _randomised(SelfNormLinear(5), torch.float64).train()
    x6, x5 = _x((6,)), _x((5,))
    with fast_paths.disabled():
        expected = [coupling(x6), transform(x5), norm(x5), transform.inverse(x5), dense(x5)]

    def refuse(*args, **kwargs):
        raise AssertionError("a fast path ran inside a reference method")

    for node in FUSED_NODES:
        monkeypatch.setattr(node, "apply", refuse)
    monkeypatch.setattr(AffineCoupling, "_conditioner", refuse)
    monkeypatch.setattr(MADE, "heads", refuse)
    got = [coupling.reference_forward(x6), transform.reference_forward(x5), norm.reference_forward(x5),
           transform.reference_inverse(x5), dense.reference_forward(x5)]
    for (a, la), (b, lb) in zip(got, expected):
        _close(a, b, 0.0)
        _close(la, lb, 0.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("likelihood_grad", ["split", "forward"])
@pytest.mark.parametrize("terms", ["likelihood and reconstruction", "likelihood only",
                                   "exact log-det values"])
def test_a_self_normalizing_training_step_has_the_same_gradients_on_both_paths(monkeypatch, dtype,
                                                                               likelihood_grad, terms):
    """The dense self-normalizing layer's fused node (``fused.SelfNormDenseFn``: six products instead of
    eleven) against the reference's three autograd pieces: the loss, every parameter's gradient (surrogate
    log-det gradients, split likelihood gradient, reconstruction) and the input's."""
    model = _randomised(SelfNormFC(6, layers=3, recon_weight=0.7, likelihood_grad=likelihood_grad), dtype,
                        std=0.4).train()
    x = _x((6,), n=40, dtype=dtype).requires_grad_()
    weights = torch.linspace(0.5, 1.5, 40, dtype=dtype)  # a non-uniform gradient reaching the latents
    ran = []
    apply = fused.SelfNormDenseFn.apply
    monkeypatch.setattr(fused.SelfNormDenseFn, "apply", lambda *a: ran.append(1) or apply(*a))

    def step(m):
        xi = x.detach().clone().requires_grad_()
        context = exact_logdet_values(m) if terms == "exact log-det values" else torch.enable_grad()
        with context:
            loss = -(m.log_prob(xi) * weights).mean()
        if terms != "likelihood only":
            loss = loss + selfnorm_loss(m)
        loss.backward()
        return loss.detach(), xi.grad

    (loss_fast, gx_fast), (loss_ref, gx_ref), fast, ref = _both(model, step)
    assert len(ran) == 3  # the fast path took the fused node in every dense layer, the reference none
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    _close(loss_fast, loss_ref, tol)
    _close(gx_fast, gx_ref, tol)
    g_fast, g_ref = _grads(fast), _grads(ref)
    assert g_fast.keys() == g_ref.keys() and any("inverse_weight" in k for k in g_fast)
    for k in g_fast:
        _close(g_fast[k], g_ref[k], tol)
