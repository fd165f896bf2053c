"""A run survives its cluster: SIGTERM stops `mtcore train` at a safe point (a saved shard, a training
step and its state), with one line and exit 143, and the rerun ends exactly as an uninterrupted run;
a kill inside a sampling stage loses at most the shard in progress. Real signals, sent to this process
from inside the stage (the handler is the one `mtcore train` installs)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import tiny_world
from mtcore.cli import main
from test_loop import TINY

pytestmark = pytest.mark.usefixtures("torch_cpu_path")

OUTPUTS = ("samples.jsonl", "scored.jsonl", "pairs.jsonl", "pseudo_pairs.jsonl", "dpo_metrics.jsonl",
           "rm_metrics.jsonl", "policy/model.safetensors", "reward/model.safetensors")
TIMING = ("seconds", "tokens_per_s", "peak_memory_mib", "profile")
RUN_TIMING = (*TIMING, "stage_seconds")  # metrics.json's too


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory.mktemp("world"))


def train_args(world, out, **extra):
    policy, reward, prompts = world
    args = ["train", "--policy", str(policy), "--reward", str(reward), "--prompts", str(prompts), "--iters", "1",
            "--out", str(out), "--shard-prompts", "3", "--save-state-every", "0"]
    for k, v in {**TINY, **extra}.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def without_timing(obj, timing=TIMING):
    if isinstance(obj, dict):
        return {k: without_timing(v, timing) for k, v in obj.items() if k not in timing}
    if isinstance(obj, list):
        return [without_timing(v, timing) for v in obj]
    return obj


def jsonl_without_timing(path: Path):
    return [without_timing(json.loads(line)) for line in path.read_text().splitlines()]


def assert_same_run(a: Path, b: Path):
    """Every output of iteration 1 byte for byte (metrics rows without their timing columns), and every
    stage's numbers."""
    for name in OUTPUTS:
        fa, fb = a / "iter_1" / name, b / "iter_1" / name
        if name.endswith("_metrics.jsonl"):
            assert jsonl_without_timing(fa) == jsonl_without_timing(fb), name
        else:
            assert fa.read_bytes() == fb.read_bytes(), name
    for stage in ("sample", "score", "pairs", "dpo", "select", "msample", "rm"):
        ra = without_timing(json.loads((a / "iter_1" / f"{stage}.json").read_text()))
        rb = without_timing(json.loads((b / "iter_1" / f"{stage}.json").read_text()))
        assert ra == rb, stage


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    with pytest.MonkeyPatch.context() as patch:  # as torch_cpu_path does for the tests (a function fixture)
        patch.setenv("TRITON_INTERPRET", "0")
        result = CliRunner().invoke(main, train_args(world, out), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def sigterm_on_call(monkeypatch, owner, name, at_call):
    """owner.name, wrapped: its at_call-th call sends SIGTERM to this process (after doing its work)."""
    real, calls = getattr(owner, name), []

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(owner, name, wrapped)
    return calls


@pytest.mark.parametrize("where", ["sampling", "scoring", "training"])
def test_sigterm_stops_at_a_safe_point_and_the_rerun_equals_an_uninterrupted_run(world, uninterrupted, tmp_path,
                                                                                  monkeypatch, where):
    from mtcore import inference, train

    out = tmp_path / "run"
    with monkeypatch.context() as patch:  # undoes only this patch (not torch_cpu_path's)
        if where == "sampling":  # the 2nd shard of the sample stage (14 prompts: shards of 3)
            sigterm_on_call(patch, inference.Sampler, "__call__", 2)
        elif where == "scoring":
            sigterm_on_call(patch, inference.Scorer, "__call__", 2)
        else:  # DPO's 2nd optimizer step
            sigterm_on_call(patch, train, "accumulate_gradients", 2)
        result = CliRunner().invoke(main, train_args(world, out))
    assert result.exit_code == 143, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM") and last.endswith("rerun the same command to resume"), last
    state = json.loads((out / "state.json").read_text()) if (out / "state.json").exists() else {"done": []}
    if where == "sampling":
        assert "shards" in last and state["done"] == []
        assert len(list((out / "iter_1" / "sample.shards" / "responses").glob("*.json"))) == 2
    elif where == "scoring":
        assert state["done"] == ["iter_1/sample"]
    else:
        assert "after step 2 of" in last and (out / "iter_1" / "dpo_state" / "trainer.json").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the command gave the handler back
    result = CliRunner().invoke(main, train_args(world, out), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert_same_run(uninterrupted, out)
    assert not list((out / "iter_1").glob("*.shards"))  # a done stage keeps its output, not its shards


def stop_line(result) -> str:
    assert result.exit_code == 143, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM") and last.endswith("rerun the same command to resume"), last
    return last


def test_sigterm_in_the_reference_pass_saves_what_it_computed_and_the_rerun_is_equal(world, uninterrupted, tmp_path,
                                                                                    monkeypatch):
    """DPO's reference log-probs stop at the next micro-batch (not at the pass's end): the examples done
    are saved beside the cache, and the rerun computes only the rest."""
    from mtcore import train

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        sigterm_on_call(patch, train, "response_logps", 1)  # the reference pass's first micro-batch
        last = stop_line(CliRunner().invoke(main, train_args(world, out)))
    partial = out / "iter_1" / "ref_logps.partial.safetensors"
    assert "in iteration 1's dpo stage, in the reference log-probs, with " in last and f"saved in {partial}" in last
    done, n = (int(w) for w in last.split("with ")[1].split(" examples")[0].split(" of "))
    assert 0 < done < n
    assert not (out / "iter_1" / "ref_logps.safetensors").exists()
    computed = []
    real = train.response_logps

    def counting(model, batch, *args, **kwargs):
        if not torch.is_grad_enabled():  # the reference pass (training's passes take gradients)
            computed.append(len(batch.index))
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(train, "response_logps", counting)
    result = CliRunner().invoke(main, train_args(world, out), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sum(computed) == n - done  # only the examples not saved
    assert not partial.exists() and (out / "iter_1" / "ref_logps.safetensors").exists()
    assert_same_run(uninterrupted, out)


def test_mtcore_dpo_keeps_a_stopped_reference_pass_for_the_same_micro_batches_only(world, tmp_path, monkeypatch):
    """`mtcore dpo` stopped in its reference pass keeps the examples done beside its cache; a rerun with
    another --micro-batch-tokens (other micro-batches) computes every example again, and one with the
    same computes the rest, ending with the log-probs of an uninterrupted pass."""
    from mtcore import train
    from safetensors.torch import load_file

    policy, _, _ = world
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"sort {i % 10} 3 1", "chosen": "1 3 " * (1 + i % 4),
                                         "rejected": "3 1"}) + "\n" for i in range(24)))
    computed = []
    real = train.response_logps

    def counting(model, batch, *args, **kwargs):
        if not torch.is_grad_enabled():  # the reference pass
            computed.append(len(batch.index))
        return real(model, batch, *args, **kwargs)

    def dpo(out, cache, tokens, stop=False):
        computed.clear()
        with monkeypatch.context() as patch:
            patch.setattr(train, "response_logps", counting)
            if stop:
                sigterm_on_call(patch, train, "response_logps", 1)
            result = CliRunner().invoke(main, ["dpo", "--policy", str(policy), "--pairs", str(pairs), "--out", str(out),
                                               "--cache-dir", str(cache), "--micro-batch-tokens", str(tokens),
                                               "--batch-size", "8", "--epochs", "1"])
        return stop_line(result) if stop else result.exit_code == 0 or pytest.fail(result.output)

    dpo(tmp_path / "whole", tmp_path / "cache_whole", 256)
    want, = (tmp_path / "cache_whole" / "ref_logps").glob("*.safetensors")
    for tokens, reused in ((256, True), (512, False)):
        cache = tmp_path / f"cache_{tokens}"
        last = dpo(tmp_path / f"out_{tokens}", cache, 256, stop=True)
        partial, = (cache / "ref_logps").glob("*.partial.safetensors")
        assert last.startswith("stopped by SIGTERM in the reference log-probs, with ") and str(partial) in last
        done = int(last.split("with ")[1].split(" of ")[0])
        assert 0 < done < 24 and sum(computed) == done
        dpo(tmp_path / f"out_{tokens}", cache, tokens)
        assert sum(computed) == (24 - done if reused else 24)
        got, = (cache / "ref_logps").glob("*.safetensors")  # the partial is gone
        assert got.name == want.name
        if reused:  # the same bits as the uninterrupted pass
            assert all(torch.equal(a, b) for a, b in zip(load_file(got).values(), load_file(want).values()))


def test_sigterm_in_the_rm_eval_saves_its_shards_and_the_rerun_is_equal(world, tmp_path, monkeypatch):
    """--rm-eval scores in saved shards like the scoring stage: a stop signal stops it at a micro-batch,
    the initial evaluation's shards are kept beside its result, and the rerun's accuracies (and its
    count of sequences cut to --max-length) equal an uninterrupted run's. --rm-eval is not part of a
    run's identity: a rerun with other pairs does not take the shards of the first ones."""
    from mtcore import inference

    long = " ".join(["7"] * 80)  # over --max-length 64: cut, and counted in "truncated"
    rows = [{"prompt": f"sort {i} 3 1", "chosen": f"1 3 {i}", "rejected": long if i == 5 else f"{i} 3 1",
             "subset": "hep-go"} for i in range(8)]
    pairs, swapped = tmp_path / "rm_eval.jsonl", tmp_path / "swapped.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    swapped.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n" for r in rows))

    def run(out, pairs_file, stop=False, **extra):
        with monkeypatch.context() as patch:
            if stop:
                sigterm_on_call(patch, inference.Scorer, "__call__", 1)  # the initial RM eval's first shard
            result = CliRunner().invoke(main, train_args(world, out, rm_eval=pairs_file, **extra))
        return stop_line(result) if stop else result.exit_code == 0 or pytest.fail(result.output)

    def results(out, name):  # "reward" and "pairs_file": the run's own r_t, the file given
        return without_timing(json.loads((out / name).read_text()), (*TIMING, "reward", "pairs_file"))

    for pairs_file in (pairs, swapped):
        run(tmp_path / pairs_file.stem, pairs_file)
    for rerun_with in (pairs, swapped):
        out = tmp_path / f"stopped_{rerun_with.stem}"
        last = run(out, pairs, stop=True)
        shards, = (out / "initial_rmeval.shards").iterdir()  # rewards-<the pairs' hash>
        assert f"in the initial evaluation's rmeval stage, with 3 of 8 items of {shards.name} saved in {shards}" in last
        assert len(list(shards.glob("*.json"))) == 1
        run(out, rerun_with)
        whole = tmp_path / rerun_with.stem
        for name in ("initial_rmeval.json", "iter_1/rmeval.json"):
            assert results(out, name) == results(whole, name) and results(out, name)["truncated"] == 1, name
        assert not (out / "initial_rmeval.shards").exists() and not (out / "iter_0").exists()
    assert results(tmp_path / "rm_eval", "initial_rmeval.json") != results(tmp_path / "swapped", "initial_rmeval.json")
    # a key of the run's identity changed before any stage finished: the run starts over, shards and all
    out = tmp_path / "changed"
    run(out, pairs, stop=True)
    run(out, pairs, beta=0.25)
    assert results(out, "initial_rmeval.json") == results(tmp_path / "rm_eval", "initial_rmeval.json")
    assert not (out / "initial_rmeval.shards").exists()


class Killed(BaseException):
    """Stands for SIGKILL: nothing of the process runs after it."""


def test_a_kill_in_sampling_redoes_at_most_one_shard(world, uninterrupted, tmp_path, monkeypatch):
    from mtcore import inference

    out = tmp_path / "run"
    real, calls = inference.Sampler.__call__, []

    def dies_in_the_third_shard(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return real(self, *args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(Killed):  # undoes only this patch
        patch.setattr(inference.Sampler, "__call__", dies_in_the_third_shard)
        CliRunner().invoke(main, train_args(world, out), catch_exceptions=False)
    assert len(list((out / "iter_1" / "sample.shards" / "responses").glob("*.json"))) == 2
    counted = []

    def counting(self, prompts, *args, **kwargs):
        counted.append(len(prompts))
        return real(self, prompts, *args, **kwargs)

    monkeypatch.setattr(inference.Sampler, "__call__", counting)
    result = CliRunner().invoke(main, train_args(world, out), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    n_policy = 24 - TINY["selection_size"] - TINY["rm_split_size"]
    # the sample stage's remaining prompts only (14 - 6 saved), then select's and msample's answers
    assert counted[:3] == [3, 3, 2] and sum(counted[:3]) == n_policy - 6
    assert (out / "iter_1" / "samples.jsonl").read_bytes() == (uninterrupted / "iter_1" / "samples.jsonl").read_bytes()
    assert_same_run(uninterrupted, out)


def test_a_second_signal_stops_at_once():
    """After the first SIGTERM a command goes on to its safe point; a second one ends it at once, by the
    signal (exit status -15 to the parent), with the first one's line printed."""
    code = ("import os, signal, time\n"
            "from mtcore import preempt\n"
            "preempt.install()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "assert preempt.requested()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(5)\n"
            "print('still running')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGTERM, (result.returncode, result.stderr)
    assert "SIGTERM received: stopping at the next safe point" in result.stderr
    assert "still running" not in result.stdout


def test_sigusr1_stops_like_sigterm():
    code = ("import os, signal\n"
            "from mtcore import preempt\n"
            "preempt.install()\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "try:\n"
            "    preempt.check('at the test point')\n"
            "except preempt.Preempted as e:\n"
            "    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "stopped by SIGUSR1 at the test point; rerun the same command to resume"
