"""Your own model, loss and data: pure losses, flax linen and flax NNX modules
over any pytree training set, with every guarantee of the built-in models."""
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ginn_jax as ginn
from ginn_jax._src import progress as progress_lib

SECRET = b"custom-models-test-secret-000000"


class NNXMLP(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):  # Keyword-only, as flax's own modules.
    self.l1 = nnx.Linear(64, 16, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.l2 = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.drop(jax.nn.relu(self.l1(x.reshape(x.shape[0], -1)))))


def nnx_loss(model, batch):
  logits = model(batch["image"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x, *, train: bool = False):
    x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(nn.Dropout(0.5, deterministic=not train)(x))


def linen_loss(model, batch):
  logits = model(batch["image"], train=True)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def pure_init(key):
  return {"w": 0.01 * jax.random.normal(key, (64, 10), jnp.float32), "b": jnp.zeros((10,), jnp.float32)}


def pure_loss(params, batch, *, key):
  del key
  logits = batch["image"].reshape(batch["image"].shape[0], -1) @ params["w"] + params["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


@pytest.fixture(scope="module")
def data():
  """256 examples of a dict dataset: 8x8 'images' and labels (not a ginn.Batch)."""
  rng = np.random.default_rng(0)
  return {"image": rng.random((256, 8, 8), np.float32), "label": rng.integers(0, 10, 256).astype(np.int32)}


MODELS = {
    "nnx": lambda: ginn.from_nnx(NNXMLP, nnx_loss, name="nnx_mlp"),
    "linen": lambda: ginn.from_linen(LinenMLP(), linen_loss, init_args=(np.zeros((1, 8, 8), np.float32),),
                                     name="linen_mlp"),
    "pure": lambda: ginn.PureModel("pure_linear", pure_init, pure_loss),
}


def _key(n: int) -> jax.Array:
  return jax.jit(lambda: jax.random.key(n))()  # (No implicit transfer: the test runtime forbids them.)


def _runtime(model, data, **kw):
  cfg = ginn.ProtocolConfig(seed=3, batch_size=32, p=1.0, clip="elementwise", clip_value=0.05)
  return ginn.TrustedRuntime(model, data, cfg, audit_secret=SECRET, **kw)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_verified_run_replays_bitwise(kind, data):
  """nnx / linen / pure: every step re-computed and accepted; a second run
  from the same seed ends on bitwise the same parameters."""
  model = MODELS[kind]()
  results = [ginn.train(_runtime(model, data), ginn.HonestWorker(model, data), 6, progress=False)
             for _ in range(2)]
  assert all(r.verified and r.num_verified == 6 for r in results)
  for a, b in zip(jax.tree_util.tree_leaves(results[0].params), jax.tree_util.tree_leaves(results[1].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert results[0].losses[-1] < results[0].losses[0] + 1.0  # It trains (and the loss is finite).


def test_nnx_dropout_is_a_pure_function_of_the_key(data):
  """The RNG state of an NNX module is re-derived from the step key on every
  call: same key, bitwise the same gradient (no counter carried between calls);
  another key, other dropout masks."""
  model = MODELS["nnx"]()
  params = jax.jit(model.init)(_key(0))
  batch = jax.device_put(ginn.gather(data, np.arange(32)), ginn.trusted_device())
  def grad():  # A fresh trace each time: state left behind by one call would show in the next.
    return jax.jit(jax.grad(lambda p, k: model.loss(p, batch, key=k)))

  k1, k2 = _key(1), _key(2)
  a, b, c = grad()(params, k1), grad()(params, jax.random.clone(k1)), grad()(params, k2)
  np.testing.assert_array_equal(a["l1"]["kernel"], b["l1"]["kernel"])
  assert not np.array_equal(a["l1"]["kernel"], c["l1"]["kernel"])


def test_nnx_params_are_plain_dicts_and_merge_back(data):
  model = MODELS["nnx"]()
  params = jax.device_put(ginn.init_state(model, optax.sgd(0.1), _key(0)).params,
                          ginn.trusted_device())
  assert set(params) == {"l1", "l2"} and set(params["l1"]) == {"kernel", "bias"}
  module = model.merge(params)
  np.testing.assert_array_equal(module.l1.kernel[...], params["l1"]["kernel"])
  # Evaluation is deterministic (eval mode, no dropout).
  x = jax.device_put(data["image"][:4], ginn.trusted_device())
  np.testing.assert_array_equal(model.logits(params, x), model.logits(params, x))


class NNXWithBatchNorm(nnx.Module):
  def __init__(self, rngs):
    self.l = nnx.Linear(64, 10, rngs=rngs)
    self.bn = nnx.BatchNorm(10, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.l(x.reshape(x.shape[0], -1)))


class LinenWithBatchNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.BatchNorm(use_running_average=False)(nn.Dense(10)(x.reshape(x.shape[0], -1)))


def test_nnx_state_beyond_params_is_refused():
  with pytest.raises(ginn.NonPureModelError, match=r"bn\.mean \(BatchStat\).*pure function"):
    ginn.from_nnx(NNXWithBatchNorm, nnx_loss)


def test_linen_mutable_collections_are_refused():
  with pytest.raises(ginn.NonPureModelError, match="batch_stats"):
    ginn.from_linen(LinenWithBatchNorm(), linen_loss, init_args=(np.zeros((1, 8, 8), np.float32),))


@pytest.mark.parametrize("kind", ["nnx", "pure"])
def test_poison_worker_is_caught_at_its_first_step(kind, data):
  """`PoisonWorker` poisons any pytree batch (here: every label set to 0);
  re-computed at p=1, its first malicious step halts the run unapplied."""
  model = MODELS[kind]()
  rt = _runtime(model, data)

  def poison(batch):
    return {**batch, "label": jnp.zeros_like(batch["label"])}

  attacker = ginn.PoisonWorker(model, data, poison=poison, schedule=ginn.schedules.FromStep(3))
  with pytest.raises(ginn.IntegrityViolation) as info:
    ginn.train(rt, attacker, 6, progress=False)
  assert info.value.step == 3 and rt.step == 3 and attacker.malicious_steps == [3]


@pytest.mark.parametrize("bad", ["nan_in_one_leaf", "wrong_shape", "missing_leaf"])
def test_bad_reports_change_nothing_nnx(bad, data):
  model = MODELS["nnx"]()
  rt = _runtime(model, data)
  worker = ginn.HonestWorker(model, data)
  ginn.train(rt, worker, 2, progress=False)
  before = jax.tree_util.tree_map(np.asarray, rt.state.params)
  report = worker(rt.next_order())
  grads = jax.tree_util.tree_map(np.asarray, report.grads)
  if bad == "nan_in_one_leaf":
    grads["l2"]["bias"] = grads["l2"]["bias"].copy()
    grads["l2"]["bias"][3] = np.nan
    expected = ginn.NonFiniteReport
  elif bad == "wrong_shape":
    grads["l1"]["kernel"] = grads["l1"]["kernel"][:, :8]
    expected = ginn.ShapeMismatch
  else:
    del grads["l2"]
    expected = ginn.StructureMismatch
  with pytest.raises(expected, match=r"step 2.*l[12]"):
    rt.submit(ginn.GradientReport(step=2, grads=grads, loss=report.loss))
  assert rt.step == 2 and len(rt.transcript) == 2
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(rt.state.params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert rt.submit(worker(rt.next_order())).outcome == "verified"  # The honest report still goes through.


def test_dataset_digest_of_pytrees(data, small_data):
  images, labels = small_data
  # Image data keeps its digest whichever way it is passed.
  assert ginn.dataset_digest(ginn.Batch(images, labels)) == ginn.dataset_digest(images, labels)
  base = ginn.dataset_digest(data)
  assert base == ginn.dataset_digest({k: v.copy() for k, v in data.items()})
  changed = data["image"].copy()
  changed[17, 3, 4] += 1e-6
  assert ginn.dataset_digest({**data, "image": changed}) != base
  assert ginn.dataset_digest({"img": data["image"], "label": data["label"]}) != base  # A leaf's name.
  assert ginn.dataset_digest({**data, "label": data["label"].astype(np.int64)}) != base  # A dtype.
  with pytest.raises(ValueError, match=r"disagree on the number of examples.*'label'.*255"):
    ginn.dataset_digest({**data, "label": data["label"][:255]})
  with pytest.raises(ValueError, match="not an array"):
    ginn.dataset_digest({**data, "name": "mnist"})
  with pytest.raises(ValueError, match="empty pytree"):
    ginn.dataset_digest({})


def test_runtime_refuses_mismatched_data(data):
  with pytest.raises(ValueError, match="disagree on the number of examples"):
    _runtime(MODELS["pure"](), {**data, "label": data["label"][:100]})


def test_nnx_run_directory_audits_clean(tmp_path, data):
  """A run of an NNX model on a dict dataset leaves a run directory that
  `audit_run` re-trains and accepts, given the model and the data."""
  model = MODELS["nnx"]()
  cfg = ginn.ProtocolConfig(seed=1, batch_size=32, p=0.5, clip="elementwise", clip_value=0.05)
  res = ginn.run_verified(tmp_path / "run", model, data, cfg, ginn.HonestWorker(model, data), 6,
                          audit_secret=SECRET, checkpoint_every=3)
  assert res.violation is None and res.steps == 6
  report = ginn.audit_run(tmp_path / "run", model=model, data=data)
  assert report.ok, report.first_failure
  other = {**data, "label": (data["label"] + 1) % 10}
  assert not ginn.audit_run(tmp_path / "run", model=model, data=other).ok
  missing = ginn.audit_run(tmp_path / "run", data=data)
  assert not missing.ok and "not a built-in model" in str(missing.first_failure)


def test_evaluate_is_example_weighted(data):
  model = MODELS["pure"]()
  params = jax.device_put(jax.jit(model.init)(_key(0)), ginn.trusted_device())
  acc = lambda p, b: (jnp.argmax(b["image"].reshape(b["image"].shape[0], -1) @ p["w"] + p["b"], -1)  # noqa: E731
                      == b["label"]).mean()
  whole = ginn.evaluate(acc, params, data, batch_size=256)
  assert ginn.evaluate(acc, params, data, batch_size=100) == pytest.approx(whole, abs=1e-6)


def test_log_progress_prints_a_few_lines():
  """Not a terminal: about ten lines for a long run, not a redraw per step."""
  out = io.StringIO()
  bar = progress_lib.LogProgress(total=600, desc="ginn train", file=out)
  for i in range(600):
    bar.update(1)
    bar.set_postfix(loss=f"{i:.4f}", verified=i)
  bar.close()
  lines = out.getvalue().splitlines()
  assert 10 <= len(lines) <= 12 and "\r" not in out.getvalue()
  assert lines[-1].startswith("ginn train: 600/600 (100%)") and lines[-1].endswith("done")


def test_train_progress_in_a_log(monkeypatch, capfd, data):
  """`train(progress=True)` with stderr not a terminal writes a few lines."""
  monkeypatch.delenv("TQDM_DISABLE", raising=False)
  model = MODELS["pure"]()
  cfg = ginn.ProtocolConfig(seed=0, batch_size=8, p=0.0, clip="elementwise", clip_value=0.05)
  rt = ginn.TrustedRuntime(model, data, cfg, audit_secret=SECRET)
  ginn.train(rt, ginn.HonestWorker(model, data), 200, progress=True)
  err = capfd.readouterr().err
  assert 5 <= len(err.splitlines()) <= 12 and len(err) < 2000, err


def test_the_classic_keyword_calls_still_work(tmp_path, small_data):
  """``images=..., labels=...`` keywords, and run_verified's named arguments."""
  images, labels = small_data
  model = ginn.get_model("mlp", input_shape=(28, 28, 1))
  cfg = ginn.ProtocolConfig(seed=0, batch_size=32, p=1.0)
  rt = ginn.TrustedRuntime(model, images=images, labels=labels, config=cfg, audit_secret=SECRET)
  worker = ginn.HonestWorker(model, images=images, labels=labels)
  assert ginn.train(rt, worker, 2, progress=False).verified
  assert rt.dataset_digest == ginn.dataset_digest(images, labels)
  res = ginn.run_verified(tmp_path / "run", model, images=images, labels=labels, config=cfg, worker=worker,
                          num_steps=2, audit_secret=SECRET, checkpoint_every=2)
  assert res.violation is None and res.steps == 2
  with pytest.raises(TypeError, match="once"):
    ginn.TrustedRuntime(model, ginn.Batch(images, labels), images=images, labels=labels)


def test_num_shards_as_a_numpy_int_is_a_plain_int():
  cfg = ginn.ProtocolConfig(batch_size=32, num_shards=np.int64(2))
  assert type(cfg.num_shards) is int and cfg.to_dict()["num_shards"] == 2
