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
