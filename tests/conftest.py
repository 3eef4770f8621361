"""A hardened test runtime (STYLE.md 9): two CPU devices, strict dtype
promotion, key-reuse checks, explicit transfers only."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()
os.environ.setdefault("TQDM_DISABLE", "1")

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_debug_key_reuse", True)
jax.config.update("jax_transfer_guard", "disallow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import ginn_jax as ginn  # noqa: E402


def pytest_configure(config):
  assert len(jax.devices("cpu")) >= 2, "tests need two CPU devices (XLA_FLAGS was set too late)"


def pytest_collection_modifyitems(config, items):
  """Tests marked `benchmark` run only when selected (``-m benchmark``)."""
  if "benchmark" in (config.getoption("markexpr") or ""):
    return
  skip = pytest.mark.skip(reason="a benchmark: run it with -m benchmark")
  for item in items:
    if "benchmark" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="session")
def mnist5k():
  return ginn.load_dataset("mnist5k")


@pytest.fixture(scope="session")
def small_data(mnist5k):
  """512 training images of mnist5k: enough for the protocol tests."""
  return mnist5k.train_images[:512], mnist5k.train_labels[:512]


@pytest.fixture(scope="session")
def mlp():
  return ginn.get_model("mlp", input_shape=(28, 28, 1))


def tree_bytes(tree) -> list[bytes]:
  """Bytes of every leaf (for bitwise comparisons of trusted state)."""
  return [np.asarray(jax.device_get(x)).tobytes() for x in jax.tree_util.tree_leaves(tree)]


_key = jax.jit(jax.random.key)


def make_key(seed: int, device=None) -> jax.Array:
  """A typed key on `device` (cpu:0 by default), made without implicit transfers."""
  device = device or jax.devices("cpu")[0]
  return _key(jax.device_put(np.uint32(seed), device))
