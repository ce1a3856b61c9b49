"""Norm-preserving latent interpolation (Eq. 16), image interpolation and Table 6's interpolation FID."""

import pytest
import torch

from flowlib import interpolate as itp
from flowlib.fid import fid_from_features, to_pixels
from flowlib.models import Glow
from tests.flowcheck import perturb


def _norms(t):
    return t.reshape(t.shape[0], -1).norm(dim=1)


def _levels(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 4, 4), (4, 2, 2), (7,)]
    za = [torch.randn(n, *s, generator=g, dtype=torch.float64) for s in shapes]
    zb = [2.0 * torch.randn(n, *s, generator=g, dtype=torch.float64) for s in shapes]
    return za, zb


def test_eq16_hand_example():
    # u = (3, 0), v = (0, 4), a = 1/2: mix (1.5, 2) of norm 2.5 rescaled to norm (3 + 4) / 2 = 3.5
    u = torch.tensor([[3.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[0.0, 4.0]], dtype=torch.float64)
    out = itp.interpolate(u, v, 0.5)
    assert torch.allclose(out, torch.tensor([[2.1, 2.8]], dtype=torch.float64), atol=1e-12)


def test_endpoints_are_reproduced():
    za, zb = _levels()
    for a, target in ((0.0, za), (1.0, zb)):
        out = itp.interpolate(za, zb, a)
        for o, t in zip(out, target):
            assert torch.allclose(o, t, rtol=1e-12, atol=1e-12)
    assert torch.allclose(itp.interpolate(za[0], zb[0], 0.0), za[0], rtol=1e-12, atol=1e-12)


def test_norm_is_the_mixture_of_norms_at_every_alpha_per_sample_per_level():
    za, zb = _levels(1)
    alphas = torch.linspace(0, 1, 11)
    out = itp.interpolate(za, zb, alphas)  # list of (A, N, ...) per level
    for lvl, (u, v) in enumerate(zip(za, zb)):
        assert out[lvl].shape == (11, *u.shape)
        for i, a in enumerate(alphas.tolist()):
            expected = (1 - a) * _norms(u) + a * _norms(v)
            assert torch.allclose(_norms(out[lvl][i]), expected, rtol=1e-10), (lvl, a)
            # and it points along the linear mixture (cosine 1)
            mix = ((1 - a) * u + a * v).reshape(u.shape[0], -1)
            cos = torch.nn.functional.cosine_similarity(out[lvl][i].reshape(u.shape[0], -1), mix, dim=1)
            assert torch.allclose(cos, torch.ones_like(cos), atol=1e-12)


def test_per_sample_alphas_match_single_calls():
    za, zb = _levels(2, n=4)
    alphas = torch.tensor([0.0, 0.25, 0.6, 1.0])
    out = itp.interpolate_pairs(za, zb, alphas)
    for i, a in enumerate(alphas.tolist()):
        single = itp.interpolate([t[i:i + 1] for t in za], [t[i:i + 1] for t in zb], a)
        for lvl in range(3):
            assert torch.allclose(out[lvl][i:i + 1], single[lvl], rtol=1e-12)


def test_interpolate_rejects_mismatches():
    za, zb = _levels(3)
    with pytest.raises(ValueError, match="same number of latent levels"):
        itp.interpolate(za, zb[:2], 0.5)
    with pytest.raises(ValueError, match="same shape"):
        itp.interpolate(za[0], zb[1], 0.5)
    with pytest.raises(ValueError, match="alpha must be a scalar or have shape"):
        itp.interpolate_pairs(za, zb, torch.zeros(3))


def _glow(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = Glow((1, 8, 8), levels=2, depth=1, hidden=8).double()
    model.train()
    model.log_prob(torch.rand(32, 1, 8, 8, generator=g, dtype=torch.float64) - 0.5)  # ActNorm init
    perturb(model, 0.05, seed=seed + 1)
    return model


def test_interpolate_images_endpoints_and_temperature():
    model = _glow()
    g = torch.Generator().manual_seed(7)
    xa = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64) - 0.5
    xb = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64) - 0.5
    strips = itp.interpolate_images(model, xa, xb, n_steps=5, temperature=1.0)
    assert strips.shape == (3, 5, 1, 8, 8) and model.training
    assert torch.allclose(strips[:, 0], xa, atol=1e-9) and torch.allclose(strips[:, -1], xb, atol=1e-9)
    cold = itp.interpolate_images(model, xa, xb, alphas=[0.0, 0.5], temperature=0.7)
    model.eval()
    with torch.no_grad():
        za, zb = model.encode(xa).z, model.encode(xb).z
        mid = model.decode([0.7 * t for t in itp.interpolate(za, zb, 0.5)])
        start = model.decode([0.7 * t for t in za])
    assert torch.allclose(cold[:, 0], start, atol=1e-9) and torch.allclose(cold[:, 1], mid, atol=1e-9)
    assert not torch.allclose(cold[:, 0], xa, atol=1e-3)  # temperature 0.7 changes the image


def test_interpolation_samples_pairs_alphas_and_endpoints():
    model = _glow(1)
    g = torch.Generator().manual_seed(8)
    x = torch.rand(10, 1, 8, 8, generator=g, dtype=torch.float64) - 0.5
    s, ia, ib, alphas = itp.interpolation_samples(model, x, 4, seed=3, batch_size=3, progress=False)
    assert s.shape == (4, 1, 8, 8) and set(ia.tolist()).isdisjoint(ib.tolist())
    assert ((alphas >= 0) & (alphas < 1)).all() and alphas.unique().numel() == 4
    s2, ia2, ib2, alphas2 = itp.interpolation_samples(model, x, 4, seed=3, progress=False)
    assert torch.equal(ia, ia2) and torch.equal(ib, ib2) and torch.equal(alphas, alphas2)
    assert torch.allclose(s, s2, atol=1e-12)  # batching does not change the result
    at0, ia0, ib0, _ = itp.interpolation_samples(model, x, 4, seed=3, alphas=torch.zeros(4), progress=False)
    at1, *_ = itp.interpolation_samples(model, x, 4, seed=3, alphas=torch.ones(4), progress=False)
    assert torch.allclose(at0, x[ia0], atol=1e-9) and torch.allclose(at1, x[ib0], atol=1e-9)
    with pytest.raises(ValueError, match="n_pairs"):
        itp.interpolation_samples(model, x, 6)


def test_interpolation_fid_against_the_test_pixels():
    model = _glow(2)
    g = torch.Generator().manual_seed(9)
    k = torch.randint(0, 256, (12, 1, 8, 8), generator=g)
    x = (k.double() + torch.rand(k.shape, generator=g, dtype=torch.float64)) / 256 - 0.5
    flat = lambda im: im.reshape(im.shape[0], -1).double().numpy()
    res = itp.interpolation_fid(model, x, 5, temperature=0.7, seed=4, n_real=12, features_fn=flat,
                                progress=False)
    samples, *_ = itp.interpolation_samples(model, x, 5, temperature=0.7, seed=4, progress=False)
    ref = fid_from_features(flat(k.to(torch.uint8)), flat(to_pixels(samples)))
    assert (res.n_real, res.n_fake) == (12, 5) and res.value == pytest.approx(ref.value, rel=1e-9)


def test_sample_at_temperatures_shares_noise():
    model = _glow(3)
    out = itp.sample_at_temperatures(model, 4, (0.5, 1.0), seed=11)
    assert list(out) == [0.5, 1.0]
    noise = model.sample_noise(4, generator=torch.Generator().manual_seed(11))
    model.eval()
    with torch.no_grad():
        for t, imgs in out.items():
            assert torch.allclose(imgs, model.decode([t * e for e in noise]), atol=1e-12)
