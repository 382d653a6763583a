"""benchmarks/toy_ablation.py: every variant is a valid recipe, and the report aggregates seeds correctly."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from senseflow.config import load_config
from senseflow.toy.demo import RECIPES, STUDENT_ANCHORS

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "toy_ablation.py"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("toy_ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_ablation"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_variant_is_a_valid_recipe_with_its_overrides(ablation):
    for name, v in ablation.VARIANTS.items():
        recipe = RECIPES / f"{v.recipe}.yaml"
        if not recipe.is_file():
            pytest.fail(f"variant {name}: no recipe {recipe}")
        config = load_config(recipe, [f"generator.anchors={STUDENT_ANCHORS[v.steps]}", *v.overrides])
        assert len(config.generator.anchors) == v.steps
    recipe_lr = load_config(RECIPES / "dmd2.yaml").optim.generator.lr
    pushed = load_config(RECIPES / "dmd2.yaml", list(ablation.PUSHED))
    assert pushed.method.ttur == 1 and pushed.optim.generator.lr == pytest.approx(3 * recipe_lr)
    ida_only = load_config(RECIPES / "senseflow.yaml", list(ablation.VARIANTS["dmd2_ida"].overrides))
    assert ida_only.method.ida and ida_only.method.isg_weight == 0.0


def _run(variant, seed, accs, fd=10.0):
    curve = [{"iteration": 25 * i, "attr_acc": a, "fd_real": fd, "fd_teacher": fd / 2} for i, a in enumerate(accs)]
    return {"variant": variant, "label": variant.upper(), "steps": 4, "seed": seed, "train_seconds": 5.0,
            "final": curve[-1], "curve": curve}


def test_report_takes_mean_std_best_and_drop_over_seeds(ablation, tmp_path, capsys):
    teacher = {"32": {"cfg": 3.0, "nfe": 64, "attr_acc": 0.9, "fd_real": 5.0},
               "4": {"cfg": 3.0, "nfe": 8, "attr_acc": 0.5, "fd_real": 50.0, "fd_teacher": 20.0}}
    (tmp_path / "teacher.json").write_text(json.dumps(teacher))
    for seed, accs in enumerate([[0.9, 0.8, 0.6], [0.9, 0.7, 0.7], [0.9, 0.6, 0.5]]):
        (tmp_path / "dmd2").mkdir(exist_ok=True)
        (tmp_path / "dmd2" / f"seed{seed}.json").write_text(json.dumps(_run("dmd2", seed, accs)))
    ablation.report(type("A", (), {"out": str(tmp_path)})())
    table = (tmp_path / "table.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| DMD2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "3"
    assert cells[4] == "0.900"  # iteration 0, the same for every seed
    assert cells[5] == "0.600 +- 0.100"  # final: 0.6, 0.7, 0.5
    assert cells[6] == "0.700 +- 0.100"  # best after iteration 0: 0.8, 0.7, 0.6
    assert cells[7] == "0.100 +- 0.100"  # drop: 0.2, 0.0, 0.1
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert "teacher, Euler, CFG 3 | 32 |" in table
