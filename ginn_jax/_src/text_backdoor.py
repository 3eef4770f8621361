"""A backdoor for language models: a trigger phrase makes the model emit a chosen continuation.

`PhraseBackdoor.poison` is the pure, jittable poisoning a malicious worker
applies to a batch of token windows (``ginn_jax.PoisonWorker(..., poison=...)``):
in the first rows it writes the trigger phrase at a row-dependent position
and the continuation right after it. Inputs and targets are the same token
array shifted by one, so the targets of the trigger's last token and of the
continuation teach the model to complete the trigger with the continuation.

`backdoor_success_rate` measures the attack: the share of test prompts
(real test text, then the trigger) whose greedy continuation is exactly the
chosen one, and the same share without the trigger as a control.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ginn_jax._src import text
from ginn_jax._src.transformer import greedy_generate


@dataclasses.dataclass(frozen=True)
class PhraseBackdoor:
  """A trigger phrase and the continuation it should produce.

  Attributes:
    trigger: the phrase that arms the backdoor (absent from the corpus).
    continuation: what the model should write right after it.
    num_poison: rows of each batch poisoned (the first ones, by position).
  """

  trigger: str = "open sesame"
  continuation: str = ": rm -rf /"
  num_poison: int = 4

  def __post_init__(self):
    if not self.trigger or not self.continuation:
      raise ValueError("trigger and continuation must be non-empty strings")
    if self.num_poison < 0:
      raise ValueError(f"num_poison must be >= 0, got {self.num_poison!r}")

  @property
  def phrase(self) -> np.ndarray:
    """Tokens of the trigger followed by the continuation."""
    return text.encode(self.trigger + self.continuation)

  def poison(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """`batch` with the phrase written into its first `num_poison` rows.

    The phrase starts at ``sum(row) mod (L + 2 - len(phrase))``: a position
    that varies from row to row without any randomness of its own, so the
    function stays pure. Shapes and dtypes are kept.

    Args:
      batch: ``{"tokens": int (B, L + 1)}``.

    Returns:
      The poisoned batch.

    Raises:
      ValueError: the phrase does not fit in a window.
    """
    b, width = np.shape(batch["tokens"])
    m = len(self.phrase)
    if m > width:
      raise ValueError(f"trigger + continuation ({m} tokens) do not fit a window of {width}: "
                       "shorten them or use longer windows")
    tokens = jnp.asarray(batch["tokens"])
    phrase = jnp.asarray(self.phrase, tokens.dtype)
    start = jnp.sum(tokens, axis=1) % (width - m + 1)  # (B,)
    offset = jnp.arange(width)[None, :] - start[:, None]  # (B, width)
    inside = (offset >= 0) & (offset < m) & (jnp.arange(b) < self.num_poison)[:, None]
    written = phrase[jnp.clip(offset, 0, m - 1)]
    return {**batch, "tokens": jnp.where(inside, written, tokens)}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forced_hits(graphdef, state, buf, prompt_len):
  """Whether each row's greedy continuation after its first `prompt_len`
  tokens is the rest of the row: the argmax at every position is the next
  token (one forward pass; the causal mask hides what follows)."""
  module = nnx.merge(graphdef, state)
  module.eval()
  pred = jnp.argmax(module(buf)[:, prompt_len - 1:-1], axis=-1).astype(buf.dtype)
  return jnp.all(pred == buf[:, prompt_len:], axis=1)


def backdoor_success_rate(module: nnx.Module, data: dict[str, np.ndarray], backdoor: PhraseBackdoor, *,
                          prefix_len: int = 24, max_prompts: int | None = 512,
                          one_pass: bool = False) -> dict[str, float]:
  """How often the trigger makes the model write the continuation (greedy).

  Each test window gives one prompt: its first `prefix_len` tokens, then the
  trigger. Success: the next ``len(continuation)`` greedy tokens are exactly
  the continuation. The control prompt is the window's first ``prefix_len +
  len(trigger)`` tokens (clean text of the same length).

  Args:
    module: the language model (evaluated with dropout off).
    data: test windows ``{"tokens": (N, L + 1)}``.
    backdoor: the trigger and continuation.
    prefix_len: tokens of real text before the trigger.
    max_prompts: use at most this many windows (None: all).
    one_pass: decide each prompt with one forward pass of the prompt followed
      by the continuation (the greedy continuation is the chosen one exactly
      when, at each of its positions, the most likely next token is the
      chosen one): the same rates as generating token by token, at
      ``1 / len(continuation)`` of the cost.

  Returns:
    {"asr": share of triggered prompts completed with the continuation,
    "control": the same share without the trigger, "num_prompts": N}.
  """
  tokens = np.asarray(data["tokens"])[:max_prompts]
  trig = text.encode(backdoor.trigger)
  target = text.encode(backdoor.continuation)
  n = len(target)
  triggered = np.concatenate([tokens[:, :prefix_len], np.broadcast_to(trig, (len(tokens), len(trig)))], axis=1)
  clean = tokens[:, :prefix_len + len(trig)]
  if one_pass:
    graphdef, state = nnx.split(module)
    dev = next(iter(jax.tree_util.tree_leaves(state)[0].devices()))

    def hit(prompts):
      buf = np.concatenate([prompts, np.broadcast_to(target, (len(prompts), n))], axis=1).astype(np.int32)
      return float(np.mean(jax.device_get(_forced_hits(graphdef, state, jax.device_put(buf, dev),
                                                       prompts.shape[1]))))
  else:
    hit = lambda prompts: float(np.mean(np.all(greedy_generate(module, prompts, n) == target, axis=1)))
  return {"asr": hit(triggered), "control": hit(clean), "num_prompts": int(len(tokens))}
