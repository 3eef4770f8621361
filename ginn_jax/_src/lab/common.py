"""What every experiment shares: data, model, trigger, runtimes, evaluation."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from ginn_jax._src.calibrate import calibrate_tolerance
from ginn_jax._src.data import load_dataset
from ginn_jax._src.metrics import accuracy, attack_success_rate, robust_accuracy
from ginn_jax._src.models import get_model
from ginn_jax._src.triggers import PatchTrigger
from ginn_jax._src.trusted import verify
from ginn_jax._src.trusted.runtime import ProtocolConfig, TrainState, TrustedRuntime
from ginn_jax._src.trusted.transforms import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class LabConfig:
  """Dataset, model, optimizer and backdoor shared by the experiments.

  The default backdoor follows BackdoorBench's BadNets: a 3x3 white patch at
  the bottom-right, all-to-one target 0, 10% of each batch poisoned.
  """

  dataset: str = "mnist5k"
  data_dir: str | None = None
  model: str = "mnist_cnn"
  batch_size: int = 64
  learning_rate: float = 0.05
  momentum: float = 0.9
  weight_decay: float = 5e-4
  trigger_size: int = 3
  target: int = 0
  poison_fraction: float = 0.1
  eval_examples: int | None = None  # Evaluate on the first N test images (None: all).


class Lab:
  """Loads the data and model once and hands out runtimes and evaluations."""

  def __init__(self, cfg: LabConfig = LabConfig()):
    self.cfg = cfg
    self.ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir)
    self.model = get_model(cfg.model, input_shape=self.ds.image_shape, num_classes=self.ds.num_classes)
    self.trigger = PatchTrigger(size=cfg.trigger_size, value=1.0, position="bottom_right")
    self.optimizer = OptimizerConfig(cfg.learning_rate, cfg.momentum, cfg.weight_decay)
    n = cfg.eval_examples or len(self.ds.test_labels)
    self.test_images, self.test_labels = self.ds.test_images[:n], self.ds.test_labels[:n]

  @property
  def train_data(self) -> tuple[np.ndarray, np.ndarray]:
    return self.ds.train_images, self.ds.train_labels

  def protocol(self, *, seed: int, p: float, clip: str, clip_value: float | None) -> ProtocolConfig:
    return ProtocolConfig(seed=seed, batch_size=self.cfg.batch_size, p=p, clip=clip,
                          clip_value=None if clip == "none" else clip_value, optimizer=self.optimizer)

  def runtime(self, *, seed: int, p: float = 0.0, clip: str = "none", clip_value: float | None = None,
              tolerance: verify.Tolerance | None = None, secret: bytes | None = None,
              state: TrainState | None = None) -> TrustedRuntime:
    """A runtime for this lab's data; `state` continues from a saved state (a fork)."""
    secret = secret or hashlib.sha256(f"lab-secret-{seed}".encode()).digest()
    rt = TrustedRuntime(self.model, *self.train_data, self.protocol(seed=seed, p=p, clip=clip,
                        clip_value=clip_value), tolerance=tolerance, audit_secret=secret)
    if state is not None:
      rt.restore(state, [], 0)
    return rt

  def evaluate(self, params) -> dict[str, float]:
    """Clean accuracy, attack success rate and robust accuracy on the test split."""
    kw = dict(trigger=self.trigger, target=self.cfg.target)
    return {
        "clean_accuracy": accuracy(self.model, params, self.test_images, self.test_labels),
        "asr": attack_success_rate(self.model, params, self.test_images, self.test_labels, **kw),
        "robust_accuracy": robust_accuracy(self.model, params, self.test_images, self.test_labels, **kw),
    }


def wilson_interval(successes: int, n: int, z: float = 2.576) -> tuple[float, float]:
  """Wilson score interval for a binomial rate (z = 2.576: 99%).

  Exact at its ends and around its point: the lower bound is 0.0 exactly when
  ``successes == 0``, the upper bound 1.0 exactly when ``successes == n``, and
  ``lo <= successes / n <= hi`` for every count (the float ``successes / n``
  itself: the formula's rounding would otherwise put the lower bound of 0 of 5
  at 5.6e-17, above its rate). With ``n == 0`` it is (0.0, 1.0).

  Raises:
    ValueError: ``n < 0`` or ``successes`` outside 0..n.
  """
  if n < 0 or not 0 <= successes <= n:
    raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
  if n == 0:
    return 0.0, 1.0
  phat = successes / n
  denom = 1 + z * z / n
  centre = (phat + z * z / (2 * n)) / denom
  half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
  # In exact arithmetic centre - half is 0 at successes == 0, centre + half is
  # 1 at successes == n, and the interval contains phat; in floats each can be
  # off by an ulp or so, so they are pinned and clamped.
  lo = 0.0 if successes == 0 else min(phat, max(0.0, centre - half))
  hi = 1.0 if successes == n else max(phat, min(1.0, centre + half))
  return lo, hi


def error_bars(values: Sequence[float], intervals: Sequence[Sequence[float]]) -> list[list[float]]:
  """Matplotlib's ``yerr`` for points with their intervals: ``[below, above]``,
  both >= 0 because each interval must contain its point.

  Raises:
    ValueError: an interval does not contain its point (it names the first).
  """
  for i, (v, (lo, hi)) in enumerate(zip(values, intervals)):
    if not lo <= v <= hi:
      raise ValueError(f"point {i}: {v!r} lies outside its interval [{lo!r}, {hi!r}]")
  return [[v - lo for v, (lo, _) in zip(values, intervals)],
          [hi - v for v, (_, hi) in zip(values, intervals)]]


def write_results(path: str | os.PathLike, payload: dict[str, Any]) -> pathlib.Path:
  """Writes JSON atomically (temp file then rename)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_jsonable))
  os.replace(tmp, path)
  return path


def _jsonable(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, float) and math.isinf(x):
    return None
  raise TypeError(f"not JSON serializable: {type(x).__name__}")


def add_lab_args(parser, *, model: str = "mnist_cnn") -> None:
  """Arguments every experiment script takes (dataset, model, output)."""
  parser.add_argument("--dataset", default="mnist5k", help="mnist5k (offline) or a TFDS name, e.g. cifar10")
  parser.add_argument("--data-dir", default=None, help="local TFDS data_dir")
  parser.add_argument("--model", default=model, help="mnist_cnn, vgg11 or mlp")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--out", default="docs/results", help="folder for the JSON and PNG")
  parser.add_argument("--tiny", action="store_true", help="a few steps only (smoke test)")
  parser.add_argument("--no-progress", action="store_true")


def lab_config(args, **overrides) -> LabConfig:
  kw = dict(dataset=args.dataset, data_dir=args.data_dir, model=args.model,
            batch_size=args.batch_size, learning_rate=args.lr)
  kw.update(overrides)
  return LabConfig(**kw)


def calibrated_tolerance(lab: Lab, given: str | None, *, clip: str, clip_value: float | None,
                         tiny: bool = False) -> verify.Tolerance:
  """The `--calibrated` JSON tolerance when given, else one calibrated here
  (2 steps when `tiny`, 8 otherwise) at the experiment's clip."""
  if given:
    return verify.Tolerance.from_dict(json.loads(given))
  return calibrate_tolerance(
      lab.model, *lab.train_data, lab.protocol(seed=0, p=1.0, clip=clip, clip_value=clip_value),
      num_steps=2 if tiny else 8).tolerance


@contextlib.contextmanager
def figure(path: str | os.PathLike, *, ncols: int = 1, size: tuple[float, float] = (6, 4)):
  """Yields the axes of a new figure (one per column) and saves it as PNG on exit."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, ncols, figsize=(size[0] * ncols, size[1]), squeeze=False)
  try:
    yield list(axes[0]) if ncols > 1 else axes[0][0]
    fig.tight_layout()
    fig.savefig(path, dpi=120)
  finally:
    plt.close(fig)


def save_experiment(out: str | os.PathLike, name: str, result: dict[str, Any], *, lab: Lab | None,
                    config: Any, argv: list[str] | None, plot) -> pathlib.Path:
  """Adds the provenance (lab, config, reproducing command) to `result`, writes
  ``out/name.json`` and draws ``out/name.png`` with ``plot(result, path)``."""
  import sys
  result.update(experiment=name, config=dataclasses.asdict(config),
                command=" ".join(["python", f"experiments/{name}.py", *(argv if argv is not None else sys.argv[1:])]))
  if lab is not None:
    result["lab"] = dataclasses.asdict(lab.cfg)
  out = pathlib.Path(out)
  path = write_results(out / f"{name}.json", result)
  plot(result, out / f"{name}.png")
  return path
