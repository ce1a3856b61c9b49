import pytest
import torch

from flowlib.bijectors import (
    MADE,
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    BatchNormFlow,
    ImagePreprocess,
    InvertibleConv1x1,
    InvertibleLinear,
    MaskedAffineAutoregressive,
    Permute,
    Reverse,
    Split,
    Squeeze,
    dequantize,
)
from flowlib.models import FlowStep
from tests.flowcheck import check_bijector, check_jacobian_logdet, perturb

G = torch.Generator().manual_seed(1)
TAB = torch.randn(3, 5, generator=G, dtype=torch.float64)
IMG = torch.randn(2, 4, 3, 3, generator=G, dtype=torch.float64)
TRAIN_TAB = torch.randn(64, 5, generator=G, dtype=torch.float64) * 2 + 1
TRAIN_IMG = torch.randn(16, 4, 3, 3, generator=G, dtype=torch.float64) * 3 - 1

CASES = {
    "actnorm-tab": (lambda: ActNorm(5), TAB, TRAIN_TAB),
    "actnorm-img": (lambda: ActNorm(4), IMG, TRAIN_IMG),
    "lu-linear": (lambda: InvertibleLinear(5), TAB, None),
    "lu-conv1x1": (lambda: InvertibleConv1x1(4), IMG, None),
    "affine-coupling-tab": (lambda: AffineCoupling(5, 8), TAB, None),
    "affine-coupling-tab-official": (lambda: AffineCoupling(5, 8, conditioner="official"), TAB, None),
    "glow-step-tab-official": (lambda: FlowStep(5, 8, image=False, conditioner="official"), TAB, TRAIN_TAB),
    "affine-coupling-img": (lambda: AffineCoupling(4, 6, image=True), IMG, None),
    "additive-coupling-tab": (lambda: AdditiveCoupling(5, 8), TAB, None),
    "additive-coupling-img": (lambda: AdditiveCoupling(4, 6, image=True), IMG, None),
    "maf-transform": (lambda: MaskedAffineAutoregressive(5, 8), TAB, None),
    "batchnorm-flow": (lambda: BatchNormFlow(5), TAB, TRAIN_TAB),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bijector(name):
    make, x, train_batch = CASES[name]
    check_bijector(make, x, train_batch=train_batch)


def test_permutations_and_squeeze_are_exact_and_volume_preserving():
    for layer, x in [(Permute(5, seed=3), TAB), (Reverse(5), TAB), (Squeeze(), IMG[:, :, :2, :2])]:
        y, ld = layer(x)
        assert torch.equal(layer.inverse(y)[0], x)
        check_jacobian_logdet(lambda v, la=layer: la(v)[0], x, ld)
    y, _ = Reverse(5)(TAB)
    assert torch.equal(y, TAB.flip(1))


def test_squeeze_moves_each_2x2_block_into_channels():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y, _ = Squeeze()(x)
    assert y.shape == (1, 4, 2, 2)
    # top-left 2x2 block [0, 1, 4, 5] becomes the channel vector of output pixel (0, 0)
    assert y[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]


def test_split_standardises_with_learned_prior():
    torch.manual_seed(0)
    split = Split(4).double()
    perturb(split)
    x = IMG

    def full(v):
        h, eps, _ = split(v)
        return torch.cat([h, eps], 1)

    h, eps, ld = split(x)
    check_jacobian_logdet(full, x, ld)
    x_rec, ld_inv = split.inverse(h, eps)
    assert torch.allclose(x_rec, x, atol=1e-10)
    assert torch.allclose(ld + ld_inv, torch.zeros_like(ld))
    mean, log_std = split._mean_logstd(h)
    assert torch.allclose(eps, (x[:, 2:] - mean) / log_std.exp())


def test_actnorm_data_dependent_init_standardises_first_batch():
    layer = ActNorm(4).double()
    y, _ = layer(TRAIN_IMG)
    dims = (0, 2, 3)
    assert torch.allclose(y.mean(dims), torch.zeros(4, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(y.std(dims, unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-5)
    before = layer.bias.clone()
    layer(TRAIN_IMG * 5)  # second batch: no re-initialisation
    assert torch.equal(layer.bias, before)


def test_lu_weight_is_product_and_logdet_matches_eq9():
    torch.manual_seed(0)
    conv = InvertibleConv1x1(4).double()
    perturb(conv)
    w = conv.weight()
    assert torch.allclose(torch.linalg.slogdet(w)[1], conv.log_s.sum())
    _, ld = conv(IMG)
    assert torch.allclose(ld, 3 * 3 * conv.log_s.sum().expand(2))  # h * w * sum log|s|


def test_made_is_autoregressive():
    torch.manual_seed(0)
    made = MADE(6, hidden=16).double()
    perturb(made, 0.5)
    x = torch.randn(1, 6, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: made(v.view(1, 6))[0, 0], x[0])
    assert torch.all(torch.triu(jac) == 0), "output i must not depend on inputs >= i"
    assert torch.any(torch.tril(jac, -1) != 0)


def test_coupling_needs_two_channels():
    with pytest.raises(ValueError, match="at least 2"):
        AffineCoupling(1, 8)
    with pytest.raises(ValueError, match="at least 2"):
        AdditiveCoupling(1, 8, image=True)


def test_wrong_feature_count_is_named():
    with pytest.raises(ValueError, match="built for 5 features"):
        ActNorm(5)(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(N, D\) or image"):
        InvertibleLinear(5)(torch.zeros(5))


def test_float32_reconstruction_on_realistic_inputs():
    torch.manual_seed(0)
    x = torch.randn(256, 12, 8, 8) * 2
    for layer in [ActNorm(12), InvertibleConv1x1(12), AffineCoupling(12, 64, image=True)]:
        layer(x)
        perturb(layer, 0.05)
        layer.eval()
        y, _ = layer(x)
        assert (layer.inverse(y)[0] - x).abs().max() < 1e-4


def test_dequantize_and_image_preprocess():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 1, 5, 5), generator=g).to(torch.uint8)
    u = dequantize(x, generator=torch.Generator().manual_seed(1))
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    assert torch.all(torch.floor(u * 256) == x.float())
    glow = ImagePreprocess("glow")
    y, ld = glow(u)
    assert torch.allclose(y, u - 0.5) and torch.all(ld == 0)
    logit = ImagePreprocess("logit", alpha=0.05).double()
    ud = u.double()
    y, ld = logit(ud)
    check_jacobian_logdet(lambda v: logit(v)[0], ud[:2], ld[:2])
    x_rec, ld_inv = logit.inverse(y)
    assert torch.allclose(x_rec, ud, atol=1e-10) and torch.allclose(ld + ld_inv, torch.zeros_like(ld))
    s = 0.05 + 0.9 * ud[0, 0, 0, 0]
    assert torch.isclose(y[0, 0, 0, 0], torch.log(s / (1 - s)))
    with pytest.raises(ValueError, match="unknown image preprocessing"):
        ImagePreprocess("sigmoid")


def test_maf_transform_density_of_identity_is_standard_normal():
    layer = MaskedAffineAutoregressive(3)
    x = torch.randn(4, 3)
    y, ld = layer(x)  # zero-initialised MADE: identity
    assert torch.equal(y, x) and torch.all(ld == 0)


@pytest.mark.parametrize("bad", ["empty", "nan", "inf"])
def test_actnorm_refuses_a_bad_first_batch_and_initialises_from_the_next(bad):
    layer = ActNorm(4).double()
    x = {"empty": TRAIN_IMG[:0], "nan": TRAIN_IMG.clone(), "inf": TRAIN_IMG.clone()}[bad]
    if bad != "empty":
        x[3, 1, 0, 2] = float(bad)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="batch of 0 samples" if bad == "empty" else "NaN or inf"):
        layer(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k  # still uninitialised: bias 0, scale 1, flag False
    y, _ = layer(TRAIN_IMG)  # the next good batch initialises it as if the bad one never came
    fresh = ActNorm(4).double()
    torch.testing.assert_close(y, fresh(TRAIN_IMG)[0], rtol=0, atol=0)
    assert bool(layer.initialized)


@pytest.mark.parametrize("reverse", [False, True])
def test_batchnorm_flow_keeps_its_running_statistics_on_a_bad_batch(reverse):
    layer, reference = BatchNormFlow(5).double(), BatchNormFlow(5).double()
    layer(TRAIN_TAB, reversed_features=reverse)
    reference(TRAIN_TAB, reversed_features=reverse)
    for value in (float("nan"), float("inf"), -float("inf")):
        bad = TRAIN_TAB.clone()
        bad[7, 2] = value
        with pytest.raises(ValueError, match="NaN or inf"):
            layer(bad, reversed_features=reverse)
        for k, v in layer.state_dict().items():
            assert torch.equal(v, reference.state_dict()[k]), k
    layer(TRAIN_TAB * 2, reversed_features=reverse)  # training goes on exactly as without the bad batches
    reference(TRAIN_TAB * 2, reversed_features=reverse)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, reference.state_dict()[k]), k
    layer.eval()
    torch.testing.assert_close(layer(TAB)[0], reference.eval()(TAB)[0], rtol=0, atol=0)


def test_layer_sizes_must_be_positive_integers():
    for make, name in [(lambda: ActNorm(0), "features"), (lambda: InvertibleLinear(-1), "features"),
                       (lambda: InvertibleConv1x1(0), "features"), (lambda: BatchNormFlow(0), "features"),
                       (lambda: AffineCoupling(4, 0), "hidden"),
                       (lambda: AdditiveCoupling(4, 0, image=True), "hidden"),
                       (lambda: MADE(4, hidden=0), "hidden"), (lambda: MADE(4, layers=0), "layers"),
                       (lambda: MaskedAffineAutoregressive(4, hidden=0), "hidden"),
                       (lambda: MADE(4, hidden=2.5), "hidden")]:
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
            make()
    import numpy as np

    assert ActNorm(np.int64(3)).features == 3  # any integer type is fine
