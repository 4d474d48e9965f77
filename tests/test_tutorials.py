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


def _calls(tree) -> set[str]:
    import ast
    return {node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            for node in ast.walk(tree) if isinstance(node, ast.Call)}


@pytest.mark.parametrize("script", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_checks_its_claims(script):
    """Each tutorial holds its prose to its numbers with asserts, so the run above fails when the
    numbers stop supporting the text."""
    import ast
    tree = ast.parse(script.read_text())
    assert any(isinstance(node, ast.Assert) for node in ast.walk(tree)), f"{script.name} asserts nothing"


def test_tutorial_9_uses_the_library_recipes():
    """Recipes live once (STYLE.md rule 15): tutorial 9 builds AdaLoRA and DRaFT-Q through the
    benchmark's experiment_for + prepare instead of restating their configs."""
    import ast
    script = next(p for p in TUTORIALS if p.name.startswith("09_"))
    calls = _calls(ast.parse(script.read_text()))
    assert {"experiment_for", "prepare", "train_config"} <= calls
    assert not calls & {"ControllerConfig", "AdaLoRAConfig", "CurvatureRankAllocator", "AdaLoRAAllocator",
                        "TrainConfig"}, calls
