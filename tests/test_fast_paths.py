"""The hand-fused fast paths (issue 9) against the plain formulas they replace.

Every fused autograd node is checked with ``torch.autograd.gradcheck`` in float64 (its hand-written backward
against finite differences), and every shortcut (contiguous MADE heads, skipped input columns, the
flip-free MAF encode, the incremental MAF decode, the one-pass batch norm) against a direct evaluation of
the equation it implements.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flowlib.bijectors import (
    MADE,
    AffineCoupling,
    BatchNormFlow,
    MaskedAffineAutoregressive,
)
from flowlib.fused import (
    AffineCouplingFn,
    BatchNormFn,
    MadeAffineFn,
    channels_last_conv_stack,
    mix_channels,
    transposed,
)
from flowlib.models import MAF, Glow


def _randn(*shape, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(requires_grad)


def _trained_like(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (zero-initialised output layers included) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


# --- the fused autograd nodes: backward against finite differences ----------------------------------------

def _made_affine_inputs(d: int, width: int, layers: int, seed: int = 0):
    """x (N, d) and random parameters for :class:`MadeAffineFn`: ``layers`` hidden layers of 3 units, the
    first reading 2 of the d input columns, heads ``width`` >= d wide, all float64 with gradients."""
    sizes = [2] + [3] * layers
    params = []
    for i in range(layers):
        params += [_randn(sizes[i + 1], sizes[i], seed=seed + 2 * i),
                   _randn(sizes[i + 1], seed=seed + 2 * i + 1)]
    params += [_randn(width, 3, seed=seed + 20), _randn(width, seed=seed + 21),
               _randn(width, 3, seed=seed + 22), _randn(width, seed=seed + 23)]
    return _randn(5, d, seed=seed + 30, requires_grad=True), [p.requires_grad_() for p in params]


def _made_affine_reference(x, lo, hi, clamp, params):
    """Eq. 10 written plainly with autograd's ops: the MLP on x[:, lo:hi], -mu and r' from the two heads,
    alpha = clamp tanh(r / clamp) with r = r' clamp / 2."""
    *hidden, w_mu, b_mu, w_r, b_r = params
    h = x[:, lo:hi]
    for w, b in zip(hidden[::2], hidden[1::2]):
        h = torch.relu(F.linear(h, w, b))
    neg_mu, r_scaled = F.linear(h, w_mu, b_mu), F.linear(h, w_r, b_r)
    alpha = clamp * torch.tanh(r_scaled * clamp / 2 / clamp)
    d = x.shape[1]
    return (x + neg_mu[:, :d]) * torch.exp(-alpha[:, :d]), -alpha.sum(1)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("width,lo", [(4, 0), (4, 2), (6, 0)])  # lo = 2: the reversed layout; 6: padded heads
def test_made_affine_fn_gradcheck(layers, width, lo):
    x, params = _made_affine_inputs(4, width, layers)
    fn = lambda x_, *p: MadeAffineFn.apply(x_, lo, lo + 2, 3.0, *p)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *params))
    u, logdet = fn(x, *params)
    expected_u, expected_logdet = _made_affine_reference(x, lo, lo + 2, 3.0, params)
    torch.testing.assert_close(u, expected_u)
    torch.testing.assert_close(logdet, expected_logdet)


def test_made_affine_fn_with_frozen_weights_still_passes_the_input_gradient():
    x, params = _made_affine_inputs(4, 6, 2)
    frozen = [p.detach() for p in params]
    u, logdet = MadeAffineFn.apply(x, 1, 3, 3.0, *frozen)
    grad_x, = torch.autograd.grad((u * u).sum() + logdet.sum(), x)
    expected_u, expected_logdet = _made_affine_reference(x, 1, 3, 3.0, frozen)
    expected, = torch.autograd.grad((expected_u * expected_u).sum() + expected_logdet.sum(), x)
    torch.testing.assert_close(grad_x, expected)


def test_batch_norm_fn_gradcheck():
    x = _randn(7, 3, requires_grad=True)
    log_gamma, beta = _randn(3, seed=1, requires_grad=True), _randn(3, seed=2, requires_grad=True)
    fn = lambda a, b, c: BatchNormFn.apply(a, b, c, 1e-5)[:2]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, log_gamma, beta))


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 2, 2)])
def test_affine_coupling_fn_gradcheck(shape):
    x_b, shift, raw = (_randn(*shape, seed=s, requires_grad=True) for s in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: AffineCouplingFn.apply(a, b, c, 2.0), (x_b, shift, raw))


# --- the shortcuts against the formulas -------------------------------------------------------------------

def _made_reference(made: MADE, x: torch.Tensor) -> torch.Tensor:
    """MADE evaluated literally: every layer on all its inputs with the masked weight, one (N, 2D) output."""
    h = x
    for layer in made.net:
        h = F.linear(h, layer.weight * layer.mask, layer.bias) if hasattr(layer, "mask") else torch.relu(h)
    return h.view(x.shape[0], made.n_outputs, made.features)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(3, 4, 5, 2), (2, 1, 1, 1), (0, 3, 2, 2)])
def test_mix_channels_is_the_1x1_convolution_with_its_gradients(shape, bias):
    g = torch.Generator().manual_seed(0)
    c = shape[1]
    x = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(c, c, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    got, want = mix_channels(x, w, b), F.conv2d(x, w.view(c, c, 1, 1), b)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if x.shape[0]:
        inputs = (x, w) + ((b,) if bias else ())
        assert torch.autograd.gradcheck(lambda *t: mix_channels(*t), inputs)


def test_a_channels_last_conv_stack_computes_what_the_layers_compute():
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.ReLU(inplace=True),
                                 torch.nn.Conv2d(8, 8, 1), torch.nn.ReLU(inplace=True)).double()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    got = channels_last_conv_stack(layers, x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, layers(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got.square().sum(), x)[0],
                               torch.autograd.grad(layers(x).square().sum(), x)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("min_bytes", [1, 10 ** 12], ids=["side by side / zero-filled", "plain copies"])
def test_transposed_copies_equal_the_transposes_bit_for_bit(min_bytes, dtype, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the side-by-side branch on any machine
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(*s, generator=g, dtype=dtype, requires_grad=True) for s in ((7, 5), (6, 6)))
    for matrices in ([a, b], [a, None], [None, b], [None, None], [b]):
        got = transposed(matrices, min_bytes=min_bytes)
        assert len(got) == len(matrices)
        for m, t in zip(matrices, got):
            if m is None:
                assert t is None
            else:  # contiguous, no autograd history, the values of m.T
                assert t.is_contiguous() and t.grad_fn is None and not t.requires_grad
                assert torch.equal(t, m.detach().T)
    # then a product accumulated into the copy is torch.addmm of the transpose, bit for bit
    x, y = torch.randn(5, 3, generator=g, dtype=dtype), torch.randn(3, 7, generator=g, dtype=dtype)
    got = transposed([a.detach()], min_bytes=min_bytes)[0].addmm_(x, y, beta=-0.5)
    assert torch.equal(got, torch.addmm(a.detach().T, x, y, beta=-0.5))


@pytest.mark.parametrize("split", [True, False])
def test_a_self_normalizing_step_is_bit_identical_with_side_by_side_transposes(split, monkeypatch):
    from flowlib import fused
    from flowlib.selfnorm import SelfNormLinear, selfnorm_loss

    def grads(min_bytes):
        torch.manual_seed(0)
        layer = SelfNormLinear(24, likelihood_grad="split" if split else "forward").train()
        x = torch.randn(16, 24)
        with monkeypatch.context() as m:
            m.setattr(fused, "transposed", lambda ms: transposed(ms, min_bytes=min_bytes))
            m.setattr(torch, "get_num_threads", lambda: 2)
            z, logdet = layer(x)
            ((0.5 * z.square().sum(1) - logdet).mean() + selfnorm_loss(layer)).backward()
        return layer.weight.grad, layer.inverse_weight.grad

    (w1, r1), (w2, r2) = grads(1), grads(10 ** 12)  # side by side against plain copies
    assert torch.equal(w1, w2) and torch.equal(r1, r2)


def _transpose_in_child(a, b):
    torch.set_num_threads(2)  # (a forked child may start with one; the side-by-side copy needs two)
    return transposed([a, b], min_bytes=1)


def test_transposed_works_in_a_forked_child_after_the_parent_used_its_worker():
    import multiprocessing

    a, b = torch.randn(4, 3), torch.randn(3, 3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        transposed([a, b], min_bytes=1)  # the parent's worker thread now exists
    finally:
        torch.set_num_threads(threads)
    with multiprocessing.get_context("fork").Pool(1) as pool:  # (the child's copy of it has no thread)
        got = pool.apply_async(_transpose_in_child, (a, b)).get(timeout=60)
    assert torch.equal(got[0], a.T) and torch.equal(got[1], b.T)


@pytest.mark.parametrize("features,hidden", [(63, 32), (6, 16), (1, 4)])
def test_made_skips_only_unused_inputs(features, hidden):
    made = _trained_like(MADE(features, hidden=hidden).double())
    first = made.net[0]
    # exactly the inputs that some hidden unit sees are kept: degree <= the largest hidden degree
    assert first.used_inputs == int(first.mask.any(0).nonzero().max()) + 1
    assert not first.mask[:, first.used_inputs:].any()
    if features == 63:
        assert first.used_inputs == 32  # 32 hidden units have degrees 1..32: inputs 33..63 are never used
    x = _randn(9, features)
    torch.testing.assert_close(made(x), _made_reference(made, x), rtol=1e-12, atol=1e-12)
    heads = made.heads(x.flip(1), reversed_features=True)
    assert all(h.shape == (9, made.head_width) and h.is_contiguous() for h in heads)
    assert made.head_width == (64 if features == 63 else features)  # 63 is padded for BLAS, 6 and 1 are not
    flipped = torch.stack([h[:, :features] for h in heads], 1)
    torch.testing.assert_close(flipped, _made_reference(made, x).flip(2), rtol=1e-12, atol=1e-12)
    assert all((h[:, features:] == 0).all() for h in heads)  # the padding columns are exactly zero


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("features", [1, 5, 63])  # 63: heads padded to 64 columns; 1: unused hidden inputs
def test_masked_affine_autoregressive_matches_eq10(grad, features):
    layer = _trained_like(MaskedAffineAutoregressive(features, hidden=8, clamp=2.0).double())
    x = _randn(11, features, requires_grad=grad)  # the fused training node returns x's gradient too
    h = _made_reference(layer.made, x)
    alpha = 2.0 * torch.tanh(h[:, 1] / 2.0)
    expected_u, expected_ld = (x - h[:, 0]) * torch.exp(-alpha), -alpha.sum(1)
    weights = _randn(11, features, seed=5)
    with torch.set_grad_enabled(grad):
        for reverse in (False, True):
            u, ld = layer(x.flip(1) if reverse else x, reversed_features=reverse)
            u = u.flip(1) if reverse else u
            torch.testing.assert_close(u, expected_u, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(ld, expected_ld, rtol=1e-12, atol=1e-12)
            if grad:  # the fused backward against autograd through the reference formula
                params = [x, *layer.parameters()]
                got = torch.autograd.grad((u * weights).sum() + ld.sum(), params, retain_graph=True)
                want = torch.autograd.grad((expected_u * weights).sum() + expected_ld.sum(), params,
                                           retain_graph=True)
                for g, w in zip(got, want):
                    torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_masked_affine_autoregressive_incremental_decode_matches_sequential():
    layer = _trained_like(MaskedAffineAutoregressive(7, hidden=5).double())  # 5 hidden < 6 input degrees
    u = _randn(6, 7, requires_grad=True)
    x, ld = layer.inverse(u)
    # the textbook decode: run the whole MADE on the partly decoded vector once per feature
    ref = torch.zeros_like(u)
    for i in range(7):
        h = _made_reference(layer.made, ref)
        alpha = layer.clamp * torch.tanh(h[:, 1, i] / layer.clamp)
        ref = ref.clone()
        ref[:, i] = u[:, i] * torch.exp(alpha) + h[:, 0, i]
    h = _made_reference(layer.made, ref)
    ref_ld = (layer.clamp * torch.tanh(h[:, 1] / layer.clamp)).sum(1)
    torch.testing.assert_close(x, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld, ref_ld, rtol=1e-12, atol=1e-12)
    # gradients through the decode (SKD) agree with those of the textbook decode
    (g,) = torch.autograd.grad(x.square().sum() + ld.sum(), u)
    (g_ref,) = torch.autograd.grad(ref.square().sum() + ref_ld.sum(), u)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("reverse", [False, True])
def test_batch_norm_flow_matches_formula_and_running_averages(reverse):
    bn = _trained_like(BatchNormFlow(4, momentum=0.25).double())
    x = 2.0 + 3.0 * _randn(50, 4)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    log_scale = bn.log_gamma - 0.5 * torch.log(var + bn.eps)
    expected = (x - mean) * torch.exp(log_scale) + bn.beta
    y, ld = bn(x.flip(1) if reverse else x, reversed_features=reverse)
    torch.testing.assert_close(y.flip(1) if reverse else y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld, log_scale.sum().expand(50), rtol=1e-12, atol=1e-12)
    # running averages are kept in the data's own order whichever way the batch came in
    torch.testing.assert_close(bn.running_mean, 0.75 * torch.zeros(4, dtype=torch.float64) + 0.25 * mean)
    torch.testing.assert_close(bn.running_var, 0.75 * torch.ones(4, dtype=torch.float64) + 0.25 * var)
    bn.eval()
    eval_log_scale = bn.log_gamma - 0.5 * torch.log(bn.running_var + bn.eps)
    y_eval, _ = bn(x.flip(1) if reverse else x, reversed_features=reverse)
    expected_eval = (x - bn.running_mean) * torch.exp(eval_log_scale) + bn.beta
    torch.testing.assert_close(y_eval.flip(1) if reverse else y_eval, expected_eval, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_maf_encode_without_flips_equals_blockwise_encode(training, depth):
    maf = _trained_like(MAF(5, depth=depth, hidden=8).double())
    x = _randn(32, 5)
    maf.train(training)
    reference = _trained_like(MAF(5, depth=depth, hidden=8).double())
    reference.load_state_dict(maf.state_dict())
    reference.train(training)
    enc = maf.encode(x)
    h, logdet, latents = x, 0, []
    for k, block in enumerate(reference.blocks):  # each block as written: transform, batch norm, reverse
        h, ld = block(h)
        logdet = logdet + ld
        latents.append(h.flip(1) if k % 2 == 0 else h)  # back in data order after k + 1 reversals
    for got, want in zip(enc.latents, latents):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(enc.logdet, logdet, rtol=1e-12, atol=1e-12)
    if training:  # the running averages moved identically
        for a, b in zip(maf.state_dict().values(), reference.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conditioner", ["mlp", "official"])
def test_affine_coupling_matches_formula(conditioner):
    layer = _trained_like(AffineCoupling(5, hidden=6, conditioner=conditioner).double())
    x = _randn(8, 5)
    h = layer.net(x[:, :2])
    log_scale = F.logsigmoid(h[:, 1::2] + 2.0) - math.log(1.0 / (1.0 + math.exp(-2.0)))
    y, ld = layer(x)
    expected = (x[:, 2:] + h[:, 0::2]) * torch.exp(log_scale)
    torch.testing.assert_close(y[:, 2:], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y[:, :2], x[:, :2])
    torch.testing.assert_close(ld, log_scale.sum(1), rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the in-place evaluation path: the same numbers bit for bit
        y_eval, ld_eval = layer(x)
    assert torch.equal(y_eval, y.detach()) and torch.equal(ld_eval, ld.detach())
    x_rec, ld_inv = layer.inverse(y)  # the decode path
    torch.testing.assert_close(x_rec, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld_inv, -ld, rtol=1e-12, atol=1e-12)


def test_official_conditioner_is_get_block_1d():
    # vklyukin/nf_distillation, models/flows.py, get_block_1d: Linear(in, h), ReLU, 3 x (Linear(h, h), ReLU),
    # Linear(h, h), Tanh, Linear(h, out); in = D // 2, out = 2 (D - D // 2)
    layer = _trained_like(AffineCoupling(7, hidden=5, conditioner="official").double())
    linears = [m for m in layer.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3, 5)] + [(5, 5)] * 4 + [(5, 8)]
    activations = [type(m).__name__ for m in layer.net if not isinstance(m, torch.nn.Linear)]
    assert activations == ["ReLU"] * 4 + ["Tanh"]
    x = _randn(6, 7)
    h = x[:, :3]
    for i, lin in enumerate(linears[:-1]):
        h = torch.tanh(lin(h)) if i == 4 else torch.relu(lin(h))
    out = linears[-1](h)
    expected = (x[:, 3:] + out[:, 0::2]) * torch.sigmoid(out[:, 1::2] + 2.0) / (1.0 / (1.0 + math.exp(-2.0)))
    torch.testing.assert_close(layer(x)[0][:, 3:], expected, rtol=1e-12, atol=1e-12)


def test_maf_log_prob_is_finite_and_consistent_under_inference_mode():
    maf = _trained_like(MAF(6, depth=3, hidden=8)).eval()
    x = torch.randn(64, 6)
    with torch.no_grad():
        expected = maf.log_prob(x)
    with torch.inference_mode():
        got = maf.log_prob(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    glow = _trained_like(Glow((6,), depth=2, hidden=8)).eval()
    with torch.inference_mode():
        assert torch.isfinite(glow.log_prob(x)).all()


def test_lu_matrix_cache_follows_parameter_updates():
    from flowlib.bijectors import InvertibleLinear

    layer = _trained_like(InvertibleLinear(4).double())
    x = _randn(3, 4)
    with torch.no_grad():
        y1, _ = layer(x)
        x1, _ = layer.inverse(y1)
    torch.testing.assert_close(x1, x, rtol=1e-10, atol=1e-10)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x)[0].square().sum().backward()
    opt.step()  # in-place update: the cached W and W^-1 must not be reused
    with torch.no_grad():
        y2, _ = layer(x)
        x2, _ = layer.inverse(y2)
    torch.testing.assert_close(y2, x @ layer.weight().T, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y1, y2)
    torch.testing.assert_close(x2, x, rtol=1e-10, atol=1e-10)


def _maf_with_batch_statistics(seed: int = 0) -> MAF:
    model = _trained_like(MAF(5, depth=3, hidden=8).double(), seed)
    model.train()
    with torch.no_grad():
        model.log_prob(_randn(64, 5, seed=seed + 1) * 2 + 1)  # running mean / variance away from 0 / 1
    return model.eval()


def test_weights_cached_without_gradients_follow_every_change():
    # MADE's masked / scaled / flipped / padded weights and batch norm's eval affine map are derived from the
    # weights (on every call, or once inside cached_weights); an optimizer step, new running statistics and a
    # checkpoint load must all show
    model, x = _maf_with_batch_statistics(), _randn(7, 5, seed=3)

    def fresh():  # with gradients on, nothing comes from the cache
        return model.log_prob(x).detach()

    with torch.inference_mode():
        first = model.log_prob(x)
    with torch.no_grad():  # reused outside inference mode: same values
        torch.testing.assert_close(model.log_prob(x), first, rtol=0, atol=0)
    torch.testing.assert_close(first, fresh(), rtol=0, atol=0)

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.log_prob(x).mean().backward()
    opt.step()
    with torch.no_grad():
        after_step = model.log_prob(x)
    torch.testing.assert_close(after_step, fresh(), rtol=0, atol=0)
    assert not torch.allclose(after_step, first)

    model.train()
    with torch.no_grad():
        model.log_prob(_randn(64, 5, seed=9) * 3 - 2)  # only the running statistics change
    model.eval()
    with torch.no_grad():
        after_stats = model.log_prob(x)
    torch.testing.assert_close(after_stats, fresh(), rtol=0, atol=0)
    assert not torch.allclose(after_stats, after_step)

    model.load_state_dict(_maf_with_batch_statistics(seed=5).state_dict())
    with torch.no_grad():
        after_load = model.log_prob(x)
    torch.testing.assert_close(after_load, fresh(), rtol=0, atol=0)
    torch.testing.assert_close(model.decode(model.encode(x).z), x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("image, conditioner", [(False, "mlp"), (True, "mlp"), (False, "official")])
def test_glow_step_with_actnorm_folded_into_the_mixing_matrix(image, conditioner):
    from flowlib.models import FlowStep

    step = FlowStep(4, hidden=6, image=image, conditioner=conditioner).double()
    x = _randn(5, 4, 2, 2) if image else _randn(5, 4)
    step.train()
    step(x)  # ActNorm's data-dependent initialisation runs the sequential path
    _trained_like(step)
    step.actnorm.initialized.fill_(True)
    y, ld = step(x)  # the folded path
    h, expected_ld = x, 0
    for layer in (step.actnorm, step.mix, step.coupling):
        h, part = layer(h)
        expected_ld = expected_ld + part
    torch.testing.assert_close(y, h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld, expected_ld, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the in-place evaluation path gives the same numbers bit for bit
        y_eval, ld_eval = step(x)
    assert torch.equal(y_eval, y.detach()) and torch.equal(ld_eval, ld.detach())


# --- the evaluation arena (flowlib.scratch) ----------------------------------------------------------------

def _tabular_models():
    torch.manual_seed(0)
    maf = _trained_like(MAF(7, depth=3, hidden=8), seed=1).eval()
    glow = _trained_like(Glow((7,), depth=3, hidden=8), seed=2)
    glow.steps[0].actnorm.initialized.fill_(True)  # exercise the ActNorm-folded step too
    official = _trained_like(Glow((7,), depth=3, hidden=8, conditioner="official"), seed=3)
    official.steps[1].actnorm.initialized.fill_(True)
    return maf, glow.eval(), official.eval()


@pytest.mark.parametrize("which", [0, 1, 2])
def test_arena_log_prob_equals_the_autograd_path_and_never_aliases(which):
    model = _tabular_models()[which]
    x, x2 = torch.randn(33, 7), torch.randn(33, 7)
    expected, expected2 = model.log_prob(x).detach(), model.log_prob(x2).detach()
    with torch.no_grad():
        first = model.log_prob(x)
        second = model.log_prob(x2)  # reuses the arena's buffers
    torch.testing.assert_close(first, expected, rtol=0, atol=0)  # bit for bit, and not overwritten
    torch.testing.assert_close(second, expected2, rtol=0, atol=0)
    arenas = model.__dict__["_scratch_arenas"]
    assert sum(a.nbytes() for a in arenas.values()) > 0
    for arena in arenas.values():
        held = {t.data_ptr() for ts in arena._buffers.values() for t in ts}
        assert first.data_ptr() not in held and second.data_ptr() not in held
    with torch.inference_mode():  # inference tensors get their own buffers
        torch.testing.assert_close(model.log_prob(x), expected, rtol=0, atol=0)
    # Another batch size replaces the buffers. Bit-identity holds only against the same computation at the
    # same shape: BLAS blocks a 5-row product differently from a 33-row one (and differently on each CPU), so
    # rows of the batch of 33 agree with the batch of 5 only to rounding.
    expected_small = model.log_prob(x[:5]).detach()
    with torch.no_grad():
        small = model.log_prob(x[:5])
    torch.testing.assert_close(small, expected_small, rtol=0, atol=0)
    torch.testing.assert_close(small, expected[:5], rtol=1e-5, atol=1e-5)
    model.release_scratch()
    assert "_scratch_arenas" not in model.__dict__


def test_arena_nested_passes_of_two_models_do_not_share_buffers():
    maf, glow, _ = _tabular_models()
    x = torch.randn(16, 7)
    expected_maf, expected_glow = maf.log_prob(x).detach(), glow.log_prob(x).detach()
    original = glow.encode

    def encode_calling_the_other_model(inp):
        inner = maf.log_prob(inp)  # runs while glow's arena is active
        torch.testing.assert_close(inner, expected_maf, rtol=0, atol=0)
        return original(inp)

    glow.encode = encode_calling_the_other_model
    with torch.no_grad():
        torch.testing.assert_close(glow.log_prob(x), expected_glow, rtol=0, atol=0)
        torch.testing.assert_close(glow.log_prob(x), expected_glow, rtol=0, atol=0)


def test_arena_is_not_used_for_large_inputs_or_with_gradients(monkeypatch):
    from flowlib import scratch

    maf = _tabular_models()[0]
    x = torch.randn(40, 7)
    monkeypatch.setattr(scratch, "MAX_ELEMENTS", 100)
    with torch.no_grad():
        maf.log_prob(x)
    assert "_scratch_arenas" not in maf.__dict__
    arena = scratch.Arena()
    with scratch.using(arena, 4):
        assert scratch.active() is None  # gradients are on: nothing may be reused
        with torch.no_grad():
            assert scratch.active() is arena
            a, b = scratch.out((4, 3), x), scratch.out((4, 3), x)
            assert a.data_ptr() != b.data_ptr()
    with scratch.using(arena, 4), torch.no_grad():
        assert scratch.out((4, 3), x).data_ptr() == a.data_ptr()  # the next pass reuses them in order
    assert scratch.out((4, 3), x) is None  # outside a pass the operation allocates its own result
