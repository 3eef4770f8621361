"""The attack suite (docs/design.md section 7): every attacker, one shared table.

(a) at p = 1 every attacker is caught at its first malicious step, whatever its
schedule, and reports honestly before it; the stealth attacker instead passes
verification and still moves the model towards the backdoor. (b) without
verification or clipping, BadNets on mnist5k plants its backdoor at no cost in
clean accuracy. Plus what the clip does to scaled and model-replacement attacks.
"""
import ast
import functools
import pathlib

import jax
import numpy as np
import optax
import pytest

import ginn_jax as ginn

from conftest import make_key, tree_bytes

SECRET = b"attack-test-secret-0123456789abcd"
LR = ginn.OptimizerConfig().learning_rate


def config(**kw):
  base = dict(seed=3, batch_size=32, p=1.0, clip="elementwise", clip_value=0.01)
  base.update(kw)
  return ginn.ProtocolConfig(**base)


def runtime(model, data, *, tolerance=None, **kw):
  return ginn.TrustedRuntime(model, *data, config(**kw), audit_secret=SECRET, tolerance=tolerance)


def host(tree):
  return [np.asarray(jax.device_get(x)) for x in jax.tree_util.tree_leaves(tree)]


@functools.partial(jax.jit, static_argnums=0)
def _backdoor_loss(model, params, images, labels):
  return optax.softmax_cross_entropy_with_integer_labels(model.logits(params, images), labels).mean()


def backdoor_loss(model, params, ds, backdoor=ginn.Backdoor()):
  """Mean loss of triggered test images (true label != target) labelled as the target."""
  keep = ds.test_labels != backdoor.target
  images = backdoor.trigger.apply(ds.test_images[keep])
  labels = np.full(len(images), backdoor.target, np.int32)
  dev = next(iter(jax.tree_util.tree_leaves(params)[0].devices()))
  return float(jax.device_get(_backdoor_loss(model, params, *jax.device_put((images, labels), dev))))


@pytest.fixture(scope="module")
def backdoored(mlp, small_data):
  """Backdoored parameters (the model-replacement target), trained from the
  runtime's initial parameters."""
  start = runtime(mlp, small_data).next_order().params
  return ginn.make_backdoored_params(mlp, *small_data, params=start, steps=300)


# -- (a) the shared suite: caught at the first malicious step --------------------

# name -> (factory(model, data, schedule, backdoored_params), protocol overrides)
ATTACKS = {
    "badnets_all_to_one": (lambda m, d, s, t: ginn.BackdoorWorker(
        m, *d, schedule=s, trigger=ginn.PatchTrigger(size=3), target=0, poison_fraction=0.1), {}),
    "badnets_source_to_target": (lambda m, d, s, t: ginn.BackdoorWorker(
        m, *d, schedule=s, trigger=ginn.PatchTrigger(size=2, value=0.45), target=5, source=1,
        poison_fraction=0.5), {}),
    "blended": (lambda m, d, s, t: ginn.BackdoorWorker(
        m, *d, schedule=s, trigger=ginn.BlendTrigger(alpha=0.1), target=7, poison_fraction=0.2), {}),
    "combined_loss": (lambda m, d, s, t: ginn.CombinedLossWorker(m, *d, schedule=s, lam=0.5), {}),
    "scaled_x10": (lambda m, d, s, t: ginn.ScaledBackdoorWorker(m, *d, schedule=s, scale=10.0), {}),
    "scaled_x100": (lambda m, d, s, t: ginn.ScaledBackdoorWorker(m, *d, schedule=s, scale=100.0), {}),
    "model_replacement_elementwise": (lambda m, d, s, t: ginn.ModelReplacementWorker(
        m, *d, schedule=s, target_params=t, clip="elementwise", clip_value=0.01), {}),
    "model_replacement_global_norm": (lambda m, d, s, t: ginn.ModelReplacementWorker(
        m, *d, schedule=s, target_params=t, clip="global_norm", clip_value=0.05),
        dict(clip="global_norm", clip_value=0.05)),
    "label_flip": (lambda m, d, s, t: ginn.LabelFlipWorker(m, *d, schedule=s), {}),
    "label_flip_half_mapped": (lambda m, d, s, t: ginn.LabelFlipWorker(
        m, *d, schedule=s, mapping=[9 - c for c in range(10)], flip_fraction=0.5), {}),
    "noise": (lambda m, d, s, t: ginn.NoiseWorker(m, *d, schedule=s, scale=0.01, seed=1), {}),
    "noise_additive": (lambda m, d, s, t: ginn.NoiseWorker(
        m, *d, schedule=s, scale=1e-3, seed=2, additive=True), {}),
}

SCHEDULES = {
    "every_step_from_2": ginn.schedules.FromStep(2),
    "window_5_8": ginn.schedules.Window(5, 8),
    "k_chosen_steps": ginn.schedules.Steps([4, 9, 11]),
    "random_rate": ginn.schedules.RandomRate(0.2, seed=4),
}


def first_malicious(schedule, horizon=100):
  return next(t for t in range(horizon) if schedule(t))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
@pytest.mark.parametrize("attack", ATTACKS, ids=str)
def test_attack_is_caught_at_its_first_malicious_step_when_p_is_1(mlp, small_data, backdoored,
                                                                   attack, schedule):
  factory, overrides = ATTACKS[attack]
  sched = SCHEDULES[schedule]
  first = first_malicious(sched)
  rt = runtime(mlp, small_data, p=1.0, **overrides)
  attacker = factory(mlp, small_data, sched, backdoored)
  with pytest.raises(ginn.IntegrityViolation) as info:
    ginn.train(rt, attacker, first + 5, progress=False)
  v = info.value
  assert v.step == first == attacker.malicious_steps[0]
  assert attacker.malicious_steps == [first]
  assert v.error["rel_l2"] > rt.tolerance.rel_l2 or v.error["max_abs"] > rt.tolerance.max_abs
  # Before it, the reports were honest (bitwise), and its own update was not applied.
  good = [e for e in rt.transcript if e.outcome != "violation"]
  assert len(good) == first and all(e.outcome == "verified" and e.max_rel_l2 == 0.0 for e in good)
  assert rt.step == first and rt.transcript[-1].outcome == "violation"


@pytest.mark.parametrize("deferred", [False, True], ids=["sync", "deferred"])
@pytest.mark.parametrize("attack", ATTACKS, ids=str)
def test_attack_is_caught_by_the_witness_check_alone(mlp, small_data, backdoored, attack, deferred):
  """p = 0, p_witness = 1: no re-computation at all, and every attacker (answering
  the challenge with the honest witness of the step) is caught at its first
  malicious step."""
  factory, overrides = ATTACKS[attack]
  sched = ginn.schedules.FromStep(2)
  rt = ginn.TrustedRuntime(mlp, *small_data, config(p=0.0, p_witness=1.0, **overrides),
                           audit_secret=SECRET, deferred=deferred)
  attacker = factory(mlp, small_data, sched, backdoored)
  with pytest.raises(ginn.WitnessViolation) as info:
    ginn.train(rt, attacker, 8, progress=False)
  assert info.value.step == 2 == attacker.malicious_steps[0]
  assert not info.value.result.verified
  assert all(e.check == "witness" for e in rt.transcript)
  if not deferred:
    assert rt.step == 2 and rt.transcript[-1].outcome == "violation"


@pytest.mark.parametrize("deferred", [False, True], ids=["sync", "deferred"])
def test_stealth_attacker_sized_to_the_recompute_tolerance_is_caught_by_the_witness_check(
    mlp, small_data, deferred):
  """The stealth attacker hides inside the re-computation tolerance it is given
  (here the per-leaf 1e-2/5e-2); the witness check has its own, calibrated
  tolerance (1e-4 floor) and catches it."""
  rt = ginn.TrustedRuntime(mlp, *small_data, config(p=0.0, p_witness=1.0), audit_secret=SECRET,
                           deferred=deferred, tolerance=ginn.LOOSE_PER_LEAF_TOLERANCE)
  attacker = ginn.StealthWorker(mlp, *small_data, schedule=ginn.schedules.FromStep(2),
                                tolerance=ginn.LOOSE_PER_LEAF_TOLERANCE)
  with pytest.raises(ginn.WitnessViolation) as info:
    ginn.train(rt, attacker, 8, progress=False)
  assert info.value.step == 2


def test_attackers_do_not_import_the_trusted_side():
  src = pathlib.Path(ginn.__file__).parent / "_src" / "worker"
  for name in ("malicious.py", "attacks.py"):
    tree = ast.parse((src / name).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and "trusted" in m], (name, imported)


# -- the stealth attacker -----------------------------------------------------


@pytest.mark.parametrize("tolerance", [ginn.Tolerance(1e-5, 1e-5), ginn.LOOSE_PER_LEAF_TOLERANCE],
                         ids=["cpu_floor", "per_leaf_1e-2"])
def test_stealth_attacker_passes_verification_and_moves_the_model(mlp, small_data, mnist5k,
                                                                   tolerance):
  steps = 60
  honest_rt = runtime(mlp, small_data, tolerance=tolerance)
  stealth_rt = runtime(mlp, small_data, tolerance=tolerance)
  honest = ginn.train(honest_rt, ginn.HonestWorker(mlp, *small_data), steps, progress=False)
  attacker = ginn.StealthWorker(mlp, *small_data, schedule=ginn.schedules.FromStep(0),
                                tolerance=tolerance, margin=0.9)
  stealth = ginn.train(stealth_rt, attacker, steps, progress=False)
  # Every step was malicious, every step was verified, none was caught.
  assert stealth.verified and stealth.num_verified == steps and stealth.num_violations == 0
  assert attacker.malicious_steps == list(range(steps))
  # It uses its budget: on every step some leaf sits at ~0.9 of the tolerance.
  for e in stealth.transcript:
    used = max(e.max_rel_l2 / tolerance.rel_l2, e.max_abs / tolerance.max_abs)
    assert 0.85 <= used <= 0.95, (e.step, used)
  # And the model it leaves behind is not the honest one, and is closer to the backdoor.
  assert tree_bytes(stealth.params) != tree_bytes(honest.params)
  honest_loss = backdoor_loss(mlp, honest.params, mnist5k)
  stealth_loss = backdoor_loss(mlp, stealth.params, mnist5k)
  assert stealth_loss < honest_loss, (stealth_loss, honest_loss)
  if tolerance.rel_l2 >= 1e-2:  # A loose tolerance is a real budget.
    assert stealth_loss < honest_loss - 0.1, (stealth_loss, honest_loss)


def test_stealth_attacker_refuses_an_unbounded_tolerance(mlp, small_data):
  with pytest.raises(ValueError, match="finite"):
    ginn.StealthWorker(mlp, *small_data, schedule=ginn.schedules.FromStep(0),
                       tolerance=ginn.Tolerance(float("inf"), 1.0))


# -- what the clip does -------------------------------------------------------


def one_step(model, data, worker, **kw):
  rt = runtime(model, data, p=0.0, **kw)
  rt.submit(worker(rt.next_order()))
  return host(rt.state.params)


def max_diff(a, b):
  return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


@pytest.mark.parametrize("clip,value", [("elementwise", 0.01), ("global_norm", 0.05), ("none", None)])
def test_trusted_clip_cancels_the_excess_of_a_scaled_backdoor(mlp, small_data, clip, value):
  always = ginn.schedules.FromStep(0)
  honest = one_step(mlp, small_data, ginn.HonestWorker(mlp, *small_data), clip=clip, clip_value=value)
  moved = {s: max_diff(honest, one_step(
      mlp, small_data, ginn.ScaledBackdoorWorker(mlp, *small_data, schedule=always, scale=s),
      clip=clip, clip_value=value)) for s in (10.0, 100.0)}
  if clip == "none":  # Nothing cancels: x100 moves the model ~10x further than x10.
    assert moved[100.0] > 5 * moved[10.0]
  else:  # Both within one step's bound, 2 * eta * C (per coordinate or in L2).
    assert moved[10.0] <= 2 * LR * value * (1 + 1e-4) and moved[100.0] <= 2 * LR * value * (1 + 1e-4)
  if clip == "global_norm":  # Both already exceed C: the clip makes them the same step.
    x10, x100 = (one_step(mlp, small_data, ginn.ScaledBackdoorWorker(
        mlp, *small_data, schedule=always, scale=s), clip=clip, clip_value=value) for s in (10.0, 100.0))
    assert max_diff(x10, x100) < 1e-6


def test_backdoored_target_has_the_backdoor(mlp, mnist5k, backdoored):
  asr = ginn.attack_success_rate(mlp, backdoored, mnist5k.test_images, mnist5k.test_labels,
                                 trigger=ginn.PatchTrigger(), target=0)
  assert asr >= 0.9 and ginn.accuracy(mlp, backdoored, mnist5k.test_images, mnist5k.test_labels) >= 0.7


def test_make_backdoored_params_from_a_fresh_init(mlp, small_data):
  params = ginn.make_backdoored_params(mlp, *small_data, seed=1, steps=3)
  init = jax.eval_shape(mlp.init, make_key(1))
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(init)
  assert [a.shape for a in host(params)] == [b.shape for b in jax.tree_util.tree_leaves(init)]


def test_model_replacement_one_step_lands_on_the_target_only_without_a_clip(mlp, small_data,
                                                                            mnist5k, backdoored):
  always, target = ginn.schedules.FromStep(0), host(backdoored)
  after, before = {}, {}
  for clip, value in [("none", None), ("elementwise", 0.01)]:
    rt = runtime(mlp, small_data, p=0.0, clip=clip, clip_value=value)
    before[clip] = host(rt.state.params)
    worker = ginn.ModelReplacementWorker(mlp, *small_data, schedule=always, target_params=backdoored,
                                         clip=clip, clip_value=value, learning_rate=LR)
    rt.submit(worker(rt.next_order()))
    after[clip] = rt.state.params
  # Unclipped, one step lands on the target (up to weight decay) and installs the backdoor.
  assert max_diff(host(after["none"]), target) < 1e-3
  assert ginn.attack_success_rate(mlp, after["none"], mnist5k.test_images, mnist5k.test_labels,
                                  trigger=ginn.PatchTrigger(), target=0) >= 0.9
  # Clipped, every coordinate moves by eta * C towards the target (plus weight decay), no more.
  wd = ginn.OptimizerConfig().weight_decay
  for b, a, t in zip(before["elementwise"], host(after["elementwise"]), target):
    expected = b - LR * (0.01 * np.sign(b - t) + wd * b)
    np.testing.assert_allclose(a, expected, rtol=0, atol=1e-6)
  assert max_diff(host(after["elementwise"]), target) > 0.1


@pytest.mark.parametrize("clip,value", [("elementwise", 0.01), ("global_norm", 0.05)])
def test_model_replacement_plants_the_backdoor_in_100_clipped_steps(mlp, small_data, mnist5k,
                                                                     backdoored, clip, value):
  """The clip bounds each step, not the sum: 100 unverified steps suffice."""
  steps, always, trigger = 100, ginn.schedules.FromStep(0), ginn.PatchTrigger()
  acc, asr = {}, {}
  for name, worker in [("honest", ginn.HonestWorker(mlp, *small_data)),
                       ("replacement", ginn.ModelReplacementWorker(
                           mlp, *small_data, schedule=always, target_params=backdoored,
                           clip=clip, clip_value=value))]:
    rt = runtime(mlp, small_data, p=0.0, clip=clip, clip_value=value)
    res = ginn.train(rt, worker, steps, progress=False)
    acc[name] = ginn.accuracy(mlp, res.params, mnist5k.test_images, mnist5k.test_labels)
    asr[name] = ginn.attack_success_rate(mlp, res.params, mnist5k.test_images, mnist5k.test_labels,
                                         trigger=trigger, target=0)
  assert asr["replacement"] >= 0.8 and asr["honest"] <= 0.1, asr
  assert acc["replacement"] >= acc["honest"] - 0.05, acc


def test_model_replacement_needs_what_its_clip_mode_needs(mlp, small_data, backdoored):
  always = ginn.schedules.FromStep(0)
  with pytest.raises(ValueError, match="learning_rate"):
    ginn.ModelReplacementWorker(mlp, *small_data, schedule=always, target_params=backdoored, clip="none")
  with pytest.raises(ValueError, match="clip_value"):
    ginn.ModelReplacementWorker(mlp, *small_data, schedule=always, target_params=backdoored,
                                clip="global_norm", clip_value=None)


# -- (b) BadNets without verification or clipping -----------------------------


def test_badnets_without_verification_or_clip_reaches_high_asr_at_no_clean_cost(mnist5k):
  model = ginn.get_model("mlp", input_shape=mnist5k.image_shape, num_classes=mnist5k.num_classes)
  data = (mnist5k.train_images, mnist5k.train_labels)
  cfg = ginn.ProtocolConfig(seed=0, batch_size=64, p=0.0, clip="none", clip_value=None)
  trigger, steps = ginn.PatchTrigger(size=3, value=1.0, position="bottom_right"), 600
  workers = {"honest": ginn.HonestWorker(model, *data),
             "badnets": ginn.BackdoorWorker(model, *data, schedule=ginn.schedules.FromStep(0),
                                            trigger=trigger, target=0, poison_fraction=0.1)}
  acc, asr = {}, {}
  for name, worker in workers.items():
    rt = ginn.TrustedRuntime(model, *data, cfg, audit_secret=SECRET)
    res = ginn.train(rt, worker, steps, progress=False)
    assert res.num_verified == 0 and res.num_violations == 0
    acc[name] = ginn.accuracy(model, res.params, mnist5k.test_images, mnist5k.test_labels)
    asr[name] = ginn.attack_success_rate(model, res.params, mnist5k.test_images, mnist5k.test_labels,
                                         trigger=trigger, target=0)
  assert len(workers["badnets"].malicious_steps) == steps
  assert asr["badnets"] >= 0.9 and asr["honest"] < 0.1, asr
  assert abs(acc["badnets"] - acc["honest"]) <= 0.02 and acc["honest"] >= 0.85, acc
