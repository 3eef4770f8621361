"""Experiment 7 (the stealth threshold t*) and the margin calibration reports below it."""
import dataclasses
import json
import pathlib
import sys
import warnings

import jax
import jax.numpy as jnp
import pytest

import ginn_jax as ginn
from ginn_jax._src import calibrate as calibrate_lib
from ginn_jax._src import cli, thresholds
from ginn_jax._src.lab.stealth_threshold import ATTACKERS, find_threshold, summarize

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _threshold(t_star, bracket, *, model="mlp", digest="x", clip="elementwise", clip_value=0.01):
  setting = {"model": model, "dataset": "digits", "dataset_digest": digest, "clip": clip,
             "clip_value": clip_value, "batch_size": 64, "learning_rate": 0.05, "momentum": 0.9,
             "attacker": "stealth", "steps": 1000, "seed": 0, "extra_seeds": [1]}
  return {"t_star": t_star, "bracket": list(bracket), "t_interp": None, "level": 0.5,
          "setting": setting, "experiment": "stealth_threshold",
          "command": "python experiments/stealth_threshold.py", "results": "r.json"}


def _write(path, *entries):
  path.write_text(json.dumps({"thresholds": list(entries)}))
  return path


# -- the sweep, end to end -------------------------------------------------------------------------


def test_quick_sweep_writes_results_and_a_stored_threshold(tmp_path):
  sys.path.insert(0, str(ROOT / "experiments"))
  try:
    import stealth_threshold as exp
  finally:
    sys.path.pop(0)
  store = tmp_path / "thresholds.json"
  assert exp.main(["--tiny", "--model", "mlp", "--dataset", "digits", "--out", str(tmp_path),
                   "--no-progress", "--store", str(store)]) == 0
  res = json.loads((tmp_path / "stealth_threshold.json").read_text())
  assert (tmp_path / "stealth_threshold.png").stat().st_size > 0
  assert {"runs", "honest", "thresholds", "all_runs", "config", "lab", "command", "experiment",
          "partial"} <= set(res)
  assert res["partial"] is False and res["command"].startswith("python experiments/stealth_threshold.py")
  assert [(r["attacker"], r["t"], r["seed"], r["steps"]) for r in res["runs"]] == [
      ("stealth", 1e-3, 0, 4), ("stealth", 1e-1, 0, 4)]
  for r in res["runs"]:
    assert 0.0 <= r["asr"] <= 1.0 and 0.0 <= r["clean_accuracy"] <= 1.0
    assert [c["step"] for c in r["curve"]] == [2, 4]
    # The attacker uses 90% of the tolerance, never more (re-computation probe).
    assert 0.85 < r["probe_worst"]["max_rel_l2"] <= 0.9 + 1e-4
    assert 0.85 < r["probe_worst"]["max_abs"] <= 0.9 + 1e-4
    assert r["probe_worst"]["witness_rel_l2"] > 0  # The witness check was run, and measured.
  th = res["thresholds"]["stealth"]
  assert set(th) >= {"t_star", "bracket", "t_interp", "monotone", "level", "bracket_runs", "from",
                     "primary_seed", "mean_over_seeds"}
  # The stored threshold names its setting, and calibration finds it by model and data digest.
  lab = exp.Lab(exp.lab_config(exp.argparse.Namespace(
      dataset="digits", data_dir=None, model="mlp", batch_size=64, lr=0.05)))
  found = ginn.lookup_thresholds("mlp", ginn.dataset_digest(*lab.train_data), path=store)
  assert len(found) == 1 and found[0].t_star == th["t_star"]
  assert found[0].setting["dataset"] == "digits" and found[0].setting["steps"] == 4
  assert found[0].setting["attacker"] == "stealth" and found[0].setting["clip"] == "elementwise"
  assert ginn.lookup_thresholds("mnist_cnn", found[0].setting["dataset_digest"], path=store) == []


def test_attackers_are_looked_up_by_name():
  assert "stealth" in ATTACKERS


# -- t* from synthetic results (hand-computed) ------------------------------------------------------


@pytest.mark.parametrize("points, t_star, bracket, t_interp, monotone", [
    # The hand measurements at 500 steps: 50% is crossed between 1e-2 and 5e-2;
    # log10 t* = -2 + (0.498 / 0.998) * log10(5).
    ([(1e-3, 0.001), (1e-2, 0.002), (5e-2, 1.0)], 5e-2, [1e-2, 5e-2], 0.0223246, True),
    # Unsorted and not monotone; halfway in ASR is the geometric mean sqrt(2e-2 * 3e-2).
    ([(3e-2, 0.6), (1e-2, 0.1), (5e-2, 0.3), (2e-2, 0.4)], 3e-2, [2e-2, 3e-2], 0.0244949, False),
    # Exactly at the level counts as reached.
    ([(1e-3, 0.0), (1e-2, 0.5)], 1e-2, [1e-3, 1e-2], 1e-2, True),
    # Reached at the smallest t: no lower end, no interpolation.
    ([(1e-3, 0.9), (1e-2, 1.0)], 1e-3, [None, 1e-3], None, True),
    # Never reached: t* is above the largest t swept.
    ([(1e-3, 0.0), (1e-1, 0.49)], None, [1e-1, None], None, True),
])
def test_find_threshold(points, t_star, bracket, t_interp, monotone):
  th = find_threshold(points)
  assert th["t_star"] == t_star and th["bracket"] == bracket and th["monotone"] is monotone
  if t_interp is None:
    assert th["t_interp"] is None
  else:
    assert th["t_interp"] == pytest.approx(t_interp, rel=1e-5)


def test_summarize_reports_the_lower_of_the_primary_seed_and_the_seed_mean():
  runs = [{"attacker": "stealth", "t": t, "seed": s, "asr": a, "clean_accuracy": 0.98}
          for t, s, a in [(1e-2, 0, 0.0), (2e-2, 0, 0.4), (3e-2, 0, 1.0), (2e-2, 1, 0.8)]]
  runs.append({"attacker": "honest", "t": None, "seed": 0, "asr": 0.0, "clean_accuracy": 0.98})
  th = summarize(runs, attacker="stealth", seed=0)
  # Seed 0 crosses between 2e-2 (0.4) and 3e-2 (1.0): 2e-2 * 1.5 ** (1/6) = 0.02140.
  assert th["primary_seed"]["t_star"] == 3e-2
  assert th["primary_seed"]["t_interp"] == pytest.approx(0.0213983, rel=1e-5)
  # The mean at 2e-2 is 0.6: between 1e-2 (0.0) and 2e-2, 1e-2 * 2 ** (5/6) = 0.01782.
  assert th["from"] == "mean over seeds" and th["t_star"] == 2e-2 and th["bracket"] == [1e-2, 2e-2]
  assert th["t_interp"] == pytest.approx(0.0178180, rel=1e-5)
  assert sorted((r["t"], r["seed"]) for r in th["bracket_runs"]) == [(1e-2, 0), (2e-2, 0), (2e-2, 1)]


# -- the margin and its warning ---------------------------------------------------------------------


def _stored(**kw):
  e = _threshold(**kw)
  return thresholds.StoredThreshold(t_star=e["t_star"], bracket=tuple(e["bracket"]), t_interp=None,
                                    level=0.5, setting=e["setting"], experiment=e["experiment"],
                                    command=e["command"], results=e["results"])


@pytest.mark.parametrize("t_star, bracket, tol, margin, at_least, safe", [
    (2e-2, (1e-2, 2e-2), (1e-5, 1e-4), 200.0, None, True),  # The larger bound counts.
    (2e-2, (1e-2, 2e-2), (5e-3, 1e-3), 4.0, None, False),
    (2e-2, (1e-2, 2e-2), (2e-3, 2e-3), 10.0, None, True),  # 10x exactly is not under 10x.
    (None, (1e-1, None), (1e-5, 1e-5), None, 1e4, True),  # t* above the sweep: a lower bound.
    (None, (1e-1, None), (2e-2, 2e-2), None, 5.0, False),
])
def test_tolerance_margin(t_star, bracket, tol, margin, at_least, safe):
  m = ginn.tolerance_margin(ginn.Tolerance(*tol), _stored(t_star=t_star, bracket=bracket))
  assert m.safe is safe and m.at_least == (None if at_least is None else pytest.approx(at_least))
  assert m.margin == (None if margin is None else pytest.approx(margin))
  assert "mlp on digits" in m.note and "elementwise clip 0.01" in m.note


def test_margin_uses_the_interpolated_crossing_where_there_is_one():
  th = dataclasses.replace(_stored(t_star=3e-2, bracket=(2e-2, 3e-2)), t_interp=2.5e-2)
  assert ginn.tolerance_margin(ginn.Tolerance(1e-5, 1e-5), th).margin == pytest.approx(2500.0)


def test_no_margin_for_the_paper_elementwise_rule():
  with pytest.raises(ValueError, match="element-wise"):
    ginn.tolerance_margin(ginn.PAPER_PROTOTYPE_TOLERANCE, _stored(t_star=2e-2, bracket=(1e-2, 2e-2)))


def test_margin_says_when_the_clip_differs():
  m = ginn.tolerance_margin(ginn.Tolerance(1e-5, 1e-5), _stored(t_star=2e-2, bracket=(1e-2, 2e-2)),
                            config=ginn.ProtocolConfig(clip="global_norm", clip_value=1.0))
  assert "differs" in m.note and m.margin == pytest.approx(2000.0)


@pytest.fixture(scope="module")
def digits():
  """The quick sweep's data and model (so calibration reuses its compiled functions)."""
  ds = ginn.load_dataset("digits")
  model = ginn.get_model("mlp", input_shape=ds.image_shape, num_classes=ds.num_classes)
  return model, ds.train_images, ds.train_labels


def test_calibration_warns_when_the_margin_is_under_10x(digits, tmp_path):
  model, images, labels = digits
  path = _write(tmp_path / "t.json", _threshold(5e-5, (1e-5, 5e-5),
                                                 digest=ginn.dataset_digest(images, labels)))
  with pytest.warns(ginn.ToleranceMarginWarning) as rec:
    cal = ginn.calibrate_tolerance(model, images, labels, ginn.ProtocolConfig(batch_size=64),
                                   num_steps=2, thresholds_path=path)
  # Two CPU devices agree bitwise, so the tolerances are the floors: 1e-5 and 1e-4 (witness).
  assert sorted(str(w.message).split(" below")[0] for w in rec) == [
      "the calibrated tolerance is only 5x", "the calibrated witness tolerance is only 0.5x"]
  assert cal.tolerance == ginn.Tolerance(1e-5, 1e-5) and cal.max_rel_l2 == 0.0  # Old fields kept.
  assert cal.margin.margin == pytest.approx(5.0) and not cal.margin.safe
  assert cal.witness_margin.margin == pytest.approx(0.5)
  assert "no stealth" not in cal.margin_note and cal.precision is not None
  lines = cli._margin_lines(cal)
  assert lines[0].startswith("WARNING: stealth margin under 10x: tolerance 5x below t* = 5e-05")
  assert lines[-1].startswith("precision: no reduced-precision setting detected (worker on cpu")


def _margins(path, digest, tol=(1e-5, 1e-5), wtol=(1e-4, 1e-4)):
  with warnings.catch_warnings():
    warnings.simplefilter("error", ginn.ToleranceMarginWarning)
    m, wm, note = calibrate_lib.stealth_margins(ginn.Tolerance(*tol), ginn.Tolerance(*wtol),
                                                model_name="mlp", digest=digest, path=path)
  cal = calibrate_lib.Calibration(tolerance=ginn.Tolerance(*tol), max_rel_l2=0.0, max_abs=0.0,
                                  num_steps=1, safety_factor=10.0, witness_tolerance=ginn.Tolerance(*wtol),
                                  margin=m, witness_margin=wm, margin_note=note,
                                  precision=ginn.detect_precision())
  return cal


def test_a_safe_margin_is_reported_without_warning(tmp_path):
  path = _write(tmp_path / "t.json", _threshold(2e-2, (1e-2, 2e-2), digest="d"),
                _threshold(1e-3, (None, 1e-3), digest="another dataset"))
  cal = _margins(path, "d")
  assert cal.margin.margin == pytest.approx(2000.0) and cal.margin.safe
  assert cal.witness_margin.margin == pytest.approx(200.0)
  assert cli._margin_lines(cal)[0].startswith("stealth margin: tolerance 2,000x below t* = 0.02")


def test_the_smallest_stored_threshold_counts(tmp_path):
  other = _threshold(3e-2, (2e-2, 3e-2), digest="d")
  other["setting"]["attacker"] = "another attacker"
  cal = _margins(_write(tmp_path / "t.json", other, _threshold(2e-2, (1e-2, 2e-2), digest="d")), "d")
  assert cal.margin.threshold.t_star == 2e-2


@pytest.mark.parametrize("entries", [None, [], [_threshold(2e-2, (1e-2, 2e-2), model="mnist_cnn")]])
def test_no_measurement_gives_no_margin(tmp_path, entries):
  path = tmp_path / "missing.json" if entries is None else _write(tmp_path / "t.json", *entries)
  cal = _margins(path, "x")
  assert cal.margin is None and cal.witness_margin is None
  assert "no stealth threshold measured for model 'mlp'" in cal.margin_note
  line = cli._margin_lines(cal)[0]
  assert line.startswith("stealth margin: unknown (no stealth threshold") and "x below" not in line


def test_the_shipped_thresholds_name_their_setting():
  data = json.loads(thresholds.DEFAULT_PATH.read_text())["thresholds"]
  assert data, "experiment 7's measurement is shipped with the library"
  for e in data:
    assert {"model", "dataset", "dataset_digest", "clip", "clip_value", "attacker", "steps",
            "seed"} <= set(e["setting"])
    assert e["command"].startswith("python experiments/stealth_threshold.py")


# -- precision settings ---------------------------------------------------------------------------


class _Bf16Model:
  name = "bf16"

  @staticmethod
  def init(key):
    del key
    return {"w": jnp.zeros((2, 2), jnp.bfloat16), "b": jnp.zeros((2,), jnp.float32)}


def test_precision_defaults_detect_nothing(mlp, monkeypatch):
  for k in ("NVIDIA_TF32_OVERRIDE", "JAX_DEFAULT_MATMUL_PRECISION"):
    monkeypatch.delenv(k, raising=False)
  p = ginn.detect_precision(mlp)
  assert not p.reduced and p.param_dtypes == ("float32",) and p.worker_platform == "cpu"


def test_precision_detects_bfloat16_parameters_and_reduced_matmuls(monkeypatch):
  monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "1")
  jax.config.update("jax_default_matmul_precision", "tensorfloat32")
  try:
    p = ginn.detect_precision(_Bf16Model())
  finally:
    jax.config.update("jax_default_matmul_precision", None)
  assert p.reduced and p.param_dtypes == ("bfloat16", "float32")
  assert p.matmul_precision == "tensorfloat32" and p.env["NVIDIA_TF32_OVERRIDE"] == "1"
  assert [f.split(":")[0] for f in p.findings] == [
      "jax_default_matmul_precision='tensorfloat32'", "parameters in bfloat16"]
  assert p.to_dict()["reduced_precision_detected"] is True


def test_precision_detects_the_environment_variable(monkeypatch):
  monkeypatch.setenv("JAX_DEFAULT_MATMUL_PRECISION", "bfloat16")
  p = ginn.detect_precision()
  assert p.findings == ("JAX_DEFAULT_MATMUL_PRECISION='bfloat16': reduced-precision float32 matmuls",)
