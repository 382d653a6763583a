"""Bad configs: each is ONE line on stderr, a non-zero exit, and nothing written."""

from pathlib import Path

import pytest
import yaml

from senseflow.cli import main
from senseflow.config import apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "configs/examples/tiny_custom.yaml").read_text())


def _write(tmp_path, data, name="cfg.yaml"):
    data = apply_overrides(data, [f"paths.output={tmp_path / 'run'}",
                                  f"paths.prompts={ROOT / 'configs/examples/prompts.txt'}"])
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


BAD = {
    "unknown top-level key": (["colour=red"], "colour: unknown key"),
    "unknown nested key": (["train.stpes=10"], "train.stpes: unknown key"),
    "wrong type": (["train.steps=many"], "train.steps"),
    "negative lr": (["optim.generator.lr=-1e-4"], "optim.generator.lr"),
    "zero lr": (["optim.fake_score.lr=0"], "optim.fake_score.lr"),
    "ttur 0": (["method.ttur=0"], "method.ttur"),
    "anchors not decreasing": (["generator.anchors=[1.0, 0.5, 0.75]"], "strictly decreasing"),
    "anchor out of range": (["generator.anchors=[1.5, 0.5]"], "(0, 1]"),
    "missing teacher path": (["teacher.family=sd3", "teacher.factory=null", "paths.teacher=/nonexistent/sd35"],
                             "paths.teacher"),
    "missing prompt file": (["paths.prompts=/nonexistent/prompts.txt"], "paths.prompts"),
    "unknown method": (["method.name=gan"], "method"),
    "ida lambda > 1": (["method.ida_lambda=1.5"], "method.ida_lambda"),
    "bad betas": (["optim.generator.betas=[0.9, 1.0]"], "betas"),
    "accumulation does not divide batch": (["train.grad_accum=3"], "divisible"),
    "guidance range reversed": (["method.real_guidance.cfg=[8, 2]"], "low <= high"),
    "custom without factory": (["teacher.factory=null"], "teacher.factory"),
    "bad sampler": (["generator.sampler=heun"], "generator.sampler"),
    "negative isg weight": (["method.isg_weight=-1"], "method.isg_weight"),
    "unknown built-in prompts": (["paths.prompts=builtin:toy-wrld"], "builtin:toy-world-open"),
    # issue 15: non-finite / out-of-range numbers that used to train (and save) NaN weights
    "infinite lr": (["optim.generator.lr=.inf"], "optim.generator.lr: Input should be a finite number"),
    "lr overflowing Adam": (["optim.generator.lr=1e39"], "optim.generator.lr: Input should be less than or equal"),
    "infinite weight decay": (["optim.fake_score.weight_decay=.inf"], "optim.fake_score.weight_decay"),
    "nan eps": (["optim.generator.eps=.nan"], "optim.generator.eps"),
    "lr * weight decay >= 1": (["optim.generator.lr=0.5", "optim.generator.weight_decay=2"], "lr * weight_decay = 1"),
    "infinite shift": (["teacher.shift=.inf"], "teacher.shift: Input should be a finite number"),
    "absurd batch": (["train.batch_size=1000000000000"], "train.batch_size: Input should be less than or equal"),
    "empty output": (["paths.output="], "paths.output: is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    overrides, needle = BAD[case]
    cfg = _write(tmp_path, BASE)
    argv = ["train", str(cfg)]
    for o in overrides:
        argv += ["--set", o]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("senseflow: error: ")
    assert needle in err, err
    assert not (tmp_path / "run").exists()


def test_unparseable_yaml_and_missing_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("paths: [unclosed\n")
    assert main(["train", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_empty_prompt_file_is_rejected_before_writing(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cfg = _write(tmp_path, BASE)
    assert main(["train", str(cfg), "--set", f"paths.prompts={empty}"]) == 2
    assert "contains no prompts" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_resolved_config_with_overrides(tmp_path, capsys):
    cfg = _write(tmp_path, BASE)
    assert main(["train", str(cfg), "--dry-run", "--set", "method.ttur=7"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["method"]["ttur"] == 7
    assert out["method"]["isg_loss"] == "pseudo_huber"  # defaults are filled in
    assert not (tmp_path / "run").exists()


def test_overrides_never_mutate_the_template():
    before = yaml.safe_dump(BASE)
    apply_overrides(BASE, ["train.steps=3", "new.section.key=1"])
    assert yaml.safe_dump(BASE) == before


def test_switching_method_by_override(tmp_path):
    cfg = _write(tmp_path, {k: v for k, v in BASE.items() if k != "method"} | {"method": {"name": "senseflow"}})
    conf = load_config(cfg, ["method.name=sid"])
    assert conf.method.name == "sid" and conf.method.lambda_sid == 100.0


def test_help_texts(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    assert "--dry-run" in capsys.readouterr().out


def test_config_reference_is_up_to_date():
    from senseflow.config_docs import render
    assert (ROOT / "docs/config.md").read_text() == render(), \
        "docs/config.md is stale: run `python -m senseflow.config_docs > docs/config.md`"


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("configs/*/*.yaml")))
def test_shipped_recipes_validate(recipe):
    """Every recipe in configs/ matches the schema (paths are checked at launch time, not here)."""
    config = load_config(ROOT / recipe, check_paths=False)
    if getattr(config.method, "adversarial_weight", 0) > 0 and config.method.name != "sid":
        assert config.discriminator is not None
