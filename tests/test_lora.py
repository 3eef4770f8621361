"""Fine-tuning with a frozen base (docs/design.md section 13): LoRA and leaf
filters on NNX and linen models, the frozen tree held by the trusted side,
committed by digest, never changed by a report, checked on resume and audit."""
import dataclasses

import jax
import numpy as np
import pytest

import ginn_jax as ginn
from ginn_jax._src.trusted.transcript import TranscriptError

from conftest import tree_bytes
from test_custom_models import MODELS, data  # noqa: F401  (a fixture)

SECRET = b"lora-frozen-test-secret-00000000"
CFG = dict(seed=5, batch_size=32, p=1.0, clip="elementwise", clip_value=0.05)


def _lora(kind, **kw):
  return ginn.lora(MODELS[kind](), rank=kw.pop("rank", 2), alpha=kw.pop("alpha", 4.0), **kw)


def _runtime(model, data, **kw):
  cfg = ginn.ProtocolConfig(**{**CFG, **kw.pop("cfg", {})})
  return ginn.TrustedRuntime(model, data, cfg, audit_secret=SECRET, **kw)


def _np(tree):
  return [np.asarray(jax.device_get(x)) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_lora_on_nnx_and_linen_trains_only_the_adapters_verified(kind, data):
  """Step 0 is the base model (b = 0); every step is re-computed and
  witness-checked and accepted; reports, state and optimizer cover the
  adapters only; the frozen base never moves."""
  ft = _lora(kind)
  rt = _runtime(ft, data, cfg=dict(p_witness=1.0))
  params0 = rt.state.params
  assert set(params0) == set(ft.targets) and all(set(v) == {"a", "b"} for v in params0.values())
  merged = jax.jit(ft.merged)(params0, rt.frozen)
  base = jax.jit(ft.base.init)(jax.device_put(ginn._src.trusted.keys.seed_streams(CFG["seed"]).init_key,
                                              jax.devices("cpu")[0]))
  for a, b in zip(_np(merged), _np(base)):  # b = 0: the merged model is the base.
    np.testing.assert_array_equal(a, b)
  frozen0 = tree_bytes(rt.frozen)
  worker = ginn.HonestWorker(ft, data, frozen=rt.frozen)
  report = worker(rt.next_order())
  assert jax.tree_util.tree_structure(report.grads) == jax.tree_util.tree_structure(params0)
  res = ginn.train(rt, worker, 5, progress=False)
  assert res.verified and res.num_verified == 5
  assert all(e.check == "recompute+witness" for e in rt.transcript)
  assert tree_bytes(rt.frozen) == frozen0
  assert any(np.abs(np.asarray(v["b"])).max() > 0 for v in res.params.values())  # The adapters moved.
  header = rt.public_header()
  assert header["frozen_digest"] == ginn._src.trusted.runtime.frozen_digest(rt.frozen)
  assert header["finetune"]["method"] == "lora" and header["finetune"]["rank"] == 2
  assert header["frozen_size"] == ft.num_frozen()


def test_lora_replays_bitwise(data):
  runs = []
  for _ in range(2):
    ft = _lora("nnx")
    rt = _runtime(ft, data, cfg=dict(p=0.5))
    ginn.train(rt, ginn.HonestWorker(ft, data, frozen=rt.frozen), 6, progress=False)
    runs.append((tree_bytes(rt.state.params), tree_bytes(rt.state.opt_state),
                 [e.digest for e in rt.transcript]))
  assert runs[0] == runs[1]


def test_frozen_leaf_in_a_report_is_refused_with_nothing_changed(data):
  ft = _lora("nnx")
  rt = _runtime(ft, data)
  worker = ginn.HonestWorker(ft, data, frozen=rt.frozen)
  before = (tree_bytes(rt.state.params), tree_bytes(rt.state.opt_state), rt.step, len(rt.transcript))
  order = rt.next_order()
  honest = worker(order)
  frozen_path = sorted(rt.frozen)[0]
  bad = dataclasses.replace(honest, grads={**honest.grads, frozen_path: rt.frozen[frozen_path]})
  with pytest.raises(ginn.StructureMismatch, match="frozen parameter") as e:
    rt.submit(bad)
  assert e.value.where == frozen_path
  assert (tree_bytes(rt.state.params), tree_bytes(rt.state.opt_state), rt.step, len(rt.transcript)) == before
  entry = rt.submit(honest)  # The honest report of the same step is still accepted.
  assert entry.outcome == "verified" and rt.step == 1


@pytest.mark.parametrize("check", ["recompute", "witness"])
def test_frozen_base_modified_by_the_worker_is_caught(check, data):
  """A worker that computes with a changed base (one frozen kernel scaled by
  1.01) is caught at its first step by re-computation and by the witness
  check (a product with a frozen weight is checked against the trusted copy),
  with nothing applied."""
  ft = _lora("linen")
  cfg = dict(p=1.0, p_witness=0.0) if check == "recompute" else dict(p=0.0, p_witness=1.0)
  rt = _runtime(ft, data, cfg=cfg)
  bad = dict(rt.frozen)
  target = ft.targets[0]
  bad[target] = jax.device_put(np.asarray(bad[target]) * np.float32(1.01), jax.devices("cpu")[1])
  before = tree_bytes(rt.state.params)
  violation = ginn.WitnessViolation if check == "witness" else ginn.IntegrityViolation
  with pytest.raises(violation):
    ginn.train(rt, ginn.HonestWorker(ft, data, frozen=bad), 3, progress=False)
  assert rt.step == 0 and tree_bytes(rt.state.params) == before
  assert rt.transcript[-1].outcome == "violation"


def test_freeze_filter_trains_only_the_chosen_leaves(data):
  model = MODELS["nnx"]()
  ft = ginn.freeze(model, trainable="l2/*")
  rt = _runtime(ft, data, cfg=dict(p_witness=1.0))
  assert sorted(rt.state.params) == ["l2/bias", "l2/kernel"]
  assert sorted(rt.frozen) == ["l1/bias", "l1/kernel"]
  res = ginn.train(rt, ginn.HonestWorker(ft, data, frozen=rt.frozen), 4, progress=False)
  assert res.verified and res.num_verified == 4
  merged = jax.jit(ft.merged)(res.params, rt.frozen)
  np.testing.assert_array_equal(np.asarray(merged["l1"]["kernel"]), np.asarray(rt.frozen["l1/kernel"]))
  assert not np.array_equal(np.asarray(merged["l2"]["kernel"]), np.asarray(rt.frozen.get("l2/kernel", 0)))


def test_lora_and_frozen_arguments_are_validated(data):
  model = MODELS["nnx"]()
  with pytest.raises(ValueError, match="rank"):
    ginn.lora(model, rank=0)
  with pytest.raises(ValueError, match="matches no parameter"):
    ginn.lora(model, rank=2, targets="*attention*")
  with pytest.raises(ValueError, match="two or more axes"):
    ginn.lora(model, rank=2, targets="l1/bias")
  with pytest.raises(ValueError, match="nothing is frozen"):
    ginn.freeze(model, trainable="*")
  with pytest.raises(TypeError, match="no frozen"):
    _runtime(model, data, frozen={"l1/kernel": np.zeros((64, 16), np.float32)})
  ft = ginn.lora(model, rank=2)
  with pytest.raises(ValueError, match="frozen parameter l1/kernel has shape"):
    good = ft.frozen_params(jax.jit(lambda: jax.random.key(0))())
    _runtime(ft, data, frozen={**good, "l1/kernel": np.zeros((64, 8), np.float32)})
  with pytest.raises(TypeError, match="frozen=rt.frozen"):  # No pretrained base: the worker needs it.
    ginn.HonestWorker(ft, data)


class _Crash(Exception):
  pass


def _persisted(path, ft, data, frozen, crash_at=None):
  cfg = ginn.ProtocolConfig(**{**CFG, "p": 0.3})
  honest = ginn.HonestWorker(ft, data, frozen=frozen)

  def worker(order):
    if order.step == crash_at:
      raise _Crash
    return honest(order)

  return ginn.run_verified(path, ft, data, cfg, worker, 7, audit_secret=SECRET, checkpoint_every=3,
                           frozen=frozen)


def test_frozen_digest_checked_on_resume_and_audit(tmp_path, data):
  """A persisted LoRA run over a pretrained base: resumed bitwise; a resume
  with another base is refused; the audit passes with the base's file and
  fails without it or with another."""
  model = MODELS["nnx"]()
  pretrained = jax.jit(model.init)(jax.jit(lambda: jax.random.key(11))())
  ft = ginn.lora(model, rank=2, alpha=4.0, params=pretrained)
  frozen = ft.frozen_params()
  ref = _persisted(tmp_path / "ref", ft, data, frozen)
  with pytest.raises(_Crash):
    _persisted(tmp_path / "run", ft, data, frozen, crash_at=4)
  other = {**frozen, "l2/bias": np.asarray(frozen["l2/bias"]) + np.float32(1e-3)}
  with pytest.raises(TranscriptError, match="frozen parameters differ"):
    _persisted(tmp_path / "run", ft, data, other)
  res = _persisted(tmp_path / "run", ft, data, frozen)
  assert res.resumed_from == 3 and res.final_digest == ref.final_digest
  assert tree_bytes(res.params) == tree_bytes(ref.params)
  digest = ginn.save_frozen(tmp_path / "base.npz", frozen)
  assert digest == ginn._src.trusted.runtime.frozen_digest(frozen)
  report = ginn.audit_run(tmp_path / "run", model=ft, data=data, frozen=tmp_path / "base.npz")
  assert report.ok, report.first_failure
  missing = ginn.audit_run(tmp_path / "run", model=ft, data=data)
  assert not missing.ok and "pass its frozen parameters" in str(missing.first_failure)
  ginn.save_frozen(tmp_path / "other.npz", other)
  wrong = ginn.audit_run(tmp_path / "run", model=ft, data=data, frozen=tmp_path / "other.npz")
  assert not wrong.ok and "not the run's base" in str(wrong.first_failure)


def test_lora_audit_rebuilds_a_builtin_base_from_the_header(tmp_path, mnist5k):
  """`ginn audit RUN --frozen FILE` of a LoRA run over a built-in model: the
  model is rebuilt from the header's ``finetune``."""
  from ginn_jax._src import cli
  base = ginn.get_model("mlp", input_shape=(28, 28, 1))
  ft = ginn.lora(base, rank=2)
  cfg = ginn.ProtocolConfig(seed=2, batch_size=32, p=0.5)
  rt_frozen = ginn.TrustedRuntime(ft, mnist5k.train_images, mnist5k.train_labels, cfg,
                                  audit_secret=SECRET).frozen
  worker = ginn.HonestWorker(ft, mnist5k.train_images, mnist5k.train_labels, frozen=rt_frozen)
  res = ginn.run_verified(tmp_path / "run", ft, mnist5k.train_images, mnist5k.train_labels, cfg, worker, 4,
                          audit_secret=SECRET, checkpoint_every=2, dataset="mnist5k", frozen=rt_frozen)
  assert res.violation is None and res.steps == 4
  ginn.save_frozen(tmp_path / "base.npz", rt_frozen)
  assert cli.main(["audit", str(tmp_path / "run"), "--frozen", str(tmp_path / "base.npz")]) == 0
  assert cli.main(["audit", str(tmp_path / "run")]) != 0


def test_frozen_bfloat16_base_is_digested_saved_and_loaded(tmp_path):
  """A bfloat16 base (the usual case for fine-tuning): its digest, its file
  and the digest of the file read back agree; the dtype survives."""
  import jax.numpy as jnp
  from ginn_jax._src.trusted.runtime import frozen_digest
  frozen = {"l1/kernel": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4).astype(jnp.bfloat16),
            "l1/bias": np.arange(4, dtype=np.float32)}
  digest = ginn.save_frozen(tmp_path / "base.npz", frozen)
  back = ginn.load_frozen(tmp_path / "base.npz")
  assert back["l1/kernel"].dtype == jnp.bfloat16 and back["l1/bias"].dtype == np.float32
  assert digest == frozen_digest(back) == frozen_digest(frozen)
  kernel = frozen["l1/kernel"].copy()
  kernel[0, 0] = kernel[0, 1]  # One bfloat16 entry changed.
  changed = {**frozen, "l1/kernel": kernel}
  assert frozen_digest(changed) != digest
