"""A hardened test runtime (STYLE.md 9): two CPU devices, strict dtype
promotion, key-reuse checks, explicit transfers only.

Which values differ between machines (float bits, so report digests, so
coins) and how the tests hold on every machine anyway: tests/README.md. The
helpers for it are at the end of this file."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()
os.environ.setdefault("TQDM_DISABLE", "1")

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_debug_key_reuse", True)
jax.config.update("jax_transfer_guard", "disallow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import ginn_jax as ginn  # noqa: E402


def pytest_configure(config):
  assert len(jax.devices("cpu")) >= 2, "tests need two CPU devices (XLA_FLAGS was set too late)"


def pytest_collection_modifyitems(config, items):
  """Tests marked `benchmark` run only when selected (``-m benchmark``)."""
  if "benchmark" in (config.getoption("markexpr") or ""):
    return
  skip = pytest.mark.skip(reason="a benchmark: run it with -m benchmark")
  for item in items:
    if "benchmark" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="session")
def mnist5k():
  return ginn.load_dataset("mnist5k")


@pytest.fixture(scope="session")
def small_data(mnist5k):
  """512 training images of mnist5k: enough for the protocol tests."""
  return mnist5k.train_images[:512], mnist5k.train_labels[:512]


@pytest.fixture(scope="session")
def mlp():
  return ginn.get_model("mlp", input_shape=(28, 28, 1))


def tree_bytes(tree) -> list[bytes]:
  """Bytes of every leaf (for bitwise comparisons of trusted state)."""
  return [np.asarray(jax.device_get(x)).tobytes() for x in jax.tree_util.tree_leaves(tree)]


_key = jax.jit(jax.random.key)


def make_key(seed: int, device=None) -> jax.Array:
  """A typed key on `device` (cpu:0 by default), made without implicit transfers."""
  device = device or jax.devices("cpu")[0]
  return _key(jax.device_put(np.uint32(seed), device))


# -- coins that do not depend on the machine (tests/README.md) ------------------------------


def coin_draws(secret: bytes, config, step: int, digest_hex: str):
  """The checks that the coin functions draw for a step whose committed report
  digest is `digest_hex`: ``(check, shards, witness_shards)`` as a transcript
  entry records them ("recompute", "witness", "recompute+witness" or "";
  the drawn shards' indices, None without shards)."""
  from ginn_jax._src.trusted import keys

  k = keys.audit_keys(secret)
  digest = bytes.fromhex(digest_hex)
  S = config.num_shards
  coins = keys.shard_verification_coins(k, step, digest, config.p, S)
  wcoins = keys.shard_witness_coins(k, step, digest, config.p_witness, S)
  check = "+".join(name for name, on in (("recompute", any(coins)), ("witness", any(wcoins))) if on)
  if S == 1:
    return check, None, None
  return check, [s for s, c in enumerate(coins) if c], [s for s, c in enumerate(wcoins) if c]


def assert_coins_as_drawn(secret: bytes, config, transcript) -> list[str]:
  """Every step entry of `transcript` was checked exactly as its own digest's
  coins say (whatever those digests are on this machine); returns the checks."""
  steps = [e for e in transcript if e.kind == "step"]
  assert steps
  for e in steps:
    check, shards, wshards = coin_draws(secret, config, e.step, e.digest)
    assert (e.check, e.shards, e.witness_shards, e.verified) == (check, shards, wshards, bool(check)), e
  return [e.check for e in steps]


EXACT_ROW = np.array([3, -1, 4, 1, -5, 9, 2, -6, 5, 3, -5, 8, 9, -7, 9, 3], np.float32)


def exact_model():
  """A linear probe whose reports are exact in float32 on every machine: the
  gradient is the batch mean of the examples and the loss is 0.0
  (``(w - w) . mean``, whatever w). On `exact_data`, where every example is
  `EXACT_ROW`, each shard's gradient is `EXACT_ROW` itself (a sum of equal
  small integers, then a power of two divides it: no rounding in any order),
  so a report's digest depends on its step alone (`exact_digest`), not on the
  machine, the batch order or the jax version; and so do its coins."""
  import jax.numpy as jnp

  def init(key):
    del key
    return {"w": jnp.zeros(EXACT_ROW.shape, jnp.float32)}

  def loss(params, batch, *, key):
    del key
    w = params["w"]
    return jnp.vdot(w - jax.lax.stop_gradient(w), batch["x"].mean(axis=0))

  return ginn.PureModel("exact_probe", init, loss)


def exact_data(n: int = 256) -> dict[str, np.ndarray]:
  """`exact_model`'s training set: `n` copies of `EXACT_ROW`."""
  return {"x": np.tile(EXACT_ROW, (n, 1))}


def exact_poison(batch):
  """A poisoning of `exact_data` batches: every gradient entry moves by 1."""
  return {"x": batch["x"] + 1}


def exact_digest(step: int, *, name: str, num_shards: int = 1, poisoned=()) -> str:
  """The report digest of `exact_model` on `exact_data` at `step` (hex),
  computed on the host: `poisoned` shards carry `exact_poison`'s gradient."""
  from ginn_jax._src.trusted import commit

  rows = [EXACT_ROW + (1 if s in poisoned else 0) for s in range(num_shards)]
  grads = rows[0] if num_shards == 1 else np.stack(rows)
  loss = np.float32(0) if num_shards == 1 else np.zeros(num_shards, np.float32)
  return commit.report_digest(step, [grads.astype(np.float32)], loss, name=name).hex()
