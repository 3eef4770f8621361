"""The walkthrough notebook runs top to bottom (so it cannot rot)."""
import pathlib
import re

import nbformat
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"


def test_walkthrough_notebook_runs(monkeypatch):
  monkeypatch.setenv("GINN_NOTEBOOK_STEPS", "60")  # A tiny configuration for CI.
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert re.search(r"caught at: \d+", outputs), outputs[-2000:]
  assert "StructureMismatch" in outputs  # The malformed report was refused.
  assert re.search(r"witness check caught it at: (\d+)", outputs), outputs[-2000:]
  first, caught = re.search(r"first malicious step: (\d+) witness check caught it at: (\d+)", outputs).groups()
  assert first == caught  # Every step's witness is checked: caught at the first malicious step.
  first, caught = map(int, re.search(r"LM backdoor: first malicious step: (\d+) caught at: (\d+)", outputs).groups())
  assert caught >= first  # The language model's backdoor was caught, never before it began.
