"""The trusted runtime: the TEE's side of one GINN step (docs/design.md section 4).

Pure pieces (`init_state`, `apply_update`) and a thin stateful shell,
`TrustedRuntime`, that issues work orders and takes reports::

    rt = TrustedRuntime(model, data, config)  # data: any pytree, or images, labels
    order = rt.next_order()          # -> the worker
    entry = rt.submit(worker(order), witness=worker.witness)
                                     # validate, commit, coins, (challenge), update, verify

`submit` is all-or-nothing: a rejected report or a failed verification leaves
parameters, optimizer state, step and transcript exactly as they were.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import queue
import threading
import time
from typing import Any, Callable, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ginn_jax._src import errors
from ginn_jax._src import finetune
from ginn_jax._src import shards as shards_lib
from ginn_jax._src.boundary import (GradientReport, ProjectionRequest, Projections, Witness, WitnessRequest,
                                    WorkOrder)
from ginn_jax._src.data import as_training_data, dataset_digest, num_examples
from ginn_jax._src.devices import trusted_device
from ginn_jax._src.models import Model
from ginn_jax._src.step import DeviceGradFn, DeviceWitnessFn, step_program
from ginn_jax._src.trusted import commit, keys, verify
from ginn_jax._src.trusted import program_check
from ginn_jax._src.trusted import projection as projection_lib
from ginn_jax._src.trusted import witness as witness_lib
from ginn_jax._src.trusted.verifier import Check, CheckResult, Verifier
from ginn_jax._src.trusted.transforms import ClipMode, Optimizer, OptimizerConfig, OptimizerSpec
from ginn_jax._src.trusted.transforms import make_update_transform, optimizer_from_dict, optimizer_to_dict
from ginn_jax._src.types import Batch, Params


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
  """Public settings of a verified run (all recorded in the transcript).

  Attributes:
    seed: the public training seed (init, data order, layer randomness).
    batch_size: examples per step.
    p: probability that a step is re-computed by the trusted runtime.
    p_witness: probability that a step's witness is asked for and checked
      (Freivalds, docs/design.md section 10); drawn independently of `p`.
      Works for any model: the witness is derived from the step's own
      gradient program (docs/design.md section 12).
    witness_timeout_s: a witness that takes longer than this to arrive is a
      violation (None: no deadline); with shards, each challenged shard's
      witness has this long.
    clip: "elementwise" (the paper), "global_norm" or "none".
    clip_value: the clip bound C.
    optimizer: the optimizer after the clip, recorded in the header: an
      `OptimizerConfig` (SGD with momentum and weight decay, the default) or
      an `OptimizerSpec` (a named optax optimizer, e.g. adam or adamw, with
      its hyperparameters and learning-rate schedule). An optax
      transformation that has no name goes to `TrustedRuntime(optimizer=...)`
      instead (a run that is not persisted).
    num_shards: S, the shards each step's batch is cut into (docs/design.md,
      "Shards"; `batch_size` must be a multiple). With S > 1 the worker
      reports each shard's gradient (a leading shard axis, e.g.
      `ShardedWorker`), the trusted update clips each shard before averaging
      them, and each shard has its own coins (re-computation and witness):
      only sampled shards are re-computed or witness-checked. 1 (the
      default) is a run without shards.
    shard_mode: with S > 1, ``"per_shard"`` (the worker reports every
      shard's gradient, as above) or ``"aggregate"`` (docs/design.md section
      11.2: the worker reports their mean and the S losses; the trusted side
      clips and applies the mean like a report without shards, then checks
      it with a secret projection challenge, `ginn_jax.ProjectionRequest`,
      before drawing the shard coins). None (the default) means
      ``"aggregate"`` for S > 1; with one shard the field reads
      ``"per_shard"`` (the modes coincide). The clip bounds a malicious
      step by 2C in ``"aggregate"`` mode and by 2C/S per corrupted shard in
      ``"per_shard"`` mode (`ginn_jax.analysis`). The projection answer has
      `witness_timeout_s` to arrive.
  """

  seed: int = 0
  batch_size: int = 64
  p: float = 0.1
  p_witness: float = 0.0
  witness_timeout_s: float | None = 60.0
  clip: ClipMode = "elementwise"
  clip_value: float | None = 0.01
  optimizer: Optimizer = OptimizerConfig()
  num_shards: int = 1
  shard_mode: str | None = None

  def __post_init__(self):
    if not isinstance(self.optimizer, (OptimizerConfig, OptimizerSpec)):
      raise TypeError(
          f"ProtocolConfig.optimizer must be an OptimizerConfig or an OptimizerSpec (which a run "
          f"header records), got {type(self.optimizer).__name__}; name an optax optimizer with "
          "ginn.OptimizerSpec(name, **hyperparameters), or pass an optax transformation to "
          "TrustedRuntime(optimizer=...) for a run that is not persisted")
    for name in ("p", "p_witness"):
      v = getattr(self, name)
      if isinstance(v, bool) or not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {v!r}")
    t = self.witness_timeout_s
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0):
      raise ValueError(f"witness_timeout_s must be a positive number or None, got {t!r}")
    if not (isinstance(self.batch_size, int) and self.batch_size > 0):
      raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
    shards_lib.check_num_shards(self.batch_size, self.num_shards)
    object.__setattr__(self, "num_shards", int(self.num_shards))  # (A numpy int would not go to JSON.)
    object.__setattr__(self, "shard_mode", shards_lib.resolve_shard_mode(self.shard_mode, self.num_shards))

  @property
  def aggregate(self) -> bool:
    """Whether the run reports the shards' mean (S > 1, ``"aggregate"``)."""
    return self.num_shards > 1 and self.shard_mode == shards_lib.AGGREGATE

  def to_dict(self) -> dict[str, Any]:
    """JSON form; without ``num_shards`` when it is 1 and without
    ``shard_mode`` unless it is ``"aggregate"`` (as before they existed, so
    headers of runs without shards and of per-shard runs are unchanged: a
    header without ``shard_mode`` means ``"per_shard"``, `from_header_dict`)."""
    d = dataclasses.asdict(self)
    d["optimizer"] = optimizer_to_dict(self.optimizer)  # (An OptimizerConfig: its fields, as before.)
    if d["num_shards"] == 1:
      del d["num_shards"]
    if not self.aggregate:
      del d["shard_mode"]
    return d

  @classmethod
  def from_header_dict(cls, d: dict[str, Any]) -> "ProtocolConfig":
    """Inverse of `to_dict` (a run header's ``config``): a header without
    ``shard_mode`` was written by a per-shard run (or one without shards)."""
    d = dict(d)
    d.setdefault("shard_mode", shards_lib.PER_SHARD)
    d["optimizer"] = optimizer_from_dict(d.get("optimizer"))
    return cls(**d)


@flax.struct.dataclass
class TrainState:
  """Trusted training state; the step counter lives inside it."""

  step: int = flax.struct.field(pytree_node=False)
  params: Params
  opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class TranscriptEntry:
  """One record of the transcript.

  ``kind == "step"``: an accepted (or, synchronously, violating) report; its
  `outcome` is "unverified" (no coin drawn), "verified" (every drawn check
  passed), "pending" (queued for deferred verification) or "violation".
  ``kind == "check"``: the later result of a deferred check of `step`,
  outcome "verified" or "violation".

  `check` says which checks were drawn: "", "recompute", "witness" or
  "recompute+witness"; `max_rel_l2`/`max_abs` are the re-computation's worst
  errors and `witness_rel_l2`/`witness_max_abs` the witness check's.

  With ``num_shards > 1``: `shards` lists the shards drawn for
  re-computation and `witness_shards` those drawn for a witness check (empty
  when none was; None in a run without shards, where the fields are not
  written to the transcript), `witness_digest` is the witness digests of the
  checked shards joined by commas, and `loss` is the mean of the shards'
  losses. In ``"aggregate"`` mode `projections_digest` is the digest of the
  worker's answer to the projection challenge (`projection.projections_digest`;
  recorded; the shard coins are drawn after it arrived, from the report
  digest), None otherwise (and then not written).
  """

  step: int
  digest: str
  mac: str
  verified: bool
  outcome: str
  loss: float
  max_rel_l2: float | None = None
  max_abs: float | None = None
  kind: str = "step"
  check: str = ""
  witness_digest: str | None = None
  witness_rel_l2: float | None = None
  witness_max_abs: float | None = None
  shards: list[int] | None = None
  witness_shards: list[int] | None = None
  projections_digest: str | None = None


class Recorder(Protocol):
  """Receives every transcript entry as it is made (e.g. to persist it)."""

  def record(self, entry: TranscriptEntry) -> None:
    ...


def init_state(model: Model, tx: optax.GradientTransformation, init_key: jax.Array) -> TrainState:
  """Initial parameters and optimizer state, computed on the trusted device."""
  dev = trusted_device()
  init_key = jax.device_put(init_key, dev)
  params = _init_params(model, init_key)
  # tx.init does not read the values, so jit leaves its output uncommitted; commit
  # it to the trusted device, or the first update would see a new sharding and
  # compile a second time.
  return TrainState(step=0, params=params, opt_state=jax.device_put(_init_opt(tx, params), dev))


@functools.partial(jax.jit, static_argnums=0)
def _init_params(model: Model, key: jax.Array) -> Params:
  return model.init(key)


@functools.partial(jax.jit, static_argnums=0)
def _init_opt(tx: optax.GradientTransformation, params: Params) -> optax.OptState:
  return tx.init(params)


def _update_arrays(tx: optax.GradientTransformation, params, opt_state, grads):
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


# Jitted once per transform object (equal SGD configs share one, see transforms.py).
_jit_update = jax.jit(_update_arrays, static_argnums=0)


def apply_update(tx: optax.GradientTransformation, state: TrainState, grads: Params) -> TrainState:
  """One clip-then-optimizer update on the trusted device (pure, jitted)."""
  params, opt_state = _jit_update(tx, state.params, state.opt_state, grads)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _checked_update(tx: optax.GradientTransformation, params, opt_state, grads, num_shards: int = 1):
  """`_update_arrays` and, from the same reads of the gradient, whether each
  leaf (with S > 1 shards: each shard of each leaf) is all finite (so the
  runtime needs no separate pass over the report)."""
  leaves = jax.tree_util.tree_leaves(grads)
  if num_shards == 1:
    finite = jnp.stack([jnp.isfinite(g).all() for g in leaves])
  else:
    finite = jnp.stack([jnp.isfinite(g).reshape(num_shards, -1).all(axis=1) for g in leaves])
  return (*_update_arrays(tx, params, opt_state, grads), finite)


def checked_update(tx: optax.GradientTransformation, state: TrainState,
                   grads: Params, num_shards: int = 1) -> tuple[TrainState, jax.Array]:
  """`apply_update`, plus a bool per gradient leaf (with S > 1 shards, a row
  of S bools per leaf): all its values are finite. Dispatched asynchronously;
  the caller must read the flags before it may use the new state."""
  if num_shards == 1:
    params, opt_state, finite = _checked_update(tx, state.params, state.opt_state, grads)
  else:
    params, opt_state, finite = _checked_update(tx, state.params, state.opt_state, grads, num_shards)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), finite


def _tree_size(tree) -> int:
  return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


def frozen_digest(frozen: Params) -> str:
  """SHA-256 (hex) of a frozen tree: every leaf's path, dtype, shape and bytes."""
  import hashlib  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256(b"ginn_jax/frozen/v2")
  for path, leaf in zip(finetune.leaf_paths(frozen), jax.tree_util.tree_leaves(frozen)):
    a = np.ascontiguousarray(jax.device_get(leaf))
    # The dtype by name and the raw little-endian bytes: any dtype, bfloat16 included.
    h.update(f"\n{path}\n{a.dtype.name}{list(a.shape)}\n".encode())
    h.update((a if a.dtype.byteorder != ">" else a.byteswap()).view(np.uint8).tobytes())
  return h.hexdigest()


def _trusted_frozen(model, frozen, init_key, device):
  """The trusted copy of the run's frozen parameters and its digest (None, None
  for a model without them)."""
  if not finetune.has_frozen(model):
    if frozen is not None:
      raise TypeError(
          f"frozen= was given, but model {getattr(model, 'name', model)!r} has no frozen "
          "parameters (no frozen_params; its loss takes no frozen=); use ginn_jax.lora or "
          "ginn_jax.freeze to fine-tune a base")
    return None, None
  if frozen is None:
    frozen = model.frozen_params(jax.device_put(init_key, device))
  finetune.check_frozen(model, frozen, init_key)
  trusted = commit.copy_to(jax.tree_util.tree_leaves(frozen), device)  # Never the caller's buffers.
  trusted = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(frozen), trusted)
  return trusted, frozen_digest(trusted)


class PhaseClock:
  """Accumulates wall time per phase of `submit` (for `ginn bench`)."""

  def __init__(self):
    self.seconds: dict[str, float] = collections.defaultdict(float)
    self._t = time.perf_counter()

  def start(self) -> None:
    self._t = time.perf_counter()

  def lap(self, phase: str) -> None:
    now = time.perf_counter()
    self.seconds[phase] += now - self._t
    self._t = now

  def reset(self) -> None:
    self.seconds.clear()


class _Answerer:
  """Calls the worker's answers to a challenge on one reused daemon thread, so
  that a worker that never answers cannot hang the runtime past its deadline
  (a new thread per step cost more than the rest of the challenge on a busy
  machine). After a call that missed its deadline the thread is abandoned to
  it, and the next call starts another."""

  def __init__(self):
    self._jobs: queue.Queue | None = None

  def _loop(self, jobs: queue.Queue) -> None:
    while True:
      fn, box, done = jobs.get()
      try:
        box["answer"] = fn()
      except BaseException as e:  # Reported to the caller.
        box["error"] = e
      done.set()

  def call(self, answer, request, *, limit: float | None, what: str, violation, step: int, ready):
    """The worker's ``answer(request)``, arrived (the arrays `ready` picks
    computed) within `limit` seconds; else `violation`."""
    if self._jobs is None:
      self._jobs = queue.Queue()
      threading.Thread(target=self._loop, args=(self._jobs,), name=f"ginn-{what}", daemon=True).start()

    def run():
      got = answer(request)
      try:
        jax.block_until_ready(ready(got))
      except Exception:  # Malformed: validation says what.
        pass
      return got

    box: dict[str, Any] = {}
    done = threading.Event()
    self._jobs.put((run, box, done))
    if not done.wait(limit):
      self._jobs = None  # That thread stays with the late call.
      raise violation(step=step, leaf=what, reason=f"no {what} within {limit} s (late or never)")
    if "error" in box:
      e = box["error"]
      raise violation(step=step, leaf=what, reason=f"the worker raised {type(e).__name__}: {e}") from e
    return box["answer"]


class TrustedRuntime:
  """Stateful shell over the pure protocol pieces, pinned to the trusted device.

  Args:
    model: the model both sides compute: a built-in `Model`, or any model
      with ``init(key)`` and a pure ``loss(params, batch, *, key)``
      (`ginn_jax.PureModel`, `ginn_jax.from_nnx`, `ginn_jax.from_linen`).
    images: the classic keyword for image data (with `labels`), in place of `data`.
    data: the trusted copy of the committed training set: any pytree of
      arrays with a leading example axis (``{"tokens": ...}``,
      ``Batch(images, labels)``). The classic call
      ``TrustedRuntime(model, images, labels, config)`` still works.
    config: public protocol settings.
    tolerance: verification tolerance (calibrate it with
      `ginn_jax.calibrate_tolerance`; the default is the CPU floor).
    witness_tolerance: tolerance of the witness check (calibrated alongside;
      default `DEFAULT_WITNESS_FLOOR`).
    audit_secret: private bytes for the MAC key and the coin; 32 random bytes
      from the OS when omitted. Use a fixed value only in tests.
    optimizer: replaces `config.optimizer` (the clip still comes first): an
      `OptimizerConfig` or `OptimizerSpec` (then ``self.config`` and the
      public header hold it), or any optax transformation, for a run that is
      not persisted: the header's ``config.optimizer`` is then None (it names
      no optimizer, so `run_verified` refuses one) and `optimizer` holds it.
    deferred: verify sampled steps on a background thread while training
      goes on (a violation stops the next step; `finalize` waits for all).
    max_pending: bound on queued deferred checks (back-pressure when full).
    recorder: receives every transcript entry as it is made.
    report_digest: the report digest's hash function ("blake3"; "sha256" to
      continue a run made before BLAKE3), named in the public header.
    frozen: the frozen parameters of a model that has them (`ginn_jax.lora`,
      `ginn_jax.freeze`; docs/design.md section 13). Default: the model's
      ``frozen_params(init_key)`` (its pretrained base, or the base's init
      from the run's init key). The runtime keeps its own copy on the trusted
      device, commits it by digest in the header (`frozen_digest`), and uses
      it for re-computation and witness checks; give the worker the same tree
      once (``HonestWorker(model, data, frozen=rt.frozen)``). Reports,
      clipping, the optimizer state and checkpoints cover the trainable
      parameters only; a report that includes a frozen leaf is refused.
  """

  def __init__(
      self,
      model: Model,
      data: Any = None,
      labels: np.ndarray | ProtocolConfig | None = None,
      config: ProtocolConfig | None = None,
      *,
      images: np.ndarray | None = None,
      tolerance: verify.Tolerance | None = None,
      witness_tolerance: verify.Tolerance | None = None,
      audit_secret: bytes | None = None,
      optimizer: Optimizer | optax.GradientTransformation | None = None,
      deferred: bool = False,
      max_pending: int = 4,
      recorder: Recorder | None = None,
      report_digest: str = commit.DEFAULT_DIGEST,
      frozen: Params | None = None,
  ):
    if isinstance(labels, ProtocolConfig):  # TrustedRuntime(model, data, config)
      if config is not None:
        raise TypeError("config given twice (third argument and config=)")
      labels, config = None, labels
    config = ProtocolConfig() if config is None else config
    if isinstance(optimizer, (OptimizerConfig, OptimizerSpec)):  # Named: the header records it.
      config, optimizer = dataclasses.replace(config, optimizer=optimizer), None
    self.optimizer: Optimizer | optax.GradientTransformation = optimizer or config.optimizer
    data = as_training_data(data, labels, images=images)
    self.model = model
    self.config = config
    self.device = trusted_device()
    if report_digest not in commit.DIGEST_NAMES:
      raise ValueError(f"report_digest must be one of {commit.DIGEST_NAMES}, got {report_digest!r}")
    self.report_digest_name = report_digest
    self.tolerance = tolerance or verify.DEFAULT_FLOOR
    self.witness_tolerance = witness_tolerance or verify.DEFAULT_WITNESS_FLOOR
    if self.witness_tolerance.elementwise:
      raise ValueError(
          "witness_tolerance must be a per-leaf tolerance: a witness check compares "
          "random projections, which have no elements to hold to an element-wise rule")
    self.num_shards = config.num_shards
    self.aggregate = config.aggregate
    if self.aggregate and self.tolerance.elementwise:
      raise ValueError(
          "an 'aggregate' run needs a per-leaf tolerance: its checks compare projections of the "
          "shards' gradients, which have no elements to hold to an element-wise rule; pass a "
          "per-leaf tolerance or shard_mode='per_shard'")
    # Aggregate: the report is the mean, clipped and applied like a report without shards.
    self.tx = make_update_transform(config.clip, config.clip_value, self.optimizer,
                                    1 if self.aggregate else config.num_shards)
    self.dataset_digest = dataset_digest(data)
    self._keys = keys.audit_keys(audit_secret if audit_secret is not None else keys.new_audit_secret())
    self.streams = keys.seed_streams(config.seed)
    self.schedule = keys.BatchSchedule(self.streams.data_key, num_examples(data), config.batch_size)
    self.frozen, self.frozen_digest = _trusted_frozen(model, frozen, self.streams.init_key, self.device)
    self._frozen_paths = frozenset(finetune.leaf_paths(self.frozen)) if self.frozen is not None else None
    self.state = init_state(model, self.tx, self.streams.init_key)
    self._treedef = jax.tree_util.tree_structure(self.state.params)
    self._paths = verify.leaf_paths(self.state.params)
    self._reference = DeviceGradFn(model.loss, data, self.device, frozen=self.frozen)
    self.verifier = Verifier(self._recompute, deferred=deferred, max_pending=max_pending)
    self.recorder = recorder
    self.transcript: list[TranscriptEntry] = []
    self._pending: dict[int, TranscriptEntry] = {}
    self.num_verified = 0
    self.halted: errors.IntegrityViolation | None = None
    self._phases = PhaseClock()
    self._witness_spec: witness_lib.WitnessSpec | None = None
    self._program = None
    if config.p_witness > 0:  # Traced now: a program the check cannot follow is refused here.
      self.witness_plan()
    self._step_key: tuple[int, jax.Array] | None = None
    self.witness_seconds: collections.deque[float] = collections.deque(maxlen=1024)  # Latest arrivals.
    # At most one step's witness is held by the trusted side at a time (received,
    # queued or being checked): a new challenge waits until the last check is done.
    self._witness_slot = threading.BoundedSemaphore(1)
    self._answerer = _Answerer()  # The projection challenge's (aggregate mode).
    self._witnesses_held = 0
    self.max_witnesses_held = 0

  # -- the two messages --------------------------------------------------------

  def next_order(self) -> WorkOrder:
    """The work order of the current step (the same data on every call).

    Raises:
      IntegrityViolation: a deferred check found a violation (first time).
      RuntimeHalted: the runtime halted earlier.
    """
    self._collect_checks()
    self._raise_if_halted()
    t = self.state.step
    return WorkOrder(
        step=t,
        params=self.state.params,
        batch_indices=self.schedule.indices(t),
        layer_key=self._layer_key(t),
    )

  def submit(self, report: GradientReport, *,
             witness: Callable[[WitnessRequest], Witness] | None = None,
             project: Callable[[ProjectionRequest], Projections] | None = None) -> TranscriptEntry:
    """Validates, commits, draws the coins, challenges, updates and verifies.

    Args:
      report: the worker's report for the current step.
      witness: the worker's answer to a witness challenge (``worker.witness``);
        called only when the step's witness coin comes up, after the report is
        committed. Missing (None) on such a step is a violation.
      project: in an ``"aggregate"`` run, the worker's answer to the
        projection challenge (``worker.project``), called on every step after
        the report is committed and before the shard coins are drawn.
        Missing (None) there is a violation.

    Returns:
      The transcript entry of the accepted step.

    Raises:
      ReportRejected (a subclass naming the problem): the report's form is
        wrong; nothing changed, submit a corrected report for the same step.
      IntegrityViolation: a re-computation disagrees (this step's,
        synchronously: its update is not applied; or an earlier step's,
        deferred). The runtime is halted.
      WitnessViolation (an IntegrityViolation): the step's witness is missing,
        late or malformed (its update is not applied, in both modes), or
        fails a Freivalds check (as above).
      ProjectionViolation (an IntegrityViolation): in an ``"aggregate"``
        run, the projections are missing, late, malformed or do not add up
        (its update is not applied, in both modes), or a checked shard's
        disagrees with the trusted side's (as above).
    """
    self._collect_checks()
    self._raise_if_halted()
    self._phases.start()
    t = self.state.step
    lap = self._phases.lap
    try:
      received = commit.receive_report(report, step=t, params=self.state.params, device=self.device,
                                       num_shards=self.num_shards, aggregate=self.aggregate)
    except errors.StructureMismatch as e:
      self._refuse_frozen(report, e, t)
      raise
    lap("receive")  # Form checks; the copy into trusted memory goes on asynchronously.
    # The update is dispatched now, so that it runs while the report is hashed,
    # and committed below only once the report is accepted; until then
    # `self.state` is the previous state (a rejected report leaves it as it was).
    # It also finds non-finite values, from its own reads of the gradient.
    new_state, finite = checked_update(self.tx, self.state,
                                       jax.tree_util.tree_unflatten(self._treedef, received.leaves),
                                       received.num_shards)
    lap("update")  # Dispatch only.
    digest = commit.digest_received(received, name=self.report_digest_name)
    lap("digest")
    challenge = None
    if self.aggregate:  # Drawn now, from the digest; computed while the update finishes, sent after.
      challenge = projection_lib.challenge(keys.projection_seed(self._keys, t, digest), received.leaves,
                                           self.device)
      lap("projection_draw")
    commit.check_finite(received, np.asarray(finite))  # Waits for the update; NaN/Inf: rejected.
    lap("finite")
    loss = received.loss
    tag = commit.report_mac(self._keys.mac_key, digest)
    S = self.num_shards
    projection = pdigest = None
    if self.aggregate:  # After the commit, the projection challenge; only then the coins.
      lap("mac_coin")
      pre = TranscriptEntry(step=t, digest=digest.hex(), mac=tag.hex(), verified=False,
                            outcome="violation", loss=float(np.mean(loss)))
      projection, pdigest = self._project(pre, digest, challenge, project)
      lap("projection_check")
    # After the commit. One coin per shard; with one shard, the coins of a run without shards.
    # (A PRF of the committed digest under a key the worker never sees: in an aggregate run
    # they are drawn after its projections arrived, and it could not predict them before.)
    coins = keys.shard_verification_coins(self._keys, t, digest, self.config.p, S)
    wcoins = keys.shard_witness_coins(self._keys, t, digest, self.config.p_witness, S)
    sampled, challenged = any(coins), any(wcoins)
    drawn = tuple(s for s, c in enumerate(coins) if c) if S > 1 else None
    wdrawn = tuple(s for s, c in enumerate(wcoins) if c) if S > 1 else None
    lap("mac_coin")
    entry = TranscriptEntry(step=t, digest=digest.hex(), mac=tag.hex(), verified=sampled or challenged,
                            outcome="pending" if sampled or challenged else "unverified",
                            loss=float(loss) if S == 1 else float(np.mean(loss)),
                            check="+".join(c for c, on in (("recompute", sampled), ("witness", challenged))
                                           if on),
                            shards=None if drawn is None else list(drawn),
                            witness_shards=None if wdrawn is None else list(wdrawn),
                            projections_digest=None if pdigest is None else pdigest.hex())
    wit = None
    if challenged:
      wit, wdigest, seed = self._challenge(entry, digest, witness, shards=wdrawn)
      entry = dataclasses.replace(entry, witness_digest=wdigest.hex() if wdrawn is None else
                                  ",".join(d.hex() for d in wdigest))
      lap("witness")  # Asking for, receiving, validating and hashing the witness.
    if sampled or challenged:
      check = Check(step=t, params=self.state.params, batch_indices=self.schedule.indices(t),
                    layer_key=self._layer_key(t), reported=received.leaves, loss=loss,
                    recompute=sampled, witness=wit, witness_seed=seed if challenged else None,
                    done=self._release_witness if challenged else None, shards=drawn,
                    witness_shards=wdrawn, projection=projection)
      result = self.verifier.submit(check)
      lap("verify")  # Synchronous re-computation, or waiting for room in the queue.
      if result is not None:  # Synchronous: resolved before the update is committed.
        entry = self._resolve(entry, result)
      else:
        self._pending[t] = entry
    self.state = new_state
    self._append(entry)
    return entry

  def _refuse_frozen(self, report, error: errors.StructureMismatch, t: int) -> None:
    """Raises a `StructureMismatch` naming the frozen parameter if the
    refused report holds a gradient for one (else returns)."""
    if self._frozen_paths is None:
      return
    try:
      got = finetune.leaf_paths(report.grads)
    except Exception:  # pylint: disable=broad-except
      return
    hits = [p for p in got if p in self._frozen_paths]
    if hits:
      raise errors.StructureMismatch(
          f"step {t}: the report includes frozen parameter {hits[0]!r}"
          f"{f' (and {len(hits) - 1} more)' if len(hits) > 1 else ''}: the worker can never change "
          "a frozen parameter, and reports carry the trainable parameters only; nothing was applied",
          step=t, where=hits[0]) from error

  def finalize(self) -> None:
    """Waits for every deferred check and applies its result.

    Raises:
      IntegrityViolation: one of them failed.
      RuntimeHalted: the runtime had already halted.
    """
    results = self.verifier.drain()
    self._raise_if_halted()
    for result in results:
      self._apply_check(result)

  def close(self) -> None:
    """Waits for queued checks and stops the verifier thread; raises like
    `finalize` unless the runtime had already halted."""
    try:
      if self.halted is None:
        self.finalize()
      else:
        self.verifier.drain()
    finally:
      self.verifier.close()

  def compile_verification(self) -> None:
    """Compiles the trusted re-computation, the comparison and (with
    ``p_witness > 0``) the witness check now, by checking the reference
    gradient and witness of the current step against themselves, so the first
    sampled step does not pay for the compilation. Changes no state."""
    t = self.state.step
    indices, key = self.schedule.indices(t), self._layer_key(t)
    if self.num_shards > 1:  # One shard's reference, compared with itself (every shard is alike).
      sub = shards_lib.shard_indices(indices, self.num_shards)[0]
      loss, grads = self._reference(self.state.params, sub, shards_lib.shard_key(key, 0))
      stacked = [jnp.broadcast_to(g, (self.num_shards, *g.shape)) for g in jax.tree_util.tree_leaves(grads)]
      wit = seed = wshards = None
      if self.config.p_witness > 0:
        witness_fn = DeviceWitnessFn(self.model.loss, self._reference.data, self.device,
                                     frozen=self.frozen)
        skey = shards_lib.shard_key(key, 0)
        _, _, outputs, input_grads = witness_fn(self.state.params, sub, skey)
        w, _, s = self.receive_witness(t, b"\0" * 32, sub, skey, jax.device_get(outputs),
                                       jax.device_get(input_grads), shard=0)
        wit, seed, wshards = (w,), (s,), (0,)
      projection = None
      if self.aggregate:  # Shard 0's scalars, its own projections (the vectors: any seed).
        leaves = jax.tree_util.tree_leaves(grads)
        vectors = projection_lib.projection_vectors(np.zeros(2, np.uint32), [g.shape for g in leaves],
                                                    self.device)
        row = np.asarray(jax.device_get(jax.jit(shards_lib.project_leaves)(leaves, vectors)), np.float32)
        projection = (vectors, np.broadcast_to(row, (self.num_shards, row.size)))
      self._recompute(Check(step=t, params=self.state.params, batch_indices=indices, layer_key=key,
                            reported=stacked, loss=np.full(self.num_shards, jax.device_get(loss),
                                                           np.float32), shards=(0,), witness=wit,
                            witness_seed=seed, witness_shards=wshards, projection=projection))
      return
    loss, grads = self._reference(self.state.params, indices, key)
    wit = seed = None
    if self.config.p_witness > 0:
      witness_fn = DeviceWitnessFn(self.model.loss, self._reference.data, self.device,
                                   frozen=self.frozen)
      _, _, outputs, input_grads = witness_fn(self.state.params, indices, key)
      wit, _, seed = self.receive_witness(t, b"\0" * 32, indices, key, jax.device_get(outputs),
                                          jax.device_get(input_grads))
    self._recompute(Check(step=t, params=self.state.params, batch_indices=indices, layer_key=key,
                          reported=jax.tree_util.tree_leaves(grads),
                          loss=np.float32(jax.device_get(loss)), witness=wit, witness_seed=seed))

  @property
  def num_pending(self) -> int:
    """Sampled steps whose deferred check has not been applied yet."""
    return len(self._pending)

  # -- verification ------------------------------------------------------------

  def witness_program(self):
    """The step's gradient program, for a batch of ``batch_size / num_shards``
    (`ginn_jax._src.program.Program`), traced on first use.

    Raises:
      UnsupportedProgram: a product sits inside control flow the check does not unroll.
    """
    if self._program is None:
      self._program = step_program(self.model.loss, self.state.params, self._reference.data,
                                   self.config.batch_size // self.num_shards, self.frozen)
    return self._program

  def witness_plan(self):
    """The run's witness plan: what a witness check checks (docs/design.md section 12)."""
    return self.witness_program().plan

  def witness_spec(self) -> witness_lib.WitnessSpec:
    """The form every witness of this run must have (with shards: every
    shard's witness, of a batch of ``batch_size / num_shards``)."""
    if self._witness_spec is None:
      self._witness_spec = witness_lib.WitnessSpec.of_plan(self.witness_plan())
    return self._witness_spec

  def _challenge(self, entry: TranscriptEntry, report_digest: bytes, answer,
                 shards: tuple[int, ...] | None = None):
    """Asks for the witness of the committed step (with shards: of each shard
    in `shards`, one after the other), validates and hashes it, and derives
    the secret vectors from it. Every failure of the worker's answer (none, an
    exception, too late, malformed) is a violation: the runtime halts and the
    step's update is not applied. The step holds one witness slot for all its
    shards (together at most one batch's witness)."""
    t = entry.step
    self._hold_witness()  # Deferred: waits until the previous witness check has run...
    try:
      self._collect_checks()  # ...and a failure it found stops this step before its update.
      self._raise_if_halted()
    except BaseException:
      self._release_witness()
      raise
    handed = False
    try:
      try:
        if answer is None:
          raise errors.WitnessViolation(
              step=t, leaf="witness", reason="the worker offers no witness (it has no `witness` "
              "method) but this step was drawn for a witness check")
        order = WorkOrder(step=t, params=self.state.params, batch_indices=self.schedule.indices(t),
                          layer_key=self._layer_key(t))
        if shards is None:
          w = self._ask(answer, WitnessRequest(step=t, order=order))
          outputs, input_grads = witness_lib.validate_witness(w, step=t, spec=self.witness_spec(),
                                                              device=self.device)
          received = self.receive_witness(t, report_digest, order.batch_indices, order.layer_key,
                                          outputs, input_grads)
        else:
          received = self._challenge_shards(t, report_digest, answer, order, shards)
      except errors.WitnessViolation:
        raise
      except Exception as e:  # Anything else about the answer: the report is committed.
        raise errors.WitnessViolation(step=t, leaf="witness",
                                      reason=f"{type(e).__name__}: {e}") from e
      handed = True  # The check releases the slot once it has run.
      return received
    except errors.WitnessViolation as violation:
      self._append(dataclasses.replace(entry, outcome="violation"))
      self.halted = violation
      raise
    finally:
      if not handed:
        self._release_witness()

  def _challenge_shards(self, t: int, report_digest: bytes, answer, order: WorkOrder,
                        shards: tuple[int, ...]):
    """The witnesses of `shards` of step `t`, received one by one; a failure
    names its shard. Returns ``(witnesses, digests, seeds)``, one per shard."""
    idx = shards_lib.shard_indices(order.batch_indices, self.num_shards)
    got = []
    for s in shards:
      try:
        w = self._ask(answer, WitnessRequest(step=t, order=order, shard=s))
        outputs, input_grads = witness_lib.validate_witness(w, step=t, spec=self.witness_spec(),
                                                            device=self.device)
        got.append(self.receive_witness(t, report_digest, idx[s], shards_lib.shard_key(order.layer_key, s),
                                        outputs, input_grads, shard=s))
      except errors.WitnessViolation as v:
        raise errors.WitnessViolation(step=t, leaf=v.leaf, error=v.error, tolerance=v.tolerance,
                                      reason=v.reason, shard=s) from v
      except Exception as e:
        raise errors.WitnessViolation(step=t, leaf="witness", reason=f"{type(e).__name__}: {e}",
                                      shard=s) from e
    return tuple(g[0] for g in got), [g[1] for g in got], tuple(g[2] for g in got)

  def _project(self, entry: TranscriptEntry, report_digest: bytes, challenge, project):
    """The projection challenge of an ``"aggregate"`` step (docs/design.md
    section 11.2), after its mean was committed: sends the secret vectors of
    `challenge` (`projection.challenge`), asks the worker for its S x L
    scalars within `witness_timeout_s`,
    validates and hashes them, and checks that they add up to S times the
    mean's projection. Any failure is a `ProjectionViolation`: recorded, the
    runtime halts, the step's update is not applied.

    Returns:
      ``((vectors, values), digest)``: what the shard checks compare against
      (`Check.projection`) and the digest of the scalars (the coins read it).
    """
    t = entry.step
    try:
      if project is None:
        raise errors.ProjectionViolation(
            step=t, leaf="projections", reason="the worker offers no projections (it has no "
            "`project` method) but an 'aggregate' run challenges every step")
      vectors, pending = challenge
      order = WorkOrder(step=t, params=self.state.params, batch_indices=self.schedule.indices(t),
                        layer_key=self._layer_key(t))
      # The worker gets copies: the trusted side checks the drawn shards with its own vectors,
      # which the worker can never write to (a read-only view's base can be made writable).
      sent = tuple((np.array(a, copy=True), np.array(b, copy=True)) for a, b in vectors)
      answer = self._answerer.call(project, ProjectionRequest(step=t, order=order, vectors=sent),
                                   limit=self.config.witness_timeout_s, what="projections",
                                   violation=errors.ProjectionViolation, step=t,
                                   ready=lambda a: a.values)
      self._phases.lap("projection_answer")
      paths = self._paths[:-1]
      values = projection_lib.validate_projections(answer, step=t, num_shards=self.num_shards,
                                                   paths=paths)
      digest = projection_lib.projections_digest(t, report_digest, values)
      mean_t, norms = projection_lib.read(pending)
      projection_lib.check_sum(values, mean_t, norms, self.tolerance.rel_l2, step=t, paths=paths)
    except errors.ProjectionViolation as violation:
      self._append(entry)
      self.halted = violation
      raise
    except Exception as e:  # Anything else about the answer: the report is committed.
      violation = errors.ProjectionViolation(step=t, leaf="projections",
                                             reason=f"{type(e).__name__}: {e}")
      self._append(entry)
      self.halted = violation
      raise violation from e
    return (vectors, values), digest

  def _ask(self, answer, request: WitnessRequest):
    """The worker's answer, arrived (arrays computed) within `witness_timeout_s`.

    The worker is called on a daemon thread so that one that never answers
    cannot hang the runtime past the deadline.
    """
    limit = self.config.witness_timeout_s
    box: dict[str, Any] = {}

    def call():
      try:
        w = answer(request)
        try:  # The deadline covers arrays still being computed.
          jax.block_until_ready([*w.outputs, *w.input_grads])
        except Exception:  # Malformed: validation says what.
          pass
        box["witness"] = w
      except BaseException as e:  # Reported below as a missing witness.
        box["error"] = e

    start = time.perf_counter()
    thread = threading.Thread(target=call, name="ginn-witness", daemon=True)
    thread.start()
    thread.join(limit)
    elapsed = time.perf_counter() - start
    self.witness_seconds.append(elapsed)
    if thread.is_alive():
      raise errors.WitnessViolation(step=request.step, leaf="witness",
                                    reason=f"no witness within {limit} s (late or never)")
    if "error" in box:
      e = box["error"]
      raise errors.WitnessViolation(step=request.step, leaf="witness",
                                    reason=f"the worker raised {type(e).__name__}: {e}") from e
    return box["witness"]

  def receive_witness(self, step: int, report_digest: bytes, indices, layer_key, outputs,
                      input_grads, shard: int | None = None):
    """Moves a validated witness to the trusted device (if it is not there
    yet) and hashes it; then derives the vectors' seed from the digest.

    Returns:
      ``(witness, digest, seed)``: what a witness `Check` carries, the
      witness digest and the seed (on the trusted device).
    """
    moved = jax.device_put((list(outputs), list(input_grads)), self.device)
    idx = jax.device_put(np.asarray(indices, np.int32), self.device)
    prep = (idx, layer_key)
    wdigest = witness_lib.witness_digest(step, report_digest, *moved, shard=shard)  # The trusted copies.
    seed = witness_lib.freivalds_seed(self._keys.freivalds_key, step, wdigest)  # After the digest.
    return (*moved, prep), wdigest, jax.device_put(seed, self.device)

  def _layer_key(self, step: int) -> jax.Array:
    """`keys.layer_key` of `step`, kept for the step it was last asked for
    (the work order, the witness request and the check all need it)."""
    if self._step_key is None or self._step_key[0] != step:
      self._step_key = (step, keys.layer_key(self.streams, step))
    return self._step_key[1]

  def _hold_witness(self) -> None:
    self._witness_slot.acquire()  # Deferred: waits for the previous witness check.
    self._witnesses_held += 1
    self.max_witnesses_held = max(self.max_witnesses_held, self._witnesses_held)

  def _release_witness(self) -> None:
    self._witnesses_held -= 1
    self._witness_slot.release()

  def _recompute(self, check: Check) -> tuple[verify.Comparison | verify.ShardComparisons | None,
                                              verify.Comparison | None]:
    comparison = witness = None
    if check.projection is not None:
      return self._recompute_projected(check)
    if check.shards is not None:  # Only the sampled shards, each against its row of the report.
      if check.recompute:
        idx = shards_lib.shard_indices(check.batch_indices, self.num_shards)
        out = []
        for s in check.shards:
          ref_loss, ref_grads = self._reference(check.params, idx[s], shards_lib.shard_key(check.layer_key, s))
          row = shards_lib.shard_row(check.reported, s)
          row_loss = jax.device_put(np.asarray(check.loss[s]), self.device)
          out.append(verify.compare(row, row_loss, jax.tree_util.tree_leaves(ref_grads), ref_loss,
                                    self._paths, tolerance=self.tolerance))
        comparison = verify.ShardComparisons(shards=tuple(check.shards), comparisons=tuple(out))
      if check.witness is not None:  # Each challenged shard's witness against its row.
        out = []
        for s, (outputs, input_grads, prep), seed in zip(check.witness_shards, check.witness,
                                                          check.witness_seed):
          grads = jax.tree_util.tree_unflatten(self._treedef, shards_lib.shard_row(check.reported, s))
          row_loss = jax.device_put(np.asarray(check.loss[s]), self.device)
          out.append(self._witness_errors(check.params, prep, outputs, grads, row_loss, seed))
        witness = verify.ShardComparisons(shards=tuple(check.witness_shards), comparisons=tuple(out))
      return comparison, witness
    reported_loss = jax.device_put(np.asarray(check.loss), self.device)
    if check.recompute:
      ref_loss, ref_grads = self._reference(check.params, check.batch_indices, check.layer_key)
      comparison = verify.compare(check.reported, reported_loss,
                                  jax.tree_util.tree_leaves(ref_grads), ref_loss, self._paths,
                                  tolerance=self.tolerance)
    if check.witness is not None:
      outputs, _, prep = check.witness
      witness = self._witness_errors(check.params, prep, outputs, check.reported, reported_loss,
                                     check.witness_seed)
    return comparison, witness

  def _recompute_projected(self, check: Check):
    """The checks of the drawn shards of an ``"aggregate"`` step: each shard's
    gradient computed by the trusted side (re-computed, or evaluated from its
    checked witness) and projected with the step's vectors, against the
    worker's scalars of that shard (`projection.shard_errors`), and its loss."""
    vectors, values = check.projection
    vectors = jax.device_put(tuple(vectors), self.device)  # (Host arrays, as sent to the worker.)
    paths = tuple(f"projection {p}" for p in self._paths[:-1]) + ("loss",)

    def against(s, ref_leaves, ref_loss) -> np.ndarray:
      errs = projection_lib.shard_errors(ref_leaves, vectors, jax.device_put(values[s], self.device))
      row_loss = jax.device_put(np.asarray(check.loss[s]), self.device)
      loss_err = verify.compare([], row_loss, [], ref_loss, ("loss",)).errors
      proj = np.asarray(jax.device_get(errs), np.float64)
      return np.concatenate([np.stack([proj, np.zeros_like(proj)], axis=1), loss_err])

    comparison = witness = None
    idx = shards_lib.shard_indices(check.batch_indices, self.num_shards)
    if check.recompute:
      out = []
      for s in check.shards:
        ref_loss, ref_grads = self._reference(check.params, idx[s], shards_lib.shard_key(check.layer_key, s))
        out.append(verify.Comparison(paths=paths, errors=against(s, jax.tree_util.tree_leaves(ref_grads),
                                                                 ref_loss)))
      comparison = verify.ShardComparisons(shards=tuple(check.shards), comparisons=tuple(out))
    if check.witness is not None:
      out = []
      for s, (outputs, _, (indices, key)), seed in zip(check.witness_shards, check.witness,
                                                       check.witness_seed):
        products, ref_loss, ref_grads = program_check.program_gradient(
            self.witness_program(), check.params, self._reference.data, indices, key, outputs, seed,
            self.frozen)
        out.append(verify.Comparison(
            paths=(*(w.describe() for w in self.witness_program().plan.witnessed), *paths),
            errors=np.concatenate([products, against(s, ref_grads, ref_loss)])))
      witness = verify.ShardComparisons(shards=tuple(check.witness_shards), comparisons=tuple(out))
    return comparison, witness

  def _witness_errors(self, params, prep, products, reported, loss, seed) -> verify.Comparison:
    """The witness check of one step (or shard): the program evaluated with
    the claimed products, each after its Freivalds check."""
    indices, key = prep
    return program_check.program_errors(
        self.witness_program(), self._paths, params, self._reference.data, indices, key, products,
        jax.tree_util.tree_leaves(reported), loss, seed, self.frozen)

  def _resolve(self, entry: TranscriptEntry, result: CheckResult) -> TranscriptEntry:
    """The entry with the checks' outcome; records and raises on a violation."""
    if result.error is not None:
      raise RuntimeError(
          f"the trusted check of step {entry.step} failed to run; the runtime cannot vouch "
          f"for this step") from result.error
    c, w = result.comparison, result.witness
    if c is not None:
      entry = dataclasses.replace(entry, max_rel_l2=c.max_rel_l2, max_abs=c.max_max_abs)
    if w is not None:
      entry = dataclasses.replace(entry, witness_rel_l2=w.max_rel_l2, witness_max_abs=w.max_max_abs)
    entry = dataclasses.replace(entry, outcome="verified")
    try:
      if c is not None:
        verify.check(c, self.tolerance, step=entry.step)
      if w is not None:
        verify.check(w, self.witness_tolerance, step=entry.step, violation=errors.WitnessViolation)
    except errors.IntegrityViolation as violation:
      self._append(dataclasses.replace(entry, outcome="violation"))
      self.halted = violation
      raise
    self.num_verified += 1
    return entry

  def _apply_check(self, result: CheckResult) -> None:
    pending = self._pending.pop(result.step)
    self._append(self._resolve(dataclasses.replace(pending, kind="check"), result))

  def _collect_checks(self) -> None:
    if self.halted is None:
      for result in self.verifier.collect():
        self._apply_check(result)

  def _append(self, entry: TranscriptEntry) -> None:
    self.transcript.append(entry)
    if self.recorder is not None:
      self.recorder.record(entry)

  def _raise_if_halted(self) -> None:
    if self.halted is not None:
      raise errors.RuntimeHalted(
          f"the trusted runtime halted at step {self.halted.step} after an integrity "
          f"violation ({self.halted}); start a new run with a trustworthy worker"
      ) from self.halted

  # -- storage hooks (transcript, checkpoints, resume) -------------------------

  def authenticate(self, data: bytes, *, label: bytes) -> bytes:
    """HMAC-SHA256 of `label || data` under the storage key (derived from the
    audit secret, distinct from the report MAC key). For anything the runtime
    writes to untrusted storage and reads back (checkpoints, kept reports)."""
    return keys.storage_mac(self._keys, data, label=label)

  def signing_seed(self) -> bytes:
    """32-byte Ed25519 private-key seed derived from the audit secret, so a
    resumed runtime (same secret) signs with the same key pair."""
    return self._keys.signing_seed

  def restore(self, state: TrainState, transcript: list[TranscriptEntry], num_verified: int) -> None:
    """Continues from a checkpointed `state` (whose integrity the caller has
    checked) and the transcript entries up to it. Deferred checks must have
    been drained when the checkpoint was taken."""
    if jax.tree_util.tree_structure(state.params) != self._treedef:
      raise ValueError("restored parameters do not match the model's structure")
    if self.verifier.pending or self._pending:
      raise RuntimeError("cannot restore while deferred checks are pending")
    self.state = jax.device_put(state, self.device)
    self.transcript = list(transcript)
    self.num_verified = num_verified
    self.halted = None

  # -- inspection --------------------------------------------------------------

  @property
  def phase_seconds(self) -> dict[str, float]:
    """Seconds spent in each phase of `submit` so far (receive, update (its
    dispatch), digest, finite (waiting for the update), mac_coin, witness,
    verify)."""
    return dict(self._phases.seconds)

  def reset_phase_seconds(self) -> None:
    self._phases.reset()

  @property
  def step(self) -> int:
    return self.state.step

  @property
  def num_violations(self) -> int:
    return int(self.halted is not None)

  def public_header(self) -> dict[str, Any]:
    """Everything public about the run (nothing derived from the audit secret)."""
    config = self.config.to_dict()
    if self.optimizer is not self.config.optimizer:  # An optax transformation: no name to record.
      config["optimizer"] = None
    return {
        "model": self.model.name,
        "input_shape": (None if getattr(self.model, "input_shape", None) is None
                        else list(self.model.input_shape)),
        "config": config,
        "tolerance": self.tolerance.to_dict(),
        "witness_tolerance": self.witness_tolerance.to_dict(),
        "report_digest": self.report_digest_name,
        "witness_digest": witness_lib.DIGEST_NAME,
        **({"witness_plan": self.witness_plan().summary()} if self.config.p_witness > 0 else {}),
        "dataset_digest": self.dataset_digest,
        **({} if self.frozen is None else {"frozen_digest": self.frozen_digest,
                                           "frozen_size": _tree_size(self.frozen)}),
        **({"finetune": self.model.describe()} if hasattr(self.model, "describe") else {}),
        "num_examples": self.schedule.num_examples,
        "jax_version": jax.__version__,
        "prng_impl": "threefry2x32",
    }
