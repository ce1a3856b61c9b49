"""Tests of flowlib.selfnorm (Self Normalizing Flows, Keller et al. 2021).

Reference values come from autograd in float64: ``slogdet`` of Jacobians built with
``torch.autograd.functional.jacobian`` and gradients taken through ``slogdet``.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian

from flowlib.bijectors import InvertibleLinear
from flowlib.models import Flow
from flowlib.selfnorm import (
    LeakyReLUFlow,
    SelfNormConv2d,
    SelfNormFC,
    SelfNormGlow,
    SelfNormLinear,
    adapt_recon_weights,
    conv_operator,
    exact_inverse,
    exact_logdet_values,
    exact_test_nll,
    fit,
    inverse_errors,
    selfnorm_layers,
    selfnorm_loss,
)
from tests.flowcheck import check_jacobian_logdet, check_state_dict, perturb

_LOG_2PI = math.log(2 * math.pi)


def _gauss_nll(z: torch.Tensor) -> torch.Tensor:
    return (0.5 * z.reshape(z.shape[0], -1).pow(2) + 0.5 * _LOG_2PI).sum(1)


def _conv_jacobian_operator(w: torch.Tensor, c: int, h: int, wd: int) -> torch.Tensor:
    """The matrix of x -> conv2d(x, w, same padding), via autograd, differentiable in w."""
    pad = w.shape[-1] // 2
    f = lambda v: torch.nn.functional.conv2d(v.view(1, c, h, wd), w, padding=pad).reshape(-1)
    return jacobian(f, torch.zeros(c * h * wd, dtype=w.dtype), create_graph=True)


# ---------------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("likelihood_grad", ["forward", "split"])
def test_linear_surrogate_gradient_equals_exact_when_r_is_the_inverse(likelihood_grad):
    """With R = W^-1 the surrogate is exact: "forward" gives W the whole exact gradient; "split" (the official
    code) gives W half of it and R half of the exact gradient of the same loss written in R (x = R z)."""
    torch.manual_seed(0)
    d = 6
    layer = SelfNormLinear(d, likelihood_grad=likelihood_grad).double()
    with torch.no_grad():
        layer.weight.add_(0.4 * torch.randn(d, d, dtype=torch.float64))
        layer.inverse_weight.copy_(torch.linalg.inv(layer.weight))
    x = torch.randn(9, d, dtype=torch.float64)
    layer.train()
    z, ld = layer(x)
    assert torch.equal(ld, torch.zeros(9, dtype=torch.float64)), "training log-det value should be omitted"
    # the whole training loss: NLL (log-det value omitted) + reconstruction term (0 at R = W^-1)
    (_gauss_nll(z) - ld).mean().add(selfnorm_loss(layer)).backward()

    w = layer.weight.detach().clone().requires_grad_(True)
    (_gauss_nll(x @ w.T) - torch.linalg.slogdet(w)[1]).mean().backward()
    share = 0.5 if likelihood_grad == "split" else 1.0
    assert torch.allclose(layer.weight.grad, share * w.grad, atol=1e-6, rtol=0), (
        f"max diff {(layer.weight.grad - share * w.grad).abs().max():.3e}"
    )
    if likelihood_grad == "forward":  # R = W^-1 reconstructs perfectly: R gets (numerically) no gradient
        assert layer.inverse_weight.grad.abs().max() < 1e-10
    else:  # the same loss as a function of R: -log p(x) = nll(R^-1 x) + log|det R|
        r = layer.inverse_weight.detach().clone().requires_grad_(True)
        (_gauss_nll(torch.linalg.solve(r, x.T).T) + torch.linalg.slogdet(r)[1]).mean().backward()
        assert torch.allclose(layer.inverse_weight.grad, 0.5 * r.grad, atol=1e-6, rtol=0)
        assert r.grad.abs().max() > 0.1  # (not vacuous)


def test_linear_surrogate_gradient_is_r_transpose_for_any_r():
    """d/dW of the training log-det is R^T (the paper's self normalizing FC layer): the gradient of
    tr(R W)."""
    torch.manual_seed(1)
    d = 5
    layer = SelfNormLinear(d, likelihood_grad="forward").double()
    perturb(layer, scale=0.5)
    x = torch.randn(4, d, dtype=torch.float64)
    layer.train()
    z, ld = layer(x)
    (_gauss_nll(z) - ld).sum().backward()
    w = layer.weight.detach().clone().requires_grad_(True)
    r = layer.inverse_weight.detach()
    (_gauss_nll(x @ w.T) - torch.trace(r @ w)).sum().backward()
    assert torch.allclose(layer.weight.grad, w.grad, atol=1e-10, rtol=0)
    # and differs from the exact gradient when R is not the inverse (the test above is not vacuous)
    exact = torch.linalg.inv(w.detach()).T
    assert (exact - r.T).abs().max() > 0.1


def test_reconstruction_gradient_matches_paper_formula():
    """dE/dW = 2 lambda R^T (x_hat - x) x^T and dE/dR = 2 lambda (x_hat - x) z^T, x detached."""
    torch.manual_seed(2)
    d, n, lam = 4, 3, 2.5
    layer = SelfNormLinear(d, recon_weight=lam).double()
    perturb(layer, scale=0.5)
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    layer.train()
    layer(x)
    selfnorm_loss(layer).backward()
    w, r, xd = layer.weight.detach(), layer.inverse_weight.detach(), x.detach()
    z = xd @ w.T
    err = z @ r.T - xd  # rows: x_hat - x
    assert torch.allclose(layer.weight.grad, 2 * lam * r.T @ err.T @ xd / n, atol=1e-10, rtol=0)
    assert torch.allclose(layer.inverse_weight.grad, 2 * lam * err.T @ z / n, atol=1e-10, rtol=0)
    assert x.grad is None, "the reconstruction loss must not reach the layer's input"


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_conv_surrogate_gradient_equals_exact_when_r_is_the_inverse(kernel_size):
    """Tiny image: the full (CHW x CHW) operator is built by autograd and the NLL differentiated through
    its slogdet. For kernel 3 the kernel is a (non-orthogonal) mixer at the centre tap, whose inverse is
    again a convolution; the data term still reaches all 9 taps."""
    torch.manual_seed(3)
    c, h, wd = 3, 3, 4
    layer = SelfNormConv2d(c, kernel_size, likelihood_grad="forward").double()
    mid = kernel_size // 2
    with torch.no_grad():
        m = layer.weight[:, :, mid, mid] + 0.4 * torch.randn(c, c, dtype=torch.float64)
        layer.weight[:, :, mid, mid] = m
        layer.inverse_weight.zero_()
        layer.inverse_weight[:, :, mid, mid] = torch.linalg.inv(m)
    x = torch.randn(5, c, h, wd, dtype=torch.float64)
    layer.train()
    z, ld = layer(x)
    (_gauss_nll(z) - ld).mean().add(selfnorm_loss(layer)).backward()

    w = layer.weight.detach().clone().requires_grad_(True)
    op = _conv_jacobian_operator(w, c, h, wd)
    zz = torch.nn.functional.conv2d(x, w, padding=mid)
    (_gauss_nll(zz) - torch.linalg.slogdet(op)[1]).mean().backward()
    assert torch.allclose(layer.weight.grad, w.grad, atol=1e-6, rtol=0), (
        f"max diff {(layer.weight.grad - w.grad).abs().max():.3e}"
    )
    if kernel_size > 1:
        assert layer.weight.grad[:, :, 0, 0].abs().max() > 1e-3, "off-centre taps should get gradient"


@pytest.mark.parametrize("kernel_size,h,wd", [(3, 3, 4), (5, 2, 3)])
def test_conv_surrogate_is_flip_r_times_multiplicity(kernel_size, h, wd):
    """For any kernels, the surrogate gradient flip(r) * m equals d/dw tr(R_op J(w)) exactly (zero
    padding; m counts kernel-entry multiplicity, clamped to 0 when the kernel exceeds the image)."""
    torch.manual_seed(4)
    c = 2
    layer = SelfNormConv2d(c, kernel_size, likelihood_grad="forward").double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight))
        layer.inverse_weight.copy_(torch.randn_like(layer.inverse_weight))
    x = torch.randn(3, c, h, wd, dtype=torch.float64)
    layer.train()
    _, ld = layer(x)
    ld.mean().backward()
    w = layer.weight.detach().clone().requires_grad_(True)
    r_op = _conv_jacobian_operator(layer.inverse_weight.detach(), c, h, wd)
    torch.trace(r_op @ _conv_jacobian_operator(w, c, h, wd)).backward()
    assert torch.allclose(layer.weight.grad, w.grad, atol=1e-10, rtol=0)


def test_conv_operator_matches_autograd_jacobian():
    torch.manual_seed(5)
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    assert torch.allclose(conv_operator(w, 3, 4), _conv_jacobian_operator(w, 2, 3, 4), atol=1e-12)


# ------------------------------------------------------------------------------- eval: log-det and inverse

LAYERS = {
    "linear": (lambda: SelfNormLinear(5), (4, 5)),
    "conv1x1": (lambda: SelfNormConv2d(3, 1), (2, 3, 3, 2)),
    "conv3x3": (lambda: SelfNormConv2d(2, 3), (2, 2, 3, 4)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_eval_logdet_and_inverses(name):
    make, shape = LAYERS[name]
    torch.manual_seed(6)
    layer = make().double()
    perturb(layer, scale=0.3)
    layer.eval()
    x = torch.randn(*shape, dtype=torch.float64)
    y, ld = layer(x)
    check_jacobian_logdet(lambda v: layer(v)[0], x, ld)

    with exact_inverse(layer):
        x_rec, ld_inv = layer.inverse(y)
    assert torch.allclose(x_rec, x, atol=1e-8, rtol=0)
    assert torch.allclose(ld + ld_inv, torch.zeros_like(ld), atol=1e-8)
    assert layer.use_exact_inverse is False, "the context manager must restore the flag"

    # learned inverse: applies R, reports R's exact log-det; not the inverse once R != W^-1
    x_r, ld_r = layer.inverse(y)
    check_jacobian_logdet(lambda v: layer.inverse(v)[0], y, ld_r)
    assert (x_r - x).abs().max() > 1e-3
    check_state_dict(layer, make, lambda m: m(x)[0])


def test_learned_inverse_is_exact_at_initialisation():
    """W starts orthogonal and R = W^T (exact inverse, to the float32 precision of the initialisation)."""
    torch.manual_seed(7)
    for layer, x in ((SelfNormLinear(6).double(), torch.randn(3, 6, dtype=torch.float64)),
                     (SelfNormConv2d(3, 3).double(), torch.randn(2, 3, 4, 4, dtype=torch.float64))):
        layer.eval()
        y, ld = layer(x)
        x_rec, ld_inv = layer.inverse(y)
        assert torch.allclose(x_rec, x, atol=1e-5, rtol=0)
        assert torch.allclose(ld, torch.zeros_like(ld), atol=1e-5)  # |det| of an orthogonal map is 1
        assert layer.inverse_error() < 1e-5


def test_training_value_omitted_exact_on_request_and_in_eval():
    torch.manual_seed(8)
    layer = SelfNormLinear(4).double()
    perturb(layer, scale=0.5)
    x = torch.randn(3, 4, dtype=torch.float64)
    exact = torch.linalg.slogdet(layer.weight.detach())[1]
    assert exact.abs() > 0.1
    layer.train()
    assert torch.equal(layer(x)[1], torch.zeros(3, dtype=torch.float64))
    with exact_logdet_values(layer):
        _, ld = layer(x)
    assert torch.allclose(ld, exact.expand(3), atol=1e-12)
    with torch.no_grad():
        assert torch.allclose(layer(x)[1], exact.expand(3), atol=1e-12)
    layer.eval()
    assert torch.allclose(layer(x)[1], exact.expand(3), atol=1e-12)


def test_cached_eval_logdet_follows_weight_updates():
    torch.manual_seed(9)
    layer = SelfNormConv2d(2, 3).double().eval()
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)[1].clone()
        layer.weight.mul_(2.0)  # in-place, as an optimizer step
        after = layer(x)[1]
    # scaling the whole linear map by 2 multiplies det by 2^D
    assert torch.allclose(after - before, torch.full_like(after, 18 * math.log(2.0)), atol=1e-10)
    y = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    with torch.no_grad():  # the learned inverse's log-det is cached the same way
        before = layer.inverse(y)[1].clone()
        layer.inverse_weight.mul_(0.5)
        after = layer.inverse(y)[1]
    assert torch.allclose(after - before, torch.full_like(after, -18 * math.log(2.0)), atol=1e-10)


def test_leaky_relu_flow():
    act = LeakyReLUFlow(0.2)
    x = torch.tensor([[-1.0, 2.0, -3.0]], dtype=torch.float64)
    y, ld = act(x)
    assert torch.allclose(y, torch.tensor([[-0.2, 2.0, -0.6]], dtype=torch.float64), atol=1e-15)
    assert torch.allclose(ld, torch.tensor([2 * math.log(0.2)], dtype=torch.float64))
    x_rec, ld_inv = act.inverse(y)
    assert torch.allclose(x_rec, x) and torch.allclose(ld_inv, -ld)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="odd"):
        SelfNormConv2d(2, 2)
    with pytest.raises(ValueError, match=r"expects \(N, 3\)"):
        SelfNormLinear(3)(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="max_operator_dim"):
        SelfNormConv2d(2, 3, max_operator_dim=10).eval()(torch.zeros(1, 2, 3, 3))
    with pytest.raises(RuntimeError, match="training"):
        selfnorm_loss(SelfNormFC(3))
    with pytest.raises(ValueError, match="negative_slope"):
        LeakyReLUFlow(0.0)


# ------------------------------------------------------------------------------------------------ models

MODELS = {
    "fc": (lambda exact, **kw: SelfNormFC(4, layers=3, exact=exact, **kw), (4,)),
    "glow-tab": (lambda exact, **kw: SelfNormGlow((4,), depth=2, hidden=8, exact=exact, **kw), (4,)),
    "glow-img": (lambda exact, **kw: SelfNormGlow((2, 4, 4), levels=2, depth=1, hidden=4, exact=exact, **kw),
                 (2, 4, 4)),
    "glow-img-k3": (lambda exact, **kw: SelfNormGlow((1, 4, 4), levels=1, depth=1, hidden=4, exact=exact,
                                                     kernel_size=3, **kw), (1, 4, 4)),
}


def _initialised(make, shape, exact, **kw):
    torch.manual_seed(10)
    model = make(exact, **kw).double()
    model.train()
    with torch.no_grad():
        model.log_prob(torch.randn(32, *shape, dtype=torch.float64) * 1.5 + 0.3)  # ActNorm init
    perturb(model, scale=0.2, seed=11)
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_eval_log_prob_and_decode(name):
    make, shape = MODELS[name]
    model = _initialised(make, shape, exact=False)
    assert isinstance(model, Flow)
    assert not any(isinstance(m, InvertibleLinear) for m in model.modules()), "LU layers left in place"
    assert len(selfnorm_layers(model)) == (3 if name == "fc" else 2 if name != "glow-img-k3" else 1)
    model.eval()
    x = torch.randn(3, *shape, dtype=torch.float64)
    enc = model.encode(x)
    flat = lambda v: model.encode(v).flat()
    check_jacobian_logdet(flat, x, enc.logdet)
    lp = model.log_prob(x)
    assert torch.allclose(lp, enc.logdet - _gauss_nll(enc.flat()), atol=1e-10)
    with exact_inverse(model):
        assert torch.allclose(model.decode(enc.z), x, atol=1e-8, rtol=0)
        s = model.sample(2, noise=model.sample_noise(2, torch.Generator().manual_seed(0)))
    assert s.shape == (2, *shape) and torch.isfinite(s).all()


@pytest.mark.parametrize("likelihood_grad", ["forward", "split"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_training_gradient_equals_exact_twin_when_r_is_inverse(name, likelihood_grad):
    """The SNF training loss -log_prob(x).mean() + selfnorm_loss(model), with every R set to W^-1, has
    the same gradient for every shared parameter as the exact-gradient twin's loss ("forward"); with the
    official split, the self-normalizing layers' W get half of it and every other parameter all of it."""
    make, shape = MODELS[name]
    snf = _initialised(make, shape, exact=False, likelihood_grad=likelihood_grad)
    twin = make(True).double()
    missing, unexpected = twin.load_state_dict(snf.state_dict(), strict=False)
    assert not missing and all(k.endswith("inverse_weight") for k in unexpected) and unexpected
    with torch.no_grad():
        for layer in selfnorm_layers(snf):
            if isinstance(layer, SelfNormLinear) or layer.kernel_size == 1:
                inv = torch.linalg.inv(layer.weight.reshape(layer.features, layer.features))
                layer.inverse_weight.copy_(inv.reshape(layer.inverse_weight.shape))
            else:  # a centre-tap kernel has a convolution inverse (see the layer test)
                mid = layer.kernel_size // 2
                layer.weight.copy_(torch.zeros_like(layer.weight))
                layer.weight[:, :, mid, mid] = torch.eye(layer.features) * 1.3 + 0.1
                layer.inverse_weight.zero_()
                layer.inverse_weight[:, :, mid, mid] = torch.linalg.inv(layer.weight[:, :, mid, mid])
                twin.get_submodule(_name_of(snf, layer)).weight.copy_(layer.weight)
    snf.train()
    twin.train()
    x = torch.randn(6, *shape, dtype=torch.float64)
    (-snf.log_prob(x).mean() + selfnorm_loss(snf)).backward()
    (-twin.log_prob(x).mean() + selfnorm_loss(twin)).backward()
    twin_params = dict(twin.named_parameters())
    mixing = {f"{_name_of(snf, layer)}.weight" for layer in selfnorm_layers(snf)}
    for n, p in snf.named_parameters():
        if n.endswith("inverse_weight"):
            continue
        share = 0.5 if likelihood_grad == "split" and n in mixing else 1.0
        assert torch.allclose(p.grad, share * twin_params[n].grad, atol=1e-6, rtol=0), n
    assert selfnorm_loss(twin).item() == 0.0


def _name_of(model, module):
    return next(n for n, m in model.named_modules() if m is module)


def test_training_value_plus_exact_logdets_is_eval_log_prob():
    torch.manual_seed(12)
    model = SelfNormFC(5, layers=2).double()
    x = torch.randn(8, 5, dtype=torch.float64)
    model.train()
    with torch.no_grad():
        model.log_prob(x)  # ActNorm init
    perturb(model, scale=0.3)
    train_value = model.log_prob(x)
    with exact_logdet_values(model):
        train_exact = model.log_prob(x)
    model.eval()
    eval_value = model.log_prob(x)
    skipped = sum(torch.linalg.slogdet(layer.weight.detach())[1] for layer in selfnorm_layers(model))
    assert torch.allclose(train_value + skipped, eval_value, atol=1e-10)
    assert torch.allclose(train_exact, eval_value, atol=1e-10)


def test_short_training_learns_inverse_and_reaches_gaussian_mle():
    """A one-layer SNF (W, ActNorm) on correlated Gaussian data is a linear Gaussian model: its best
    training NLL is that of the empirical-covariance Gaussian, 0.5 log det(2 pi e S). Start with R far
    from W^-1 (||R W - I||_F about 1.8); training must drive it to ~0 and reach that optimum."""
    torch.manual_seed(13)
    d, n = 4, 512
    a = torch.randn(d, d, dtype=torch.float64)
    x = torch.randn(n, d, dtype=torch.float64) @ a.T + 1.0
    xc = x - x.mean(0)
    mle = 0.5 * torch.linalg.slogdet(2 * math.pi * math.e * (xc.T @ xc / n))[1].item()

    model = SelfNormFC(d, layers=1).double()
    layer = selfnorm_layers(model)[0]
    with torch.no_grad():
        layer.weight.add_(0.5 * torch.randn(d, d, dtype=torch.float64))
    start_err = inverse_errors(model)[0]
    assert start_err > 0.5
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(600):
        opt.zero_grad()
        loss = -model.log_prob(x).mean() + selfnorm_loss(model)
        loss.backward()
        opt.step()
    end_err = inverse_errors(model)[0]
    model.eval()
    with torch.no_grad():
        nll = -model.log_prob(x).mean().item()
    assert end_err < 1e-4, (start_err, end_err)
    assert abs(nll - mle) < 1e-3, (nll, mle)


def test_fit_lowers_exact_nll_and_pulls_r_to_the_inverse():
    """fit() on a tiny correlated Gaussian set, with R started away from W^-1: the exact validation NLL
    falls, ||R W - I|| shrinks, the history has the documented records, and the run is reproducible."""
    torch.manual_seed(14)
    d = 4
    a = torch.randn(d, d)
    x_train, x_val = torch.randn(512, d) @ a.T + 0.5, torch.randn(256, d) @ a.T + 0.5

    def make():
        torch.manual_seed(15)
        model = SelfNormFC(d, layers=2)
        with torch.no_grad():
            for layer in selfnorm_layers(model):
                layer.inverse_weight.add_(0.3 * torch.randn(d, d))
        return model

    kw = dict(steps=200, batch_size=64, lr=1e-2, seed=3, eval_every=50, progress=False)
    model = make()
    hist = fit(model, x_train, x_val, **kw)
    assert [h["step"] for h in hist] == [0, 50, 100, 150, 200]
    assert "loss" not in hist[0] and all(math.isfinite(h["loss"]) and h["recon"] >= 0 for h in hist[1:])
    assert hist[0]["inverse_error"] > 0.5
    assert hist[-1]["inverse_error"] < 0.25 * hist[0]["inverse_error"], [h["inverse_error"] for h in hist]
    assert hist[-1]["val_nll"] < hist[0]["val_nll"] - 1.0, [h["val_nll"] for h in hist]
    assert hist[-1]["time"] > 0 and len(hist[-1]["inverse_errors"]) == 2
    assert model.training  # fit leaves the model in training mode, evaluation restores it
    # the recorded validation NLL is the exact one of eval mode
    model.eval()
    with torch.no_grad():
        direct = -model.log_prob(x_val).mean().item()
    assert abs(exact_test_nll(model, x_val, seed=4) - direct) < 1e-4
    assert not model.training
    per = exact_test_nll(model, x_val, per_example=True, batch_size=100)  # batches of 100, 100, 56
    assert per.shape == (256,) and abs(per.mean().item() - direct) < 1e-4
    noisy = lambda xb, g: xb + 0.1 * torch.randn(xb.shape, generator=g)
    fixed = exact_test_nll(model, x_val, noisy, draws=3)
    assert fixed == exact_test_nll(model, x_val, noisy, draws=3)  # fixed draws: reproducible
    assert fixed != exact_test_nll(model, x_val, noisy, draws=3, seed=5)
    again = fit(make(), x_train, x_val, **kw)
    assert [h["val_nll"] for h in again] == [h["val_nll"] for h in hist]
    with pytest.raises(ValueError, match="no self-normalizing layers"):
        fit(torch.nn.Linear(2, 2), x_train, steps=1)


# ------------------------------------------------------------------- the official gradient split (issue 20)

def _flip(kernel: torch.Tensor) -> torch.Tensor:
    """The kernel of the transposed convolution: channels swapped, taps mirrored (official flip_kernel)."""
    return kernel.transpose(0, 1).flip(2, 3)


@pytest.mark.parametrize("case", ["dense", "conv1x1", "conv3x3"])
def test_split_gradients_are_the_official_formulas(case):
    """For any W and R (not inverses), the likelihood gradients of the default layer are the official
    SelfNormConvFunc's: W gets (dz x^T - flip(R) m) / 2 and R gets (-dx (Wx)^T + flip(W) m) / 2, with
    dz the gradient at z, dx = W^T dz the one passed to x, m the tap multiplicity; x's gradient is the
    plain W^T dz. Loss: sum over the batch of the Gaussian NLL minus the (value 0) training log-det."""
    torch.manual_seed(20)
    n = 5
    if case == "dense":
        d = 4
        layer = SelfNormLinear(d).double()
        x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    else:
        k, c, h, wd = (1, 3, 3, 4) if case == "conv1x1" else (3, 2, 3, 4)
        layer = SelfNormConv2d(c, k).double()
        x = torch.randn(n, c, h, wd, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():  # arbitrary kernels, R far from W^-1
        layer.weight.copy_(torch.randn_like(layer.weight))
        layer.inverse_weight.copy_(torch.randn_like(layer.inverse_weight))
    layer.train()
    z, ld = layer(x)
    (_gauss_nll(z) - ld).sum().backward()

    w, r, xd = layer.weight.detach(), layer.inverse_weight.detach(), x.detach()
    if case == "dense":
        zz = xd @ w.T
        dz = zz  # d/dz of the Gaussian NLL
        dx = dz @ w
        grad_w = (dz.T @ xd - n * r.T) / 2
        grad_r = (-dx.T @ zz + n * w.T) / 2
    else:
        pad = k // 2
        zz = F.conv2d(xd, w, padding=pad)
        dz = zz
        dx = torch.nn.grad.conv2d_input(xd.shape, w, dz, padding=pad)
        off = (torch.arange(k) - pad).abs()
        m = ((h - off).clamp(min=0)[:, None] * (wd - off).clamp(min=0)[None, :]).double()
        grad_w = (torch.nn.grad.conv2d_weight(xd, w.shape, dz, padding=pad) - n * _flip(r) * m) / 2
        grad_r = (torch.nn.grad.conv2d_weight(zz, r.shape, -dx, padding=pad) + n * _flip(w) * m) / 2
    torch.testing.assert_close(layer.weight.grad, grad_w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.inverse_weight.grad, grad_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, dx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(z, zz, rtol=0, atol=0)  # the split changes gradients, never the value


def test_the_one_sided_option_gives_w_the_whole_gradient_and_r_none():
    torch.manual_seed(21)
    layer = SelfNormLinear(4, likelihood_grad="forward").double()
    perturb(layer, scale=0.5)
    x = torch.randn(3, 4, dtype=torch.float64)
    layer.train()
    z, ld = layer(x)
    (_gauss_nll(z) - ld).sum().backward()
    w, r = layer.weight.detach(), layer.inverse_weight.detach()
    torch.testing.assert_close(layer.weight.grad, (x @ w.T).T @ x - 3 * r.T, rtol=1e-10, atol=1e-10)
    assert layer.inverse_weight.grad is None or not layer.inverse_weight.grad.any()


@pytest.mark.parametrize("kernel_size", [0, 1, 3])
def test_symmetric_reconstruction_averages_both_directions(kernel_size):
    """sym_recon: (||x - R W x||^2 + ||z - W R z||^2) / 2 with the target z = W x detached (official)."""
    torch.manual_seed(22)
    lam = 3.0
    if kernel_size == 0:
        layer = SelfNormLinear(4, recon_weight=lam, sym_recon=True).double()
        x = torch.randn(6, 4, dtype=torch.float64)
        apply = lambda v, k: v @ k.T  # noqa: E731
    else:
        layer = SelfNormConv2d(2, kernel_size, recon_weight=lam, sym_recon=True).double()
        x = torch.randn(6, 2, 3, 3, dtype=torch.float64)
        apply = lambda v, k: F.conv2d(v, k, padding=kernel_size // 2)  # noqa: E731
    perturb(layer, scale=0.3)
    layer.train()
    layer(x)
    loss = selfnorm_loss(layer)
    w = layer.weight.detach().clone().requires_grad_(True)
    r = layer.inverse_weight.detach().clone().requires_grad_(True)
    zz = apply(x, w)
    forward = (x - apply(zz, r)).pow(2).flatten(1).sum(1)
    backward = (zz.detach() - apply(apply(zz, r), w)).pow(2).flatten(1).sum(1)
    expected = lam * ((forward + backward) / 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.inverse_weight.grad, r.grad, rtol=1e-10, atol=1e-10)


def test_adaptive_reconstruction_weight_follows_the_official_update():
    """recon_lr > 0: ema <- alpha ema + (1 - alpha) E (started by the first E), lambda <- lambda exp(lr ema);
    the weight and the average are buffers, so a checkpoint carries them."""
    torch.manual_seed(23)
    model = SelfNormFC(4, layers=1, recon_weight=2.0, recon_lr=0.1, recon_alpha=0.5)
    layer = selfnorm_layers(model)[0]
    assert {"blocks.0.1.adaptive_recon_weight", "blocks.0.1.recon_ema"} <= set(model.state_dict())
    perturb(model, scale=0.3)
    model.train()
    lam, ema = 2.0, None
    for _ in range(3):
        model.log_prob(torch.randn(8, 4))
        error = layer._recon.item()
        assert selfnorm_loss(model).item() == pytest.approx(lam * error, rel=1e-6)
        adapt_recon_weights(model)
        ema = error if ema is None else 0.5 * ema + 0.5 * error
        lam *= math.exp(0.1 * ema)
        assert layer.current_recon_weight == pytest.approx(lam, rel=1e-6)
    fixed = SelfNormFC(4, layers=1, recon_weight=2.0)
    fixed.train()
    fixed.log_prob(torch.randn(8, 4))
    adapt_recon_weights(fixed)
    assert selfnorm_layers(fixed)[0].current_recon_weight == 2.0


def test_selfnorm_options_are_checked():
    with pytest.raises(ValueError, match="likelihood_grad must be one of split, forward"):
        SelfNormLinear(3, likelihood_grad="both")
    with pytest.raises(ValueError, match="recon_lr"):
        SelfNormLinear(3, recon_lr=-1.0)
    assert SelfNormGlow((4,), depth=1, hidden=4).steps[0].mix.recon_weight == 100.0  # official Glow default
    assert SelfNormFC(4).blocks[0][1].recon_weight == 1.0  # official FC default
