"""docs/walkthrough.ipynb runs top to bottom, offline, on the bundled demo model: every
cell (whose asserts check the hand-computed layer, the hand-decoded Q4_K block and the
lens against the model's own numbers) executes without an error.

``python tests/test_walkthrough.py --update`` runs it and saves it with its outputs (the
notebook is kept in the repository with them)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "walkthrough.ipynb"


def execute(path: Path = NOTEBOOK, timeout: int = 900):
    """The notebook at ``path`` executed in a fresh Python kernel with no network (the
    Hub offline), from the docs folder."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the kernel's: nothing may be downloaded (plots: the inline backend)
    env.pop("MPLBACKEND", None)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=env)  # (handed to the kernel manager's start_kernel)
    return nb


@pytest.mark.slow
def test_the_walkthrough_runs():
    pytest.importorskip("nbclient", reason="the notebook runs with nbclient (pip install phi3ref[notebook])")
    pytest.importorskip("matplotlib", reason="the notebook plots with matplotlib (pip install phi3ref[notebook])")
    nb = execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    assert images >= 6  # RoPE, head scores, attention patterns, the lens, two of the sampler


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_walkthrough.py --update   (runs docs/walkthrough.ipynb and saves its outputs)")
    import nbformat

    nbformat.write(execute(), NOTEBOOK)
    print(f"wrote {NOTEBOOK} with its outputs")
