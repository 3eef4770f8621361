"""Tests of ginn_jax._src.data: offline datasets, TFDS reading, digests."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from ginn_jax._src import data

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# name, split kwargs, image shape, train N, test N, test images per class.
BUILTIN_SPLITS = [
    ("mnist5k", {}, (28, 28, 1), 4000, 1000, [100] * 10),
    ("mnist5k", {"test_fraction": 0.1}, (28, 28, 1), 4500, 500, [50] * 10),
    ("mnist5k", {"split_seed": 7}, (28, 28, 1), 4000, 1000, [100] * 10),
    # digits has 174..183 images per class: round(0.2 * count) of each go to test.
    ("digits", {}, (8, 8, 1), 1438, 359, [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]),
]
BUILTIN_NAMES = ["mnist5k", "digits"]


def _row_hashes(images: np.ndarray) -> list[bytes]:
  return [row.tobytes() for row in images.reshape(len(images), -1)]


@pytest.mark.parametrize("name,kwargs,shape,n_train,n_test,per_class", BUILTIN_SPLITS)
def test_builtin_shapes_dtypes_and_stratified_split(name, kwargs, shape, n_train, n_test,
                                                    per_class):
  ds = data.load_dataset(name, **kwargs)
  assert ds.name == name
  assert ds.num_classes == 10
  assert ds.image_shape == shape
  assert ds.train_images.shape == (n_train, *shape)
  assert ds.test_images.shape == (n_test, *shape)
  assert ds.train_labels.shape == (n_train,)
  assert ds.test_labels.shape == (n_test,)
  for images, labels in [(ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)]:
    assert images.dtype == np.float32
    assert labels.dtype == np.int32
    assert images.flags.c_contiguous
    assert images.min() == 0.0
    assert images.max() == 1.0
    assert labels.min() == 0 and labels.max() == 9
  assert np.bincount(ds.test_labels, minlength=10).tolist() == per_class


@pytest.mark.parametrize("name,levels", [("mnist5k", 255), ("digits", 16)])
def test_builtin_values_are_scaled_integer_levels(name, levels):
  ds = data.load_dataset(name)
  scaled = ds.train_images.astype(np.float64) * levels
  np.testing.assert_allclose(scaled, np.round(scaled), atol=1e-4)


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_split_is_shuffled(name):
  ds = data.load_dataset(name)
  for labels in (ds.train_labels, ds.test_labels):
    assert np.any(np.diff(labels) < 0), "labels are still sorted"
    # Not merely rotated: every class shows up within the first 100 items.
    assert len(np.unique(labels[:100])) == 10


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_split_is_deterministic_per_seed(name):
  first = data.load_dataset(name, split_seed=3)
  data._load_cached.cache_clear()  # pylint: disable=protected-access
  again = data.load_dataset(name, split_seed=3)
  other = data.load_dataset(name, split_seed=4)
  assert again is not first
  for field in ("train_images", "train_labels", "test_images", "test_labels"):
    np.testing.assert_array_equal(getattr(again, field), getattr(first, field))
  assert again.digest() == first.digest()
  assert not np.array_equal(other.train_labels, first.train_labels)
  assert other.digest() != first.digest()
  assert other.digest("test") != first.digest("test")


@pytest.mark.parametrize("name,n_total", [("mnist5k", 5000), ("digits", 1797)])
def test_builtin_train_and_test_partition_the_data(name, n_total):
  ds = data.load_dataset(name)
  train, test = set(_row_hashes(ds.train_images)), set(_row_hashes(ds.test_images))
  assert len(train) == len(ds.train_images)  # (the raw data has no duplicates)
  assert len(test) == len(ds.test_images)
  assert train.isdisjoint(test)
  assert len(train | test) == n_total


def test_repeated_loads_are_cached():
  assert data.load_dataset("mnist5k") is data.load_dataset("mnist5k", split_seed=0)


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_image_size_resizes_builtin(name):
  ds = data.load_dataset(name, image_size=(16, 12))
  assert ds.image_shape == (16, 12, 1)
  assert ds.train_images.dtype == np.float32
  assert 0.0 <= ds.train_images.min() and ds.train_images.max() <= 1.0
  np.testing.assert_array_equal(ds.train_labels, data.load_dataset(name).train_labels)


@pytest.mark.parametrize("kwargs,match", [
    ({"test_fraction": 0.0}, "test_fraction"),
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"image_size": (0, 8)}, "image_size"),
])
def test_load_dataset_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.load_dataset("mnist5k", **kwargs)


def test_list_datasets():
  assert data.list_datasets() == [
      "mnist5k", "digits", "mnist", "cifar10", "visual_domain_decathlon/gtsrb"]


# ----------------------------------------------------------------- TFDS offline


@pytest.mark.parametrize("name", ["mnist", "cifar10", "visual_domain_decathlon/gtsrb"])
@pytest.mark.parametrize("how", ["argument", "path_argument", "env_var"])
def test_missing_tfds_dataset_raises_dataset_not_found(name, how, tmp_path, monkeypatch):
  data_dir = tmp_path / "tfds"
  kwargs = {}
  if how == "argument":
    kwargs["data_dir"] = str(data_dir)
  elif how == "path_argument":
    kwargs["data_dir"] = data_dir
  else:
    monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
  with pytest.raises(data.DatasetNotFoundError) as info:
    data.load_dataset(name, **kwargs)
  message = str(info.value)
  assert isinstance(info.value, FileNotFoundError)
  assert repr(name) in message
  assert str(data_dir) in message
  assert f"ginn data prepare {name} --data-dir {data_dir}" in message
  # tfds says "random access ... not supported" when no array_record data is there.
  assert isinstance(info.value.__cause__, NotImplementedError)


def test_unknown_tfds_name_is_a_value_error(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset_xyz'"):
    data.load_dataset("no_such_dataset_xyz", data_dir=tmp_path)


def test_prepare_tfds_without_tensorflow_says_what_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # import now fails
  with pytest.raises(ImportError, match=r"pip install 'ginn_jax\[tfds-build\]'"):
    data.prepare_tfds("mnist", tmp_path)
  data.prepare_tfds("mnist5k", tmp_path)  # built in: nothing to prepare


def test_digits_without_sklearn_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
  data._load_builtin.cache_clear()  # pylint: disable=protected-access
  with pytest.raises(ImportError, match="pip install scikit-learn"):
    data.load_dataset("digits", split_seed=12345)  # a seed nothing else caches


# ----------------------------------------------------------------- TFDS mocked

# name, image_size, expected image shape, classes. The mock generates random
# examples from each builder's feature spec; GTSRB images have no fixed size in
# that spec, so they come in several sizes and are resized to (32, 32).
MOCK_CASES = [
    ("mnist", None, (28, 28, 1), 10),
    ("cifar10", None, (32, 32, 3), 10),
    ("visual_domain_decathlon/gtsrb", None, (32, 32, 3), 43),
    ("mnist", (16, 20), (16, 20, 1), 10),
    ("visual_domain_decathlon/gtsrb", (24, 24), (24, 24, 3), 43),
]


@pytest.mark.parametrize("name,image_size,shape,num_classes", MOCK_CASES)
def test_tfds_dataset_through_mock_data(name, image_size, shape, num_classes, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  n = 6
  with tfds.testing.mock_data(num_examples=n):
    ds = data.load_dataset(name, data_dir=tmp_path, image_size=image_size)
    raw = tfds.data_source(name, split="train", data_dir=tmp_path, download=False)
    raw_images = [np.asarray(raw[i]["image"]) for i in range(n)]
    raw_labels = [int(raw[i]["label"]) for i in range(n)]
  assert ds.num_classes == num_classes
  assert ds.image_shape == shape
  for images, labels in [(ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)]:
    assert images.shape == (n, *shape)
    assert images.dtype == np.float32 and labels.dtype == np.int32
    assert images.flags.c_contiguous and not images.flags.writeable
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert labels.min() >= 0 and labels.max() < num_classes
  assert ds.train_labels.tolist() == raw_labels
  if all(im.shape == shape for im in raw_images):
    expected = np.stack(raw_images).astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(ds.train_images, expected)


@pytest.mark.parametrize("name,splits", [
    ("mnist", ["train", "test"]),
    ("cifar10", ["train", "test"]),
    # GTSRB's test split has no labels: the labelled validation split is used.
    ("visual_domain_decathlon/gtsrb", ["train", "validation"]),
])
def test_tfds_splits_requested(name, splits, tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  requested = []
  original = tfds.data_source

  def spy(*args, **kwargs):
    requested.append(kwargs.get("split"))
    return original(*args, **kwargs)

  monkeypatch.setattr(tfds, "data_source", spy)
  with tfds.testing.mock_data(num_examples=2):
    data.load_dataset(name, data_dir=tmp_path)
  assert requested == [splits]


# ---------------------------------------------------------------------- digests

GOLDEN_IMAGES = np.arange(24, dtype=np.float32).reshape(2, 2, 3, 2) / np.float32(24)
GOLDEN_LABELS = np.array([0, 1], np.int32)
GOLDEN_DIGEST = "ec932b94338886ccc8a53c9f9e95ec120355265769128caa984e3e3f853858b6"


@pytest.mark.parametrize("images,labels", [
    (GOLDEN_IMAGES, GOLDEN_LABELS),
    (GOLDEN_IMAGES.astype(">f4"), GOLDEN_LABELS.astype(">i4")),  # big-endian
    (np.asfortranarray(GOLDEN_IMAGES), GOLDEN_LABELS),  # not C-contiguous
    (np.repeat(GOLDEN_IMAGES, 2, axis=0)[::2], GOLDEN_LABELS),  # strided view
])
def test_digest_is_canonical(images, labels):
  assert data.dataset_digest(images, labels) == GOLDEN_DIGEST


def test_digest_equal_across_processes():
  ds = data.load_dataset("mnist5k")
  code = ("from ginn_jax._src import data; "
          "print(data.load_dataset('mnist5k').digest())")
  env = dict(os.environ, PYTHONHASHSEED="12345",
             PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=120, check=True)
  assert out.stdout.strip().splitlines()[-1] == ds.digest()
  assert len(ds.digest()) == 64


def _flip_pixel(images, labels):
  images[17, 3, 5, 0] = 1.0 - images[17, 3, 5, 0]


def _change_label(images, labels):
  labels[42] = (labels[42] + 1) % 10


def _swap_two_examples(images, labels):
  images[[0, 1]] = images[[1, 0]]
  labels[[0, 1]] = labels[[1, 0]]


def _nudge_one_pixel_by_an_ulp(images, labels):
  images[5, 14, 14, 0] = np.nextafter(images[5, 14, 14, 0], np.float32(2))


@pytest.mark.parametrize("mutate", [
    _flip_pixel, _change_label, _swap_two_examples, _nudge_one_pixel_by_an_ulp])
def test_digest_changes_with_any_change(mutate):
  ds = data.load_dataset("mnist5k")
  images, labels = ds.train_images.copy(), ds.train_labels.copy()
  assert data.dataset_digest(images, labels) == ds.digest("train")
  mutate(images, labels)
  assert data.dataset_digest(images, labels) != ds.digest("train")
  assert ds.digest("train") == data.dataset_digest(ds.train_images, ds.train_labels)


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_digest_differs_between_splits(name):
  ds = data.load_dataset(name)
  assert ds.digest("train") != ds.digest("test")
  assert ds.digest() == ds.digest("train")
  with pytest.raises(ValueError, match="'validation'"):
    ds.digest("validation")


@pytest.mark.parametrize("images,labels,match", [
    (GOLDEN_IMAGES.astype(np.float64), GOLDEN_LABELS, "images must be float32"),
    (GOLDEN_IMAGES.astype(np.uint8), GOLDEN_LABELS, "images must be float32"),
    (GOLDEN_IMAGES[0], GOLDEN_LABELS, "images must be 4-D"),
    (GOLDEN_IMAGES, GOLDEN_LABELS.astype(np.int64), "labels must be int32"),
    (GOLDEN_IMAGES, GOLDEN_LABELS.astype(np.uint32), "labels must be int32"),
    (GOLDEN_IMAGES, GOLDEN_LABELS[:, None], "labels must be 1-D"),
    (GOLDEN_IMAGES, GOLDEN_LABELS[:1], "disagree on N"),
])
def test_digest_rejects_bad_inputs(images, labels, match):
  with pytest.raises(ValueError, match=match):
    data.dataset_digest(images, labels)


# -------------------------------------------------------------------- read-only

FIELDS = ["train_images", "train_labels", "test_images", "test_labels"]


@pytest.mark.parametrize("name", BUILTIN_NAMES)
@pytest.mark.parametrize("field", FIELDS)
def test_returned_arrays_are_read_only(name, field):
  ds = data.load_dataset(name)
  arr = getattr(ds, field)
  before = ds.digest("train" if field.startswith("train") else "test")
  assert not arr.flags.writeable
  with pytest.raises(ValueError, match="read-only"):
    arr[0] = 0
  with pytest.raises(ValueError):
    arr.flags.writeable = True  # a view of a read-only base: cannot be re-enabled
  with pytest.raises((AttributeError, TypeError)):
    setattr(ds, field, arr.copy())  # the dataclass is frozen
  again = data.load_dataset(name)
  assert again.digest("train" if field.startswith("train") else "test") == before
