"""Read-only and full disks, and damaged files in a finished run.

The disks are real where the test may mount one (root: a tmpfs, remounted read-only or filled), and
the tests that need one are skipped elsewhere, saying why; the rest simulate the error. What each
checks is what the README promises for a user error: one `error:` line naming the path and the
cause, exit 2, every file that existed before byte-identical; and a finished run reruns as done
without writing anything.
"""

import errno
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import reference_caches, tiny_world, write_pairs
from mtcore.cli import main
from mtcore.errors import MtcoreError

pytestmark = pytest.mark.usefixtures("torch_cpu_path")

TINY_CFG = dict(iters=1, samples=3, max_new_tokens=6, beta=0.5, dpo_lr=1e-3, dpo_batch_size=4, save_every=2,
                selection_size=4, rm_split_size=6, rm_lr=1e-3, rm_batch_size=4, tau=0.0, max_length=64,
                micro_batch_tokens=512, policy_split_size=0)
TINY = [a for k, v in TINY_CFG.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_error(result) -> str:
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output[-3000:]}"
    assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception, SystemExit))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().splitlines()[-1] == errors[0], result.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny policy, RM and prompts, pairs for `mtcore dpo`, and one finished `mtcore train` run."""
    w = tmp_path_factory.mktemp("world")
    policy, reward, prompts = tiny_world(w)
    write_pairs(w / "pairs.jsonl", 6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        result = CliRunner().invoke(main, ["train", *real_args(w), "--out", str(w / "run")])
    assert result.exit_code == 0, result.output[-3000:]
    return w


def real_args(w: Path) -> list[str]:
    return ["--policy", str(w / "policy"), "--reward", str(w / "reward"), "--prompts", str(w / "prompts.jsonl"), *TINY]


def dpo_args(w: Path, out: Path, pairs: Path | None = None) -> list[str]:
    return ["dpo", "--policy", str(w / "policy"), "--pairs", str(pairs or w / "pairs.jsonl"), "--out", str(out),
            "--batch-size", "3", "--micro-batch-tokens", "256"]


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a new tmpfs of that size; remount(point, options). Skipped where this process
    may not mount (it must be root, or root in a user namespace)."""
    points = []

    def mount(size: str = "16m") -> Path:
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command here")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        points.append(point)
        return point
    yield mount
    for point in points:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def remount(point: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True, capture_output=True)


def fill(point: Path, leave: int) -> None:
    """Fill the filesystem of `point` until `leave` bytes are free (one filler file)."""
    free = shutil.disk_usage(point).free
    (point / "filler").write_bytes(b"\0" * max(0, free - leave))
    assert abs(shutil.disk_usage(point).free - leave) < 8192


# --- writes that fail: one line, and nothing lost ---

def test_a_failed_write_cleans_up_without_raising_again(tmp_path, monkeypatch):
    """The temp file's removal fails too (a read-only disk): the error is still the write's, one line."""
    import mtcore.files as files

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(files.os, "replace", full)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(MtcoreError, match=r"x\.json: cannot write \(No space left on device\)$"):
        files.write_json(tmp_path / "x.json", {"a": 1})


def test_a_file_that_holds_the_text_already_is_not_written(tmp_path, monkeypatch):
    import mtcore.files as files

    path = tmp_path / "x.json"
    assert files.write_json(path, {"a": 1.0})
    monkeypatch.setattr(files.os, "replace", lambda *a: pytest.fail("rewrote an unchanged file"))
    assert not files.write_json(path, {"a": 1.0})
    with pytest.raises(pytest.fail.Exception):
        files.write_json(path, {"a": 2.0})


def test_a_disk_error_no_handler_named_is_one_line(world, monkeypatch):
    """The last net (cli.user_errors): an OSError of a full or read-only disk anywhere is one line."""
    import mtcore.checkpoint

    def fail(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/out/model.safetensors")
    monkeypatch.setattr(mtcore.checkpoint, "convert", fail)
    error = one_error(CliRunner().invoke(main, ["convert", str(world / "policy"), str(world / "c")]))
    assert error.startswith("error: /data/out/model.safetensors: Permission denied; make it writable"), error


def test_the_reference_cache_on_a_full_disk_is_a_warning(world, tmp_path, monkeypatch, caplog):
    """safetensors wraps the disk's error in its SafetensorError, which the cache's handler now takes:
    dpo trains without the cache, and says so."""
    from safetensors import SafetensorError

    import safetensors.torch

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    result = CliRunner().invoke(main, dpo_args(world, tmp_path / "o", shutil.copy(world / "pairs.jsonl", tmp_path)))
    assert result.exit_code == 0, result.output[-3000:]
    assert "cannot cache the reference log-probs" in caplog.text and "No space left" in caplog.text
    assert not list(tmp_path.glob("*.ref-*")) and not list(tmp_path.glob(".*tmp*"))


def test_dpo_with_its_pairs_on_a_read_only_mount(world, tmp_path, tmpfs, caplog):
    data = tmpfs("1m")
    shutil.copy(world / "pairs.jsonl", data)
    remount(data, "ro")
    result = CliRunner().invoke(main, dpo_args(world, tmp_path / "o", data / "pairs.jsonl"))
    assert result.exit_code == 0, result.output[-3000:]
    assert "cannot cache" not in caplog.text and len(reference_caches()) == 1  # the cache is mtcore's own
    assert (tmp_path / "o" / "summary.json").exists()
    assert [p.name for p in data.iterdir()] == ["pairs.jsonl"]
    # the cache directory on a read-only mount: a warning, and dpo goes on without it
    cache = tmpfs("1m")
    (cache / "ref_logps").mkdir()
    remount(cache, "ro")
    result = CliRunner().invoke(main, dpo_args(world, tmp_path / "o2", data / "pairs.jsonl")
                                + ["--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output[-3000:]
    assert "cannot cache the reference log-probs" in caplog.text and "Read-only file system" in caplog.text
    assert (tmp_path / "o2" / "summary.json").exists()


def test_a_full_disk_is_refused_before_any_work_with_both_numbers(world, tmpfs):
    """`mtcore dpo --overwrite` onto a disk without room for the new model beside the old output:
    refused before any work, naming what it needs and what is free; the old output byte-identical."""
    disk = tmpfs("2m")
    shutil.copytree(world / "run" / "iter_1" / "policy", disk / "old")  # any directory: --overwrite replaces it
    model_bytes = (world / "policy" / "model.safetensors").stat().st_size
    fill(disk, model_bytes // 2)
    before = snapshot(disk)
    error = one_error(CliRunner().invoke(main, [*dpo_args(world, disk / "old"), "--overwrite"]))
    assert f"{disk / 'old.partial'}: `mtcore dpo`'s model and resumable state needs about" in error, error
    need, free = re.search(r"needs about ([\d.]+ \w+) on disk, and its filesystem has ([\d.]+ \w+) free", error).groups()
    # the estimate is the tensors' bytes: the saved file less its header
    assert abs(_bytes(need) - model_bytes) < 0.02 * model_bytes and abs(_bytes(free) - model_bytes // 2) < 8192, error
    assert snapshot(disk) == before


def _bytes(size: str) -> float:
    number, unit = size.split()
    return float(number) * {"bytes": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


def test_a_disk_that_fills_while_dpo_saves_leaves_the_old_output(world, tmpfs, monkeypatch):
    """The estimate let it through, and the disk filled anyway (here: the check is switched off): one
    line naming the cause, the old output byte-identical, and the rerun with room completes."""
    import mtcore.train

    disk = tmpfs("2m")
    args = dpo_args(world, disk / "o")
    assert CliRunner().invoke(main, args).exit_code == 0
    before = snapshot(disk / "o")
    fill(disk, (world / "policy" / "model.safetensors").stat().st_size // 2)
    monkeypatch.setattr(mtcore.train, "check_free_space", lambda *a: None)
    error = one_error(CliRunner().invoke(main, [*args, "--lr", "1e-4"]))
    assert "No space left on device" in error, error
    assert snapshot(disk / "o") == before
    (disk / "filler").unlink()
    assert CliRunner().invoke(main, [*args, "--lr", "1e-4"]).exit_code == 0
    assert json.loads((disk / "o" / "summary.json").read_text())["config"]["lr"] == 1e-4


def test_a_full_disk_during_train_is_refused_and_the_rerun_with_room_ends_as_an_uninterrupted_run(world, tmpfs):
    """The run fills its disk up to the DPO stage, whose candidates do not fit: refused before it
    trains, naming both numbers. With room (the tmpfs grown), the same command resumes and ends with
    the uninterrupted run's numbers and models."""
    disk = tmpfs("200k")
    args = ["train", *real_args(world), "--out", str(disk / "run")]
    error = one_error(CliRunner().invoke(main, args))
    assert "iteration 1's dpo stage (2 candidates and the resumable state) needs about" in error, error
    assert "iter_1/pairs" in json.loads((disk / "run" / "state.json").read_text())["done"]
    remount(disk, "size=16m")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output[-3000:]
    assert _numbers(disk / "run") == _numbers(world / "run")
    for model in ("policy", "reward"):
        assert (disk / "run" / "iter_1" / model / "model.safetensors").read_bytes() == \
            (world / "run" / "iter_1" / model / "model.safetensors").read_bytes()


def _numbers(run: Path) -> dict:
    """metrics.json less what a machine's speed decides (profiles, seconds) and where the run lives."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("profile", "stage_seconds")}
        return [strip(v) for v in x] if isinstance(x, list) else x
    return strip(json.loads((run / "metrics.json").read_text()))


def _copy_run(world, dst: Path) -> None:
    """The finished run, moved to dst (metrics.json names its models relative to the run directory)."""
    shutil.copytree(world / "run", dst)


def test_a_finished_run_reruns_as_done_on_a_read_only_mount(world, tmpfs):
    disk = tmpfs("16m")
    _copy_run(world, disk / "run")
    before = snapshot(disk)
    remount(disk, "ro")
    result = CliRunner().invoke(main, ["train", *real_args(world), "--out", str(disk / "run")])
    assert result.exit_code == 0, result.output[-3000:]
    assert f"done: 1 iterations\n  final policy  {disk / 'run' / 'iter_1' / 'policy'}\n" in result.output
    assert snapshot(disk) == before


def test_an_unfinished_run_on_a_read_only_mount_is_one_line(world, tmpfs):
    disk = tmpfs("16m")
    _copy_run(world, disk / "run")
    state = json.loads((disk / "run" / "state.json").read_text())
    state["done"].remove("iter_1/rm")
    (disk / "run" / "state.json").write_text(json.dumps(state))
    before = snapshot(disk)
    remount(disk, "ro")
    error = one_error(CliRunner().invoke(main, ["train", *real_args(world), "--out", str(disk / "run")]))
    assert str(disk / "run" / "iter_1") in error and "Read-only file system" in error, error
    assert snapshot(disk) == before


def test_a_full_disk_while_saving_the_training_state_is_one_line(tmpfs):
    from mtcore import parallel

    disk = tmpfs("8k")
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(MtcoreError, match=r"state: cannot save the training state \(No space left on device\)"):
        parallel.save_train_state(disk / "state", model, optimizer, {"run": 1, "scheduler": {}, "history": []})
    assert not list(disk.iterdir())


def test_the_state_estimate_counts_two_states_while_one_replaces_the_other():
    from mtcore.train import STATE_BYTES_PER_PARAM, TrainConfig, state_disk_bytes

    cfg = TrainConfig(save_state_every=10)
    assert state_disk_bytes(1000, 10, cfg) == 0  # saved after steps < 10 only: never
    assert state_disk_bytes(1000, 11, cfg) == STATE_BYTES_PER_PARAM * 1000
    assert state_disk_bytes(1000, 21, cfg) == state_disk_bytes(1000, 500, cfg) == 2 * STATE_BYTES_PER_PARAM * 1000
    assert state_disk_bytes(1000, 500, cfg, saved=True) == STATE_BYTES_PER_PARAM * 1000
    assert state_disk_bytes(1000, 500, TrainConfig(save_state_every=0)) == 0


# --- damaged files in a finished run ---

def _rerun(world, run: Path, *extra) -> object:
    return CliRunner().invoke(main, ["train", *real_args(world), "--out", str(run), *extra])


def _truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.unlink()  # the file may be a hard link shared with a candidate: cut this name's copy only
    path.write_bytes(data[:int(len(data) * fraction)])


@pytest.mark.parametrize("model,stage", [("policy", "iter_1/dpo"), ("reward", "iter_1/rm")])
def test_a_truncated_model_in_a_finished_run_is_found_and_redone(world, tmp_path, model, stage):
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    weights = run / "iter_1" / model / "model.safetensors"
    _truncate(weights)
    before = snapshot(run)
    error = one_error(_rerun(world, run))
    assert f"{weights}: truncated or damaged" in error and f"--redo {stage}" in error, error
    assert snapshot(run) == before
    result = _rerun(world, run, "--redo", stage)
    assert result.exit_code == 0, result.output[-3000:]
    assert weights.read_bytes() == (world / "run" / "iter_1" / model / "model.safetensors").read_bytes()
    assert _numbers(run) == _numbers(world / "run")


def test_a_damaged_candidate_is_found_before_select_reads_it(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    state = json.loads((run / "state.json").read_text())
    state["done"] = state["done"][:state["done"].index("iter_1/select")]
    (run / "state.json").write_text(json.dumps(state))
    candidate = next((run / "iter_1" / "candidates").glob("step_*")) / "model.safetensors"  # the one select kept
    _truncate(candidate, 0.9)
    error = one_error(_rerun(world, run))
    assert f"{candidate}: truncated or damaged" in error and "--redo iter_1/dpo" in error, error


def test_redo_marks_the_stage_and_every_later_one_not_done(world, tmp_path):
    from mtcore.config import resolve_config
    from mtcore.rundir import Run

    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    done = json.loads((run / "state.json").read_text())["done"]
    cfg = resolve_config({}, {"policy": str(world / "policy"), "reward": str(world / "reward"),
                              "prompts": str(world / "prompts.jsonl"), **TINY_CFG})
    for stage in ("rm", "score"):  # saved shards: of a stage in progress (rm), of one that stays done (score)
        (run / "iter_1" / f"{stage}.shards" / "part").mkdir(parents=True)
    opened = Run(run, cfg, redo="iter_1/select")
    assert opened.state["done"] == done[:done.index("iter_1/select")]
    assert not (run / "iter_1" / "rm.shards").exists()  # its inputs are redone
    assert (run / "iter_1" / "score.shards" / "part").is_dir()
    assert json.loads((run / "state.json").read_text())["done"] == opened.state["done"]
    with pytest.raises(MtcoreError, match="--redo iter_1/rm: not a finished stage"):
        Run(run, cfg, redo="iter_1/rm")
