"""Shards (docs/design.md, "Shards"): the sharded worker, per-shard clipping,
coins and checks, and the attackers that corrupt chosen shards.

The suite has two CPU devices, so the meshes here are `[cpu:1]` (several
shards per device) and `[cpu:0, cpu:1]` (a 2-device mesh; a mesh may hold any
devices, the trusted one included, since the test only checks the numbers).
"""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import ginn_jax as ginn
from ginn_jax._src import shards
from ginn_jax._src.step import DeviceGradFn
from ginn_jax._src.trusted import commit, keys

from conftest import make_key

SECRET = b"test-shards-secret-0123456789abcd"


def mesh_of(*ids):
  cpus = jax.devices("cpu")
  return Mesh(np.array([cpus[i] for i in ids]), ("shards",))


def order_of(mlp, small_data, *, batch_size=32, step=0, seed=3):
  rt = ginn.TrustedRuntime(mlp, *small_data, ginn.ProtocolConfig(seed=seed, batch_size=batch_size, p=0.0),
                           audit_secret=SECRET)
  return rt.next_order()


# -- the cut -----------------------------------------------------------------------


def test_shard_indices_are_contiguous_slices():
  idx = np.arange(12, dtype=np.int32)
  np.testing.assert_array_equal(shards.shard_indices(idx, 3), [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
  with pytest.raises(ValueError, match="not a multiple of num_shards=5"):
    shards.shard_indices(idx, 5)


def test_shard_keys_are_fold_ins_of_the_layer_key():
  key = make_key(7)
  got = np.asarray(jax.device_get(jax.random.key_data(shards.shard_keys(key, 4))))
  for s in range(4):
    np.testing.assert_array_equal(got[s], jax.random.key_data(keys.fold_in(key, s)))
    np.testing.assert_array_equal(got[s], jax.random.key_data(shards.shard_key(key, s)))


# -- the worker ----------------------------------------------------------------------


@pytest.mark.parametrize("num_shards,mesh", [(2, (1,)), (4, (1,)), (2, (0, 1)), (4, (0, 1))])
def test_each_shard_is_bitwise_the_trusted_per_shard_gradient(mlp, small_data, num_shards, mesh):
  order = order_of(mlp, small_data)
  w = ginn.ShardedWorker(mlp, *small_data, num_shards=num_shards, mesh=mesh_of(*mesh))
  report = w(order)
  leaves = jax.tree_util.tree_leaves(report.grads)
  assert all(g.shape[0] == num_shards for g in leaves) and report.loss.shape == (num_shards,)
  ref = DeviceGradFn(mlp.loss, *small_data, jax.devices("cpu")[0])
  idx = shards.shard_indices(order.batch_indices, num_shards)
  for s in range(num_shards):
    loss, grads = ref(order.params, idx[s], shards.shard_key(order.layer_key, s))
    assert np.asarray(loss) == np.asarray(report.loss)[s]
    for r, g in zip(jax.tree_util.tree_leaves(grads), leaves):
      np.testing.assert_array_equal(np.asarray(jax.device_get(g))[s], np.asarray(r))


def test_one_shard_is_todays_worker(mlp, small_data):
  order = order_of(mlp, small_data)
  a = ginn.ShardedWorker(mlp, *small_data, num_shards=1, mesh=mesh_of(1))(order)
  b = ginn.HonestWorker(mlp, *small_data)(order)
  assert np.asarray(a.loss).shape == ()
  for x, y in zip(jax.tree_util.tree_leaves((a.grads, a.loss)), jax.tree_util.tree_leaves((b.grads, b.loss))):
    assert x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))


def test_shard_count_must_be_a_multiple_of_the_mesh(mlp, small_data):
  with pytest.raises(ValueError, match="not a multiple of the mesh's 2 devices"):
    ginn.ShardedWorker(mlp, *small_data, num_shards=3, mesh=mesh_of(0, 1))
  with pytest.raises(ValueError, match="positive int"):
    ginn.ShardedWorker(mlp, *small_data, num_shards=0)


def test_sharded_report_validates_with_its_shard_axis(mlp, small_data):
  order = order_of(mlp, small_data)
  report = ginn.ShardedWorker(mlp, *small_data, num_shards=4, mesh=mesh_of(1))(order)
  leaves, loss = commit.validate_report(report, step=0, params=order.params, num_shards=4)
  assert loss.shape == (4,) and leaves[0].shape[0] == 4
  with pytest.raises(ginn.MalformedReport, match=r"shape \(2,\) \(one per shard\)"):
    commit.validate_report(report, step=0, params=order.params, num_shards=2)
  grads, loss = jax.device_get((report.grads, report.loss))
  half = ginn.GradientReport(0, jax.tree_util.tree_map(lambda g: g[:2], grads), loss)
  with pytest.raises(ginn.ShapeMismatch, match="leading shard axis"):
    commit.validate_report(half, step=0, params=order.params, num_shards=4)
