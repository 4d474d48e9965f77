"""Every tutorial runs top to bottom in its fast mode and draws its figures."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parent.parent / "tutorials").glob("[0-9][0-9]_*.py"))


def test_there_are_tutorials():
    assert len(TUTORIALS) >= 10, [p.name for p in TUTORIALS]


@pytest.mark.parametrize("script", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_fast_and_draws(script, tmp_path):
    env = dict(os.environ, NANOPEFT_FAST="1", NANOPEFT_FIGURES=str(tmp_path), MPLBACKEND="Agg",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    figures = [p for p in tmp_path.glob("*.png") if p.stat().st_size > 1000]
    assert figures, f"{script.name} drew no figure into NANOPEFT_FIGURES"
