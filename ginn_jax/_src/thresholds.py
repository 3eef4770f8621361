"""Measured stealth thresholds t* (experiment 7, `experiments/stealth_threshold.py`).

Each stored threshold names the experiment and the setting it came from
(model, dataset and its digest, clip, optimizer, attacker, steps, seeds), so
calibration can say how far below it a calibrated tolerance is, for the same
model and data, and say plainly when nothing was measured for them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import numpy as np

from ginn_jax._src.data import dataset_digest

DEFAULT_PATH = pathlib.Path(__file__).with_name("thresholds.json")


@dataclasses.dataclass(frozen=True)
class StoredThreshold:
  """One measured t* and where it came from.

  Attributes:
    t_star: the first swept tolerance (rel_l2 = max_abs = t, per leaf) at which
      the attacker's ASR reached `level`; None if none did (then `bracket[0]`
      is the largest t measured, and t* lies above it).
    bracket: [largest t below t* with ASR < level, t_star].
    t_interp: log-linear interpolation of the crossing inside `bracket`.
    level: the ASR that counts as a planted backdoor.
    setting: model, dataset, dataset_digest, clip, clip_value, batch_size,
      learning_rate, momentum, attacker, steps, seed, extra_seeds.
    experiment, command, results: the script, the exact command and the
      results file.
  """

  t_star: float | None
  bracket: tuple[float | None, float | None]
  t_interp: float | None
  level: float
  setting: dict[str, Any]
  experiment: str
  command: str
  results: str

  @property
  def reference(self) -> float | None:
    """The t* margins are measured against: `t_interp` where there is one (it
    is below `t_star`, so margins err low), else `t_star`."""
    return self.t_interp if self.t_interp is not None else self.t_star

  def describe(self) -> str:
    s = self.setting
    return (f"{self.experiment}: {s['attacker']} attacker, {s['model']} on {s['dataset']}, "
            f"{s['clip']} clip {s['clip_value']}, {s['steps']} steps, seed {s['seed']}"
            + "".join(f" and {e}" for e in s.get("extra_seeds", [])))


def store_threshold(path: str | os.PathLike, result: dict[str, Any], *, attacker: str,
                    train_data: tuple[np.ndarray, np.ndarray]) -> None:
  """Records `attacker`'s t* from an experiment-7 result in the file at `path`,
  replacing an earlier entry for the same setting."""
  path = pathlib.Path(path)
  th, lab, cfg = result["thresholds"][attacker], result["lab"], result["config"]
  setting = {"model": lab["model"], "dataset": lab["dataset"],
             "dataset_digest": dataset_digest(*train_data), "clip": cfg["clip"],
             "clip_value": cfg["clip_value"], "batch_size": lab["batch_size"],
             "learning_rate": lab["learning_rate"], "momentum": lab["momentum"],
             "attacker": attacker, "steps": cfg["steps"], "seed": cfg["seed"],
             "extra_seeds": list(cfg["extra_seeds"])}
  entry = {"t_star": th["t_star"], "bracket": th["bracket"], "t_interp": th["t_interp"],
           "level": th["level"], "from": th.get("from"), "setting": setting, "experiment": result["experiment"],
           "command": result["command"], "commands": result.get("commands", []),
           "partial": result.get("partial", False),
           "results": f"docs/results/{result['experiment']}.json"}
  entries = _read(path)
  same = lambda e: all(e["setting"].get(k) == setting[k] for k in  # noqa: E731
                       ("model", "dataset_digest", "clip", "clip_value", "attacker"))
  entries = [e for e in entries if not same(e)] + [entry]
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps({"thresholds": entries}, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


def _read(path: pathlib.Path) -> list[dict[str, Any]]:
  return json.loads(path.read_text())["thresholds"] if path.exists() else []


def lookup_thresholds(model_name: str, digest: str, *,
                      path: str | os.PathLike | None = None) -> list[StoredThreshold]:
  """Every stored threshold measured for this model on data with this digest."""
  out = []
  for e in _read(pathlib.Path(path) if path is not None else DEFAULT_PATH):
    if e["setting"]["model"] == model_name and e["setting"]["dataset_digest"] == digest:
      out.append(StoredThreshold(t_star=e["t_star"], bracket=tuple(e["bracket"]),
                                 t_interp=e["t_interp"], level=e["level"], setting=e["setting"],
                                 experiment=e["experiment"], command=e["command"],
                                 results=e["results"]))
  return out
