"""Norm-preserving latent interpolation (Eq. 16, section 4.4) and temperature sampling helpers.

Eq. 16 mixes the latents ``f(u)``, ``f(v)`` of two images linearly and rescales the mixture so that
its norm is the same mixture of the two norms::

    f(u, v, a) = ((1 - a) f(u) + a f(v)) * ((1 - a) ||f(u)|| + a ||f(v)||) / ||(1 - a) f(u) + a f(v)||

A plain linear mix of two Gaussian latents has a smaller norm than either (it moves towards the
mode, where typical samples do not live); the rescaling keeps the interpolant on the shell where
standard-normal latents of dimension D concentrate (norm about sqrt(D)).

**Multi-scale models.** A multi-scale Glow has one latent per level (:attr:`Encoding.z`). We apply
Eq. 16 to *every* level, with norms taken per sample per level, so each level's latent keeps its own
typical norm. (The paper's code mixed only the top-level latent; interpolating every level makes the
decoded image move from one endpoint to the other, and at ``a = 0`` / ``a = 1`` reproduces the
endpoints exactly.)

Table 6 measures the FID of decoded interpolations of random test-image pairs, each with a random
``a`` in [0, 1), at temperatures 1.0 and 0.7 (the interpolated latent is multiplied by the
temperature before decoding): :func:`interpolation_fid`.

Temperatures must be finite numbers >= 0 and every ``alpha`` finite (``ValueError``); the model functions
evaluate a fixed model many times, inside :func:`flowlib.bijectors.cached_weights`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .bijectors import cached_weights
from .fid import FIDResult, fid, to_pixels
from .metrics import eval_mode
from .models import check_temperature

__all__ = [
    "interpolate",
    "interpolate_images",
    "interpolate_pairs",
    "interpolation_fid",
    "interpolation_samples",
    "sample_at_temperatures",
]


def _norm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample Euclidean norm, shaped (N, 1, ..., 1) to broadcast against ``t``."""
    n = t.reshape(t.shape[0], -1).norm(dim=1)
    return n.view(-1, *([1] * (t.dim() - 1)))


def _eq16(u: torch.Tensor, v: torch.Tensor, a: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. 16 for one level; ``a`` has shape (N,) (one alpha per sample)."""
    if u.shape != v.shape:
        raise ValueError(f"latents to interpolate must have the same shape, got {tuple(u.shape)} and "
                         f"{tuple(v.shape)}")
    a = a.to(device=u.device, dtype=u.dtype).view(-1, *([1] * (u.dim() - 1)))
    mix = (1 - a) * u + a * v
    target = (1 - a) * _norm(u) + a * _norm(v)
    return mix * (target / _norm(mix).clamp_min(eps))


def _check_alphas(a: torch.Tensor) -> None:
    if not bool(torch.isfinite(a).all()):
        raise ValueError(f"interpolation weights alpha must be finite, got {a.tolist()}")


def _as_levels(z) -> tuple[list[torch.Tensor], bool]:
    if torch.is_tensor(z):
        return [z], True
    levels = list(z)
    if not levels or not all(torch.is_tensor(t) for t in levels):
        raise TypeError("latents must be a tensor or a non-empty list of per-level tensors")
    return levels, False


def interpolate_pairs(za, zb, alpha, eps: float = 1e-12):
    """Eq. 16 with one ``alpha`` per sample: ``alpha`` is a float or a tensor of shape (N,).

    ``za`` and ``zb`` are (N, ...) tensors or lists of per-level (N, ...) tensors (as ``Encoding.z``);
    norms are per sample per level. Returns the same structure as ``za``. If a mixture is exactly
    zero (``zb = -za`` at alpha 1/2, a probability-zero event for Gaussian latents) it stays zero.
    """
    la, single = _as_levels(za)
    lb, _ = _as_levels(zb)
    if len(la) != len(lb):
        raise ValueError(f"both endpoints need the same number of latent levels, got {len(la)} and {len(lb)}")
    n = la[0].shape[0]
    a = torch.as_tensor(alpha, dtype=torch.float64)
    if a.dim() == 0:
        a = a.expand(n)
    if a.shape != (n,):
        raise ValueError(f"alpha must be a scalar or have shape ({n},), got {tuple(a.shape)}")
    _check_alphas(a)
    out = [_eq16(u, v, a, eps) for u, v in zip(la, lb)]
    return out[0] if single else out


def interpolate(za, zb, alphas, eps: float = 1e-12):
    """Norm-preserving interpolation (Eq. 16) of latents ``za`` -> ``zb`` at each of ``alphas``.

    ``alphas``: a float (result shaped like ``za``) or a 1-D sequence/tensor of A values (result with a
    leading alpha axis, (A, N, ...), per level). ``za``/``zb``: tensors or lists of per-level tensors.
    At ``alpha = 0`` the result is ``za``, at 1 ``zb``; its per-sample, per-level norm is
    ``(1 - alpha) ||za|| + alpha ||zb||``.
    """
    a = torch.as_tensor(alphas, dtype=torch.float64)
    _check_alphas(a)
    if a.dim() == 0:
        return interpolate_pairs(za, zb, float(a), eps)
    if a.dim() != 1:
        raise ValueError(f"alphas must be a float or a 1-D sequence, got shape {tuple(a.shape)}")
    steps = [interpolate_pairs(za, zb, float(ai), eps) for ai in a]
    if torch.is_tensor(za):
        return torch.stack(steps)
    return [torch.stack([s[lvl] for s in steps]) for lvl in range(len(steps[0]))]


def interpolate_images(model, xa: torch.Tensor, xb: torch.Tensor, n_steps: int = 8,
                       temperature: float = 1.0, alphas: Sequence[float] | None = None) -> torch.Tensor:
    """Decoded interpolations between model-space images ``xa`` and ``xb`` (each (N, ...)).

    Encodes both, applies Eq. 16 at ``alphas`` (default ``n_steps`` evenly spaced values from 0 to 1)
    to every latent level, multiplies by ``temperature`` and decodes. Returns (N, A, ...): row i is the
    strip from ``xa[i]`` to ``xb[i]``. At temperature 1 the end columns reconstruct ``xa`` and ``xb``.
    Runs under ``torch.inference_mode`` in eval mode (restored afterwards).
    """
    if xa.shape != xb.shape:
        raise ValueError(f"xa and xb must have the same shape, got {tuple(xa.shape)} and {tuple(xb.shape)}")
    check_temperature(temperature)
    if alphas is None:
        if n_steps < 2:
            raise ValueError(f"n_steps must be >= 2, got {n_steps}")
        alphas = torch.linspace(0.0, 1.0, n_steps, dtype=torch.float64)
    alphas = torch.as_tensor(alphas, dtype=torch.float64)
    _check_alphas(alphas)
    device = next(model.parameters()).device
    with eval_mode(model), torch.inference_mode(), cached_weights(model):
        za, zb = model.encode(xa.to(device)).z, model.encode(xb.to(device)).z
        cols = []
        for a in alphas:
            z = interpolate_pairs(za, zb, float(a))
            cols.append(model.decode([temperature * t for t in z]))
    return torch.stack(cols, dim=1)


def interpolation_samples(model, x_test: torch.Tensor, n_pairs: int, temperature: float = 1.0,
                          seed: int = 0, alphas=None, batch_size: int = 64, progress: bool = True):
    """Table 6's interpolated samples: ``n_pairs`` random pairs of distinct test images, one random
    ``alpha ~ U[0, 1)`` per pair (or the given ``alphas``, shape (n_pairs,)), Eq. 16 on every level,
    times ``temperature``, decoded.

    Pairs and alphas come from a ``torch.Generator`` seeded with ``seed``: a random permutation of the
    test set gives ``idx_a`` (its first ``n_pairs`` entries) and ``idx_b`` (the next ``n_pairs``), so
    ``2 * n_pairs <= len(x_test)``. Returns ``(samples, idx_a, idx_b, alphas)``, samples in model space.
    """
    check_temperature(temperature)
    n = x_test.shape[0]
    if n_pairs < 1 or 2 * n_pairs > n:
        raise ValueError(f"need 1 <= n_pairs <= len(x_test) / 2 = {n // 2}, got n_pairs={n_pairs}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    idx_a, idx_b = perm[:n_pairs], perm[n_pairs:2 * n_pairs]
    if alphas is None:
        alphas = torch.rand(n_pairs, generator=gen, dtype=torch.float64)
    alphas = torch.as_tensor(alphas, dtype=torch.float64)
    if alphas.shape != (n_pairs,):
        raise ValueError(f"alphas must have shape ({n_pairs},), got {tuple(alphas.shape)}")
    _check_alphas(alphas)
    device = next(model.parameters()).device
    out = []
    with eval_mode(model), torch.inference_mode(), cached_weights(model):
        for s in tqdm(range(0, n_pairs, batch_size), desc=f"interpolating (T={temperature})",
                      disable=not progress):
            ia, ib = idx_a[s:s + batch_size], idx_b[s:s + batch_size]
            za = model.encode(x_test[ia].to(device)).z
            zb = model.encode(x_test[ib].to(device)).z
            z = interpolate_pairs(za, zb, alphas[s:s + batch_size])
            out.append(model.decode([temperature * t for t in z]).cpu())
    return torch.cat(out), idx_a, idx_b, alphas


def interpolation_fid(model, x_test: torch.Tensor, n_pairs: int, temperature: float = 1.0, *,
                      seed: int = 0, n_real: int | None = None, preprocess=None, batch_size: int = 64,
                      progress: bool = True, **fid_kwargs) -> FIDResult:
    """FID of decoded latent interpolations against real test images (Table 6).

    ``x_test``: model-space test images (what ``model.log_prob`` takes). The fakes are
    :func:`interpolation_samples`; the reals are the pixels of ``n_real`` test images (default
    ``n_pairs``, a subset seeded by ``seed + 1``), via :func:`flowlib.fid.to_pixels` (``preprocess`` as
    there; it exactly undoes dequantisation). ``fid_kwargs`` go to :func:`flowlib.fid.fid`, e.g.
    ``dataset="celeba"`` to cache the real features, ``features_fn`` or ``batch_size``.
    Remember that the value depends on the sample counts (shown in the result).
    """
    samples, *_ = interpolation_samples(model, x_test, n_pairs, temperature, seed, batch_size=batch_size,
                                        progress=progress)
    real = to_pixels(x_test, preprocess)
    fid_kwargs.setdefault("progress", progress)
    return fid(to_pixels(samples, preprocess), real, n_real=n_pairs if n_real is None else n_real,
               seed=seed + 1, **fid_kwargs)


def sample_at_temperatures(model, n: int, temperatures: Sequence[float] = (0.5, 0.7, 1.0),
                           seed: int = 0) -> dict[float, torch.Tensor]:
    """Samples at several temperatures from the *same* standard-normal noise (seeded), so rows of a
    temperature sweep differ only by the temperature: ``{T: model.decode(T * noise)}``."""
    temperatures = [check_temperature(t) for t in temperatures]
    gen = torch.Generator().manual_seed(seed)
    with eval_mode(model), torch.inference_mode(), cached_weights(model):
        noise = model.sample_noise(n, generator=gen)
        return {float(t): model.sample(temperature=float(t), noise=noise) for t in temperatures}
