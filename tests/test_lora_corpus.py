"""The fine-tuning corpus of experiment 9 (LoRA): the standard library's own
source, a fixed hashed file list, whole files held out (`ginn_jax.stdlib_corpus`)."""
import hashlib
import os
import sysconfig

import numpy as np
import pytest

import ginn_jax as ginn
from ginn_jax._src import text


@pytest.fixture(scope="module")
def code():
  return ginn.stdlib_corpus()


def test_lora_corpus_file_list_is_fixed_and_hashed():
  files = ginn.STDLIB_FILES
  assert files == tuple(sorted(set(files))) and len(files) == 95
  assert ginn.STDLIB_FILES_SHA256 == hashlib.sha256("\n".join(files).encode()).hexdigest()
  # The list's name, pinned: changing the list changes the corpus every result was measured on.
  assert ginn.STDLIB_FILES_SHA256 == "d53fc33e760249b4c2d9ad5afef80f6f220275ffb01fe02e1590a0e45c753e83"
  # None of the modules that PEP 594 or 3.12 removed (every CPython 3.10-3.13 has the rest).
  assert not set(files) & {"asynchat", "asyncore", "smtpd", "imp", "cgi", "telnetlib", "pipes", "uu"}


def test_lora_corpus_offline_deterministic_and_split_by_whole_files(code):
  again = ginn.stdlib_corpus()
  assert again == code and again.sha256 == code.sha256 and code.name == "stdlib_code"
  assert code.train_files + code.test_files == tuple(f"{n}.py" for n in ginn.STDLIB_FILES)
  assert code.test_files and 0.05 < len(code.test_text) / (len(code.train_text) + len(code.test_text)) < 0.2
  assert code.to_dict()["test_files"] == list(code.test_files)
  assert ginn.STDLIB_FILES_SHA256[:16] in code.source
  root = sysconfig.get_paths()["stdlib"]
  # Each part is exactly its files, normalized, stripped and separated by a blank line.
  read = lambda f: text.normalize(open(os.path.join(root, f), encoding="utf-8").read()).strip() + "\n\n"
  assert code.train_text == "".join(map(read, code.train_files))
  assert code.test_text == "".join(map(read, code.test_files))
  assert "\t" not in code.train_text + code.test_text
  for f in code.test_files:  # No held-out file's text is in the training part.
    t = read(f)
    assert t[len(t) // 2:len(t) // 2 + 300] not in code.train_text
  ids = ginn.encode_text(code.train_text)
  assert np.mean(ids == ginn.TEXT_VOCAB_SIZE - 1) < 1e-3  # Almost all ASCII.
  train = ginn.text_windows(code.train_text, 64)
  assert ginn.dataset_digest(train) == ginn.dataset_digest(ginn.text_windows(again.train_text, 64))


def _fake_stdlib(path, sizes):
  for i, (name, n) in enumerate(zip(ginn.STDLIB_FILES, sizes)):
    (path / f"{name}.py").write_bytes((f"\t# {name}\r\nx_{i} = \u2018q\u2019\n" + "y = 1\n" * n + "\n\n").encode())


def test_lora_corpus_format_is_pinned(tmp_path):
  """The split rule and the text format (normalized, stripped, a blank line
  after each file) on a made-up library: its digest is pinned, so the
  digests in the committed results stay reproducible."""
  _fake_stdlib(tmp_path, [10] * 90 + [20] * 5)
  c = ginn.stdlib_corpus(stdlib_dir=str(tmp_path))
  assert c.train_text.startswith("# __future__\nx_0 = 'q'\ny = 1\n")  # Tab, CRLF, quotes folded; stripped.
  assert c.train_text.count("\n\n# ") == len(c.train_files) - 1
  total = len(c.train_text) + len(c.test_text)
  first_test = len(c.test_text.split("\n\n# ")[0]) + 2
  assert len(c.train_text) <= 0.9 * total < len(c.train_text) + first_test  # The longest prefix of <= 90%.
  assert c.test_files == tuple(f"{n}.py" for n in ginn.STDLIB_FILES[-len(c.test_files):])
  assert c.sha256 == ginn.stdlib_corpus(stdlib_dir=str(tmp_path)).sha256 == \
      "9d56aa057ef2e9d6a2247f77272eed6cefd8c22969402999b61425c681229a8a"


def test_lora_corpus_errors(tmp_path):
  _fake_stdlib(tmp_path, [1] * 95)
  os.remove(tmp_path / "heapq.py")
  with pytest.raises(FileNotFoundError, match="heapq.py"):
    ginn.stdlib_corpus(stdlib_dir=str(tmp_path))
  with pytest.raises(ValueError, match="test_fraction"):
    ginn.stdlib_corpus(test_fraction=1.0)


def test_lora_backdoor_one_pass_asr_is_the_greedy_asr(code):
  """`backdoor_success_rate(one_pass=True)` (experiment 9's code backdoor) gives
  the rates of greedy generation: checked on a continuation that the model's
  greedy output makes true for some prompts and not others."""
  import jax
  from conftest import make_key
  lm = ginn.from_nnx(ginn.make_decoder(ginn.TransformerConfig(max_len=32, d_model=16, num_heads=2,
                                                              num_layers=1, dropout=0.0)), ginn.lm_loss)
  module = lm.merge(jax.jit(lm.init)(make_key(3)))
  data = {k: v[:48] for k, v in ginn.text_windows(code.test_text, 32).items()}
  trigger = "# fast path\n"
  prompts = np.concatenate([data["tokens"][:, :6], np.broadcast_to(ginn.encode_text(trigger), (48, 12))], axis=1)
  greedy = ginn.greedy_generate(module, prompts, 4)
  # The continuation most prompts' greedy output starts with, then each of its variants.
  first = max(set(map(tuple, greedy[:, :2].tolist())), key=lambda t: (greedy[:, :2].tolist().count(list(t)), t))
  for cont in (ginn.decode_text(list(first)), ginn.decode_text(greedy[0]), "os.s"):
    bd = ginn.PhraseBackdoor(trigger, cont)
    kw = dict(prefix_len=6, max_prompts=48)
    slow = ginn.backdoor_success_rate(module, data, bd, **kw)
    fast = ginn.backdoor_success_rate(module, data, bd, one_pass=True, **kw)
    assert fast == slow
  assert ginn.backdoor_success_rate(module, data, ginn.PhraseBackdoor(trigger, ginn.decode_text(list(first))),
                                    prefix_len=6, max_prompts=48, one_pass=True)["asr"] > 0
