import math

import pytest
import torch

from flowlib.models import (
    MAF,
    PAPER_PARAMS_K,
    PRESETS,
    TABULAR_DIMS,
    Glow,
    build_model,
    count_parameters,
    from_preset,
)
from tests.flowcheck import check_gradients, check_jacobian_logdet, check_state_dict, perturb

MODELS = {
    "glow-image": (lambda: Glow((1, 4, 4), levels=2, depth=2, hidden=8), (1, 4, 4)),
    "glow-image-rgb": (lambda: Glow((3, 4, 4), levels=1, depth=2, hidden=8), (3, 4, 4)),
    "glow-tabular": (lambda: Glow((5,), depth=3, hidden=8), (5,)),
    "maf": (lambda: MAF(5, depth=3, hidden=8), (5,)),
    "maf-no-bn": (lambda: MAF(4, depth=2, hidden=8, batch_norm=False), (4,)),
}


def _trained(make, shape, seed=0):
    torch.manual_seed(seed)
    model = make().double()
    model.train()
    model.encode(torch.randn(32, *shape, dtype=torch.float64) * 1.5 + 0.3)  # ActNorm / BatchNorm statistics
    perturb(model, 0.1, seed)
    return model.eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_invertible_and_logdet_exact(name):
    make, shape = MODELS[name]
    model = _trained(make, shape)
    x = torch.randn(3, *shape, dtype=torch.float64)
    enc = model.encode(x)
    assert enc.logdet.shape == (3,)
    x_rec = model.decode(enc.z)
    assert torch.allclose(x_rec, x, atol=1e-8, rtol=0)
    assert torch.allclose(model.decode(enc.flat()), x, atol=1e-8, rtol=0)
    check_jacobian_logdet(lambda v: model.encode(v).flat(), x, enc.logdet)
    # decode direction: log|det d x / d z| = -logdet of the encoder at x
    check_jacobian_logdet(lambda v: model.decode(v), enc.flat(), -enc.logdet)
    # log_prob is the change of variables (Eq. 1): log N(z) + log|det dz/dx|
    flat = enc.flat()
    expected = -0.5 * (flat**2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi) + enc.logdet
    assert torch.allclose(model.log_prob(x), expected)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_gradients_state_dict_and_float32(name):
    make, shape = MODELS[name]
    model = _trained(make, shape)
    x = torch.randn(8, *shape, dtype=torch.float64)
    model.train()
    check_gradients(model, lambda: -model.log_prob(x).mean())
    model.eval()
    check_state_dict(model, make, lambda m: m.log_prob(x))
    model32 = model.float()
    x32 = torch.randn(256, *shape) * 1.5
    assert (model32.decode(model32.encode(x32).z) - x32).abs().max() < 1e-4
    assert model32.log_prob(x32).dtype == torch.float32


def test_latents_are_the_distillation_points():
    glow = Glow((1, 8, 8), levels=3, depth=2, hidden=8)
    enc = glow.encode(torch.randn(2, 1, 8, 8))
    assert [tuple(t.shape[1:]) for t in enc.latents] == [(4, 4, 4), (8, 2, 2), (16, 1, 1)]
    assert [tuple(t.shape[1:]) for t in enc.z] == [(2, 4, 4), (4, 2, 2), (16, 1, 1)]
    assert torch.equal(enc.latents[-1], enc.z[-1])
    maf = MAF(4, depth=5, hidden=8)
    enc = maf.encode(torch.randn(2, 4))
    assert len(enc.latents) == 5 and torch.equal(enc.latents[-1], enc.z[0])
    tab = Glow((4,), depth=3, hidden=8)
    assert len(tab.encode(torch.randn(2, 4)).latents) == 3


@pytest.mark.parametrize("name", sorted(MODELS))
def test_identity_initialised_model_gives_standard_normal_density(name):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().double().eval()  # no data seen: ActNorm identity, zero-initialised couplings/priors
    x = torch.randn(6, *shape, dtype=torch.float64)
    d = math.prod(shape)
    analytic = -0.5 * x.reshape(6, -1).pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi)
    # BatchNormFlow's eps (1e-5) makes MAF differ from the identity by ~1e-5 per block
    assert torch.allclose(model.log_prob(x), analytic, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_temperature_scales_noise_and_same_noise_same_samples(name):
    make, shape = MODELS[name]
    model = _trained(make, shape)
    noise = model.sample_noise(4, generator=torch.Generator().manual_seed(3))
    a = model.sample(temperature=0.7, noise=noise)
    b = model.sample(temperature=0.7, noise=[n.clone() for n in noise])
    assert torch.equal(a, b)
    z = model.encode(a).flat()
    assert torch.allclose(z, 0.7 * model.flatten_latent(noise), atol=1e-8)
    g1 = model.sample(4, generator=torch.Generator().manual_seed(5))
    g2 = model.sample(4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(g1, g2) and g1.shape == (4, *shape)


def test_model_moves_across_dtype_and_device_without_fixed_device_tensors():
    for make, shape in MODELS.values():
        torch.manual_seed(0)
        model = make().eval().to("meta")
        enc = model.encode(torch.empty(2, *shape, device="meta"))
        assert enc.logdet.device.type == "meta"
        assert model.decode(enc.z).device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path; CPU path is covered above")
def test_model_runs_on_cuda():  # pragma: no cover - exercised on GPU machines only
    model = Glow((1, 8, 8), levels=2, depth=2, hidden=8).cuda()
    x = torch.rand(4, 1, 8, 8, device="cuda") - 0.5
    model.train()
    lp = model.log_prob(x)
    assert lp.device.type == "cuda" and torch.isfinite(lp).all()
    model.eval()
    assert (model.decode(model.encode(x).z) - x).abs().max() < 1e-4


def test_clear_errors():
    with pytest.raises(ValueError, match="divisible by 2\\*\\*levels"):
        Glow((1, 28, 28), levels=3)
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 1, 8, 8\)"):
        Glow((1, 8, 8), levels=2, depth=1, hidden=4).encode(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 5\)"):
        MAF(5, depth=1).encode(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="at least 2"):
        Glow((1,), depth=1, hidden=4)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("realnvp", (4,))
    with pytest.raises(ValueError, match="unknown preset"):
        from_preset("glow-huge")
    with pytest.raises(ValueError, match="latent 0 should have shape"):
        MAF(3, depth=1).decode([torch.zeros(2, 4)])


def test_paper_parameter_counts():
    # MAF (Table 2) and the image Glows (Table 5, L and K columns read swapped) match within 15%.
    for name in ("tabular-maf-student", "tabular-maf-teacher"):
        for ds, paper_k in PAPER_PARAMS_K[name].items():
            ours = count_parameters(from_preset(name, shape=(TABULAR_DIMS[ds],))) / 1000
            assert abs(ours - paper_k) / paper_k < 0.15, (name, ds, ours, paper_k)
    for name, ds in [("cifar10-glow-student", "cifar10"), ("cifar10-glow-teacher", "cifar10"),
                     ("celeba-glow-student", "celeba")]:
        with torch.device("meta"):
            ours = count_parameters(from_preset(name)) / 1000
        paper_k = PAPER_PARAMS_K[name][ds]
        assert abs(ours - paper_k) / paper_k < 0.15, (name, ours, paper_k)
    # Documented mismatches (see the comment above PRESETS): the CelebA teacher as configured in Table 5
    # has 44.1M parameters, not 61.2M; Table 2's tabular GLOW counts imply an unspecified conditioner.
    with torch.device("meta"):
        celeba_teacher = count_parameters(from_preset("celeba-glow-teacher")) / 1e3
    assert abs(celeba_teacher - 44_051) < 50
    glow_s = count_parameters(from_preset("tabular-glow-student", shape=(6,))) / 1000
    glow_t = count_parameters(from_preset("tabular-glow-teacher", shape=(6,))) / 1000
    assert glow_s < glow_t and abs(glow_s - 4.416) < 0.01 and abs(glow_t - 14.688) < 0.01
    assert set(PRESETS) == set(PAPER_PARAMS_K)


def test_maf_latents_are_reported_in_data_order():
    # Identity-initialised blocks (eval mode) only reverse the features; every reported latent, whatever
    # the number of reversals behind it, must line up with the data's features so that a 3-block student
    # and a 6-block teacher are compared feature by feature (LKD / ILKD).
    x = torch.randn(5, 4)
    for depth in (1, 2, 3):
        enc = MAF(4, depth=depth).eval().encode(x)
        for latent in enc.latents + enc.z:
            assert torch.allclose(latent, x, atol=1e-4), depth
