"""--report-to, offline: TensorBoard's event files read back hold each training step's numbers as the
stage's metrics JSONL has them, and wandb (WANDB_MODE=offline) writes its run with the same keys."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import tiny_world, write_pairs
from mtcore.cli import main

pytest.importorskip("tensorboard")  # mtcore[tensorboard]; the wandb test also needs mtcore[wandb]

pytestmark = pytest.mark.usefixtures("torch_cpu_path")


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of every TensorBoard event file in directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


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


def test_train_to_tensorboard_and_wandb_offline_one_run(world, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
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
