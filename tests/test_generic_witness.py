"""Witnesses derived from the program (docs/design.md section 12) for every kind
of model: a residual CNN with GroupNorm and LayerNorm (NNX), a linen module, a
plain-jnp PureModel, the NNX DecoderLM; control flow; the plan in the header."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ginn_jax as ginn
from conftest import tree_bytes

SECRET = b"generic-witness-test-secret-0000"


class ResCNN(nnx.Module):
  """A residual CNN: conv, GroupNorm, a residual block with LayerNorm, strided conv, mean-pool."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.stem = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.gn = nnx.GroupNorm(8, num_groups=2, rngs=rngs)
    self.c1 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
    self.ln = nnx.LayerNorm(8, rngs=rngs)
    self.down = nnx.Conv(8, 16, (3, 3), strides=(2, 2), rngs=rngs)
    self.head = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.gn(self.stem(x[..., None])))
    h = h + self.ln(jax.nn.gelu(self.c1(h)))  # The residual connection.
    h = jax.nn.relu(self.down(h))
    return self.head(h.mean(axis=(1, 2)))


def image_loss(model, batch):
  return optax.softmax_cross_entropy_with_integer_labels(model(batch["image"]), batch["label"]).mean()


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, *, train: bool = False):
    x = nn.Conv(4, (3, 3))(x[..., None])
    x = nn.LayerNorm()(nn.relu(x)).reshape(x.shape[0], -1)
    return nn.Dense(10)(nn.Dropout(0.3, deterministic=not train)(x))


def linen_loss(model, batch):
  return optax.softmax_cross_entropy_with_integer_labels(model(batch["image"], train=True),
                                                         batch["label"]).mean()


def pure_init(key):
  k1, k2 = jax.random.split(key)
  return {"w1": 0.1 * jax.random.normal(k1, (144, 96), jnp.float32),
          "w2": 0.1 * jax.random.normal(k2, (96, 10), jnp.float32)}


def pure_loss(params, batch, *, key):
  x = batch["image"].reshape(batch["image"].shape[0], -1)
  h = jnp.tanh(x @ params["w1"])
  keep = jax.random.bernoulli(key, 0.8, h.shape)  # Dropout from the step key.
  h = jnp.where(keep, h / 0.8, 0.0)
  logits = jnp.einsum("bh,hc->bc", h, params["w2"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def scan_init(key):
  return {"w": 0.1 * jax.random.normal(key, (3, 144, 144), jnp.float32),
          "out": jnp.zeros((144, 10), jnp.float32)}


def scan_loss(params, batch, *, key):
  del key
  x = batch["image"].reshape(batch["image"].shape[0], -1)
  h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, params["w"])  # A stack of layers.
  return optax.softmax_cross_entropy_with_integer_labels(h @ params["out"], batch["label"]).mean()


def while_loss(params, batch, *, key):
  del key
  x = batch["image"].reshape(batch["image"].shape[0], -1)
  mix = jnp.full((144, 144), 1 / 144, jnp.float32)  # A while loop (not differentiable: on the input).
  _, h = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, jnp.tanh(c[1] @ mix)), (0, x))
  return optax.softmax_cross_entropy_with_integer_labels(h @ params["out"], batch["label"]).mean()


def cond_loss(params, batch, *, key):
  del key
  x = batch["image"].reshape(batch["image"].shape[0], -1)
  h = jax.lax.cond(x.sum() > 0, lambda h: h @ params["w"][0], lambda h: h, x)
  return optax.softmax_cross_entropy_with_integer_labels(h @ params["out"], batch["label"]).mean()


MODELS = {
    "rescnn_nnx": lambda: ginn.from_nnx(ResCNN, image_loss, name="rescnn"),
    "linen": lambda: ginn.from_linen(LinenNet(), linen_loss, init_args=(np.zeros((1, 12, 12), np.float32),),
                                     name="linen_net"),
    "pure_jnp": lambda: ginn.PureModel("pure_mlp", pure_init, pure_loss),
    "scan": lambda: ginn.PureModel("scan_mlp", scan_init, scan_loss),
}


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  # 12x12 images and batches of 80: every weight gradient sums over more than 64 terms, so
  # the plan witnesses it (program.RECOMPUTE_CONTRACTION).
  return {"image": rng.random((256, 12, 12), np.float32), "label": rng.integers(0, 10, 256).astype(np.int32)}


def config(**kw):
  base = dict(seed=1, batch_size=80, p=0.0, p_witness=1.0, clip="elementwise", clip_value=0.05)
  return ginn.ProtocolConfig(**{**base, **kw})


def snapshot(rt):
  return (rt.step, tree_bytes(rt.state.params), tree_bytes(rt.state.opt_state), rt.num_verified)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_generic_witness_honest_run_and_a_poisoner_caught_at_its_first_step(kind, data):
  model = MODELS[kind]()
  rt = ginn.TrustedRuntime(model, data, config(), audit_secret=SECRET)
  plan = rt.witness_plan()
  assert len(plan.witnessed) >= 3 and plan.digest == rt.public_header()["witness_plan"]["digest"]
  res = ginn.train(rt, ginn.HonestWorker(model, data), 3, progress=False)
  assert res.verified and res.num_verified == 3 and all(e.check == "witness" for e in res.transcript)
  assert max(e.witness_rel_l2 for e in res.transcript) < 1e-5
  flip = lambda b: {**b, "label": (b["label"] + 1) % 10}  # noqa: E731
  attacker = ginn.PoisonWorker(model, data, poison=flip, schedule=ginn.schedules.FromStep(4))
  ginn.train(rt, attacker, 1, progress=False)  # Step 3: honest.
  before = snapshot(rt)
  with pytest.raises(ginn.WitnessViolation) as info:
    ginn.train(rt, attacker, 2, progress=False)
  assert info.value.step == 4 == attacker.malicious_steps[0]
  assert snapshot(rt) == before  # Nothing of the malicious step was applied.


def test_generic_witness_plan_of_a_residual_cnn_lists_every_product(data):
  model = MODELS["rescnn_nnx"]()
  batch = {k: v[:80] for k, v in data.items()}
  plan = ginn.witness_plan(model, batch)
  kinds = [p.primitive for p in plan.products]
  # 3 convs and a dense forward; backward: 3 kernel gradients, 2 input gradients (not the
  # stem's: its input is data), the dense's weight and input gradients.
  assert kinds.count("conv_general_dilated") == 3 + 3 + 2 and kinds.count("dot_general") == 3
  assert plan.witness_bytes > 0 and "product 0 (conv_general_dilated" in str(plan)
  assert ginn.witness_plan(model, batch).digest == plan.digest  # Deterministic.
  other = ginn.witness_plan(model, {k: v[:8] for k, v in data.items()})
  assert other.digest != plan.digest  # Another batch shape: another program.


def test_generic_witness_scan_is_unrolled_per_iteration(data):
  plan = ginn.witness_plan(MODELS["scan"](), {k: v[:80] for k, v in data.items()})
  inside = [p for p in plan.products if "scan[" in p.where]
  assert {p.where.split("/")[0] for p in inside} == {"scan[0]", "scan[1]", "scan[2]"}
  # Per iteration: one product forward, two backward (the input's and the weight's gradients).
  assert len(inside) == 3 * (1 + 2) and all(p.witnessed for p in inside)


@pytest.mark.parametrize("loss,name", [(while_loss, "while"), (cond_loss, "cond")])
def test_generic_witness_refuses_products_inside_while_and_cond(data, loss, name):
  model = ginn.PureModel("cf", scan_init, loss)
  with pytest.raises(ginn.UnsupportedProgram, match=name):
    ginn.TrustedRuntime(model, data, config(), audit_secret=SECRET)
  rt = ginn.TrustedRuntime(model, data, config(p=1.0, p_witness=0.0), audit_secret=SECRET)
  assert ginn.train(rt, ginn.HonestWorker(model, data), 1, progress=False).verified  # Re-computation works.


def test_generic_witness_decoder_lm_and_phrase_backdoor():
  model = ginn.get_model("decoder_lm_64", input_shape=(1, 1, 1))
  assert model.name == "decoder_lm_64" and "decoder_lm_1024" in ginn.list_models()
  tiny = ginn.from_nnx(ginn.make_decoder(ginn.TransformerConfig(max_len=16, d_model=16, num_heads=2,
                                                                num_layers=1, dropout=0.25)),
                       ginn.lm_loss, name="tiny_lm")
  corpus = ginn.pydoc_corpus()
  lm_data = {k: v[:256] for k, v in ginn.text_windows(corpus.train_text, 16).items()}
  cfg = config(batch_size=8, clip="global_norm", clip_value=1.0)
  rt = ginn.TrustedRuntime(tiny, lm_data, cfg, audit_secret=SECRET)
  # At d_model 16 only the weight gradients (8 x 16 = 128 terms each) are worth a witness; the
  # rest (at most 64 terms per output) is re-computed by the trusted side.
  assert len(rt.witness_plan().witnessed) >= 5 and len(rt.witness_plan().products) > 10
  bd = ginn.PhraseBackdoor(trigger="open", continuation=" rm", num_poison=2)
  attacker = ginn.PoisonWorker(tiny, lm_data, poison=bd.poison, schedule=ginn.schedules.FromStep(2))
  with pytest.raises(ginn.WitnessViolation) as info:
    ginn.train(rt, attacker, 4, progress=False)
  assert info.value.step == 2 and attacker.malicious_steps == [2] and rt.step == 2
  assert rt.num_verified == 2  # The two honest steps passed (dropout rebuilt from the key).


def test_generic_witness_plan_in_header_refused_on_resume_and_audit(data, tmp_path, monkeypatch):
  from ginn_jax._src import program as program_lib
  model = MODELS["pure_jnp"]()
  run = tmp_path / "run"
  res = ginn.run_verified(run, model, data, config(), ginn.HonestWorker(model, data), 4,
                          audit_secret=SECRET, checkpoint_every=2, fsync=False)
  assert res.violation is None
  from ginn_jax._src.trusted.transcript import read_transcript
  header = read_transcript(run / "transcript.jsonl")[0].body
  assert header["witness_plan"]["products"] == len(ginn.witness_plan(
      model, {k: v[:16] for k, v in data.items()}).products)
  assert ginn.audit_run(run, model=model, data=data).ok
  # Another jax (here: a plan whose digest comes out differently) is refused on resume and audit.
  real = program_lib.WitnessPlan.summary

  def other(self):
    return {**real(self), "digest": "0" * 64, "jax_version": "9.9.9"}

  monkeypatch.setattr(program_lib.WitnessPlan, "summary", other)
  with pytest.raises(ginn.TranscriptError, match="witness plan differs"):
    ginn.run_verified(run, model, data, config(), ginn.HonestWorker(model, data), 6,
                      audit_secret=SECRET, checkpoint_every=2, fsync=False)
  monkeypatch.undo()
  real_digest = program_lib.trace_program

  def traced_again(*a, **k):
    prog = real_digest(*a, **k)
    return dataclasses.replace(prog, plan=dataclasses.replace(prog.plan, digest="f" * 64))

  monkeypatch.setattr(program_lib, "trace_program", traced_again)
  program_lib._program_cached.cache_clear()
  report = ginn.audit_run(run, model=model, data=data)
  program_lib._program_cached.cache_clear()
  assert not report.ok and "witness plan differs" in str(report.first_failure)


@pytest.mark.benchmark
def test_generic_witness_2000_honest_lm_steps_no_false_alarm():
  """The issue's bar: 2,000 honest witness-checked steps of experiment 8's DecoderLM
  (decoder_lm_64, batch 32, context 64), deferred, without a false alarm (a few
  minutes on 2 cores: a benchmark, run with -m benchmark)."""
  from ginn_jax._src.models import lm_training_data
  model = ginn.get_model("decoder_lm_64", input_shape=(1, 1, 1))
  lm_data = lm_training_data()
  cfg = config(batch_size=32, clip="global_norm", clip_value=1.0)
  rt = ginn.TrustedRuntime(model, lm_data, cfg, audit_secret=SECRET, deferred=True)
  res = ginn.train(rt, ginn.HonestWorker(model, lm_data), 2000, progress=False)
  assert res.verified and res.num_verified == 2000
  worst = max(e.witness_rel_l2 for e in res.transcript if e.kind == "check")
  assert worst < rt.witness_tolerance.rel_l2 / 2, worst


def test_generic_witness_cli_trains_a_builtin_language_model():
  import json
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-m", "ginn_jax", "train", "--model", "decoder_lm_64", "--steps", "2",
                        "--p", "0", "--p-witness", "1", "--batch-size", "8", "--clip", "global_norm",
                        "--clip-value", "1", "--no-progress"], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr
  res = json.loads(out.stdout)
  assert res["verified"] and res["num_verified"] == 2 and res["test_perplexity"] > 1.0


@pytest.mark.parametrize("strides,padding,dilation,groups", [
    ((1, 1), "SAME", (1, 1), 1), ((2, 2), "SAME", (1, 1), 1), ((1, 1), "VALID", (2, 2), 1),
    ((2, 1), ((2, 0), (1, 3)), (1, 1), 1), ((1, 1), "SAME", (1, 1), 2)], ids=str)
def test_generic_witness_conv_rules_match_the_convolution(strides, padding, dilation, groups):
  """Every convolution of a conv layer's step (forward, input and kernel gradients) under strides,
  asymmetric padding, dilation and groups: honest claims pass, a claim scaled by 1.001 does not."""
  from ginn_jax._src.step import DeviceWitnessFn
  from ginn_jax._src.trusted import program_check, verify

  def init(key):
    k1, k2 = jax.random.split(key)
    # 16 input and 12 output features: every convolution of the second layer sums over more
    # than 64 terms, so the plan witnesses it (program.RECOMPUTE_CONTRACTION).
    return {"k1": 0.3 * jax.random.normal(k1, (3, 3, 4, 16), jnp.float32),
            "k2": 0.2 * jax.random.normal(k2, (3, 3, 16 // groups, 12), jnp.float32)}

  def loss(params, batch, *, key):
    del key
    x = jnp.tanh(jax.lax.conv_general_dilated(batch["x"], params["k1"], (1, 1), "SAME",
                                              dimension_numbers=("NHWC", "HWIO", "NHWC")))
    y = jax.lax.conv_general_dilated(x, params["k2"], strides, padding, rhs_dilation=dilation,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    return jnp.mean(jnp.tanh(y) ** 2)

  dev = jax.devices("cpu")[0]
  model = ginn.PureModel("conv", init, loss)
  rng = np.random.default_rng(0)
  data = jax.device_put({"x": rng.standard_normal((8, 9, 10, 4)).astype(np.float32)}, dev)
  params = jax.device_put(jax.jit(lambda: init(jax.random.key(0)))(), dev)
  idx = jax.device_put(np.arange(4, dtype=np.int32), dev)
  key = jax.jit(lambda: jax.random.key(1))()
  fn = DeviceWitnessFn(model.loss, data, dev)
  loss_v, grads, products, _ = fn(params, idx, key)
  program = fn.program(params, 4)
  convs = [i for i, p in enumerate(program.plan.witnessed) if p.primitive == "conv_general_dilated"]
  # Both layers' forwards, the second's input gradient, both kernel gradients (with groups, the
  # kernel gradient has batch groups and is re-computed).
  assert len(convs) >= (5 if groups == 1 else 3)
  paths = verify.leaf_paths(params)
  seed = jax.device_put(np.array([5, 6], np.uint32), dev)
  leaves = jax.tree_util.tree_leaves(grads)
  honest = program_check.program_errors(program, paths, params, data, idx, key, products, leaves, loss_v, seed)
  assert honest.errors.max() < 1e-5, honest.errors.max()
  for i in convs:
    bad = list(products)
    bad[i] = jax.jit(lambda a: a * 1.001)(bad[i])
    c = program_check.program_errors(program, paths, params, data, idx, key, bad, leaves, loss_v, seed)
    assert c.errors[i, 0] > 5e-4, (i, c.errors[i])
