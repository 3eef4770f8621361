"""Offline corpora, a fixed character vocabulary and next-token windows.

The English corpus is Python's own help texts, ``pydoc_data.topics.topics`` (a dict of
79 topics, about 465 KB in Python 3.11), which ships with every CPython
install, so the language-model experiments need no network. The code corpus
(`stdlib_corpus`) is the source of a fixed list of the standard library's own
modules (``Lib/*.py``), which every CPython install has too. The text
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
    train_files, test_files: the files of each part, for a corpus made of
      files (`stdlib_corpus`; empty otherwise).
  """

  name: str
  train_text: str
  test_text: str
  source: str
  train_files: tuple[str, ...] = ()
  test_files: tuple[str, ...] = ()

  @property
  def sha256(self) -> str:
    """Digest of the whole (normalized) text, train then test."""
    return hashlib.sha256((self.train_text + self.test_text).encode()).hexdigest()

  def to_dict(self) -> dict[str, object]:
    out = {"name": self.name, "source": self.source, "sha256": self.sha256,
           "train_chars": len(self.train_text), "test_chars": len(self.test_text)}
    if self.train_files or self.test_files:
      out.update(train_files=list(self.train_files), test_files=list(self.test_files))
    return out


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
  n = _split_at(texts, test_fraction)
  return TextCorpus(name="pydoc_topics", train_text="".join(texts[:n]), test_text="".join(texts[n:]),
                    source=f"pydoc_data.topics.topics (Python {sys.version.split()[0]}, {len(texts)} topics)")


def _split_at(texts: list[str], test_fraction: float) -> int:
  """The number of leading texts that make up about ``1 - test_fraction`` of
  the characters (the rest is the test part)."""
  total = sum(map(len, texts))
  cut, n = 0, 0
  while n < len(texts) and cut + len(texts[n]) <= (1.0 - test_fraction) * total:
    cut += len(texts[n])
    n += 1
  return n


STDLIB_FILES: tuple[str, ...] = (
    "__future__", "_collections_abc", "_compression", "_markupbase", "_osx_support", "_py_abc", "_strptime",
    "_threading_local", "_weakrefset", "abc", "base64", "bdb", "bz2", "cProfile", "calendar", "cmd", "code",
    "codecs", "codeop", "colorsys", "compileall", "contextlib", "copy", "copyreg", "csv", "dis", "filecmp",
    "fileinput", "fnmatch", "fractions", "ftplib", "functools", "genericpath", "getopt", "getpass", "gettext",
    "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "io", "linecache", "lzma", "mimetypes",
    "modulefinder", "netrc", "ntpath", "numbers", "opcode", "operator", "os", "pkgutil", "plistlib", "poplib",
    "posixpath", "pprint", "profile", "pstats", "pty", "py_compile", "pyclbr", "queue", "quopri", "random",
    "reprlib", "rlcompleter", "runpy", "sched", "selectors", "shelve", "shlex", "site", "socket",
    "socketserver", "stat", "string", "symtable", "sysconfig", "tabnanny", "tempfile", "textwrap", "timeit",
    "tokenize", "trace", "tracemalloc", "types", "uuid", "warnings", "wave", "weakref", "webbrowser", "zipapp",
    "zipimport")
"""The standard library modules of `stdlib_corpus` (``Lib/<name>.py``), in
sorted order: the top-level modules of CPython 3.11 of 4 to 40 KB that every
CPython from 3.10 to 3.13 has (none of those PEP 594 removed; no data tables
such as ``stringprep``, no generated ``_sysconfigdata``), 1.6 MB in 3.11."""

STDLIB_FILES_SHA256: str = hashlib.sha256("\n".join(STDLIB_FILES).encode()).hexdigest()
"""SHA-256 of `STDLIB_FILES` joined by newlines: names the file list."""


def stdlib_corpus(*, test_fraction: float = 0.1, stdlib_dir: str | None = None) -> TextCorpus:
  """Python code: the standard library's own source, a fixed list of modules, offline.

  The files of `STDLIB_FILES` (``<stdlib>/<name>.py``), in that (sorted)
  order, each normalized like the help texts (tabs to 4 spaces, typographic
  punctuation to ASCII), stripped and followed by a blank line. The last whole
  files that make up about `test_fraction` of the characters are the test
  part, so no test window shares text with a training window. The list is
  fixed (`STDLIB_FILES_SHA256` names it), the text is the installed Python's:
  `TextCorpus.sha256` says exactly which text a run saw.

  Args:
    test_fraction: share of the characters held out (whole files).
    stdlib_dir: the folder of the standard library (default
      ``sysconfig.get_paths()["stdlib"]``, the running Python's).

  Returns:
    A `TextCorpus` named ``"stdlib_code"`` with its train and test files;
    the same one on every call with the same Python.

  Raises:
    ValueError: `test_fraction` outside (0, 1).
    FileNotFoundError: a listed module is missing (it names it).
  """
  import os
  import sys
  import sysconfig

  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
  root = stdlib_dir or sysconfig.get_paths()["stdlib"]
  texts = []
  for name in STDLIB_FILES:
    path = os.path.join(root, f"{name}.py")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"stdlib_corpus: the standard library module {name}.py is not in {root}")
    with open(path, encoding="utf-8") as f:
      texts.append(normalize(f.read()).strip() + "\n\n")
  n = _split_at(texts, test_fraction)
  files = tuple(f"{name}.py" for name in STDLIB_FILES)
  return TextCorpus(
      name="stdlib_code", train_text="".join(texts[:n]), test_text="".join(texts[n:]),
      source=(f"standard library source (Python {sys.version.split()[0]}, {len(files)} modules of "
              f"ginn_jax STDLIB_FILES, sha256 {STDLIB_FILES_SHA256[:16]})"),
      train_files=files[:n], test_files=files[n:])


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
