"""A small decoder-only transformer in flax NNX, its loss, generation and perplexity.

`DecoderLM` is a GPT-style character model: token and learned position
embeddings, pre-LayerNorm blocks of causal multi-head self-attention and a GELU
MLP, a final LayerNorm and an untied output projection. Its only state is
`nnx.Param` and, with dropout, the RNG stream of `nnx.Dropout` (which the
protocol reseeds from each step's layer key, so a step stays a pure function
of params, batch and key).

`lm_loss(module, batch)` is the NNX-style loss that ``ginn_jax.from_nnx``
takes; `perplexity` and `greedy_generate` evaluate a module (always in
evaluation mode: dropout off).

Example:
  >>> from flax import nnx
  >>> import numpy as np
  >>> m = DecoderLM(TransformerConfig(d_model=16, num_heads=2, num_layers=1, max_len=8),
  ...               rngs=nnx.Rngs(0))
  >>> batch = {"tokens": np.zeros((2, 9), np.int32)}
  >>> lm_loss(m, batch).shape
  ()
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ginn_jax._src.text import VOCAB_SIZE


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Shape of a `DecoderLM`.

  Attributes:
    vocab_size: number of token ids.
    max_len: longest input (context length L).
    d_model: width of the residual stream.
    num_heads: attention heads (must divide `d_model`).
    num_layers: transformer blocks.
    mlp_ratio: MLP hidden width over `d_model`.
    dropout: dropout rate after attention and MLP (0 for none).
  """

  vocab_size: int = VOCAB_SIZE
  max_len: int = 64
  d_model: int = 128
  num_heads: int = 4
  num_layers: int = 2
  mlp_ratio: int = 4
  dropout: float = 0.0

  def __post_init__(self):
    if self.d_model % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide d_model={self.d_model}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


class CausalSelfAttention(nnx.Module):
  """Multi-head self-attention in which position i sees positions <= i."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.qkv = nnx.Linear(cfg.d_model, 3 * cfg.d_model, rngs=rngs)
    self.out = nnx.Linear(cfg.d_model, cfg.d_model, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    h = self.num_heads
    q, k, v = jnp.split(self.qkv(x).reshape(b, n, 3, h, d // h), 3, axis=2)
    q, k, v = (t[:, :, 0].transpose(0, 2, 1, 3) for t in (q, k, v))  # (b, h, n, d/h)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // h).astype(np.float32)
    causal = jnp.tril(jnp.ones((n, n), bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    y = jax.nn.softmax(scores, axis=-1) @ v
    return self.out(y.transpose(0, 2, 1, 3).reshape(b, n, d))


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.attn = CausalSelfAttention(cfg, rngs=rngs)
    self.ln2 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.fc1 = nnx.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, rngs=rngs)
    self.fc2 = nnx.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, rngs=rngs)
    self.drop = nnx.Dropout(cfg.dropout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.drop(self.attn(self.ln1(x)))
    return x + self.drop(self.fc2(jax.nn.gelu(self.fc1(self.ln2(x)))))


class DecoderLM(nnx.Module):
  """Decoder-only transformer: ``module(tokens int (B, n)) -> logits (B, n, vocab)``, n <= max_len."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.max_len, cfg.d_model)))
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.head = nnx.Linear(cfg.d_model, cfg.vocab_size, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    n = tokens.shape[-1]
    if n > self.cfg.max_len:
      raise ValueError(f"input of {n} tokens is longer than max_len={self.cfg.max_len}")
    x = self.embed(tokens) + self.pos[:n]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln_f(x))


def make_decoder(cfg: TransformerConfig):
  """``make(rngs) -> DecoderLM(cfg, rngs=rngs)``, the constructor ``ginn_jax.from_nnx`` takes."""

  def make(rngs: nnx.Rngs) -> DecoderLM:
    return DecoderLM(cfg, rngs=rngs)

  return make


def token_nll(module: nnx.Module, tokens: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood (B, L) of windows ``tokens`` (B, L + 1)."""
  logits = module(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])


def lm_loss(module: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
  """Mean next-token cross-entropy (nats) of ``batch["tokens"]`` (B, L + 1)."""
  return token_nll(module, batch["tokens"]).mean()


@functools.partial(jax.jit, static_argnums=0)
def _sum_nll(graphdef, state, tokens):
  module = nnx.merge(graphdef, state)
  module.eval()
  return token_nll(module, tokens).sum()


def perplexity(module: nnx.Module, data: dict[str, np.ndarray], *, batch_size: int = 256) -> float:
  """exp(mean next-token NLL) over every target token of `data` (dropout off).

  Args:
    module: the language model.
    data: ``{"tokens": (N, L + 1)}`` windows.
    batch_size: windows per evaluation call.

  Returns:
    The perplexity (1 is perfect; `vocab_size` is a uniform guess).
  """
  graphdef, state = nnx.split(module)
  dev = _device_of(state)
  tokens = np.asarray(data["tokens"])
  total = 0.0
  for i in range(0, len(tokens), batch_size):
    total += float(jax.device_get(_sum_nll(graphdef, state, jax.device_put(tokens[i:i + batch_size], dev))))
  return float(np.exp(total / (tokens.shape[0] * (tokens.shape[1] - 1))))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _greedy(graphdef, state, prompts, num_tokens):
  module = nnx.merge(graphdef, state)
  module.eval()
  b, p = prompts.shape
  buf = jnp.concatenate([prompts, jnp.zeros((b, num_tokens), prompts.dtype)], axis=1)

  def body(i, buf):
    logits = jax.lax.dynamic_index_in_dim(module(buf), p + i - 1, axis=1, keepdims=False)
    nxt = jnp.argmax(logits, axis=-1).astype(buf.dtype)
    return jax.lax.dynamic_update_slice_in_dim(buf, nxt[:, None], p + i, axis=1)

  return jax.lax.fori_loop(0, num_tokens, body, buf)[:, p:]


def greedy_generate(module: nnx.Module, prompts, num_tokens: int) -> np.ndarray:
  """The `num_tokens` most likely next tokens after each prompt, one at a time.

  The causal mask makes the zeros after the prompt invisible, so every step
  runs one fixed-shape forward pass (jitted once per shape).

  Args:
    module: the language model (run with dropout off).
    prompts: int tokens (B, P), P + num_tokens <= max_len.
    num_tokens: tokens to generate.

  Returns:
    int32 (B, num_tokens).
  """
  graphdef, state = nnx.split(module)
  prompts = np.asarray(prompts, np.int32)
  if prompts.shape[1] + num_tokens > module.cfg.max_len:
    raise ValueError(f"prompt of {prompts.shape[1]} plus {num_tokens} tokens exceeds "
                     f"max_len={module.cfg.max_len}: shorten the prompt")
  out = _greedy(graphdef, state, jax.device_put(prompts, _device_of(state)), num_tokens)
  return np.asarray(jax.device_get(out))


def _device_of(state) -> jax.Device:
  leaf = jax.tree_util.tree_leaves(state)[0]
  return next(iter(leaf.devices())) if isinstance(leaf, jax.Array) else jax.devices("cpu")[0]
