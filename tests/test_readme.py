"""The README's library example runs as written."""
import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
  block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
  out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr
  assert "caught at step 120 by the" in out.stdout  # p_witness = 1: at the first malicious step.
  assert "'num_violations': 0" in out.stdout


def test_readme_own_model_example_runs_nnx():
  """The "Use it with your own model" block (an NNX model): trains verified,
  and its batch-poisoning attacker is caught."""
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  block = next(b for b in blocks if "ginn.from_nnx" in b)
  out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr
  assert "'verified': True" in out.stdout and "'num_violations': 0" in out.stdout
  caught = re.search(r"caught at step (\d+)", out.stdout)
  assert caught and int(caught.group(1)) == 250, out.stdout  # p_witness = 1: its first malicious step.
  assert "witness plan" in out.stdout and "dot_general" in out.stdout
  accuracy = float(re.search(r"\} ([0-9.]+)", out.stdout).group(1))
  assert accuracy > 0.5, out.stdout  # 200 steps of the MLP on mnist5k.


def test_readme_lora_example_runs():
  """The "Fine-tune a pretrained model" block: a verified LoRA fine-tune of a
  pretrained base, every step witness-checked; a worker with a planted base
  is caught at its first step."""
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  block = next(b for b in blocks if "ginn.lora" in b)
  out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr
  assert "'verified': True" in out.stdout and "'num_violations': 0" in out.stdout, out.stdout
  assert re.search(r"frozen digest [0-9a-f]{16}", out.stdout), out.stdout
  caught = re.search(r"caught at step (\d+) by the witness check", out.stdout)
  assert caught and int(caught.group(1)) == 30, out.stdout  # The planted worker's first step.
