"""--report-to, offline: TensorBoard's event files read back hold each training step's numbers as the
stage's metrics JSONL has them, and wandb (WANDB_MODE=offline) writes its run with the same keys."""

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import tiny_world, write_pairs
from mtcore.cli import main

pytest.importorskip("tensorboard")  # mtcore[tensorboard]; the wandb test also needs mtcore[wandb]

pytestmark = pytest.mark.usefixtures("torch_cpu_path")


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard shows them: every run (a directory holding event files)
    under directory, read as TensorBoard reads it (a writer's purge_step drops what came before)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for run in sorted({f.parent for f in directory.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            assert tag not in out, f"{tag} in two runs"
            out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return out


def raw_steps(directory: Path) -> list[tuple[str, int]]:
    """(tag, step) of every scalar event written under directory, purged or not, in file order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for f in sorted(directory.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(f)).Load():
            steps += [(v.tag, event.step) for v in event.summary.value]
    return steps


def no_step_twice(tb: dict) -> None:
    for tag, points in tb.items():
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)), (tag, steps)


def wandb_records(path: Path) -> list:
    """The records of a .wandb file: a 7-byte header, then 32 KiB blocks of records, each with a
    7-byte header (crc32c, little-endian length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, records, part = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def wandb_history(run_dir: Path) -> tuple[str, list[dict]]:
    """(the run's display name, its logged rows) from an offline run directory."""
    (path,) = run_dir.glob("run-*.wandb")
    name, rows = None, []
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            name = r.run.display_name
        elif kind == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return name, rows


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("report")
    policy, reward, prompts = tiny_world(w)
    write_pairs(w / "pairs.jsonl", 12)
    return w


def test_dpo_to_tensorboard_holds_every_step_of_metrics_jsonl(world, tmp_path):
    out = tmp_path / "dpo"
    result = CliRunner().invoke(main, ["dpo", "--policy", str(world / "policy"), "--pairs", str(world / "pairs.jsonl"),
                                       "--out", str(out), "--batch-size", "3", "--micro-batch-tokens", "256",
                                       "--lr", "1e-3", "--report-to", "tensorboard"])
    assert result.exit_code == 0, result.output[-3000:]
    rows, tb = metrics(out / "metrics.jsonl"), scalars(out / "tb")
    assert len(rows) == 4
    for key in ("loss", "accuracy", "lr", "grad_norm", "margin", "tokens_per_s"):
        assert tb[f"dpo/{key}"] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows], key
    assert not (tmp_path / "dpo.partial").exists()


def wandb_offline(monkeypatch):
    for key, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_DISABLE_GIT", "true")):
        monkeypatch.setenv(key, value)


def test_train_to_tensorboard_and_wandb_offline_one_run(world, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    wandb_offline(monkeypatch)
    out = tmp_path / "run"
    args = ["train", "--policy", world / "policy", "--reward", world / "reward", "--prompts", world / "prompts.jsonl",
            "--iters", "1", "--selection-size", "4", "--rm-split-size", "4", "--policy-split-size", "16", "--samples", "2", "--max-new-tokens", "4",
            "--max-length", "64", "--micro-batch-tokens", "256", "--dpo-batch-size", "4", "--rm-batch-size", "4",
            "--save-every", "2", "--tau", "0", "--report-to", "tensorboard,wandb", "--run-name", "toy-report",
            "--out", out]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output[-3000:]
    dpo, rm = metrics(out / "iter_1" / "dpo_metrics.jsonl"), metrics(out / "iter_1" / "rm_metrics.jsonl")
    iteration = json.loads((out / "metrics.json").read_text())["iterations"][0]
    tb = scalars(out / "tb")
    assert tb["iter_1/dpo/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in dpo]
    assert tb["iter_1/rm/accuracy"] == [(r["step"], pytest.approx(r["accuracy"], rel=1e-6)) for r in rm]
    assert tb["iteration/select/win_rate"] == [(1, pytest.approx(iteration["select"]["win_rate"], rel=1e-6))]
    assert tb["iteration/dpo/loss"] == [(1, pytest.approx(iteration["dpo"]["loss"], rel=1e-6))]

    (run_dir,) = (out / "tb" / "wandb").glob("offline-run-*")
    name, rows = wandb_history(run_dir)
    assert name == "toy-report"
    logged = [r for r in rows if "iter_1/dpo/loss" in r]
    assert [(r["iter_1/dpo/step"], r["iter_1/dpo/loss"]) for r in logged] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in dpo]
    assert any(r.get("iteration/select/win_rate") == pytest.approx(iteration["select"]["win_rate"]) for r in rows)


class Killed(Exception):
    """A stand-in for kill -9: raised right after a step is logged, before its state is saved."""


def test_dpo_killed_and_resumed_logs_no_step_twice(world, tmp_path, monkeypatch):
    """`mtcore dpo` saves its state every 2 steps; killed after logging step 3, a rerun resumes after step
    2 and logs steps 3 and 4: TensorBoard shows each step once (the rerun's), wandb logs step 3 once."""
    from mtcore import report

    out = tmp_path / "dpo"
    args = ["dpo", "--policy", str(world / "policy"), "--pairs", str(world / "pairs.jsonl"), "--out", str(out),
            "--batch-size", "3", "--micro-batch-tokens", "256", "--lr", "1e-3", "--save-state-every", "2",
            "--report-to", "tensorboard"]
    log = report.Reporter.log

    def dying_log(self, prefix, row, step, again=True):
        log(self, prefix, row, step, again)
        if step == 3:
            raise Killed()

    monkeypatch.setattr(report.Reporter, "log", dying_log)
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, Killed), result.output[-3000:]
    assert json.loads((tmp_path / "dpo.partial" / "tb" / "logged.json").read_text()) == {"dpo": 3}
    monkeypatch.setattr(report.Reporter, "log", log)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output[-3000:]
    rows, tb = metrics(out / "metrics.jsonl"), scalars(out / "tb")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [s for s, _ in raw_steps(out / "tb") if s == "dpo/loss"].count("dpo/loss") == 5  # step 3 written twice
    no_step_twice(tb)
    assert tb["dpo/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]


def test_train_resumed_and_extended_logs_no_step_twice(world, tmp_path, monkeypatch):
    """`mtcore train` killed in iteration 1's RM stage after a step is logged, resumed, then extended to
    2 iterations: every TensorBoard tag has each step once, iteration 1's iteration/* scalars are written
    once (not again by the rerun or the extension), and wandb's run never logs a prefix's step twice."""
    pytest.importorskip("wandb")
    from mtcore import report

    wandb_offline(monkeypatch)
    out = tmp_path / "run"
    args = ["train", "--policy", world / "policy", "--reward", world / "reward", "--prompts", world / "prompts.jsonl",
            "--selection-size", "4", "--rm-split-size", "4", "--policy-split-size", "8", "--samples", "2",
            "--max-new-tokens", "4", "--max-length", "64", "--micro-batch-tokens", "256", "--dpo-batch-size", "2",
            "--rm-batch-size", "1", "--save-every", "2", "--save-state-every", "2", "--tau", "0",
            "--report-to", "tensorboard,wandb", "--out", out]
    log = report.Reporter.log

    def dying_log(self, prefix, row, step, again=True):
        log(self, prefix, row, step, again)
        if prefix == "iter_1/rm" and step == 3:
            raise Killed()

    monkeypatch.setattr(report.Reporter, "log", dying_log)
    result = CliRunner().invoke(main, [str(a) for a in args + ["--iters", "1"]])
    assert isinstance(result.exception, Killed), result.output[-3000:]
    monkeypatch.setattr(report.Reporter, "log", log)
    for iters in ("1", "2"):  # the resume, then the extension
        result = CliRunner().invoke(main, [str(a) for a in args + ["--iters", iters]])
        assert result.exit_code == 0, result.output[-3000:]
    tb = scalars(out / "tb")
    no_step_twice(tb)
    rm = metrics(out / "iter_1" / "rm_metrics.jsonl")
    assert len(rm) > 3 and tb["iter_1/rm/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rm]
    iterations = json.loads((out / "metrics.json").read_text())["iterations"]
    assert tb["iteration/dpo/loss"] == [(i["iteration"], pytest.approx(i["dpo"]["loss"], rel=1e-6)) for i in iterations]
    assert [step for tag, step in raw_steps(out / "tb" / "iteration") if tag == "iteration/dpo/loss"] == [1, 2]
    assert "iter_2/dpo/loss" in tb

    logged = {}
    for run_dir in (out / "tb" / "wandb").glob("offline-run-*"):
        for row in wandb_history(run_dir)[1]:
            for key, step in row.items():
                if key.endswith("/step"):
                    logged.setdefault(key, []).append(step)
    assert logged["iteration/step"] == [1, 2] or sorted(logged["iteration/step"]) == [1, 2]
    for key, steps in logged.items():
        assert len(steps) == len(set(steps)), (key, sorted(steps))
    assert sorted(logged["iter_1/rm/step"]) == [r["step"] for r in rm]


def test_a_new_event_file_sorts_after_the_earlier_ones(tmp_path):
    """TensorBoard reads event files in name order, the name starting with the second it was opened: a
    writer opened in the same second as an earlier file waits for the next second, or its file could
    sort first ("...<pid>.10" before "...<pid>.9") and the earlier file's purge_step drop its steps."""
    from mtcore.report import _after_earlier_files

    now = int(time.time())
    (tmp_path / f"events.out.tfevents.{now:010d}.host.123.9").write_bytes(b"")
    _after_earlier_files(tmp_path)
    assert int(time.time()) > now
    for f in tmp_path.iterdir():
        f.unlink()
    (tmp_path / f"events.out.tfevents.{now - 5:010d}.host.123.9").write_bytes(b"")
    (tmp_path / f"events.out.tfevents.{now + 3600:010d}.other.45.1").write_bytes(b"")  # another host's clock
    started = time.monotonic()
    _after_earlier_files(tmp_path)  # only older files, and one dated later than the next second: no wait
    _after_earlier_files(tmp_path / "none")
    assert time.monotonic() - started < 0.05
