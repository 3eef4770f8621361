"""Named optax optimizers (`OptimizerSpec`): checked when made, recorded in a
run's header, rebuilt from it by a resume and an audit; an optimizer that
cannot be named is refused by `run_verified`, never dropped."""
import dataclasses
import json
import math
import os
import shutil

import jax
import optax
import pytest

import ginn_jax as ginn
from ginn_jax._src.audit import audit_run
from ginn_jax._src.rundir import run_verified
from ginn_jax._src.trusted import checkpoint as ckpt
from ginn_jax._src.trusted import keys
from ginn_jax._src.trusted.transcript import TranscriptError, TranscriptWriter, read_transcript
from ginn_jax._src.trusted.transforms import optimizer_from_dict

from conftest import tree_bytes

SECRET = b"optimizer-spec-secret-0123456789ab"
WARMUP = {"schedule": "warmup_cosine_decay", "init_value": 0.0, "peak_value": 3e-3, "warmup_steps": 3,
          "decay_steps": 12}
ADAM = ginn.OptimizerSpec("adam", learning_rate=WARMUP)
STEPS = 12


# -- the spec -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(name="adamx", learning_rate=1e-3), ValueError, "unknown optimizer 'adamx'.*sgd, momentum, adam"),
    (dict(name=optax.adam(1e-3), learning_rate=1e-3), ValueError, "unknown optimizer"),
    (dict(name="adam"), TypeError, "missing hyperparameter 'learning_rate'"),
    (dict(name="adam", learning_rate=1e-3, beta1=0.9), TypeError,
     r"OptimizerSpec\('adam'\): unknown hyperparameter 'beta1'; it takes learning_rate, b1, b2, eps"),
    (dict(name="sgd", learning_rate=0.1, momentum=0.9), TypeError, "unknown hyperparameter 'momentum'"),
    (dict(name="adam", learning_rate=0.0), ValueError, "learning_rate must be > 0, got 0.0"),
    (dict(name="adam", learning_rate=float("inf")), ValueError, "learning_rate must be finite"),
    (dict(name="adam", learning_rate="1e-3"), TypeError, "learning_rate must be a float"),
    (dict(name="adam", learning_rate=True), TypeError, "learning_rate must be a float"),
    (dict(name="adam", learning_rate=optax.constant_schedule(1e-3)), TypeError,
     "learning_rate is a function, which a run header cannot name"),
    (dict(name="adam", learning_rate=1e-3, b1=1.0), ValueError, "b1 must be >= 0 and < 1, got 1.0"),
    (dict(name="adam", learning_rate=1e-3, eps=0), ValueError, "eps must be > 0"),
    (dict(name="adamw", learning_rate=1e-3, weight_decay=-0.1), ValueError, "weight_decay must be >= 0"),
    (dict(name="momentum", learning_rate=0.1, momentum=None), TypeError, "momentum must be a float"),
    (dict(name="rmsprop", learning_rate=1e-3, centered=1), TypeError, "centered must be a bool"),
    (dict(name="sgd", learning_rate={"schedule": "cosine", "init_value": 0.1}), ValueError,
     "schedule 'cosine' is not known.*cosine_decay"),
    (dict(name="sgd", learning_rate={"init_value": 0.1}), ValueError, "schedule None is not known"),
    (dict(name="sgd", learning_rate={"schedule": "cosine_decay", "init_value": 0.1}), TypeError,
     "schedule 'cosine_decay': missing argument 'decay_steps'"),
    (dict(name="sgd", learning_rate={"schedule": "cosine_decay", "init_value": 0.1, "decay_steps": 10.0}),
     TypeError, "decay_steps must be an int, got 10.0"),
    (dict(name="sgd", learning_rate={"schedule": "cosine_decay", "init_value": 0.1, "decay_steps": 0}),
     ValueError, "decay_steps must be >= 1, got 0"),
    (dict(name="sgd", learning_rate={"schedule": "linear", "init_value": 0.1, "end_value": 0.0,
                                     "transition_steps": 5, "steps": 3}),
     TypeError, "unknown argument 'steps'; it takes init_value, end_value, transition_steps, transition_begin"),
    (dict(name="sgd", learning_rate={**WARMUP, "warmup_steps": 12}), ValueError,
     "decay_steps .* must exceed warmup_steps, got 12 and 12"),
])
def test_optimizer_spec_refuses_bad_input_naming_it(kwargs, error, match):
  with pytest.raises(error, match=match):
    ginn.OptimizerSpec(**kwargs)


SPECS = [
    ginn.OptimizerSpec("sgd", learning_rate=0.1),
    ginn.OptimizerSpec("momentum", learning_rate={"schedule": "exponential_decay", "init_value": 0.1,
                                                  "transition_steps": 10, "decay_rate": 0.5}),
    ADAM,
    ginn.OptimizerSpec("adamw", learning_rate={"schedule": "cosine_decay", "init_value": 1e-3,
                                               "decay_steps": 100}, weight_decay=0.01),
    ginn.OptimizerSpec("rmsprop", learning_rate={"schedule": "constant", "value": 1e-3}, centered=True),
    ginn.OptimizerSpec("lion", learning_rate={"schedule": "linear", "init_value": 1e-4, "end_value": 0.0,
                                              "transition_steps": 50}),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_optimizer_spec_json_round_trip(spec):
  text = json.dumps(spec.to_dict())
  back = ginn.OptimizerSpec.from_dict(json.loads(text))
  assert back == spec and hash(back) == hash(spec) and back.to_dict() == spec.to_dict()
  assert optimizer_from_dict(json.loads(text)) == spec
  assert eval(repr(spec), {"OptimizerSpec": ginn.OptimizerSpec}) == spec
  # Every hyperparameter is recorded, defaults filled in, so the header does not depend on optax's defaults.
  assert set(spec.to_dict()) == {"name", *ginn.OptimizerSpec.__init__.__globals__["OPTIMIZERS"][spec.name]}
  # Equal specs share one update transform, so runtimes share one jitted update.
  assert ginn.make_update_transform("elementwise", 0.01, back) is ginn.make_update_transform(
      "elementwise", 0.01, spec)
  cfg = ginn.ProtocolConfig(optimizer=spec)
  assert cfg.to_dict()["optimizer"] == spec.to_dict() and json.dumps(cfg.to_dict())


def test_equal_optimizer_specs_are_one_value():
  a = ginn.OptimizerSpec("adam", learning_rate=1)
  b = ginn.OptimizerSpec("adam", learning_rate=1.0, b1=0.9, b2=0.999, eps=1e-8)
  assert a == b and hash(a) == hash(b) and a.to_dict()["learning_rate"] == 1.0
  assert a != ginn.OptimizerSpec("adamw", learning_rate=1.0)
  assert a != ginn.OptimizerSpec("adam", learning_rate=1.0, b1=0.8)
  with pytest.raises(AttributeError):
    a.name = "sgd"


@jax.transfer_guard("allow")  # Schedules evaluated at Python ints, as a reader would.
def test_optimizer_schedules_are_optax_schedules():
  sched = ginn.OptimizerSpec("sgd", learning_rate=WARMUP).learning_rate()
  want = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 3, 12)
  for t in (0, 1, 3, 7, 12, 20):
    assert float(sched(t)) == float(want(t))
  peaks = {"constant": ({"value": 0.2}, 0.2), "cosine_decay": ({"init_value": 0.2, "decay_steps": 5}, 0.2),
           "warmup_cosine_decay": (WARMUP, 3e-3),
           "linear": ({"init_value": 0.0, "end_value": 0.3, "transition_steps": 5}, 0.3),
           "exponential_decay": ({"init_value": 0.2, "transition_steps": 5, "decay_rate": 0.5}, 0.2)}
  for name, (args, peak) in peaks.items():
    spec = ginn.OptimizerSpec("sgd", learning_rate={**args, "schedule": name})
    assert spec.peak_learning_rate() == peak
    rates = [float(spec.learning_rate()(t)) for t in range(20)]
    assert max(rates) <= peak * (1 + 1e-6)
  grows = {"schedule": "exponential_decay", "init_value": 0.1, "transition_steps": 5, "decay_rate": 2.0}
  assert ginn.OptimizerSpec("sgd", learning_rate=grows).peak_learning_rate() == math.inf
  capped = ginn.OptimizerSpec("sgd", learning_rate={**grows, "end_value": 0.4})
  assert capped.peak_learning_rate() == 0.4


def test_old_optimizer_config_headers_are_unchanged():
  # The header's config of a default run, as runs made before OptimizerSpec recorded it.
  assert json.dumps(ginn.ProtocolConfig().to_dict(), sort_keys=True, separators=(",", ":")) == (
      '{"batch_size":64,"clip":"elementwise","clip_value":0.01,"optimizer":{"learning_rate":0.05,'
      '"momentum":0.9,"weight_decay":0.0005},"p":0.1,"p_witness":0.0,"seed":0,"witness_timeout_s":60.0}')
  old = {"learning_rate": 0.05, "momentum": 0.9, "weight_decay": 0.0005}
  assert optimizer_from_dict(old) == ginn.OptimizerConfig()
  with pytest.raises(TypeError, match="neither an OptimizerSpec"):
    optimizer_from_dict({"learning_rate": 0.05})
  with pytest.raises(ValueError, match="records no optimizer"):
    optimizer_from_dict(None)


# -- training -------------------------------------------------------------------------------

SCHEDULED = [  # (spec, the same optimizer built with optax by hand): every schedule once.
    (ginn.OptimizerSpec("sgd", learning_rate={"schedule": "exponential_decay", "init_value": 0.1,
                                              "transition_steps": 2, "decay_rate": 0.5}, weight_decay=1e-3),
     lambda: optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(optax.exponential_decay(0.1, 2, 0.5)))),
    (ginn.OptimizerSpec("momentum", learning_rate={"schedule": "cosine_decay", "init_value": 0.1,
                                                   "decay_steps": 4}, momentum=0.8),
     lambda: optax.chain(optax.sgd(optax.cosine_decay_schedule(0.1, 4), momentum=0.8))),
    (ginn.OptimizerSpec("adam", learning_rate=WARMUP, b1=0.8, b2=0.99, eps=1e-6),
     lambda: optax.adam(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 3, 12), b1=0.8, b2=0.99, eps=1e-6)),
    (ginn.OptimizerSpec("adamw", learning_rate={"schedule": "linear", "init_value": 3e-3, "end_value": 1e-3,
                                                "transition_steps": 4}, weight_decay=0.01),
     lambda: optax.adamw(optax.linear_schedule(3e-3, 1e-3, 4), weight_decay=0.01)),
    (ginn.OptimizerSpec("rmsprop", learning_rate={"schedule": "constant", "value": 1e-3}, decay=0.8,
                        centered=True),
     lambda: optax.rmsprop(optax.constant_schedule(1e-3), decay=0.8, centered=True)),
    (ginn.OptimizerSpec("lion", learning_rate={"schedule": "cosine_decay", "init_value": 1e-4,
                                               "decay_steps": 4}, b2=0.95),
     lambda: optax.lion(optax.cosine_decay_schedule(1e-4, 4), b2=0.95)),
]


@pytest.mark.parametrize("spec,by_hand", SCHEDULED, ids=[s.name for s, _ in SCHEDULED])
def test_each_optimizer_with_a_schedule_trains_as_optax_does(tmp_path, mlp, small_data, spec, by_hand):
  cfg = ginn.ProtocolConfig(seed=1, batch_size=32, p=0.5, clip="global_norm", clip_value=1.0, optimizer=spec)
  rt = ginn.TrustedRuntime(mlp, *small_data, cfg, audit_secret=SECRET)  # Strict promotion (conftest).
  initial = tree_bytes(rt.state.params)
  res = ginn.train(rt, ginn.HonestWorker(mlp, *small_data), 4, progress=False)
  assert res.verified and rt.public_header()["config"]["optimizer"] == spec.to_dict()
  with jax.numpy_dtype_promotion("standard"):  # optax.adam needs it; the spec's own update does not.
    ref = ginn.TrustedRuntime(mlp, *small_data, dataclasses.replace(cfg, p=0.0),
                              audit_secret=SECRET, optimizer=by_hand())
    ginn.train(ref, ginn.HonestWorker(mlp, *small_data), 4, progress=False)
  assert tree_bytes(rt.state.params) != initial
  assert tree_bytes(rt.state.params) == tree_bytes(ref.state.params)
  assert tree_bytes(rt.state.opt_state) == tree_bytes(ref.state.opt_state)
  counts = [int(x) for p, x in jax.tree_util.tree_leaves_with_path(rt.state.opt_state)
            if "count" in jax.tree_util.keystr(p)]
  assert counts and set(counts) == {4}  # The schedule's (and Adam's) step count.
  # Its state survives a checkpoint bitwise, and the restored runtime takes the next step as the original.
  ckpt.save_checkpoint(tmp_path / "c.ckpt", rt.state, num_verified=0, authenticate=rt.authenticate)
  fresh = ginn.TrustedRuntime(mlp, *small_data, cfg, audit_secret=SECRET)
  state, _ = ckpt.load_checkpoint(tmp_path / "c.ckpt", fresh.state, authenticate=fresh.authenticate)
  fresh.restore(state, list(rt.transcript), rt.num_verified)
  assert tree_bytes(fresh.state) == tree_bytes(rt.state)
  w = ginn.HonestWorker(mlp, *small_data)
  for r in (rt, fresh):
    r.submit(w(r.next_order()))
  assert tree_bytes(fresh.state) == tree_bytes(rt.state)


def test_momentum_optimizer_spec_is_the_sgd_config(mlp, small_data):
  """`OptimizerConfig`'s SGD, named: the same update, bitwise."""
  cfgs = [ginn.ProtocolConfig(seed=2, batch_size=32, p=0.0, optimizer=o) for o in (
      ginn.OptimizerConfig(), ginn.OptimizerSpec("momentum", learning_rate=0.05, momentum=0.9, weight_decay=5e-4))]
  params = []
  for cfg in cfgs:
    rt = ginn.TrustedRuntime(mlp, *small_data, cfg, audit_secret=SECRET)
    ginn.train(rt, ginn.HonestWorker(mlp, *small_data), 3, progress=False)
    params.append(tree_bytes(rt.state.params))
  assert params[0] == params[1]


def test_unnamed_optax_optimizer_is_never_recorded_as_sgd(mlp, small_data):
  with pytest.raises(TypeError, match="OptimizerSpec.*TrustedRuntime\\(optimizer=...\\)"):
    ginn.ProtocolConfig(optimizer=optax.adam(1e-3))
  tx = optax.sgd(0.05)
  rt = ginn.TrustedRuntime(mlp, *small_data, ginn.ProtocolConfig(batch_size=32), audit_secret=SECRET,
                           optimizer=tx)
  assert rt.optimizer is tx and rt.public_header()["config"]["optimizer"] is None
  b = ginn.analysis.deviation_bound("elementwise", 0.01, rt.optimizer)
  assert not b.bounded and "cannot name" in b.note
  # A named optimizer given to the runtime goes into its config and header.
  rt = ginn.TrustedRuntime(mlp, *small_data, ginn.ProtocolConfig(batch_size=32), audit_secret=SECRET,
                           optimizer=ADAM)
  assert rt.config.optimizer == ADAM == rt.optimizer
  assert rt.public_header()["config"]["optimizer"] == ADAM.to_dict()


def test_optimizer_spec_deviation_bounds():
  A = ginn.analysis
  sgd = A.deviation_bound("elementwise", 0.01, ginn.OptimizerConfig(learning_rate=0.1, momentum=0.9))
  named = A.deviation_bound("elementwise", 0.01, ginn.OptimizerSpec("momentum", learning_rate=0.1))
  assert named.bounded and (named.per_step, named.with_momentum) == (sgd.per_step, sgd.with_momentum)
  cosine = {"schedule": "cosine_decay", "init_value": 0.1, "decay_steps": 100}
  b = A.deviation_bound("global_norm", 1.0, ginn.OptimizerSpec("sgd", learning_rate=cosine))
  assert b.bounded and b.per_step == pytest.approx(2 * 0.1 * 1.0) and b.with_momentum == b.per_step
  assert "largest learning rate" in b.note
  grows = {"schedule": "exponential_decay", "init_value": 0.1, "transition_steps": 5, "decay_rate": 2.0}
  assert not A.deviation_bound("elementwise", 0.01, ginn.OptimizerSpec("sgd", learning_rate=grows)).bounded
  for spec in SPECS:
    if spec.name not in ("sgd", "momentum"):
      b = A.deviation_bound("elementwise", 0.01, spec)
      assert not b.bounded and b.per_step == math.inf and "does not bound" in b.note
      assert not A.shard_deviation_bound("elementwise", 0.01, spec, num_shards=2, corrupted_shards=1).bounded


# -- persisted runs -------------------------------------------------------------------------


class Crash(Exception):
  pass


def crash_at(worker, step):
  def call(order):
    if order.step == step:
      raise Crash
    return worker(order)
  return call


def persist(d, mlp, small_data, worker=None, *, optimizer=ADAM, num_steps=STEPS, **kw):
  worker = worker or ginn.HonestWorker(mlp, *small_data)
  cfg = ginn.ProtocolConfig(seed=3, batch_size=32, p=0.3, clip="global_norm", clip_value=1.0)
  return run_verified(d, mlp, *small_data, cfg, worker, num_steps, audit_secret=SECRET, checkpoint_every=4,
                      optimizer=optimizer, **kw)


def checkpoint_shas(d):
  return [r.body["sha256"] for r in read_transcript(d / "transcript.jsonl") if r.type == "checkpoint"]


@pytest.fixture(scope="module")
def adam_run(tmp_path_factory, mlp, small_data):
  d = tmp_path_factory.mktemp("adam") / "run"
  return d, persist(d, mlp, small_data)


def test_adam_optimizer_run_persisted_killed_resumed_bitwise_and_audited(tmp_path, mlp, small_data, adam_run):
  ref_dir, ref = adam_run
  header = read_transcript(ref_dir / "transcript.jsonl")[0].body
  assert header["config"]["optimizer"] == ADAM.to_dict()
  w = ginn.HonestWorker(mlp, *small_data)
  d = tmp_path / "run"
  with pytest.raises(Crash):
    persist(d, mlp, small_data, crash_at(w, 6))
  res = persist(d, mlp, small_data, w)
  assert res.resumed_from == 4 and res.steps == STEPS
  assert tree_bytes(res.params) == tree_bytes(ref.params) and res.final_digest == ref.final_digest
  assert [e.digest for e in res.transcript] == [e.digest for e in ref.transcript]
  # Every checkpoint (parameters, Adam's mu, nu and count, the schedule's count) bitwise as uninterrupted.
  assert checkpoint_shas(d) == checkpoint_shas(ref_dir)
  rt = ginn.TrustedRuntime(mlp, *small_data, ginn.ProtocolConfig(
      seed=3, batch_size=32, p=0.3, clip="global_norm", clip_value=1.0, optimizer=ADAM), audit_secret=SECRET)
  state, _ = ckpt.load_checkpoint(d / "checkpoints" / f"step-{STEPS:08d}.ckpt", rt.state,
                                  authenticate=rt.authenticate)
  counts = [int(x) for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
            if "count" in jax.tree_util.keystr(p)]
  assert counts == [STEPS, STEPS]  # scale_by_adam's and the schedule's.
  rep = audit_run(d, model=mlp, images=small_data[0], labels=small_data[1], audit_secret=SECRET)
  assert rep.ok, rep.first_failure
  assert sum(i.kind == "segment" for i in rep.items) == STEPS // 4


def test_unnamed_optax_optimizer_is_refused_by_run_verified_writing_nothing(tmp_path, mlp, small_data):
  d = tmp_path / "run"
  with pytest.raises(TypeError, match="run header cannot name.*OptimizerSpec\\('adam', learning_rate=1e-3\\)"):
    persist(d, mlp, small_data, optimizer=optax.adam(1e-3))
  assert not d.exists()
  with pytest.raises(TypeError, match="run header cannot name"):
    persist(d, mlp, small_data, optimizer="adam")
  assert not d.exists()


def test_resume_with_another_optimizer_is_refused(tmp_path, mlp, small_data):
  w = ginn.HonestWorker(mlp, *small_data)
  d = tmp_path / "run"
  with pytest.raises(Crash):
    persist(d, mlp, small_data, crash_at(w, 6))
  before = (d / "transcript.jsonl").read_bytes()
  for other in (ginn.OptimizerSpec("adam", learning_rate={**WARMUP, "peak_value": 3e-2}),
                ginn.OptimizerSpec("adamw", learning_rate=WARMUP), ginn.OptimizerConfig()):
    with pytest.raises(TranscriptError, match="other settings \\(config.optimizer"):
      persist(d, mlp, small_data, w, optimizer=other)
  assert (d / "transcript.jsonl").read_bytes() == before


def resign(src, dst, optimizer):
  """A copy of run `src` whose header records `optimizer`, the whole chain
  signed again with the run's key (a forgery by someone who holds it)."""
  shutil.copytree(src, dst)
  records = read_transcript(src / "transcript.jsonl")
  os.unlink(dst / "transcript.jsonl")
  header = dict(records[0].body, config=dict(records[0].body["config"], optimizer=optimizer))
  w = TranscriptWriter.create(dst / "transcript.jsonl", header, keys.audit_keys(SECRET).signing_seed)
  for r in records[1:]:
    w.append(r.type, r.body)
  w.close()


def test_tampered_optimizer_header_is_refused_on_resume_and_audit(tmp_path, mlp, small_data, adam_run):
  ref_dir, _ = adam_run
  w = ginn.HonestWorker(mlp, *small_data)
  # A changed byte in the header's optimizer: the chain and signature fail.
  edited = tmp_path / "edited"
  shutil.copytree(ref_dir, edited)
  raw = (edited / "transcript.jsonl").read_bytes()
  assert raw.count(b'"peak_value":0.003') == 1
  (edited / "transcript.jsonl").write_bytes(raw.replace(b'"peak_value":0.003', b'"peak_value":0.004'))
  with pytest.raises(TranscriptError, match="entry 1"):
    persist(edited, mlp, small_data, w)
  rep = audit_run(edited, model=mlp, images=small_data[0], labels=small_data[1])
  assert not rep.ok and rep.first_failure.kind == "transcript" and "entry 1" in rep.first_failure.detail
  # A header signed again with another optimizer: resume refuses it, the audit's re-training exposes it.
  other = ginn.OptimizerSpec("adam", learning_rate={**WARMUP, "peak_value": 4e-3})
  resign(ref_dir, tmp_path / "resigned", other.to_dict())
  with pytest.raises(TranscriptError, match="other settings \\(config.optimizer"):
    persist(tmp_path / "resigned", mlp, small_data, w)
  rep = audit_run(tmp_path / "resigned", model=mlp, images=small_data[0], labels=small_data[1])
  assert not rep.ok and rep.first_failure.kind == "segment" and rep.first_failure.step == 4
  # A header naming an optimizer this version does not know: the audit says so.
  resign(ref_dir, tmp_path / "unknown", {**ADAM.to_dict(), "name": "adamx"})
  rep = audit_run(tmp_path / "unknown", model=mlp, images=small_data[0], labels=small_data[1])
  assert not rep.ok and rep.first_failure.kind == "header"
  assert "unknown optimizer 'adamx'" in rep.first_failure.detail
  resign(ref_dir, tmp_path / "unnamed", None)
  rep = audit_run(tmp_path / "unnamed", model=mlp, images=small_data[0], labels=small_data[1])
  assert not rep.ok and "records no optimizer" in rep.first_failure.detail


def test_cli_train_and_analyze_take_an_optimizer(capsys):
  from ginn_jax._src import cli
  spec = json.dumps({"name": "adamw", "learning_rate": {"schedule": "cosine_decay", "init_value": 1e-3,
                                                          "decay_steps": 10}, "weight_decay": 0.01})
  assert cli.main(["train", "--model", "mlp", "--steps", "3", "--batch-size", "32", "--p", "0.5",
                   "--optimizer", spec, "--no-progress", "--tolerance", '{"rel_l2": 1e-5, "max_abs": 1e-5}']) == 0
  res = json.loads(capsys.readouterr().out)
  assert res["optimizer"] == ginn.OptimizerSpec.from_dict(json.loads(spec)).to_dict()
  assert res["steps"] == 3 and res["num_violations"] == 0
  assert cli.main(["analyze", "--optimizer", "adam"]) == 0
  assert json.loads(capsys.readouterr().out)["deviation_bound"]["bounded"] is False
  assert cli.main(["analyze", "--optimizer", "momentum", "--lr", "0.1", "--momentum", "0.5"]) == 0
  assert json.loads(capsys.readouterr().out)["deviation_bound"]["with_momentum"] == pytest.approx(
      2 * 0.1 * 0.01 / 0.5)
  assert cli.main(["analyze", "--optimizer", "adam", "--lr", "0"]) == 2
  assert "--optimizer: OptimizerSpec('adam'): learning_rate must be > 0" in capsys.readouterr().err
  assert cli.main(["train", "--optimizer", '{"name": "adam", "beta1": 0.9}', "--steps", "1"]) == 2
  assert "unknown hyperparameter 'beta1'" in capsys.readouterr().err


def test_adamw_optimizer_lora_fine_tune_persists_resumes_and_audits_from_its_header(tmp_path, mnist5k):
  """A fine-tune as users run it: LoRA over a built-in base, AdamW with a
  warm-up schedule; killed, resumed bitwise; `ginn audit --frozen` rebuilds
  model and optimizer from the header alone."""
  from ginn_jax._src import cli
  x, y = mnist5k.train_images, mnist5k.train_labels  # All of it: the audit loads it by name.
  ft = ginn.lora(ginn.get_model("mlp", input_shape=(28, 28, 1)), rank=2)
  cfg = ginn.ProtocolConfig(seed=4, batch_size=32, p=0.5, clip="global_norm", clip_value=1.0)
  adamw = ginn.OptimizerSpec("adamw", learning_rate=WARMUP, weight_decay=0.01)
  frozen = ginn.TrustedRuntime(ft, x, y, cfg, audit_secret=SECRET).frozen
  honest = ginn.HonestWorker(ft, x, y, frozen=frozen)

  def persist_ft(d, worker):
    return run_verified(d, ft, x, y, cfg, worker, 8, audit_secret=SECRET, checkpoint_every=3,
                        dataset="mnist5k", frozen=frozen, optimizer=adamw)

  ref = persist_ft(tmp_path / "ref", honest)
  with pytest.raises(Crash):
    persist_ft(tmp_path / "run", crash_at(honest, 5))
  res = persist_ft(tmp_path / "run", honest)
  assert res.resumed_from == 3 and tree_bytes(res.params) == tree_bytes(ref.params)
  assert checkpoint_shas(tmp_path / "run") == checkpoint_shas(tmp_path / "ref")
  header = read_transcript(tmp_path / "run" / "transcript.jsonl")[0].body
  assert header["config"]["optimizer"] == adamw.to_dict() and "frozen_digest" in header
  ginn.save_frozen(tmp_path / "base.npz", frozen)
  assert cli.main(["audit", str(tmp_path / "run"), "--frozen", str(tmp_path / "base.npz")]) == 0
