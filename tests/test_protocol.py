"""The GINN protocol end to end (docs/design.md sections 2-5), on two CPU devices."""
import hashlib
import math

import jax
import numpy as np
import pytest

import ginn_jax as ginn
from ginn_jax._src.trusted import keys
from ginn_jax._src.step import DeviceGradFn

from conftest import (assert_coins_as_drawn, exact_data, exact_digest, exact_model, exact_poison,
                      tree_bytes)

SECRET = b"test-audit-secret-0123456789abcdef"


def config(**kw):
  base = dict(seed=3, batch_size=32, p=1.0, clip="elementwise", clip_value=0.01)
  base.update(kw)
  return ginn.ProtocolConfig(**base)


def runtime(mlp, small_data, secret=SECRET, **kw):
  x, y = small_data
  return ginn.TrustedRuntime(mlp, x, y, config(**kw), audit_secret=secret)


def snapshot(rt):
  return (rt.step, tree_bytes(rt.state.params), tree_bytes(rt.state.opt_state),
          len(rt.transcript), rt.num_verified, rt.halted)


def test_worker_and_trusted_devices_differ(mlp, small_data):
  rt = runtime(mlp, small_data)
  w = ginn.HonestWorker(mlp, *small_data)
  assert rt.device == jax.devices("cpu")[0]
  assert w.device == jax.devices("cpu")[1]
  report = w(rt.next_order())
  assert all(g.devices() == {w.device} for g in jax.tree_util.tree_leaves(report.grads))
  rt.submit(report)
  assert all(p.devices() == {rt.device} for p in jax.tree_util.tree_leaves(rt.state.params))


def test_honest_run_every_step_verified_has_no_violation(mlp, small_data):
  rt = runtime(mlp, small_data)
  res = ginn.train(rt, ginn.HonestWorker(mlp, *small_data), 300, progress=False)
  assert res.steps == 300 and res.num_verified == 300 and res.num_violations == 0
  assert res.verified
  assert all(e.outcome == "verified" and e.max_rel_l2 == 0.0 for e in res.transcript)
  assert np.mean(res.losses[-20:]) < np.mean(res.losses[:20])  # It learns.


def test_same_seed_replays_bitwise_at_every_step(mlp, small_data):
  a = runtime(mlp, small_data, secret=b"a" * 32, p=0.3)
  b = runtime(mlp, small_data, secret=b"b" * 32, p=0.3)
  w = ginn.HonestWorker(mlp, *small_data)
  for _ in range(40):
    oa, ob = a.next_order(), b.next_order()
    # The worker learns nothing about the coin: orders are identical.
    assert oa.step == ob.step
    assert tree_bytes(oa.params) == tree_bytes(ob.params)
    assert oa.batch_indices.tobytes() == ob.batch_indices.tobytes()
    assert tree_bytes(jax.random.key_data(oa.layer_key)) == tree_bytes(jax.random.key_data(ob.layer_key))
    ea, eb = a.submit(w(oa)), b.submit(w(ob))
    assert ea.digest == eb.digest
    assert ea.mac != eb.mac  # Keyed by the secret.
  # Each runtime drew exactly its own secret's coins on the committed digests
  # (which digests those are depends on the machine's float bits)...
  assert_coins_as_drawn(b"a" * 32, a.config, a.transcript)
  assert_coins_as_drawn(b"b" * 32, b.config, b.transcript)
  # ...and the two secrets' coins differ (on fixed digests: the same on every machine).
  ka, kb = keys.audit_keys(b"a" * 32), keys.audit_keys(b"b" * 32)
  assert ([keys.verification_coin(ka, t, bytes(32), 0.3) for t in range(40)]
          != [keys.verification_coin(kb, t, bytes(32), 0.3) for t in range(40)])


def test_any_step_recomputes_from_seed_and_its_params_alone(mlp, small_data):
  rt = runtime(mlp, small_data, p=0.0)
  w = ginn.HonestWorker(mlp, *small_data)
  reports = {}
  params_at = {}
  for _ in range(150):  # Crosses epochs (512 // 32 = 16 steps per epoch).
    order = rt.next_order()
    params_at[order.step] = order.params
    reports[order.step] = w(order)
    rt.submit(reports[order.step])
  for t in (0, 17, 99, 149):
    streams = keys.seed_streams(3)
    sched = keys.BatchSchedule(streams.data_key, len(small_data[0]), 32)  # Fresh: no history.
    f = DeviceGradFn(mlp.loss, *small_data, jax.devices("cpu")[0])
    loss, grads = f(params_at[t], sched.indices(t), keys.layer_key(streams, t))
    assert tree_bytes(grads) == tree_bytes(reports[t].grads), t
    assert tree_bytes(loss) == tree_bytes(reports[t].loss), t


def test_batches_are_per_epoch_permutations(mlp, small_data):
  sched = keys.BatchSchedule(keys.seed_streams(0).data_key, 100, 32)
  assert sched.steps_per_epoch == 3
  for epoch in range(3):
    seen = np.concatenate([sched.indices(epoch * 3 + i) for i in range(3)])
    assert len(set(seen.tolist())) == 96 and seen.max() < 100
  assert sched.indices(0).tobytes() != sched.indices(3).tobytes()


def backdoor(mlp, small_data, schedule):
  return ginn.BackdoorWorker(mlp, *small_data, schedule=schedule, target=0, poison_fraction=0.5)


@pytest.mark.parametrize("start", [0, 5, 23])
def test_malicious_worker_caught_at_first_malicious_step_when_p_is_1(mlp, small_data, start):
  rt = runtime(mlp, small_data, p=1.0)
  attacker = backdoor(mlp, small_data, ginn.schedules.FromStep(start))
  with pytest.raises(ginn.IntegrityViolation) as info:
    ginn.train(rt, attacker, start + 10, progress=False)
  v = info.value
  assert v.step == start == attacker.malicious_steps[0]
  assert str(start) in str(v) and v.leaf in str(v) and "tolerance" in str(v)
  assert v.result.steps == start and not v.result.verified
  assert rt.transcript[-1].outcome == "violation"
  # The violating report's update was not applied, and the runtime stays halted.
  assert rt.step == start
  with pytest.raises(ginn.RuntimeHalted, match=f"step {start}"):
    rt.next_order()


def test_malicious_worker_never_caught_when_p_is_0(mlp, small_data):
  rt = runtime(mlp, small_data, p=0.0)
  attacker = backdoor(mlp, small_data, ginn.schedules.FromStep(0))
  res = ginn.train(rt, attacker, 60, progress=False)
  assert res.num_violations == 0 and res.num_verified == 0 and len(attacker.malicious_steps) == 60


def test_violation_leaves_state_at_last_good_step(mlp, small_data):
  rt = runtime(mlp, small_data, p=1.0)
  ginn.train(rt, ginn.HonestWorker(mlp, *small_data), 4, progress=False)
  before = snapshot(rt)
  attacker = backdoor(mlp, small_data, ginn.schedules.FromStep(0))
  with pytest.raises(ginn.IntegrityViolation):
    rt.submit(attacker(rt.next_order()))
  after = snapshot(rt)
  assert after[:3] == before[:3] and after[4] == before[4]


def test_detection_rate_matches_formula_over_500_trials():
  """Real runs, each with its own audit secret, of an attacker malicious on k
  steps: the share caught matches 1-(1-p)^k (99% binomial interval). The model
  is `exact_model`, whose report digests (so coins, so this rate) are the same
  on every machine; a run is caught exactly at the first step its coin drew."""
  k, p, trials = 6, 0.15, 500
  model, data = exact_model(), exact_data()
  attacker = ginn.PoisonWorker(model, data, poison=exact_poison, schedule=ginn.schedules.Steps(range(k)))
  cfg = config(p=p)
  detected = 0
  for trial in range(trials):
    secret = hashlib.sha256(f"trial-{trial}".encode()).digest()
    rt = ginn.TrustedRuntime(model, data, cfg, audit_secret=secret)
    res = ginn.train(rt, attacker, k, progress=False, raise_on_violation=False)
    drawn = assert_coins_as_drawn(secret, cfg, res.transcript)
    caught = next((t for t, c in enumerate(drawn) if c), None)
    assert (None if res.violation is None else res.violation.step) == caught
    assert len(drawn) == (k if caught is None else caught + 1)
    assert [e.digest for e in res.transcript] == [
        exact_digest(t, name=rt.report_digest_name, poisoned=(0,)) for t in range(len(drawn))]
    detected += res.violation is not None
  expected = ginn.analysis.detection_probability(p, k)
  half = 2.576 * math.sqrt(expected * (1 - expected) / trials)  # 99% binomial interval.
  rate = detected / trials
  assert expected - half <= rate <= expected + half, (rate, expected, half)


# -- bad reports --------------------------------------------------------------


def _mutate(report, params, kind):
  g = report.grads
  first = jax.tree_util.tree_leaves(g)[0]
  leaves, treedef = jax.tree_util.tree_flatten(g)
  host = [np.array(jax.device_get(x)) for x in leaves]
  R = ginn.GradientReport
  if kind == "next_step":
    return R(report.step + 1, g, report.loss), ginn.StepMismatch
  if kind == "previous_step":
    return R(report.step - 1, g, report.loss), ginn.StepMismatch
  if kind == "step_as_string":
    return R(str(report.step), g, report.loss), ginn.StepMismatch
  if kind == "step_as_bool":
    return R(True, g, report.loss), ginn.StepMismatch
  if kind == "not_a_report":
    return {"step": report.step, "grads": g, "loss": report.loss}, ginn.MalformedReport
  if kind == "missing_leaf":
    d = {k: dict(v) for k, v in g.items()}
    d["Dense_0"].pop("bias")
    return R(report.step, d, report.loss), ginn.StructureMismatch
  if kind == "extra_leaf":
    d = {k: dict(v) for k, v in g.items()}
    d["Dense_0"]["backdoor"] = first
    return R(report.step, d, report.loss), ginn.StructureMismatch
  if kind == "list_instead_of_dict":
    return R(report.step, leaves, report.loss), ginn.StructureMismatch
  if kind == "reshaped_leaf":
    host[0] = host[0].reshape(1, -1)
    return R(report.step, treedef.unflatten(host), report.loss), ginn.ShapeMismatch
  if kind == "float64_leaf":
    host[1] = host[1].astype(np.float64)
    return R(report.step, treedef.unflatten(host), report.loss), ginn.DtypeMismatch
  if kind == "int_leaf":
    host[1] = host[1].astype(np.int32)
    return R(report.step, treedef.unflatten(host), report.loss), ginn.DtypeMismatch
  if kind == "string_leaf":
    host[2] = "gradient"
    return R(report.step, treedef.unflatten(host), report.loss), ginn.MalformedReport
  if kind == "nan_leaf":
    host[2].flat[3] = np.nan
    return R(report.step, treedef.unflatten(host), report.loss), ginn.NonFiniteReport
  if kind == "inf_leaf":
    host[0].flat[0] = -np.inf
    return R(report.step, treedef.unflatten(host), report.loss), ginn.NonFiniteReport
  if kind == "nan_loss":
    return R(report.step, g, np.float32(np.nan)), ginn.NonFiniteReport
  if kind == "vector_loss":
    return R(report.step, g, np.zeros(3, np.float32)), ginn.MalformedReport
  if kind == "string_loss":
    return R(report.step, g, "0.1"), ginn.MalformedReport
  raise AssertionError(kind)


BAD = ["next_step", "previous_step", "step_as_string", "step_as_bool", "not_a_report",
       "missing_leaf", "extra_leaf", "list_instead_of_dict", "reshaped_leaf", "float64_leaf",
       "int_leaf", "string_leaf", "nan_leaf", "inf_leaf", "nan_loss", "vector_loss", "string_loss"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_report_is_refused_and_state_is_unchanged(mlp, small_data, kind):
  rt = runtime(mlp, small_data, p=0.5)
  ref = runtime(mlp, small_data, p=0.5)
  w = ginn.HonestWorker(mlp, *small_data)
  ginn.train(rt, w, 3, progress=False)
  ginn.train(ref, w, 3, progress=False)
  before = snapshot(rt)
  report = w(rt.next_order())
  bad, expected = _mutate(report, rt.state.params, kind)
  with pytest.raises(expected) as info:
    rt.submit(bad)
  assert isinstance(info.value, ginn.ReportRejected)
  assert "step 3" in str(info.value) or "3" in str(info.value)
  assert snapshot(rt) == before
  # Training goes on with the corrected report, exactly as if nothing happened.
  ginn.train(rt, w, 5, progress=False)
  ginn.train(ref, w, 5, progress=False)
  assert snapshot(rt)[:5] == snapshot(ref)[:5]
  assert rt.transcript == ref.transcript  # Same digests, MACs and coins.


def test_rejection_names_the_leaf(mlp, small_data):
  rt = runtime(mlp, small_data)
  report = ginn.HonestWorker(mlp, *small_data)(rt.next_order())
  bad, _ = _mutate(report, rt.state.params, "nan_leaf")
  with pytest.raises(ginn.NonFiniteReport, match=r"\['Dense_1'\]\['bias'\]|\['Dense_0'\]"):
    rt.submit(bad)


# -- clipping bounds the attacker ---------------------------------------------


@pytest.mark.parametrize("clip,value", [("elementwise", 0.003), ("global_norm", 0.05)])
def test_scaled_report_moves_params_within_the_stated_bound(mlp, small_data, clip, value):
  honest_rt = runtime(mlp, small_data, p=0.0, clip=clip, clip_value=value)
  attacked_rt = runtime(mlp, small_data, p=0.0, clip=clip, clip_value=value)
  w = ginn.HonestWorker(mlp, *small_data)
  ginn.train(honest_rt, w, 10, progress=False)
  ginn.train(attacked_rt, w, 10, progress=False)
  order = attacked_rt.next_order()
  honest = w(order)
  evil = backdoor(mlp, small_data, ginn.schedules.FromStep(0))(order)
  scaled = ginn.GradientReport(order.step, jax.tree_util.tree_map(
      lambda g: np.asarray(jax.device_get(g)) * np.float32(1000), evil.grads), evil.loss)
  honest_rt.submit(honest)
  attacked_rt.submit(scaled)
  diff = [np.asarray(jax.device_get(a)) - np.asarray(jax.device_get(b)) for a, b in zip(
      jax.tree_util.tree_leaves(attacked_rt.state.params), jax.tree_util.tree_leaves(honest_rt.state.params))]
  bound = ginn.analysis.deviation_bound(clip, value, honest_rt.config.optimizer)
  if clip == "elementwise":
    measured = max(float(np.abs(d).max()) for d in diff)
  else:
    measured = math.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in diff))
  # Exact arithmetic gives <= bound; float32 rounds each parameter by half an ulp.
  max_param = max(float(np.abs(np.asarray(jax.device_get(p))).max())
                  for p in jax.tree_util.tree_leaves(honest_rt.state.params))
  slack = 4 * np.finfo(np.float32).eps * max_param * (1 if clip == "elementwise" else math.sqrt(
      sum(d.size for d in diff)))
  assert measured <= bound.per_step + slack, (measured, bound.per_step, slack)
  assert measured >= 0.5 * bound.per_step  # The x1000 attacker does push to the bound.
  # Without a clip the same report moves the parameters far beyond it.
  assert ginn.analysis.deviation_bound("none", None).per_step == math.inf


def test_calibration_measures_zero_error_between_cpu_devices(mlp, small_data):
  cal = ginn.calibrate_tolerance(mlp, *small_data, config(), num_steps=4)
  assert cal.max_rel_l2 == 0.0 and cal.max_abs == 0.0
  assert cal.tolerance == ginn.Tolerance(1e-5, 1e-5)  # The floor.


def test_tolerance_rejects_nonsense():
  with pytest.raises(ValueError):
    ginn.Tolerance(rel_l2=-1.0, max_abs=0.1)
  with pytest.raises(ValueError):
    ginn.Tolerance(rel_l2=float("nan"), max_abs=0.1)


def test_small_perturbation_inside_tolerance_passes_and_outside_fails(mlp, small_data):
  for scale, caught in [(1e-7, False), (1e-2, True)]:
    rt = runtime(mlp, small_data, p=1.0)
    order = rt.next_order()
    r = ginn.HonestWorker(mlp, *small_data)(order)
    pert = jax.tree_util.tree_map(lambda g: np.asarray(jax.device_get(g)) * np.float32(1 + scale), r.grads)
    rep = ginn.GradientReport(order.step, pert, r.loss)
    if caught:
      with pytest.raises(ginn.IntegrityViolation):
        rt.submit(rep)
    else:
      assert rt.submit(rep).outcome == "verified"


def test_any_optax_optimizer_can_follow_the_clip(mlp, small_data):
  import optax
  # optax.adam's bias correction mixes a Python float with an int32 count, which
  # strict promotion (our conftest) refuses; users run with standard promotion.
  with jax.numpy_dtype_promotion("standard"):
    cfg = config(p=1.0, clip="global_norm", clip_value=1.0)
    rt = ginn.TrustedRuntime(mlp, *small_data, cfg, audit_secret=SECRET, optimizer=optax.adam(1e-3))
    res = ginn.train(rt, ginn.HonestWorker(mlp, *small_data), 20, progress=False)
  assert res.verified and res.num_verified == 20
  assert np.mean(res.losses[-5:]) < res.losses[0]
  assert not ginn.analysis.deviation_bound("global_norm", 1.0, "adam").bounded
