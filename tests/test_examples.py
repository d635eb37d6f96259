"""The gallery examples run, in fast mode, and draw their figures.

Every ``examples/plot_*.py`` is run in a fresh interpreter under matplotlib's
Agg backend with ``SKLEARN_MAF_FAST=1``, which the examples read to use few
rows and epochs, so an API change that breaks an example fails here rather
than in the next documentation build.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("plot_*.py"))

# Runs one example, then fails unless it left at least one figure open.
RUNNER = """
import runpy, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
plt.show = lambda *args, **kwargs: None
runpy.run_path(sys.argv[1], run_name="__main__")
if not plt.get_fignums():
    sys.exit(sys.argv[1] + " drew no figure")
"""


def test_there_are_gallery_examples():
    assert len(EXAMPLES) >= 3, EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_is_a_gallery_page_with_a_fast_mode(path):
    """sphinx-gallery needs an RST title in the docstring; the tests need FAST."""
    source = path.read_text()
    docstring = ast.get_docstring(ast.parse(source)) or ""
    lines = docstring.strip().splitlines()
    if lines and set(lines[0]) == {"="}:  # an overline above the title
        lines = lines[1:]
    assert len(lines) >= 2 and set(lines[1]) == {"="} and len(lines[1]) >= len(lines[0]), (
        f"{path.name}: the module docstring must open with an RST title "
        "underlined with '='"
    )
    assert "SKLEARN_MAF_FAST" in source, (
        f"{path.name} must read SKLEARN_MAF_FAST and use few rows and epochs when it is set"
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_runs_in_fast_mode(path, tmp_path):
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(
        os.environ,
        SKLEARN_MAF_FAST="1",
        MPLBACKEND="Agg",
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
        PYTHONPATH=pythonpath,
    )
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout}\n{result.stderr}"
