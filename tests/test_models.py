"""Each model's loss and gradients under jit on both CPU devices."""
import jax
import numpy as np
import pytest

import ginn_jax as ginn
from ginn_jax._src.step import DeviceGradFn

from conftest import make_key, tree_bytes

CASES = [  # (model, input shape, batch)
    ("mlp", (28, 28, 1), 8),
    ("mnist_cnn", (28, 28, 1), 8),
    ("vgg11", (32, 32, 3), 4),
]


@pytest.mark.parametrize("name,shape,batch", CASES)
def test_loss_and_grads_on_both_devices_are_bitwise_equal(name, shape, batch):
  model = ginn.get_model(name, input_shape=shape, num_classes=10)
  rng = np.random.default_rng(0)
  images = rng.random((batch * 2, *shape), dtype=np.float32)
  labels = rng.integers(0, 10, batch * 2).astype(np.int32)
  cpu0, cpu1 = jax.devices("cpu")[:2]
  params = ginn.init_state(model, ginn.make_update_transform("none", None, ginn.OptimizerConfig()),
                           make_key(1)).params
  indices = np.arange(batch, dtype=np.int32)
  key = make_key(7)
  results = []
  for dev in (cpu0, cpu1):
    loss, grads = DeviceGradFn(model.loss, images, labels, dev)(params, indices, key)
    assert loss.shape == () and loss.dtype == np.float32 and np.isfinite(jax.device_get(loss))
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    for g, p in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(params)):
      assert g.shape == p.shape and g.dtype == p.dtype
      assert g.devices() == {dev}
    results.append((tree_bytes(loss), tree_bytes(grads)))
  assert results[0] == results[1], f"{name}: gradients differ between {cpu0} and {cpu1}"
  assert any(np.abs(np.frombuffer(b, np.float32)).sum() > 0 for b in results[0][1])


def test_dropout_key_changes_vgg_loss_but_same_key_reproduces():
  model = ginn.get_model("vgg11", input_shape=(32, 32, 3))
  rng = np.random.default_rng(0)
  images = rng.random((4, 32, 32, 3), dtype=np.float32)
  labels = np.arange(4, dtype=np.int32)
  cpu0 = jax.devices("cpu")[0]
  params = jax.jit(model.init)(make_key(0))
  f = DeviceGradFn(model.loss, images, labels, cpu0)
  idx = np.arange(4, dtype=np.int32)
  k1, k2 = make_key(1), make_key(2)
  l1, l1b, l2 = f(params, idx, k1)[0], f(params, idx, k1)[0], f(params, idx, k2)[0]
  assert tree_bytes(l1) == tree_bytes(l1b)
  assert tree_bytes(l1) != tree_bytes(l2)


def test_unknown_model_names_the_choices():
  with pytest.raises(ValueError, match="mnist_cnn"):
    ginn.get_model("resnet", input_shape=(28, 28, 1))
