"""Progress bars that suit where the output goes.

On a terminal: a tqdm bar, redrawn in place. Anywhere else (CI, ``nohup``, a
file, a notebook that captures stderr): a redrawn bar is hundreds of lines of
carriage returns in the log, so `LogProgress` prints a few plain lines
instead: one at about every tenth of the work (and at most one every
`min_interval_s` seconds for work of unknown size), and a last one at the end.
``TQDM_DISABLE=1`` turns both off.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable

from tqdm.auto import tqdm


def _stderr_is_terminal() -> bool:
  try:
    return sys.stderr.isatty()
  except (AttributeError, ValueError):  # Closed or replaced stderr.
    return False


class LogProgress:
  """The tqdm methods the library uses (`update`, `set_postfix`, `close`,
  iteration), printing a handful of lines to stderr instead of redrawing.

  Args:
    iterable: iterate over it, counting one step per item (optional).
    total: the amount of work (None: unknown).
    desc: the label of each line.
    initial: work already done (a resumed run).
    lines: about how many lines a run of known size prints, besides the last.
    min_interval_s: the least time between two lines.
  """

  def __init__(self, iterable: Iterable | None = None, *, total: int | None = None,
               desc: str = "", initial: int = 0, lines: int = 10, min_interval_s: float = 30.0,
               file=None):
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
      total = len(iterable)
    self.iterable, self.total, self.desc, self.n = iterable, total, desc, initial
    self._every = max(1, (total - initial) // lines) if total else None
    self._next = initial + self._every if self._every else None
    self._min_interval = min_interval_s
    self._start = self._last = time.perf_counter()
    self._postfix = ""
    self._file = file
    self._closed = False

  def __iter__(self):
    for item in self.iterable:
      yield item
      self.update(1)
    self.close()

  def update(self, n: int = 1) -> None:
    self.n += n
    now = time.perf_counter()
    if self._next is not None:  # Known size: a line at about every tenth.
      if self.n < self._next:
        return
      while self._next <= self.n:
        self._next += self._every
    elif now - self._last < self._min_interval:  # Unknown size: by time.
      return
    self._print(now)

  def set_postfix(self, refresh: bool = False, **kwargs: Any) -> None:
    del refresh  # Lines are printed on `update` only.
    self._postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self._print(time.perf_counter(), last=True)

  def _print(self, now: float, last: bool = False) -> None:
    self._last = now
    done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
    pct = f" ({100 * self.n // self.total}%)" if self.total else ""
    post = f", {self._postfix}" if self._postfix else ""
    end = " done" if last and self.total and self.n >= self.total else ""
    print(f"{self.desc}: {done}{pct} in {now - self._start:.0f} s{post}{end}",
          file=self._file or sys.stderr, flush=True)


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
        enabled: bool = True, initial: int = 0, leave: bool = False):
  """A progress bar for `total` steps: tqdm on a terminal, `LogProgress` on
  anything else, a silent tqdm when not `enabled` (or ``TQDM_DISABLE`` set)."""
  if not enabled or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
    return tqdm(iterable, total=total, disable=True)
  if _stderr_is_terminal():
    return tqdm(iterable, total=total, desc=desc, initial=initial, leave=leave, dynamic_ncols=True)
  return LogProgress(iterable, total=total, desc=desc, initial=initial)
