"""The "aggregate" shard mode (docs/design.md section 11.1): the worker reports
the shards' mean, the trusted side checks it with a secret projection
challenge before it draws the shard coins, and every attacker of the issue is
caught at its stated rate with nothing applied.

Meshes as in tests/test_shards.py: `[cpu:1]` (all shards on one device) and
`[cpu:0, cpu:1]`.
"""
import hashlib
import json
import math

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import ginn_jax as ginn
from ginn_jax._src import shards
from ginn_jax._src.trusted import commit, keys, projection

from conftest import (EXACT_ROW, assert_coins_as_drawn, exact_data, exact_model, exact_poison,
                      tree_bytes)

SECRET = b"test-aggregate-secret-0123456789"
S = 4


def mesh_of(*ids):
  cpus = jax.devices("cpu")
  return Mesh(np.array([cpus[i] for i in ids]), ("shards",))


def config(**kw):
  base = dict(seed=3, batch_size=32, p=1.0, clip="elementwise", clip_value=0.01, num_shards=S,
              shard_mode="aggregate")
  base.update(kw)
  return ginn.ProtocolConfig(**base)


def runtime(mlp, small_data, secret=SECRET, **kw):
  return ginn.TrustedRuntime(mlp, *small_data, config(**kw), audit_secret=secret)


def worker(mlp, small_data, mesh=(1,), **kw):
  return ginn.ShardedWorker(mlp, *small_data, num_shards=S, mesh=mesh_of(*mesh), shard_mode="aggregate",
                            **kw)


def snapshot(rt):
  return (rt.step, tree_bytes(rt.state.params), tree_bytes(rt.state.opt_state), rt.num_verified)


# -- the config ---------------------------------------------------------------------------


def test_aggregate_config_field_default_and_header():
  assert config().shard_mode == "aggregate" and config().aggregate
  assert ginn.ProtocolConfig(batch_size=32, num_shards=4).shard_mode == "aggregate"  # The default.
  assert config(shard_mode="per_shard").shard_mode == "per_shard"
  assert config(num_shards=1).shard_mode == "per_shard" and not config(num_shards=1).aggregate
  with pytest.raises(ValueError, match="shard_mode must be one of"):
    config(shard_mode="mean")
  # Headers: aggregate runs name the mode; per-shard runs and runs without shards read as before.
  assert config().to_dict()["shard_mode"] == "aggregate"
  assert "shard_mode" not in config(shard_mode="per_shard").to_dict()
  assert "shard_mode" not in config(num_shards=1).to_dict()
  for c in (config(), config(shard_mode="per_shard"), config(num_shards=1)):
    assert ginn.ProtocolConfig.from_header_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_aggregate_refuses_an_elementwise_tolerance(mlp, small_data):
  with pytest.raises(ValueError, match="per-leaf tolerance"):
    ginn.TrustedRuntime(mlp, *small_data, config(), tolerance=ginn.PAPER_PROTOTYPE_TOLERANCE)


# -- honest runs ----------------------------------------------------------------------------


@pytest.mark.parametrize("mesh", [(1,), (0, 1)])
def test_aggregate_honest_run_verifies(mlp, small_data, mesh):
  """Every shard re-computed and witness-checked, each against its scalars."""
  rt = runtime(mlp, small_data, p=1.0, p_witness=1.0)
  w = worker(mlp, small_data, mesh)
  order = rt.next_order()
  report = w(order)
  assert all(g.shape == p.shape for g, p in zip(jax.tree_util.tree_leaves(report.grads),
                                                jax.tree_util.tree_leaves(order.params)))
  assert report.loss.shape == (S,)
  res = ginn.train(rt, w, 3, progress=False)
  assert res.verified and res.num_verified == 3
  assert assert_coins_as_drawn(SECRET, rt.config, res.transcript)
  for e in res.transcript:
    assert e.shards == e.witness_shards == [0, 1, 2, 3] and e.max_rel_l2 < 1e-6
    assert len(e.projections_digest) == 64 and e.witness_max_abs < 1e-4


def test_aggregate_report_is_the_mean_and_the_update_clips_it(mlp, small_data):
  """The mean is the per-shard gradients' mean (to rounding); the trusted update
  is clip(mean) then SGD, computed by hand."""
  rt = runtime(mlp, small_data, p=0.0)
  order = rt.next_order()
  per = ginn.ShardedWorker(mlp, *small_data, num_shards=S, mesh=mesh_of(1), shard_mode="per_shard")(order)
  agg = worker(mlp, small_data)
  report = agg(order)
  rt.submit(report, project=agg.project)
  g = [np.asarray(x) for x in jax.device_get(jax.tree_util.tree_leaves(per.grads))]
  m = [np.asarray(x) for x in jax.device_get(jax.tree_util.tree_leaves(report.grads))]
  for gs, ms in zip(g, m):
    np.testing.assert_allclose(ms, gs.mean(axis=0), rtol=1e-5, atol=1e-8)
  p0 = [np.asarray(x) for x in jax.device_get(jax.tree_util.tree_leaves(order.params))]
  p1 = [np.asarray(x) for x in jax.device_get(jax.tree_util.tree_leaves(rt.state.params))]
  lr, wd, C = 0.05, 5e-4, 0.01
  for ms, a, b in zip(m, p0, p1):
    np.testing.assert_allclose(b, a - lr * (np.clip(ms, -C, C) + wd * a), rtol=1e-6, atol=1e-9)


def test_aggregate_compile_verification_changes_nothing(mlp, small_data):
  rt = runtime(mlp, small_data, p=1.0, p_witness=1.0)
  before = snapshot(rt)
  rt.compile_verification()
  assert snapshot(rt) == before and not rt.transcript


def test_aggregate_deferred_run_verifies_and_catches(mlp, small_data):
  rt = ginn.TrustedRuntime(mlp, *small_data, config(p=0.5), audit_secret=SECRET, deferred=True)
  res = ginn.train(rt, worker(mlp, small_data), 6, progress=False)
  assert res.verified and rt.num_pending == 0
  rt = ginn.TrustedRuntime(mlp, *small_data, config(p=1.0), audit_secret=SECRET, deferred=True)
  bad = liar(mlp, small_data, "one_shard", shard=1)
  with pytest.raises(ginn.IntegrityViolation) as info:
    ginn.train(rt, bad, 3, progress=False)
  assert info.value.shard == 1 and info.value.step == 0


# -- attackers (each caught, nothing applied) --------------------------------------------------


def liar(mlp, small_data, lie, *, start=0, **kw):
  return ginn.AggregateLiarWorker(mlp, *small_data, num_shards=S, lie=lie, mesh=mesh_of(1),
                                  schedule=ginn.schedules.FromStep(start),
                                  poison=ginn.Backdoor(poison_fraction=1.0).poison, **kw)


def submit_one(rt, w):
  return rt.submit(w(rt.next_order()), witness=getattr(w, "witness", None), project=w.project)


# (lie, p, caught by: "sum" = the projection check, for any coins; "shard" = a drawn shard's check)
FORM_AND_SUM = [("honest_scalars", "step 0: the projection of leaf"), ("wrong_count", "3 x "),
                ("nan", "shard 2 at leaf"), ("replayed", "the projection of leaf")]


@pytest.mark.parametrize("lie,message", FORM_AND_SUM)
def test_aggregate_attackers_caught_by_the_projection_check_at_any_p(mlp, small_data, lie, message):
  """Caught on their first malicious step, with p = 0 (no shard check at all)."""
  start = 1 if lie == "replayed" else 0  # Replays what it answered for step 0.
  rt = runtime(mlp, small_data, p=0.0)
  bad = liar(mlp, small_data, lie, start=start, shard=2)
  if start:
    submit_one(rt, bad)
  before = snapshot(rt)
  with pytest.raises(ginn.ProjectionViolation, match=message) as info:
    submit_one(rt, bad)
  v = info.value
  assert v.step == start and snapshot(rt) == before
  assert v.shard == (2 if lie == "nan" else None)
  assert rt.transcript[-1].outcome == "violation" and rt.halted is v
  with pytest.raises(ginn.RuntimeHalted):
    rt.next_order()


@pytest.mark.parametrize("lie,shard", [("one_shard", 2), ("spread", None)])
def test_aggregate_lies_that_add_up_are_caught_by_a_drawn_shard(mlp, small_data, lie, shard):
  """The scalars add up, so the lie sits on a shard: caught when it is drawn
  (p = 1: every shard), named, nothing applied; not caught when none is."""
  rt = runtime(mlp, small_data, p=1.0)
  bad = liar(mlp, small_data, lie, shard=2)
  before = snapshot(rt)
  with pytest.raises(ginn.IntegrityViolation) as info:
    submit_one(rt, bad)
  v = info.value
  assert v.step == 0 and v.leaf.startswith("projection ")
  assert v.shard == (shard if shard is not None else 0)  # Spread: the first shard checked.
  assert f"at step 0, shard {v.shard}: leaf projection" in str(v)
  assert snapshot(rt) == before
  # No shard drawn: the projection check alone cannot see it (that is what the coins are for).
  rt = runtime(mlp, small_data, p=0.0)
  entry = submit_one(rt, liar(mlp, small_data, lie, shard=2))
  assert entry.outcome == "unverified"


def test_aggregate_witness_check_catches_the_lied_shard(mlp, small_data):
  rt = runtime(mlp, small_data, p=0.0, p_witness=1.0)
  before = snapshot(rt)
  with pytest.raises(ginn.WitnessViolation) as info:
    submit_one(rt, liar(mlp, small_data, "one_shard", shard=3))
  assert info.value.shard == 3 and info.value.leaf.startswith("projection ")
  assert snapshot(rt) == before


def test_aggregate_one_shard_replaced_is_caught_when_its_shard_is_drawn(mlp, small_data):
  """A `MaliciousWorker` in aggregate mode: shard 2's contribution to the mean
  replaced by a backdoor gradient, its scalars consistent with it."""
  bad = ginn.BackdoorWorker(mlp, *small_data, schedule=ginn.schedules.FromStep(0), num_shards=S,
                            shards=[2], mesh=mesh_of(1), shard_mode="aggregate")
  rt = runtime(mlp, small_data, p=1.0)
  before = snapshot(rt)
  with pytest.raises(ginn.IntegrityViolation) as info:
    submit_one(rt, bad)
  assert info.value.shard == 2 and info.value.step == 0 and snapshot(rt) == before
  rt = runtime(mlp, small_data, p=0.0)  # The sum adds up: unseen without coins.
  assert submit_one(rt, bad).outcome == "unverified"


def test_aggregate_missing_late_and_malformed_answers(mlp, small_data):
  w = worker(mlp, small_data)
  rt = runtime(mlp, small_data, p=0.0)
  before = snapshot(rt)
  with pytest.raises(ginn.ProjectionViolation, match="offers no projections"):
    rt.submit(w(rt.next_order()))
  assert snapshot(rt) == before
  rt = ginn.TrustedRuntime(mlp, *small_data, config(p=0.0, witness_timeout_s=0.5), audit_secret=SECRET)
  import time
  with pytest.raises(ginn.ProjectionViolation, match="no projections within 0.5 s"):
    rt.submit(w(rt.next_order()), project=lambda r: time.sleep(30))
  for answer, message in [(lambda r: ginn.Projections(step=r.step + 1, values=np.zeros((S, 4), np.float32)),
                           "for step 1, not 0"),
                          (lambda r: ginn.Projections(step=r.step, values=np.zeros((S, 4), np.int32)),
                           "dtype int32"),
                          (lambda r: ginn.Projections(step=r.step, values=[0.0] * S), "values is a list"),
                          (lambda r: "no", "expected Projections")]:
    rt = runtime(mlp, small_data, p=0.0)
    with pytest.raises(ginn.ProjectionViolation, match=message):
      rt.submit(w(rt.next_order()), project=answer)
    assert snapshot(rt) == before


def test_aggregate_refuses_a_per_shard_report_with_nothing_changed(mlp, small_data):
  rt = runtime(mlp, small_data)
  order = rt.next_order()
  before = snapshot(rt)
  per = ginn.ShardedWorker(mlp, *small_data, num_shards=S, mesh=mesh_of(1), shard_mode="per_shard")
  with pytest.raises(ginn.ShapeMismatch, match="mean of the 4 shards"):
    rt.submit(per(order))
  assert snapshot(rt) == before and not rt.transcript
  good = worker(mlp, small_data)
  rt.submit(good(order), project=good.project)  # The corrected report is accepted.
  assert rt.step == 1


# -- the rate ---------------------------------------------------------------------------------


def _exact_mean_digest(step, name, poisoned):
  rows = [EXACT_ROW + (1 if s in poisoned else 0) for s in range(S)]
  mean = (np.sum(rows, axis=0) / S).astype(np.float32)  # Exact: small integers over a power of two.
  return commit.report_digest(step, [mean], np.zeros(S, np.float32), name=name).hex()


def test_aggregate_one_shard_detection_rate_matches_the_formula():
  """300 runs, each with its own audit secret, of a worker that replaces shard
  3's contribution to the mean on k = 3 steps and answers consistently: the
  share caught lies in the 99% interval of
  ``aggregate_detection_probability``. `exact_model` makes every report
  digest (so every coin) the same on every machine."""
  k, p, trials = 3, 0.15, 300
  model, data = exact_model(), exact_data()
  attacker = ginn.PoisonWorker(model, data, poison=exact_poison, schedule=ginn.schedules.Steps(range(k)),
                               num_shards=S, shards=[3], mesh=mesh_of(1), shard_mode="aggregate")
  cfg = config(p=p)
  detected = 0
  for trial in range(trials):
    secret = hashlib.sha256(f"aggregate-trial-{trial}".encode()).digest()
    rt = ginn.TrustedRuntime(model, data, cfg, audit_secret=secret)
    res = ginn.train(rt, attacker, k, progress=False, raise_on_violation=False)
    assert_coins_as_drawn(secret, cfg, res.transcript)
    assert [e.digest for e in res.transcript] == [_exact_mean_digest(e.step, rt.report_digest_name, (3,))
                                                  for e in res.transcript]
    caught = next((e.step for e in res.transcript if 3 in e.shards), None)
    assert (None if res.violation is None else res.violation.step) == caught
    if res.violation is not None:
      assert res.violation.shard == 3 and res.steps == caught
      detected += 1
  expected = ginn.analysis.aggregate_detection_probability(p, k, num_shards=S, lied_shards=1)
  assert expected == pytest.approx(1 - (1 - p) ** k)
  half = 2.576 * math.sqrt(expected * (1 - expected) / trials)
  assert expected - half <= detected / trials <= expected + half, (detected / trials, expected, half)


# -- the projection's pieces -----------------------------------------------------------------


def test_projection_is_a_kronecker_form_and_sees_a_paired_change():
  g = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
  a = np.linspace(-1, 1, 6).astype(np.float32)
  b = np.array([0.5, -1, 2, 0.25], np.float32)
  dev = jax.devices("cpu")[0]
  project = lambda *xs: float(jax.jit(shards.project_leaf)(*jax.device_put(xs, dev)))  # noqa: E731
  got = project(g, a, b)
  assert got == pytest.approx(float(a @ g.reshape(6, 4) @ b), rel=1e-6)
  # A paired change u(e_i - e_j) moves a^T G b by u (a_i b_i' - a_j b_j'): not 0 for Gaussian vectors.
  vecs = projection.projection_vectors(np.array([1, 2], np.uint32), [(64, 32)], jax.devices("cpu")[0])
  g = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
  moved = g.copy()
  moved[3, 5] += 1e-3
  moved[40, 7] -= 1e-3
  t0, t1 = (project(x, *vecs[0]) for x in (g, moved))
  assert abs(t1 - t0) > 1e-6


def test_projection_vectors_are_secret_per_step_and_digest():
  k = keys.audit_keys(SECRET)
  seeds = {bytes(keys.projection_seed(k, t, d)) for t in (0, 1) for d in (b"\0" * 32, b"\1" * 32)}
  assert len(seeds) == 4
  assert bytes(keys.projection_seed(keys.audit_keys(b"another-secret-0123456789abcdef0"), 0, b"\0" * 32)) \
      not in seeds


def test_projection_miss_probability_bound_holds_for_rank_one_changes():
  """Monte Carlo over Gaussian a, b: a rank-1 change of Frobenius norm 1 gives
  |a^T D b| <= x no more often than the stated bound (which is also close)."""
  rng = np.random.default_rng(1)
  n = 200_000
  xy = np.abs(rng.standard_normal(n) * rng.standard_normal(n))
  for x in (1e-3, 1e-2, 0.1):
    bound = ginn.analysis.projection_miss_probability(x)
    rate = float(np.mean(xy <= x))
    assert rate <= bound + 3 * math.sqrt(bound / n) and rate >= 0.7 * bound, (x, rate, bound)


# -- run directories, the audit, the CLI -------------------------------------------------------


def test_aggregate_run_dir_audits_clean_and_exposes_an_uncaught_shard(tmp_path, mlp, small_data):
  from ginn_jax._src.audit import audit_run
  from ginn_jax._src.rundir import run_verified

  res = run_verified(tmp_path / "ok", mlp, *small_data, config(p=0.3), worker(mlp, small_data), 4,
                     audit_secret=SECRET, checkpoint_every=2, keep_reports=True, fsync=False)
  assert res.violation is None and res.steps == 4
  assert all(len(e.projections_digest) == 64 for e in res.transcript if e.kind == "step")
  report = audit_run(tmp_path / "ok", model=mlp, images=small_data[0], labels=small_data[1],
                     audit_secret=SECRET)
  assert report.ok, report.first_failure
  # Shard 1 replaced on a step no coin drew: the kept mean is not the mean the auditor re-computes.
  attacker = ginn.NoiseWorker(mlp, *small_data, schedule=ginn.schedules.Steps([3]), scale=0.01,
                              num_shards=S, shards=[1], mesh=mesh_of(1), shard_mode="aggregate")
  res = run_verified(tmp_path / "bad", mlp, *small_data, config(p=0.0), attacker, 4, audit_secret=SECRET,
                     checkpoint_every=2, keep_reports=True, fsync=False)
  assert res.violation is None
  report = audit_run(tmp_path / "bad", model=mlp, images=small_data[0], labels=small_data[1])
  f = report.first_failure
  assert not report.ok and f.step == 3 and "kept report is not the gradient" in f.detail, f


def test_ginn_train_and_analyze_aggregate(capsys):
  from ginn_jax._src import cli

  assert cli.main(["train", "--model", "mlp", "--steps", "3", "--batch-size", "32", "--p", "1",
                   "--num-shards", "8", "--shard-mode", "aggregate",
                   "--tolerance", '{"rel_l2": 1e-5, "max_abs": 1e-5}', "--no-progress"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["verified"] is True and out["num_verified"] == 3
  assert out["num_shards"] == 8 and out["shard_mode"] == "aggregate"
  with pytest.raises(SystemExit):
    cli.main(["train", "--model", "mlp", "--num-shards", "4", "--shard-mode", "mean"])
  assert "invalid choice: 'mean'" in capsys.readouterr().err
  assert cli.main(["analyze", "--k", "10", "--p", "0.25", "--num-shards", "4", "--shard-mode",
                   "aggregate"]) == 0
  out = json.loads(capsys.readouterr().out)["shards"]
  assert out["shard_mode"] == "aggregate" and out["trusted_gradients_per_step"] == 1
  assert out["lie_on_one_shard"]["detection_probability"] == pytest.approx(1 - 0.75**10)
  assert out["lie_on_all_shards"]["detection_probability"] == pytest.approx(1 - 0.75**40)
  assert out["deviation_per_step"] == pytest.approx(2 * 0.05 * 0.01)  # 2·eta·C, not divided by S.
  assert out["sum_check_miss_probability_at_x"]["0.001"] == pytest.approx(0.00511, abs=1e-5)


def test_aggregate_analysis_formulas():
  A = ginn.analysis
  assert A.aggregate_detection_probability(0.1, 3, num_shards=4, p_witness=0.2) == pytest.approx(
      1 - (0.9 * 0.8) ** 3)
  assert A.aggregate_detection_probability(0.1, 2, num_shards=4, lied_shards=4) == pytest.approx(1 - 0.9**8)
  with pytest.raises(ValueError, match="lied_shards"):
    A.aggregate_detection_probability(0.1, 2, num_shards=4, lied_shards=0)
  per = A.shard_trusted_bytes(10_000, num_shards=8, shard_mode="per_shard")
  agg = A.shard_trusted_bytes(10_000, num_shards=8, shard_mode="aggregate", num_leaves=4, vector_elements=300)
  assert per["received"] == 80_000 and agg["received"] == 10_000 + 4 * 8 * 4 and agg["sent"] == 1200
  assert A.aggregate_check_cost(0.1, 0.2, 4.0, num_shards=8) == pytest.approx(0.1 + 0.2 / 4)
  assert A.aggregate_deviation_bound("elementwise", 0.01).per_step == pytest.approx(
      A.shard_deviation_bound("elementwise", 0.01, num_shards=8, corrupted_shards=8).per_step)


def test_aggregate_worker_cannot_rewrite_the_trusted_vectors(mlp, small_data):
  """The worker is sent copies of the secret vectors: a worker that makes the
  arrays it received writable and zeroes them (which would make every
  projection 0 and any lie pass the drawn shards' checks) changes nothing
  on the trusted side; the honest answer still verifies."""
  rt = runtime(mlp, small_data, p=1.0)
  w = worker(mlp, small_data)
  seen = []

  def project(request):
    answer = w.project(request)  # Answers first (computed), then tampers with what it was sent.
    jax.block_until_ready(answer.values)
    for a, b in request.vectors:
      for v in (a, b):
        base = v if v.base is None else v.base
        base.flags.writeable = True
        base[...] = 0
        seen.append(v)
    return answer

  order = rt.next_order()
  entry = rt.submit(w(order), witness=w.witness, project=project)
  assert entry.outcome == "verified" and seen and all(not v.any() for v in seen)
