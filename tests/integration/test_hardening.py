"""The hardening pass (issue 15), through the CLI as a careless or hostile user would use it.

Every refusal is ONE line on stderr, a non-zero exit, and the output directory byte-for-byte as
it was; the silent cases are checked for the correct value.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from senseflow.cli import main
from senseflow.train.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "configs/examples/tiny_custom.yaml").read_text())
PROMPTS = ROOT / "configs/examples/prompts.txt"
COMMON = ["--set", f"paths.prompts={PROMPTS}", "--set", "train.progress=false", "--set", "train.tensorboard=false",
          "--set", "teacher.resolution=8", "--set", "train.num_samples=2", "--set", "train.batch_size=2"]


def _cfg(tmp_path: Path) -> Path:
    cfg = tmp_path / "cfg.yaml"
    if not cfg.exists():
        cfg.write_text(yaml.safe_dump(BASE))
    return cfg


def _train(tmp_path: Path, out: Path, *sets: str, resume: str | None = None) -> int:
    argv = ["train", str(_cfg(tmp_path)), "--set", f"paths.output={out}", *COMMON]
    for s in sets:
        argv += ["--set", s]
    if resume is not None:
        argv += ["--resume", resume]
    return main(argv)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (directories as markers): byte-for-byte comparison."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


def _one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("senseflow: error: "), err
    assert needle in err, err
    return err


@pytest.fixture()
def run2(tmp_path, capsys):
    """A finished 2-step run (checkpoint at step 2)."""
    out = tmp_path / "run"
    assert _train(tmp_path, out, "train.steps=2") == 0
    capsys.readouterr()
    return out


# -- 1. nothing written before everything is validated -------------------------------------------
def test_refused_resumes_leave_the_run_byte_for_byte_unchanged(tmp_path, run2, capsys):
    before = _snapshot(run2)
    assert _train(tmp_path, run2, "train.steps=4", resume=str(tmp_path / "nowhere")) == 2
    _one_line_error(capsys, "not a checkpoint directory")
    # a checkpoint of a run with another shape: the key is named, the saved config is kept
    assert _train(tmp_path, run2, "train.steps=4", "teacher.resolution=16") == 2
    _one_line_error(capsys, "teacher.resolution was 8")
    assert _train(tmp_path, run2, "train.steps=4", "method={name: dmd2, real_guidance: {cfg: 3.0}}") == 2
    _one_line_error(capsys, "method.name was 'senseflow'")
    assert _snapshot(run2) == before
    assert yaml.safe_load((run2 / "config.yaml").read_text())["teacher"]["resolution"] == 8


def test_data_failing_at_the_first_batch_writes_nothing(tmp_path, capsys):
    from PIL import Image
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(data / "ok.png")
    Image.new("RGB", (64, 64), (10, 200, 30)).save(data / "cut.png")
    raw = (data / "cut.png").read_bytes()
    (data / "cut.png").write_bytes(raw[: len(raw) // 2])  # the header passes, decoding fails
    (data / "set.json").write_text('{"image_paths": ["ok.png", "cut.png"], "prompts": ["a", "b"]}')
    out = tmp_path / "run"
    argv = ["train", str(_cfg(tmp_path)), "--set", f"paths.output={out}", *COMMON, "--set", "paths.prompts=null",
            "--set", f"paths.image_text={data / 'set.json'}", "--set", "train.steps=2"]
    assert main(argv) == 2
    _one_line_error(capsys, "cut.png")
    assert not out.exists()


def test_a_changed_config_on_resume_is_never_replaced_silently(tmp_path, run2, capsys):
    first = (run2 / "config.yaml").read_text()
    assert _train(tmp_path, run2, "train.steps=3") == 0
    err = capsys.readouterr().err
    assert "train.steps" in err and "config_history" in err, err
    assert yaml.safe_load((run2 / "config.yaml").read_text())["train"]["steps"] == 3
    assert (run2 / "config_history/config_step_00000002.yaml").read_text() == first


# -- 2. no non-finite weights, no exit 0 on a diverged run ------------------------------------------
def test_fp16_teacher_trains_fp32_weights_and_optimiser_state(tmp_path):
    from senseflow import api
    from senseflow.config import load_config
    config = load_config(_cfg(tmp_path), [f"paths.output={tmp_path / 'run'}", f"paths.prompts={PROMPTS}",
                                          "train.progress=false", "train.tensorboard=false", "teacher.resolution=8",
                                          "train.steps=2", "train.batch_size=2", "train.num_samples=2",
                                          "teacher.dtype=float16"])
    trainer = api.build_trainer(config)
    assert {p.dtype for p in trainer.method.models.teacher.parameters()} == {torch.float16}
    trainer.fit()
    for name, net in trainer.networks.items():
        assert {p.dtype for p in net.parameters()} == {torch.float32}, name
        assert all(torch.isfinite(p).all() for p in net.parameters()), name
        states = [v for st in trainer.optimizers[name].state.values() for v in st.values()
                  if isinstance(v, torch.Tensor) and v.ndim > 0]
        assert states and {v.dtype for v in states} == {torch.float32}, name


def test_a_diverging_step_stops_nonzero_and_writes_no_nonfinite_weights(tmp_path, capsys, monkeypatch):
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *a, **k):  # the 5th optimiser step (iteration 3's generator phase) overflows
        out = real_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 5:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "run"
    assert _train(tmp_path, out, "train.steps=4", "train.checkpoint_every=2") == 2
    _one_line_error(capsys, "training diverged at step 3")
    assert latest_checkpoint(out).name == "step_00000002"
    assert not (out / "student").exists()
    from safetensors.torch import load_file
    for f in latest_checkpoint(out).glob("*.safetensors"):
        assert all(torch.isfinite(v).all() for v in load_file(str(f)).values()), f


def test_checkpoints_and_exports_refuse_nonfinite_values(tmp_path):
    from senseflow.export import export_student
    from senseflow.generator import FewStepGenerator
    from senseflow.teachers.base import Denoiser, SenseflowError
    from senseflow.teachers.custom import tiny_example
    from senseflow.train.checkpoint import save_checkpoint
    net = torch.nn.Linear(2, 2)
    first = save_checkpoint(tmp_path, 1, {"generator": net}, {"step": 1})
    before = _snapshot(tmp_path)
    with torch.no_grad():
        net.weight[0, 1] = float("nan")
    with pytest.raises(SenseflowError, match=r"\(generator\): weight holds non-finite"):
        save_checkpoint(tmp_path, 2, {"generator": net}, {"step": 2})
    with pytest.raises(SenseflowError, match="exp_avg"):
        save_checkpoint(tmp_path, 2, {"generator": torch.nn.Linear(2, 2)},
                        {"optimizers": {"generator": {"state": {0: {"exp_avg": torch.tensor([1.0, float("inf")])}}}}})
    assert _snapshot(tmp_path) == before and latest_checkpoint(tmp_path) == first
    adapter, backbone = tiny_example(resolution=8)
    with torch.no_grad():
        backbone.out.bias.fill_(float("inf"))
    with pytest.raises(SenseflowError, match="out.bias"):
        export_student(FewStepGenerator(Denoiser(backbone, adapter), [1.0]), tmp_path / "student", {})
    assert not (tmp_path / "student/student.safetensors").exists()


# -- 3. one run per directory --------------------------------------------------------------------------
def test_a_second_trainer_is_refused_naming_the_first_and_the_lock_dies_with_it(tmp_path, run2, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from senseflow.train.lock import "
         "lock_run_dir; lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)", str(run2)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(run2)
        assert _train(tmp_path, run2, "train.steps=3") == 2
        _one_line_error(capsys, f"in use by process {holder.pid}")
        assert _snapshot(run2) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert _train(tmp_path, run2, "train.steps=3") == 0  # the kernel dropped the killed holder's lock
    assert latest_checkpoint(run2).name == "step_00000003"
    assert not (run2 / ".lock").exists()  # released at the end of the run


def test_stale_temporary_checkpoints_are_removed_when_a_run_starts(tmp_path, run2):
    ckpts = run2 / "checkpoints"
    (ckpts / "step_00000099.tmp").mkdir()
    (ckpts / "step_00000099.tmp/generator.safetensors").write_bytes(b"half")
    (ckpts / ".latest.tmp").write_text("step_00000099")
    assert _train(tmp_path, run2, "train.steps=3") == 0
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000002", "step_00000003"]


# -- 4. tracebacks -> one line -------------------------------------------------------------------------
def test_damaged_checkpoints_are_one_line_and_change_nothing(tmp_path, run2, capsys):
    ckpt = latest_checkpoint(run2)
    weights = ckpt / "generator.safetensors"
    good = weights.read_bytes()
    cases = {"truncated": good[: len(good) // 2], "empty": b"",
             "oversized header": (2 ** 60).to_bytes(8, "little") + b"{}"}
    for name, payload in cases.items():
        weights.write_bytes(payload)
        before = _snapshot(run2)
        assert _train(tmp_path, run2, "train.steps=3") == 2, name
        _one_line_error(capsys, "the file is damaged")
        assert _snapshot(run2) == before, name
    weights.write_bytes(good)
    meta = (ckpt / "meta.json").read_bytes()
    (ckpt / "meta.json").write_text('{"step": 2, "networks": [')
    before = _snapshot(run2)
    assert _train(tmp_path, run2, "train.steps=3", resume=str(ckpt)) == 2
    _one_line_error(capsys, "meta.json' is damaged")
    assert _snapshot(run2) == before
    (ckpt / "meta.json").write_bytes(meta)
    # a binary `latest` pointer is ignored: the newest complete checkpoint is resumed
    (run2 / "checkpoints/latest").write_bytes(b"\x89\xff\x00\x13binary")
    assert latest_checkpoint(run2) == ckpt
    assert _train(tmp_path, run2, "train.steps=3") == 0
    assert "from step 2" in capsys.readouterr().out


def test_refused_sharded_metadata_is_one_line(tmp_path):
    import pickle

    from senseflow.teachers.base import SenseflowError
    from senseflow.train.distributed import DistContext
    from senseflow.train.sharded import consolidate_network, load_sharded, save_sharded
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    path = save_sharded(tmp_path, 1, {"generator": net}, {"generator": opt}, {"step": 1}, {}, DistContext())

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    (path / ".metadata").write_bytes(pickle.dumps(Evil()))
    for call in (lambda: load_sharded(path, {"generator": net}, {"generator": opt}),
                 lambda: consolidate_network(path, "generator", tmp_path / "out.safetensors")):
        with pytest.raises(SenseflowError) as err:
            call()
        assert "not allowed" in str(err.value) and len(str(err.value).splitlines()) == 1
    (path / ".metadata").write_bytes(b"\x80\x04truncated")
    with pytest.raises(SenseflowError, match="corrupt checkpoint metadata"):
        load_sharded(path, {"generator": net}, {"generator": opt})
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out.safetensors").exists()


def test_config_and_environment_tracebacks_are_one_line(tmp_path, capsys, monkeypatch):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    assert main(["train", str(binary)]) == 2
    _one_line_error(capsys, "is not UTF-8 text")
    out = tmp_path / "run"
    assert _train(tmp_path, out, "teacher.factory=json:dumps") == 2
    _one_line_error(capsys, "teacher.factory 'json:dumps' needs argument 'obj'")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert _train(tmp_path, blocker / "run") == 2
    _one_line_error(capsys, "is a file")
    # an image over PIL's decompression-bomb limit
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    Image.new("RGB", (16, 16)).save(tmp_path / "big.png")
    (tmp_path / "set.json").write_text('{"image_paths": ["big.png"], "prompts": ["a"]}')
    argv = ["train", str(_cfg(tmp_path)), "--set", f"paths.output={out}", *COMMON, "--set", "paths.prompts=null",
            "--set", f"paths.image_text={tmp_path / 'set.json'}"]
    assert main(argv) == 2
    _one_line_error(capsys, "decompression-bomb limit")
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_unwritable_output_is_one_line(tmp_path, capsys):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert _train(tmp_path, locked / "run") == 2
        _one_line_error(capsys, "permission denied")
    finally:
        locked.chmod(0o700)


def test_bad_max_shard_size_is_one_line(tmp_path, capsys):
    from senseflow.export_diffusers import parse_shard_size
    assert parse_shard_size("5GB") == 5 * 10 ** 9 and parse_shard_size("1.5mb") == 1_500_000
    assert parse_shard_size(1024) == 1024
    student = tmp_path / "student"
    student.mkdir()
    (student / "student.json").write_text('{"family": "sd3", "teacher": "/nowhere", "resolution": 32, '
                                          '"anchors": [1.0]}')
    (student / "student.safetensors").write_bytes(b"")
    for bad in ("lots", "0", "-3GB", "GB"):
        assert main(["export", "--student", str(student), "--out", str(tmp_path / "out"),
                     f"--max-shard-size={bad}"]) == 2, bad
        _one_line_error(capsys, "--max-shard-size")
    assert not (tmp_path / "out").exists()


# -- 5. silent wrong results -> refused or correct -----------------------------------------------------
def test_first_batch_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, capsys):
    from senseflow.teachers.base import SenseflowError
    from senseflow.train.preflight import batch_bytes, check_batch_memory
    # 4 float32 latent copies of a (4, 64, 64) latent, micro-batch 8: 4 * 8 * 16384 * 4 bytes
    assert batch_bytes(8, (4, 64, 64)) == 2_097_152
    check_batch_memory(16, 2, (4, 64, 64), torch.device("cpu"), available=2_097_152)
    with pytest.raises(SenseflowError, match="micro-batch 8"):
        check_batch_memory(16, 2, (4, 64, 64), torch.device("cpu"), available=2_097_151)
    out = tmp_path / "run"
    # 4096 images of 3 x 4096 x 4096 float32 pixels: 3 TiB of latents, more than any machine running this
    assert _train(tmp_path, out, "train.batch_size=4096", "teacher.resolution=4096") == 2
    _one_line_error(capsys, "GiB for its latents alone")
    assert not out.exists()


def test_running_out_of_memory_in_the_first_step_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from senseflow.train.trainer import Trainer

    def oom(self, phase, batch):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes")
    monkeypatch.setattr(Trainer, "run_phase", oom)
    out = tmp_path / "run"
    assert _train(tmp_path, out, "train.steps=2") == 2
    _one_line_error(capsys, "the first training step ran out of cpu memory with train.batch_size 2")
    assert not out.exists()

    def bug(self, phase, batch):
        raise RuntimeError("shape mismatch")  # any other error stays a traceback (a bug, not a user error)
    monkeypatch.setattr(Trainer, "run_phase", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        _train(tmp_path, out, "train.steps=2")
    assert not out.exists()


def test_sixteen_bit_png_is_scaled_by_its_real_bit_depth(tmp_path):
    import numpy as np
    from PIL import Image

    from senseflow.data.image_text import load_image
    values = np.array([[32768, 65535], [1000, 0]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    img = load_image(tmp_path / "gray16.png", 2)
    # v * 255 / 65535 rounded: 32768 -> 128, 65535 -> 255, 1000 -> 4, 0 -> 0; then x / 127.5 - 1
    expected = torch.tensor([[128, 255], [4, 0]], dtype=torch.float32) / 127.5 - 1.0
    for c in range(3):
        assert torch.equal(img[c], expected), img[c]


def test_alias_bomb_and_duplicate_keys_are_refused(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb.write_text("\n".join(lines) + "\n")
    assert main(["train", str(bomb)]) == 2
    _one_line_error(capsys, "expands to more than")
    dup = tmp_path / "dup.yaml"
    dup.write_text(yaml.safe_dump(BASE) + "train:\n  steps: 3\n")
    assert main(["train", str(dup)]) == 2
    _one_line_error(capsys, "duplicate key 'train'")


def test_a_directory_where_a_file_is_expected_is_named_as_one(tmp_path, capsys):
    folder = tmp_path / "prompts_dir"
    folder.mkdir()
    out = tmp_path / "run"
    assert _train(tmp_path, out, f"paths.prompts={folder}") == 2
    _one_line_error(capsys, "is a directory")
    assert main(["train", str(tmp_path)]) == 2
    _one_line_error(capsys, "is a directory")
    assert not out.exists()
    from senseflow.data.image_text import load_image_text
    from senseflow.data.prompts import load_prompts
    from senseflow.teachers.base import SenseflowError
    for load in (load_prompts, load_image_text):
        with pytest.raises(SenseflowError, match="is a directory"):
            load(folder)


# -- 6. packaging: peft only where LoRA is used --------------------------------------------------------
def test_without_peft_plain_students_work_and_lora_names_the_extra(tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "peft" or m.startswith("peft.")] or ["peft"]:
        monkeypatch.setitem(sys.modules, name, None)
    from senseflow.lora import has_lora, peft_available
    assert not peft_available()
    out = tmp_path / "run"
    assert _train(tmp_path, out, "train.steps=1") == 0
    from senseflow.student import load_student
    loaded = load_student(out / "student")
    assert not loaded.has_lora and not has_lora(loaded.backbone)
    assert _train(tmp_path, tmp_path / "lora", "generator.lora={rank: 2}", "fake_score.lora={rank: 2}") == 2
    _one_line_error(capsys, "pip install 'senseflow[lora]'")
    assert not (tmp_path / "lora").exists()


# -- 7. say what happened ------------------------------------------------------------------------------
def test_a_resumed_run_says_so_in_one_line_without_progress_bars(tmp_path, run2, capsys):
    assert _train(tmp_path, run2, "train.steps=3") == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("resuming")]
    assert lines == [f"resuming {run2} from step 2 (checkpoint {run2 / 'checkpoints/step_00000002'})"]


# -- kill -9 while a checkpoint is being written -------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("where", ["weights", "renamed"])
def test_kill_9_inside_a_checkpoint_write_resumes_bit_exactly(tmp_path, capsys, where):
    """Killed while writing step 4: half a weights file in step_4.tmp, or step_4 complete but `latest`
    still naming step 2.  Either way the run resumes from step 2 and ends bit-identical to a straight run."""
    from safetensors.torch import load_file
    straight = tmp_path / "straight"
    assert _train(tmp_path, straight, "train.steps=6", "train.checkpoint_every=2") == 0
    killed = tmp_path / "killed"
    args = ["train", str(_cfg(tmp_path)), "--set", f"paths.output={killed}", *COMMON,
            "--set", "train.steps=6", "--set", "train.checkpoint_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.kill_in_checkpoint", where, "4", "--", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:], time.time() - t0)
    capsys.readouterr()
    assert main(args) == 0
    assert "from step 2 " in capsys.readouterr().out
    a = load_file(str(straight / "student/student.safetensors"))
    b = load_file(str(killed / "student/student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in (killed / "checkpoints").iterdir() if p.name.endswith(".tmp")]
