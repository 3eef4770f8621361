"""An offline English corpus, a fixed character vocabulary and next-token windows.

The corpus is Python's own help texts, ``pydoc_data.topics.topics`` (a dict of
79 topics, about 465 KB in Python 3.11), which ships with every CPython
install, so the language-model experiments need no network. The text
differs between Python versions: the dataset digest (``ginn_jax.dataset_digest``)
and `TextCorpus.sha256` say exactly which text a run saw.

Tokens are characters of a fixed 97-symbol vocabulary (newline, printable
ASCII, one unknown symbol), so the vocabulary does not depend on the corpus.
A dataset is the pytree ``{"tokens": int32 (N, L + 1)}``: each row is a window
whose first L tokens are the input and whose last L are the targets.
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

# Typographic punctuation of the corpus, written in ASCII before tokenizing.
_ASCII_FOLD = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "--",
               "\u2026": "...", "\t": "    "}

VOCAB: str = "\n" + "".join(chr(c) for c in range(32, 127))
"""The characters with a token of their own (token i is ``VOCAB[i]``)."""
UNK: int = len(VOCAB)
"""The token of every other character (decoded as ``UNK_CHAR``)."""
UNK_CHAR: str = "\ufffd"
VOCAB_SIZE: int = len(VOCAB) + 1

_TABLE = np.full(128, UNK, np.int32)
_TABLE[[ord(c) for c in VOCAB]] = np.arange(len(VOCAB), dtype=np.int32)


def encode(text: str) -> np.ndarray:
  """Token ids (int32) of `text`: one per character, `UNK` outside `VOCAB`.

  Example:
    >>> decode(encode("x = 1\\n")) == "x = 1\\n"
    True
  """
  codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
  return np.where(codes < 128, _TABLE[np.minimum(codes, 127)], UNK).astype(np.int32)


def decode(tokens) -> str:
  """The text of `tokens` (`UNK` becomes ``UNK_CHAR``)."""
  return "".join(VOCAB[t] if 0 <= t < UNK else UNK_CHAR for t in np.asarray(tokens).tolist())


def normalize(text: str) -> str:
  """Folds typographic quotes, dashes, ellipses and tabs into ASCII."""
  for k, v in _ASCII_FOLD.items():
    text = text.replace(k, v)
  return text


@dataclasses.dataclass(frozen=True)
class TextCorpus:
  """A text split into a training and a test part.

  Attributes:
    name: where the text came from.
    train_text, test_text: the two parts (normalized).
    source: a note on the package and version the text came from.
  """

  name: str
  train_text: str
  test_text: str
  source: str

  @property
  def sha256(self) -> str:
    """Digest of the whole (normalized) text, train then test."""
    return hashlib.sha256((self.train_text + self.test_text).encode()).hexdigest()

  def to_dict(self) -> dict[str, object]:
    return {"name": self.name, "source": self.source, "sha256": self.sha256,
            "train_chars": len(self.train_text), "test_chars": len(self.test_text)}


def pydoc_corpus(*, test_fraction: float = 0.1) -> TextCorpus:
  """Python's help texts (``pydoc_data.topics``) as one corpus, offline.

  The topics are joined in sorted order of their names, separated by a blank
  line; the last `test_fraction` of the characters (cut at a topic boundary)
  is the test part, so no test window shares text with a training window.

  Args:
    test_fraction: share of the characters held out.

  Returns:
    A `TextCorpus`; the same one on every call with the same Python.
  """
  import sys

  from pydoc_data import topics

  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
  texts = [normalize(topics.topics[k]).strip() + "\n\n" for k in sorted(topics.topics)]
  total = sum(map(len, texts))
  cut, n = 0, 0
  while n < len(texts) and cut + len(texts[n]) <= (1.0 - test_fraction) * total:
    cut += len(texts[n])
    n += 1
  return TextCorpus(name="pydoc_topics", train_text="".join(texts[:n]), test_text="".join(texts[n:]),
                    source=f"pydoc_data.topics.topics (Python {sys.version.split()[0]}, {len(texts)} topics)")


def windows(text: str, length: int, *, stride: int | None = None) -> dict[str, np.ndarray]:
  """Next-token windows of `text`: ``{"tokens": int32 (N, length + 1)}``.

  Row i is ``encode(text)[i * stride : i * stride + length + 1]``; the default
  stride `length` makes every token a target exactly once.

  Args:
    text: the text.
    length: context length L (inputs per row).
    stride: characters between row starts (default `length`).

  Returns:
    The dataset pytree (rows in text order; the runtime shuffles).

  Raises:
    ValueError: the text is shorter than one window.
  """
  stride = stride or length
  ids = encode(text)
  n = (len(ids) - length - 1) // stride + 1
  if len(ids) < length + 1 or n < 1:
    raise ValueError(f"text of {len(ids)} characters is shorter than one window of {length + 1}")
  idx = np.arange(n)[:, None] * stride + np.arange(length + 1)[None, :]
  return {"tokens": ids[idx].astype(np.int32)}
