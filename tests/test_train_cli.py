"""`mtcore dpo`, `mtcore rm`, `mtcore sft` end to end on tiny random checkpoints with the toy tokenizer:
outputs transformers loads, the reference cache, the length rule, and one-line errors."""

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import reference_caches, tiny_world
from mtcore.cli import main


pytestmark = pytest.mark.usefixtures("torch_cpu_path")


@pytest.fixture
def world(tmp_path):
    policy, reward, _ = tiny_world(tmp_path)
    pairs = tmp_path / "data" / "pairs.jsonl"
    pairs.parent.mkdir()
    rows = [{"prompt": f"sort {i % 10} 3 1", "chosen": "1 3 x", "rejected": "3 1", "id": i} for i in range(10)]
    rows.append({"prompt": [{"role": "user", "content": "sort 5 4"}], "chosen": "4 5", "rejected": "5 4 5 4 5 4",
                 "margin": 0.5})
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return policy, reward, pairs


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_dpo_writes_a_loadable_model_metrics_and_a_reference_cache(world, tmp_path):
    from transformers import AutoModelForCausalLM

    policy, _, pairs = world
    common = ["dpo", "--policy", policy, "--pairs", pairs, "--batch-size", 4, "--micro-batch-tokens", 256,
              "--lr", 1e-3, "--beta", 0.5]
    result = invoke(*common, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "3 steps" in result.output
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert {"loss", "grad_norm", "lr", "accuracy", "chosen_reward", "rejected_reward", "margin", "tokens_per_s",
            "peak_memory_mib"} <= rows[0].keys()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["data"] == {"kept": 11, "truncated": 0, "dropped": 0}
    caches = reference_caches()
    assert len(caches) == 1
    assert not list(pairs.parent.glob("*.ref-*"))  # nothing beside the data
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    trained = dict(hf.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    before = AutoModelForCausalLM.from_pretrained(str(policy))
    assert not torch.equal(trained, dict(before.named_parameters())["model.layers.0.mlp.up_proj.weight"])
    # a rerun reads the cache (same bytes; no second pass), and ends identically
    stamp = caches[0].stat().st_mtime_ns
    assert invoke(*common, "--out", tmp_path / "again").exit_code == 0
    assert caches[0].stat().st_mtime_ns == stamp
    again = [json.loads(x) for x in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again] == [r["loss"] for r in rows]


def test_dpo_with_a_separate_reference_loads_it_only_when_the_cache_misses(world, tmp_path, monkeypatch):
    """--ref: another checkpoint (here the trained output of a first run) gives the reference log-probs,
    so the first step's loss is not ln 2; a rerun reads the cache and never loads the reference."""
    from mtcore import commands

    policy, _, pairs = world
    common = ["dpo", "--policy", policy, "--pairs", pairs, "--batch-size", 4, "--micro-batch-tokens", 256,
              "--lr", 1e-3, "--beta", 0.5]
    assert invoke(*common, "--out", tmp_path / "ref").exit_code == 0
    loads = []
    real_load = commands.load_model
    monkeypatch.setattr(commands, "load_model", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    runs = []
    for name in ("first", "again"):
        result = invoke(*common, "--ref", tmp_path / "ref", "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        runs.append([json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
    assert runs[0][0]["loss"] != pytest.approx(0.6931, abs=1e-3)
    assert runs[1] == [dict(r, seconds=s["seconds"], tokens_per_s=s["tokens_per_s"],
                            peak_memory_mib=s["peak_memory_mib"]) for r, s in zip(runs[0], runs[1])]
    assert [str(p) for p in loads].count(str(tmp_path / "ref")) == 1  # the first run's only


def test_rm_and_sft(world, tmp_path):
    from transformers import AutoModelForSequenceClassification

    policy, reward, pairs = world
    result = invoke("rm", "--reward", reward, "--pairs", pairs, "--out", tmp_path / "rm", "--batch-size", 11,
                    "--micro-batch-tokens", 128, "--lr", 1e-3)
    assert result.exit_code == 0, result.output
    AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"))
    demos = tmp_path / "demos.jsonl"
    demos.write_text('{"prompt": "sort 2 1", "response": "1 2"}\n{"prompt": "sort 3 1", "response": "1 3"}\n')
    result = invoke("sft", "--policy", policy, "--data", demos, "--out", tmp_path / "sft", "--batch-size", 2)
    assert result.exit_code == 0, result.output
    assert "nll" in (tmp_path / "sft" / "metrics.jsonl").read_text()


def test_a_batch_larger_than_the_data_is_a_warning_naming_the_option(world, tmp_path, caplog):
    """rm's default batch (512) on 11 pairs makes one step: said, with the option to change."""
    _, reward, pairs = world
    result = invoke("rm", "--reward", reward, "--pairs", pairs, "--out", tmp_path / "rm", "--micro-batch-tokens", 128)
    assert result.exit_code == 0, result.output
    assert "--batch-size 512 is more than the 11 examples: 1 step(s) in all" in caplog.text
    assert "1 steps" in result.output


def test_over_long_pairs_are_cut_or_dropped_and_counted(world, tmp_path):
    policy, _, pairs = world
    # the prompts are 14-16 tokens with the chat template: 15 cuts responses, and drops the longest prompts
    result = invoke("dpo", "--policy", policy, "--pairs", pairs, "--out", tmp_path / "out", "--max-length", 15,
                    "--micro-batch-tokens", 64, "--batch-size", 4)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "summary.json").read_text())["data"]
    assert data["dropped"] >= 1 and data["truncated"] >= 1 and data["kept"] + data["dropped"] == 11


@pytest.mark.parametrize("line, message", [
    ("not json", "pairs.jsonl:2: not valid JSON"),
    ('{"prompt": "x", "chosen": "a"}', 'pairs.jsonl:2: needs a "rejected" string field'),
    ('{"chosen": "a", "rejected": "b"}', 'pairs.jsonl:2: needs a "prompt" or a "messages" field'),
    ('{"prompt": "x", "chosen": "a", "rejected": "b", "margin": "big"}', 'pairs.jsonl:2: "margin" must be a number'),
])
def test_malformed_pairs_name_the_line(world, tmp_path, line, message):
    policy, _, pairs = world
    pairs.write_text('{"prompt": "x", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    result = CliRunner().invoke(main, ["dpo", "--policy", str(policy), "--pairs", str(pairs), "--out",
                                       str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_micro_batch_too_small_is_a_clear_error(world, tmp_path):
    policy, _, pairs = world
    result = CliRunner().invoke(main, ["dpo", "--policy", str(policy), "--pairs", str(pairs), "--out",
                                       str(tmp_path / "out"), "--micro-batch-tokens", "16"])
    assert result.exit_code == 2 and "pairs.jsonl:1:" in result.output and "--micro-batch-tokens 16" in result.output


def test_nan_loss_stops_with_the_last_good_model_kept(world, tmp_path):
    policy, _, pairs = world
    result = CliRunner().invoke(main, ["dpo", "--policy", str(policy), "--pairs", str(pairs), "--out",
                                       str(tmp_path / "out"), "--lr", "1e30", "--max-grad-norm", "0", "--beta", "1",
                                       "--batch-size", "2", "--micro-batch-tokens", "64", "--warmup-ratio", "0"])
    assert result.exit_code == 2, result.output
    assert "is nan" in result.output or "is inf" in result.output
    assert "last_good" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()  # OUT is the old output (none) or the new one, never a failed run's
    steps = (tmp_path / "out.partial" / "metrics.jsonl").read_text().splitlines()
    assert len(steps) >= 1 and "out.partial/metrics.jsonl" in result.output  # the good steps' metrics stay
    from mtcore import load_model
    model = load_model(tmp_path / "out.partial" / "last_good")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_every_option_of_every_command_explains_itself():
    """--help has a line of its own for every option (train's 37 from LoopConfig, dpo/rm/sft's from
    TrainConfig), with the paper's value where the option has one."""
    import click

    from mtcore.config import LOOP_HELP, LoopConfig

    assert set(LOOP_HELP) == {f.name for f in __import__("dataclasses").fields(LoopConfig)}
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and len(param.help) > 10, f"mtcore {name} {param.opts[0]} has no help"
    train_help = CliRunner().invoke(main, ["train", "--help"]).output
    assert "[paper: 0.6]" in train_help and "toy: 1e-05" in train_help  # tau; the toy DPO lr
    from mtcore.train import TrainConfig
    dpo_params = {p.name for p in main.commands["dpo"].params}
    assert {f.name for f in __import__("dataclasses").fields(TrainConfig)} <= dpo_params
