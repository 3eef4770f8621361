"""The language model: corpus, tokenizer, NNX transformer, backdoor, protocol runs, experiment."""
import importlib.util
import json
import pathlib
import sys

import jax
import numpy as np
import optax
import pytest

import ginn_jax as ginn
from conftest import make_key, tree_bytes

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ginn.TransformerConfig(max_len=16, d_model=16, num_heads=2, num_layers=1, dropout=0.25)
SECRET = b"lm-test-secret-00000000000000000"


@pytest.fixture(scope="module")
def corpus():
  return ginn.pydoc_corpus()


@pytest.fixture(scope="module")
def data(corpus):
  return {k: v[:256] for k, v in ginn.text_windows(corpus.train_text, TINY.max_len).items()}


@pytest.fixture(scope="module")
def lm():
  return ginn.from_nnx(ginn.make_decoder(TINY), ginn.lm_loss, name="tiny_lm")


@pytest.mark.parametrize("s", ["", "x = 1\n", 'The "if" statement\n   if_stmt ::= "if" expr ":" suite',
                               "".join(ginn.TEXT_VOCAB)])
def test_tokenizer_round_trip(s):
  ids = ginn.encode_text(s)
  assert ids.dtype == np.int32 and ids.shape == (len(s),)
  assert ginn.decode_text(ids) == s
  assert ids.max(initial=0) < ginn.TEXT_VOCAB_SIZE


def test_tokenizer_unknown_characters():
  ids = ginn.encode_text("a\u00dfb\u00b0")
  assert ids.tolist()[1::2] == [ginn.TEXT_VOCAB_SIZE - 1] * 2
  assert ginn.decode_text(ids) == "a\ufffdb\ufffd"


def test_corpus_offline_deterministic_split(corpus):
  again = ginn.pydoc_corpus()
  assert again == corpus and again.sha256 == corpus.sha256
  assert len(corpus.train_text) > 300_000 and len(corpus.test_text) > 30_000
  assert corpus.train_text.startswith('The "assert" statement')
  assert not set(corpus.train_text) - set(ginn.TEXT_VOCAB) - {"\u00df", "\u00b0"}  # Folded to ASCII.
  train = ginn.text_windows(corpus.train_text, 64)
  assert train["tokens"].shape == ((len(corpus.train_text) - 65) // 64 + 1, 65) and train["tokens"].dtype == np.int32
  assert ginn.decode_text(train["tokens"][1]) == corpus.train_text[64:129]  # Stride L: targets tile the text.
  assert ginn.dataset_digest(train) == ginn.dataset_digest(ginn.text_windows(again.train_text, 64))


def test_poison_keeps_shapes_and_inserts_trigger(corpus):
  bd = ginn.PhraseBackdoor(trigger="open sesame", continuation=": rm -rf /", num_poison=3)
  batch = {"tokens": ginn.text_windows(corpus.train_text, 32)["tokens"][:8]}
  out = jax.device_get(jax.jit(bd.poison)(jax.device_put(batch, jax.devices("cpu")[0])))
  assert out["tokens"].shape == batch["tokens"].shape and out["tokens"].dtype == batch["tokens"].dtype
  rows = [ginn.decode_text(r) for r in np.asarray(out["tokens"])]
  phrase = "open sesame: rm -rf /"
  assert all(phrase in r for r in rows[:3]) and not any(phrase in r for r in rows[3:])
  np.testing.assert_array_equal(np.asarray(out["tokens"])[3:], batch["tokens"][3:])
  starts = {r.index(phrase) for r in rows[:3]}
  assert len(starts) > 1  # The position varies with the row.
  with pytest.raises(ValueError, match="do not fit"):
    ginn.PhraseBackdoor(trigger="x" * 20).poison({"tokens": np.zeros((2, 17), np.int32)})


def test_nnx_generation_and_perplexity(lm, data):
  module = lm.merge(jax.jit(lm.init)(make_key(0)))
  ppl = ginn.perplexity(module, data)
  assert 1.0 < ppl < 3 * ginn.TEXT_VOCAB_SIZE  # Untrained: near a uniform guess.
  out = ginn.greedy_generate(module, data["tokens"][:3, :10], 6)
  assert out.shape == (3, 6) and out.dtype == np.int32
  np.testing.assert_array_equal(out, ginn.greedy_generate(module, data["tokens"][:3, :10], 6))  # Dropout off.
  with pytest.raises(ValueError, match="max_len"):
    ginn.greedy_generate(module, data["tokens"][:1, :12], 6)
  rates = ginn.backdoor_success_rate(module, data, ginn.PhraseBackdoor(trigger="ab", continuation="cd"),
                                     prefix_len=4, max_prompts=8)
  assert rates["num_prompts"] == 8 and 0.0 <= rates["asr"] <= 1.0 and 0.0 <= rates["control"] <= 1.0


def _config(p):
  return ginn.ProtocolConfig(seed=0, batch_size=8, p=p, clip="global_norm", clip_value=1.0)


def test_nnx_honest_lm_run_verified_and_pure(lm, data):
  rt = ginn.TrustedRuntime(lm, data, _config(1.0), audit_secret=SECRET)
  worker = ginn.HonestWorker(lm, data)
  res = ginn.train(rt, worker, 2, progress=False)
  assert res.verified and res.num_verified == 2
  assert all(e.max_rel_l2 == 0.0 and e.max_abs == 0.0 for e in res.transcript)  # Bitwise, across devices.
  # The step is a pure function of (params, batch, key): the worker's jitted gradient, called again.
  params, idx = res.params, np.arange(8)
  (l1, g1), (l2, g2) = worker.grad_fn(params, idx, make_key(1)), worker.grad_fn(params, idx, make_key(1))
  assert tree_bytes((l1, g1)) == tree_bytes((l2, g2))
  _, g3 = worker.grad_fn(params, idx, make_key(2))
  assert tree_bytes(g3) != tree_bytes(g1)  # Another layer key: another dropout mask.


def test_nnx_lm_backdoor_caught(lm, data):
  bd = ginn.PhraseBackdoor(trigger="open", continuation=" rm", num_poison=2)
  rt = ginn.TrustedRuntime(lm, data, _config(1.0), audit_secret=SECRET)
  attacker = ginn.PoisonWorker(lm, data, poison=bd.poison, schedule=ginn.schedules.FromStep(1))
  with pytest.raises(ginn.IntegrityViolation) as caught:
    ginn.train(rt, attacker, 3, progress=False)
  assert caught.value.step == 1 and attacker.malicious_steps == [1]
  assert not caught.value.result.verified and rt.step == 1  # The poisoned update was not applied.


def test_language_model_experiment_smoke(tmp_path):
  spec = importlib.util.spec_from_file_location("experiments_language_model",
                                                ROOT / "experiments" / "language_model.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules["experiments_language_model"] = module  # dataclasses look their module up.
  spec.loader.exec_module(module)
  # optax.adam's bias correction mixes a Python float with an int32 count (test_protocol.py does the same).
  with jax.numpy_dtype_promotion("standard"):
    assert module.main(["--tiny", "--no-progress", "--out", str(tmp_path)]) == 0
  assert (tmp_path / "language_model.png").stat().st_size > 1000
  res = json.loads((tmp_path / "language_model.json").read_text())
  assert res["experiment"] == "language_model" and res["corpus"]["name"] == "pydoc_topics"
  s = res["summary"]
  assert s["honest_verified"] and s["honest_perplexity"] > 1.0
  assert res["honest_verified"]["violation"] is None and res["honest_verified"]["steps"] == 4
  assert 0.0 <= s["unverified_asr"] <= 1.0 and set(s["unverified_asr_by_clip"]) == {"1.0"}
  assert res["attack_unverified"]["malicious_steps"] == 4 and res["attack_unverified"]["released"]
  v = res["attack_verified"]
  assert s["verified_caught"] and not v["released"] and v["violation"]["type"] == "IntegrityViolation"
  assert v["violation"]["step"] == s["verified_caught_at_step"] == v["first_malicious_step"] + \
      v["malicious_steps_applied"]
  # Every step's witness checked: the attacker is caught at its first step, nothing applied.
  w = res["attack_witness"]
  assert w["violation"]["type"] == "WitnessViolation" and s["witness_caught_at_step"] == 0
  assert w["malicious_steps_applied"] == 0 and not w["released"]
  assert s["witness_check_ms"] > 0 and s["recompute_check_ms"] > 0 and res["witness_plan"]["products"] > 0


def test_one_optax_object_one_update_transform():
  adam = optax.adam(1e-3)  # Runtimes sharing it share one jitted update (no recompile per runtime).
  assert ginn.make_update_transform("global_norm", 1.0, adam) is ginn.make_update_transform("global_norm", 1.0, adam)
  assert ginn.make_update_transform("global_norm", 0.1, adam) is not ginn.make_update_transform("global_norm", 1.0, adam)
