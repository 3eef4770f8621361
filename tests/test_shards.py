"""Shards (docs/design.md, "Shards"): the sharded worker, per-shard clipping,
coins and checks, and the attackers that corrupt chosen shards.

Every run here is in "per_shard" mode (named explicitly: "aggregate" is the
default for S > 1 and has tests/test_aggregate.py).

The suite has two CPU devices, so the meshes here are `[cpu:1]` (several
shards per device) and `[cpu:0, cpu:1]` (a 2-device mesh; a mesh may hold any
devices, the trusted one included, since the test only checks the numbers).
"""
import hashlib
import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import ginn_jax as ginn
from ginn_jax._src import shards
from ginn_jax._src.step import DeviceGradFn
from ginn_jax._src.trusted import commit, keys

from conftest import (assert_coins_as_drawn, exact_data, exact_digest, exact_model, exact_poison,
                      make_key, tree_bytes)

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


@pytest.mark.parametrize("num_shards,mesh", [(4, (1,)), (2, (0, 1)), (4, (0, 1))])
def test_each_shard_is_bitwise_the_trusted_per_shard_gradient(mlp, small_data, num_shards, mesh):
  order = order_of(mlp, small_data)
  w = ginn.ShardedWorker(mlp, *small_data, num_shards=num_shards, shard_mode="per_shard", mesh=mesh_of(*mesh))
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
  report = ginn.ShardedWorker(mlp, *small_data, num_shards=4, shard_mode="per_shard", mesh=mesh_of(1))(order)
  leaves, loss = commit.validate_report(report, step=0, params=order.params, num_shards=4)
  assert loss.shape == (4,) and leaves[0].shape[0] == 4
  with pytest.raises(ginn.MalformedReport, match=r"shape \(2,\) \(one per shard\)"):
    commit.validate_report(report, step=0, params=order.params, num_shards=2)
  grads, loss = jax.device_get((report.grads, report.loss))
  half = ginn.GradientReport(0, jax.tree_util.tree_map(lambda g: g[:2], grads), loss)
  with pytest.raises(ginn.ShapeMismatch, match="leading shard axis"):
    commit.validate_report(half, step=0, params=order.params, num_shards=4)


# -- the runtime -----------------------------------------------------------------------


def config(**kw):
  base = dict(seed=3, batch_size=32, p=1.0, clip="elementwise", clip_value=0.01, num_shards=4,
              shard_mode="per_shard")
  base.update(kw)
  return ginn.ProtocolConfig(**base)


def runtime(mlp, small_data, secret=SECRET, **kw):
  return ginn.TrustedRuntime(mlp, *small_data, config(**kw), audit_secret=secret)


def snapshot(rt):
  return (rt.step, tree_bytes(rt.state.params), tree_bytes(rt.state.opt_state),
          len(rt.transcript), rt.num_verified, rt.halted)


def test_config_refuses_a_batch_not_divisible_by_the_shards():
  with pytest.raises(ValueError, match="batch_size=30 is not a multiple of num_shards=4"):
    config(batch_size=30)
  assert "num_shards" not in config(num_shards=1).to_dict()  # Headers without shards: unchanged.
  assert config().to_dict()["num_shards"] == 4


@pytest.mark.parametrize("mesh", [(1,), (0, 1)])
def test_honest_sharded_run_verifies_every_shard_bitwise(mlp, small_data, mesh):
  rt = runtime(mlp, small_data)
  res = ginn.train(rt, ginn.ShardedWorker(mlp, *small_data, num_shards=4, shard_mode="per_shard", mesh=mesh_of(*mesh)), 12,
                   progress=False)
  assert res.verified and res.num_verified == 12
  assert all(e.shards == [0, 1, 2, 3] and e.max_rel_l2 == 0.0 and e.max_abs == 0.0
             for e in res.transcript)


def test_update_clips_each_shard_then_averages(mlp, small_data):
  """The trusted update equals clip-each, mean, SGD computed by hand (and
  differs from clipping the mean)."""
  rt = runtime(mlp, small_data, p=0.0)
  w = ginn.ShardedWorker(mlp, *small_data, num_shards=4, shard_mode="per_shard", mesh=mesh_of(1))
  order = rt.next_order()
  report = w(order)
  rt.submit(report)
  g = [np.asarray(x) for x in jax.device_get(jax.tree_util.tree_leaves(report.grads))]
  p0 = [np.asarray(x) for x in jax.device_get(jax.tree_util.tree_leaves(order.params))]
  p1 = [np.asarray(x) for x in jax.device_get(jax.tree_util.tree_leaves(rt.state.params))]
  lr, wd, C = 0.05, 5e-4, 0.01
  for g_, a, b in zip(g, p0, p1):
    want = a - lr * (np.clip(g_, -C, C).mean(axis=0) + wd * a)
    np.testing.assert_allclose(b, want, rtol=1e-6, atol=1e-9)
  mean_then_clip = [a - lr * (np.clip(g_.mean(axis=0), -C, C) + wd * a) for g_, a in zip(g, p0)]
  assert any(not np.allclose(b, m, rtol=1e-6, atol=1e-9) for b, m in zip(p1, mean_then_clip))


def test_one_shard_coins_and_transcript_are_todays(mlp, small_data):
  a = runtime(mlp, small_data, p=0.3, num_shards=1)
  b = ginn.TrustedRuntime(mlp, *small_data, ginn.ProtocolConfig(seed=3, batch_size=32, p=0.3,
                                                                clip="elementwise", clip_value=0.01),
                          audit_secret=SECRET)
  w = ginn.ShardedWorker(mlp, *small_data, num_shards=1, mesh=mesh_of(1))
  ea = ginn.train(a, w, 10, progress=False).transcript
  eb = ginn.train(b, ginn.HonestWorker(mlp, *small_data), 10, progress=False).transcript
  assert ea == eb and all(e.shards is None for e in ea)
  assert a.public_header() == b.public_header()


def _mixed_draws(coins) -> bool:
  """Whether 20 steps of fixed digests (the same on every machine) draw some
  but not all of 4 shards on some step: one coin per shard, not one per step."""
  k = keys.audit_keys(SECRET)
  return any(0 < sum(coins(k, t, bytes([t]) * 32, 0.5, 4)) < 4 for t in range(20))


def test_coins_are_drawn_per_shard(mlp, small_data):
  rt = runtime(mlp, small_data, p=0.5)
  res = ginn.train(rt, ginn.ShardedWorker(mlp, *small_data, num_shards=4, shard_mode="per_shard", mesh=mesh_of(1)), 10,
                   progress=False)
  drawn = [e.shards for e in res.transcript]
  # Each step re-computed exactly the shards its digest's coins drew.
  assert res.verified and assert_coins_as_drawn(SECRET, rt.config, res.transcript)
  assert all(e.verified == bool(e.shards) for e in res.transcript)
  assert res.num_verified == sum(bool(d) for d in drawn)
  assert _mixed_draws(keys.shard_verification_coins)


def _bad(report, kind):
  grads, loss = jax.device_get((report.grads, report.loss))
  leaves, treedef = jax.tree_util.tree_flatten(grads)
  leaves = [np.array(x) for x in leaves]
  loss = np.array(loss)
  if kind == "too_few_shards":
    return ginn.GradientReport(report.step, treedef.unflatten([x[:3] for x in leaves]), loss[:3]), ginn.MalformedReport
  if kind == "too_many_shards":
    more = [np.concatenate([x, x[:1]]) for x in leaves]
    return ginn.GradientReport(report.step, treedef.unflatten(more), np.concatenate([loss, loss[:1]])), ginn.MalformedReport
  if kind == "no_shard_axis":
    return ginn.GradientReport(report.step, treedef.unflatten([x[0] for x in leaves]), loss[0]), ginn.MalformedReport
  if kind == "one_shard_wrong_leaf_count":  # Shard count in the loss right, one leaf short a shard.
    leaves[1] = leaves[1][:3]
    return ginn.GradientReport(report.step, treedef.unflatten(leaves), loss), ginn.ShapeMismatch
  if kind == "nan_in_shard_2":
    leaves[0][2].flat[5] = np.nan
    return ginn.GradientReport(report.step, treedef.unflatten(leaves), loss), ginn.NonFiniteReport
  if kind == "inf_loss_of_shard_1":
    loss[1] = np.inf
    return ginn.GradientReport(report.step, treedef.unflatten(leaves), loss), ginn.NonFiniteReport
  raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["too_few_shards", "too_many_shards", "no_shard_axis",
                                  "one_shard_wrong_leaf_count", "nan_in_shard_2", "inf_loss_of_shard_1"])
def test_bad_sharded_reports_are_refused_with_nothing_changed(mlp, small_data, kind):
  rt = runtime(mlp, small_data, p=0.5)
  w = ginn.ShardedWorker(mlp, *small_data, num_shards=4, shard_mode="per_shard", mesh=mesh_of(1))
  ginn.train(rt, w, 2, progress=False)
  before = snapshot(rt)
  order = rt.next_order()
  bad, error = _bad(w(order), kind)
  with pytest.raises(error) as info:
    rt.submit(bad)
  assert snapshot(rt) == before
  if kind == "nan_in_shard_2":
    assert info.value.shard == 2 and "shard 2" in str(info.value)
  if kind == "inf_loss_of_shard_1":
    assert info.value.shard == 1
  rt.submit(w(order))  # The corrected report is accepted.
  assert rt.step == before[0] + 1


def test_witness_checks_per_shard(mlp, small_data):
  """Each shard has its own witness coin; a challenged shard's witness is that
  of its sub-batch; a one-shard attacker is caught by its shard's witness check."""
  rt = runtime(mlp, small_data, p=0.0, p_witness=0.5)
  w = ginn.ShardedWorker(mlp, *small_data, num_shards=4, shard_mode="per_shard", mesh=mesh_of(1))
  res = ginn.train(rt, w, 6, progress=False)
  assert res.verified and assert_coins_as_drawn(SECRET, rt.config, res.transcript)
  assert _mixed_draws(keys.shard_witness_coins)
  for e in res.transcript:
    assert (e.check == "witness") == bool(e.witness_shards) and e.shards == []
    if e.witness_shards:
      assert len(e.witness_digest.split(",")) == len(e.witness_shards) and e.witness_max_abs < 1e-4
  rt = runtime(mlp, small_data, p=0.0, p_witness=1.0)
  before = snapshot(rt)
  attacker = _attacker("backdoor", mlp, small_data, num_shards=4, shards=[2], mesh=mesh_of(1), shard_mode="per_shard")
  with pytest.raises(ginn.WitnessViolation) as info:
    rt.submit(attacker(rt.next_order()), witness=attacker.witness)
  assert info.value.shard == 2 and "step 0, shard 2" in str(info.value)
  assert snapshot(rt)[:3] == before[:3]
  rt = runtime(mlp, small_data, p=0.0, p_witness=1.0)
  with pytest.raises(ginn.WitnessViolation, match="offers no witness"):
    rt.submit(w(rt.next_order()))


# -- attackers per shard ---------------------------------------------------------------


def _attacker(name, mlp, small_data, **kw):
  sched = ginn.schedules.FromStep(0)
  x, y = small_data
  if name == "backdoor":
    return ginn.BackdoorWorker(mlp, x, y, schedule=sched, **kw)
  if name == "combined":
    return ginn.CombinedLossWorker(mlp, x, y, schedule=sched, lam=1.0, **kw)
  if name == "scaled":
    return ginn.ScaledBackdoorWorker(mlp, x, y, schedule=sched, scale=10.0, **kw)
  if name == "label_flip":
    return ginn.LabelFlipWorker(mlp, x, y, schedule=sched, **kw)
  if name == "noise":
    return ginn.NoiseWorker(mlp, x, y, schedule=sched, scale=0.01, **kw)
  if name == "model_replacement":
    target = jax.jit(lambda t: jax.tree_util.tree_map(lambda p: p * 0.5, t))(order_of(mlp, small_data).params)
    return ginn.ModelReplacementWorker(mlp, x, y, schedule=sched, target_params=target, **kw)
  if name == "stealth":
    return ginn.StealthWorker(mlp, x, y, schedule=sched, tolerance=ginn.LOOSE_PER_LEAF_TOLERANCE, **kw)
  raise AssertionError(name)


ATTACKERS = ["backdoor", "combined", "scaled", "label_flip", "noise", "model_replacement", "stealth"]


@pytest.mark.parametrize("name,chosen", [(a, (1,)) for a in ATTACKERS] + [("backdoor", None),
                                                                          ("noise", (0, 3))])
def test_attackers_corrupt_only_the_chosen_shards(mlp, small_data, name, chosen):
  order = order_of(mlp, small_data)
  bad = _attacker(name, mlp, small_data, num_shards=4, shards=chosen, mesh=mesh_of(1), shard_mode="per_shard")(order)
  good = ginn.ShardedWorker(mlp, *small_data, num_shards=4, shard_mode="per_shard", mesh=mesh_of(1))(order)
  corrupted = set(range(4) if chosen is None else chosen)
  for b, g in zip(*(jax.device_get(jax.tree_util.tree_leaves(r.grads)) for r in (bad, good))):
    assert b.shape == g.shape == (4, *b.shape[1:])
    for s in range(4):
      assert np.array_equal(b[s], g[s]) == (s not in corrupted), (name, s)


@pytest.mark.parametrize("name", ["backdoor", "model_replacement"])
def test_a_corrupted_shard_is_named_by_the_violation(mlp, small_data, name):
  rt = runtime(mlp, small_data, p=1.0)
  before = snapshot(rt)
  with pytest.raises(ginn.IntegrityViolation) as info:
    rt.submit(_attacker(name, mlp, small_data, num_shards=4, shards=[2], mesh=mesh_of(1), shard_mode="per_shard")(rt.next_order()))
  v = info.value
  assert v.step == 0 and v.shard == 2 and "at step 0, shard 2: leaf" in str(v)
  assert snapshot(rt)[:3] == before[:3]
  assert rt.transcript[-1].outcome == "violation" and rt.transcript[-1].shards == [0, 1, 2, 3]


def test_attacker_shards_are_checked(mlp, small_data):
  with pytest.raises(ValueError, match="range\\(4\\)"):
    _attacker("backdoor", mlp, small_data, num_shards=4, shards=[4])
  with pytest.raises(ValueError, match="range\\(1\\)"):
    _attacker("backdoor", mlp, small_data, shards=[1])


@pytest.mark.parametrize("corrupted", [1])  # The all-shard attacker: same code.
def test_detection_rate_of_shard_attackers_matches_the_formula(corrupted):
  """Real runs, each with its own audit secret: the share caught matches
  ``shard_detection_probability`` (99% binomial interval). The model is
  `exact_model`, whose report digests (so coins, so this rate) are the same on
  every machine; a run is caught exactly at the first step whose coins drew a
  corrupted shard."""
  k, p, num_shards, trials = 3, 0.15, 4, 300
  model, data = exact_model(), exact_data()
  attacker = ginn.PoisonWorker(model, data, poison=exact_poison, schedule=ginn.schedules.Steps(range(k)),
                               num_shards=num_shards, shards=None if corrupted == num_shards else [3],
                               mesh=mesh_of(1), shard_mode="per_shard")
  cfg = config(p=p, num_shards=num_shards)
  detected = 0
  for trial in range(trials):
    secret = hashlib.sha256(f"shard-trial-{trial}".encode()).digest()
    rt = ginn.TrustedRuntime(model, data, cfg, audit_secret=secret)
    res = ginn.train(rt, attacker, k, progress=False, raise_on_violation=False)
    assert_coins_as_drawn(secret, cfg, res.transcript)
    caught = next((e.step for e in res.transcript if set(e.shards) & set(attacker.corrupted_shards)),
                  None)
    assert (None if res.violation is None else res.violation.step) == caught
    assert [e.digest for e in res.transcript] == [
        exact_digest(e.step, name=rt.report_digest_name, num_shards=num_shards,
                     poisoned=attacker.corrupted_shards) for e in res.transcript]
    detected += res.violation is not None
    if res.violation is not None:
      assert res.violation.shard in attacker.corrupted_shards
  expected = ginn.analysis.shard_detection_probability(p, k, num_shards=num_shards,
                                                       corrupted_shards=corrupted)
  half = 2.576 * math.sqrt(expected * (1 - expected) / trials)
  assert expected - half <= detected / trials <= expected + half, (detected / trials, expected, half)


@pytest.mark.parametrize("p,k,S,m,want", [
    (0.25, 1, 4, 1, 0.25), (0.25, 1, 4, 4, 1 - 0.75**4), (0.1, 10, 8, 1, 1 - 0.9**10),
    (0.1, 10, 8, 8, 1 - 0.9**80), (0.5, 0, 2, 2, 0.0)])
def test_shard_detection_probability(p, k, S, m, want):
  assert ginn.analysis.shard_detection_probability(p, k, num_shards=S, corrupted_shards=m) == pytest.approx(want)


@pytest.mark.parametrize("clip,S,m,want", [("elementwise", 4, 1, 2 * 0.05 * 0.01 / 4),
                                           ("global_norm", 4, 4, 2 * 0.05 * 0.01),
                                           ("elementwise", 8, 2, 2 * 0.05 * 0.01 * 2 / 8)])
def test_shard_deviation_bound(clip, S, m, want):
  b = ginn.analysis.shard_deviation_bound(clip, 0.01, ginn.OptimizerConfig(), num_shards=S,
                                          corrupted_shards=m)
  assert b.bounded and b.per_step == pytest.approx(want) and b.with_momentum == pytest.approx(want / 0.1)
  assert not ginn.analysis.shard_deviation_bound("none", None, num_shards=S, corrupted_shards=m).bounded
  with pytest.raises(ValueError, match="corrupted_shards"):
    ginn.analysis.shard_deviation_bound(clip, 0.01, num_shards=S, corrupted_shards=S + 1)


def test_ginn_analyze_num_shards(capsys):
  from ginn_jax._src import cli

  assert cli.main(["analyze", "--k", "10", "--p", "0.25", "--num-shards", "4", "--shard-mode",
                   "per_shard"]) == 0
  out = json.loads(capsys.readouterr().out)["shards"]
  assert out["one_shard"]["detection_probability"] == pytest.approx(1 - 0.75**10)
  assert out["all_shards"]["detection_probability"] == pytest.approx(1 - 0.75**40)
  assert out["one_shard"]["deviation_per_step"] == pytest.approx(out["all_shards"]["deviation_per_step"] / 4)


def test_ginn_train_num_shards(capsys):
  from ginn_jax._src import cli

  assert cli.main(["train", "--model", "mlp", "--steps", "4", "--batch-size", "32", "--p", "1",
                   "--num-shards", "4", "--shard-mode", "per_shard",
                   "--tolerance", '{"rel_l2": 1e-5, "max_abs": 1e-5}', "--no-progress"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["verified"] is True and out["steps"] == 4 and out["num_verified"] == 4
  assert cli.main(["train", "--model", "mlp", "--batch-size", "30", "--num-shards", "4"]) == 2
  assert "not a multiple of num_shards=4" in capsys.readouterr().err


# -- run directories and the audit --------------------------------------------------------


def test_sharded_run_dir_audits_clean_and_exposes_an_uncaught_shard(tmp_path, mlp, small_data):
  from ginn_jax._src.audit import audit_run
  from ginn_jax._src.rundir import run_verified

  cfg = config(p=0.3)
  w = ginn.ShardedWorker(mlp, *small_data, num_shards=4, shard_mode="per_shard", mesh=mesh_of(1))
  res = run_verified(tmp_path / "ok", mlp, *small_data, cfg, w, 6, audit_secret=SECRET,
                     checkpoint_every=3, keep_reports=True, fsync=False)
  assert res.violation is None and res.steps == 6
  report = audit_run(tmp_path / "ok", model=mlp, images=small_data[0], labels=small_data[1],
                     audit_secret=SECRET)
  assert report.ok, report.first_failure
  assert sum(i.kind == "segment" for i in report.items) == 2
  # A one-shard attacker on steps no coin drew: the kept report of its shard fails the audit.
  attacker = ginn.NoiseWorker(mlp, *small_data, schedule=ginn.schedules.Steps([4]), scale=0.01,
                              num_shards=4, shards=[1], mesh=mesh_of(1), shard_mode="per_shard")
  res = run_verified(tmp_path / "bad", mlp, *small_data, config(p=0.0), attacker, 6, audit_secret=SECRET,
                     checkpoint_every=3, keep_reports=True, fsync=False)
  assert res.violation is None
  report = audit_run(tmp_path / "bad", model=mlp, images=small_data[0], labels=small_data[1])
  f = report.first_failure
  assert not report.ok and f.step == 4 and "shard 1" in f.detail, f


# -- the bench ---------------------------------------------------------------------------


def test_measure_shards_smoke(mlp, small_data):
  """In-process, on this suite's one worker device (both shards on it)."""
  from ginn_jax._src.bench import BenchConfig, format_shards, measure_shards

  cfg = BenchConfig(model="mlp", batch_size=32, shard_counts=(1, 2), shard_steps=2, shard_repeats=1,
                    shard_mode="per_shard")
  res = measure_shards(mlp, *small_data, cfg)
  for name in ("trusted", "step", "recompute"):
    assert set(res[f"{name}_ms"]) == {"1", "2"} and all(v > 0 for v in res[f"{name}_ms"].values())
    assert res[f"{name}_ratio"]["1"] == 1.0
  assert "S = 2: trusted" in format_shards({"shards": res})


@pytest.mark.benchmark
def test_ginn_bench_only_shards_forces_cpu_devices(tmp_path):
  path = tmp_path / "bench.json"
  out = subprocess.run([sys.executable, "-m", "ginn_jax", "bench", "--only", "shards", "--model", "mlp",
                        "--shard-steps", "2", "--shard-repeats", "1", "--no-progress", "--json", str(path)],
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr
  assert "re-running with 5 forced CPU devices" in out.stderr
  res = json.loads(path.read_text())["shards"]
  assert res["devices"] == {"1": 1, "2": 2, "4": 4}
