"""Scale-out on CPU with gloo: 2 processes against 1 on tiny random checkpoints. FSDP2 training
(losses, gradient norms, the saved checkpoint), sharded save and resume, data-parallel generation
and scoring, and the commands under torchrun."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import make_hf_model, reference_caches, save_hf, tiny_world
from test_loop import read_jsonl
from mtcore import parallel
from mtcore.checkpoint import save_model

WORLD = 2


pytestmark = pytest.mark.usefixtures("torch_cpu_path")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank, world, port):
    """What torchrun does for a worker: the environment, then mtcore's own process-group setup."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    parallel.init()


def _entry(rank, fn, world, port, args):
    _join(rank, world, port)
    fn(*args)
    parallel.finish()  # exits


def spawn(fn, *args, world=WORLD):
    """fn(*args) in `world` fresh processes joined in one gloo group (a failure re-raises here)."""
    torch.multiprocessing.spawn(_entry, args=(fn, world, free_port(), args), nprocs=world)


def torchrun(*args, world=WORLD, timeout=120):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "mtcore", *map(str, args)]
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def close(a, b, rel):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


# --- one process: the helpers are the identity ---

def test_balanced_shares():
    sizes = [5, 9, 1, 7, 3, 3, 8]
    shares = parallel.balanced_shares(sizes, 3)
    assert sorted(i for s in shares for i in s) == list(range(7))
    assert all(s == sorted(s) for s in shares)
    loads = [sum(sizes[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(sizes)  # largest first, each to the lightest rank
    assert loads == [12, 12, 12]
    assert parallel.balanced_shares(sizes, 1) == [list(range(7))]
    assert parallel.balanced_shares([4], 2) == [[0], []]  # a rank may get nothing


def test_one_process_helpers_are_the_identity():
    assert parallel.world_size() == 1 and parallel.rank() == 0 and parallel.is_main()
    assert parallel.my_share([3, 1, 2]) == [0, 1, 2]
    assert parallel.map_shards(lambda xs: [x * 2 for x in xs], [1, 2, 3]) == [2, 4, 6]
    assert parallel.all_reduce_sum([1.5, 2]) == [1.5, 2]
    assert parallel.all_max(3) == 3 and parallel.all_gather_object("x") == ["x"]
    model = torch.nn.Linear(2, 2)
    assert parallel.shard_model(model) is model and not parallel.is_sharded(model)


# --- FSDP2 training: 2 processes against 1 ---

def _train(kind, model_dir, pairs, grad_checkpointing=False):
    """3 optimizer steps (5 + 5 + 3 pairs, several micro-batches each) of DPO or Bradley-Terry."""
    from mtcore import load_model
    from mtcore.train import DPO, BradleyTerry, TrainConfig, fit, reference_logps

    model = load_model(model_dir, kind=kind, dtype=torch.float32)
    if kind == "policy":
        sums, counts = reference_logps(model, pairs, 48)
        objective = DPO(sums, counts, beta=0.5)
    else:
        sums, objective = None, BradleyTerry(center_coef=0.01)
    cfg = TrainConfig(lr=1e-3, batch_size=5, micro_batch_tokens=48, warmup_ratio=0.0, max_grad_norm=0.05,
                      grad_checkpointing=grad_checkpointing)
    parallel.parallelize(model, cfg.grad_checkpointing)
    return model, fit(model, pairs, objective, cfg), sums


def _train_worker(tmp):
    from test_train import random_pairs

    pairs = random_pairs(13, seed=11)
    for kind in ("policy", "reward"):
        model, history, sums = _train(kind, tmp / kind, pairs, grad_checkpointing=kind == "policy")
        assert parallel.is_sharded(model)
        save_model(model, tmp / f"{kind}_2ranks")
        if parallel.is_main():
            (tmp / f"{kind}_2ranks.json").write_text(json.dumps(history))
            if sums is not None:
                torch.save(sums, tmp / "ref_sums_2ranks.pt")


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path):
    """DPO and Bradley-Terry: the same losses and gradient norms over 3 optimizer steps (clipping
    applied), the same reference log-probs, and a checkpoint from 2 ranks that transformers loads
    with the weights 1 process ends with. The 2 ranks' DPO also recomputes activations in backward
    (activation checkpointing under FSDP2), which changes no number."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from test_train import random_pairs

    save_hf(make_hf_model("policy", seed=0), tmp_path / "policy")
    save_hf(make_hf_model("reward", seed=1), tmp_path / "reward")
    spawn(_train_worker, tmp_path)
    pairs = random_pairs(13, seed=11)
    for kind, auto in (("policy", AutoModelForCausalLM), ("reward", AutoModelForSequenceClassification)):
        model, one, sums = _train(kind, tmp_path / kind, pairs)
        two = json.loads((tmp_path / f"{kind}_2ranks.json").read_text())
        assert len(one) == len(two) == 3
        for a, b in zip(one, two):
            print(kind, "loss", a["loss"], b["loss"], "grad_norm", a["grad_norm"], b["grad_norm"])
            assert close(a["loss"], b["loss"], 1e-5) and close(a["grad_norm"], b["grad_norm"], 1e-5)
            assert a["grad_norm"] > 0.05  # the clip applied
            assert a["tokens"] == b["tokens"] and a["examples"] == b["examples"]
            # margins are differences of sums of log-probs ~ -50: compare them on that scale
            assert a["accuracy"] == b["accuracy"] and abs(a["margin"] - b["margin"]) < 1e-5
        if sums is not None:
            torch.testing.assert_close(torch.load(tmp_path / "ref_sums_2ranks.pt"), sums, rtol=1e-6, atol=1e-6)
        hf = auto.from_pretrained(str(tmp_path / f"{kind}_2ranks"), dtype=torch.float32)
        mine = model.state_dict()
        worst = 0.0
        for name, p in hf.state_dict().items():
            worst = max(worst, (p - mine[name]).abs().max().item())
        print(kind, "max weight difference", worst)
        assert worst < 1e-5  # lr 1e-3 over 3 steps: an update differing in its 3rd digit would show


# --- sharded state: save, stop, resume ---

class Stop(Exception):
    pass


def _resume_run(tmp, tag):
    """5 Bradley-Terry steps (warm-up and cosine, so the schedule's state matters) uninterrupted, and
    again stopped after step 3 with the state saved every 2 steps, then resumed in a fresh model."""
    from mtcore import load_model
    from mtcore.train import BradleyTerry, TrainConfig, fit
    from test_train import random_pairs
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    pairs = random_pairs(13, seed=12)
    cfg = TrainConfig(lr=1e-3, batch_size=3, micro_batch_tokens=48, warmup_ratio=0.3, save_state_every=2)

    def run(**kw):
        model = parallel.parallelize(load_model(tmp / "reward", kind="reward", dtype=torch.float32))
        return model, fit(model, pairs, BradleyTerry(), cfg, **kw)

    def stop_at_3(step, n_steps, model):
        if step == 3:
            raise Stop

    whole, history = run()
    with pytest.raises(Stop):
        run(state_dir=tmp / f"state_{tag}", on_step=stop_at_3)
    resumed, resumed_history = run(state_dir=tmp / f"state_{tag}")
    assert [r["step"] for r in resumed_history] == [1, 2, 3, 4, 5]
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in resumed_history] == \
        [(r["loss"], r["grad_norm"], r["lr"]) for r in history]
    full = StateDictOptions(full_state_dict=True)
    a, b = get_model_state_dict(whole, options=full), get_model_state_dict(resumed, options=full)
    assert all(torch.equal(a[k], b[k]) for k in a)
    if parallel.is_main():
        (tmp / f"history_{tag}.json").write_text(json.dumps(history))


def _stopped_reference_worker(tmp):
    """The reference pass with a stop signal on rank 1 only, after its first micro-batch: every rank
    stops before the same micro-batch (preempt.requested), and the rest, computed apart, completes the
    pass exactly as the pass run whole."""
    from mtcore import load_model, preempt
    from mtcore.train import reference_logps
    from test_train import random_pairs

    pairs, model = random_pairs(13, seed=11), load_model(tmp / "policy", kind="policy", dtype=torch.float32)
    whole = reference_logps(model, pairs, 48)
    asked = []

    def signalled_on_rank_1():
        asked.append(1)
        if parallel.rank() == 1 and len(asked) == 2:
            preempt._received = "SIGTERM"
        return preempt.requested()

    finished = torch.zeros(len(pairs), dtype=torch.bool)
    first = reference_logps(model, pairs, 48, finished=finished, should_stop=signalled_on_rank_1)
    preempt._received = None
    assert 0 < int(finished.sum()) < len(pairs)
    assert parallel.all_gather_object(finished.tolist()) == [finished.tolist()] * WORLD
    done = finished.clone()
    rest = reference_logps(model, pairs, 48, finished=finished)
    assert bool(finished.all())
    for a, b, w in zip(first, rest, whole):
        assert torch.equal(torch.where(done[:, None], a, b), w)
        assert not torch.where(done[:, None], b, a).any()  # each pass left the other's rows 0


@pytest.mark.slow
def test_a_reference_pass_stopped_on_one_rank_stops_every_rank_and_its_rest_completes_it(tmp_path):
    save_hf(make_hf_model("policy", seed=0), tmp_path / "policy")
    spawn(_stopped_reference_worker, tmp_path)


def test_resume_from_saved_state_one_process(tmp_path):
    save_hf(make_hf_model("reward", seed=1), tmp_path / "reward")
    _resume_run(tmp_path, "1")


@pytest.mark.slow
def test_resume_from_sharded_state(tmp_path):
    """2 ranks save their shards at step 2 and 4, stop after 3, resume: exactly the uninterrupted run.
    Then 1 process resumes the 2 ranks' step-4 state (resharded) and ends like them."""
    from mtcore import load_model
    from mtcore.train import BradleyTerry, TrainConfig, fit
    from test_train import random_pairs

    save_hf(make_hf_model("reward", seed=1), tmp_path / "reward")
    spawn(_resume_run, tmp_path, "2")
    two = json.loads((tmp_path / "history_2.json").read_text())
    model = load_model(tmp_path / "reward", kind="reward", dtype=torch.float32)
    cfg = TrainConfig(lr=1e-3, batch_size=3, micro_batch_tokens=48, warmup_ratio=0.3, save_state_every=2)
    history = fit(model, random_pairs(13, seed=12), BradleyTerry(), cfg, state_dir=tmp_path / "state_2")
    numbers = [(r["loss"], r["grad_norm"], r["lr"]) for r in history]
    assert numbers[:4] == [(r["loss"], r["grad_norm"], r["lr"]) for r in two[:4]]  # read back from the state
    assert close(history[4]["loss"], two[4]["loss"], 1e-5) and close(history[4]["grad_norm"], two[4]["grad_norm"], 1e-5)
    assert history[4]["lr"] == two[4]["lr"]


# --- the commands under torchrun ---

@pytest.fixture
def world(tmp_path):
    policy, reward, prompts = tiny_world(tmp_path)
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"sort {i % 10} 3 1", "chosen": "1 3 x" * (1 + i % 3), "rejected": "3 1", "margin": i / 10}
            for i in range(11)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return policy, reward, prompts, pairs


@pytest.mark.slow
def test_torchrun_dpo_matches_one_process(world, tmp_path):
    """The issue's bar: `torchrun --nproc_per_node 2 -m mtcore dpo` matches one process's losses and
    gradient norms (first step and the next two) to 1e-4 relative, and writes a checkpoint that
    transformers loads, equal to one process's."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from mtcore.cli import main

    policy, _, _, pairs = world
    common = ["dpo", "--policy", policy, "--pairs", pairs, "--batch-size", 4, "--micro-batch-tokens", 64, "--lr", 1e-3,
              "--beta", 0.5, "--max-grad-norm", 0.1]
    result = CliRunner().invoke(main, [str(a) for a in common + ["--out", tmp_path / "one"]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for cache in reference_caches():
        cache.unlink()  # so that 2 ranks compute the reference log-probs too
    two = torchrun(*common, "--out", tmp_path / "two")
    assert two.stdout.count("wrote ") == 1  # rank 0 alone reports
    one, two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        print(f"step {a['step']}: loss {a['loss']:.9f} / {b['loss']:.9f}, grad norm {a['grad_norm']:.9f} / "
              f"{b['grad_norm']:.9f}")
        assert close(a["loss"], b["loss"], 1e-4) and close(a["grad_norm"], b["grad_norm"], 1e-4)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    a = AutoModelForCausalLM.from_pretrained(str(tmp_path / "one")).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "two")).state_dict()
    before = AutoModelForCausalLM.from_pretrained(str(policy)).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k
    assert any(not torch.equal(a[k], before[k]) for k in a)


@pytest.mark.slow
def test_torchrun_generate_and_score_equal_one_process(world, tmp_path):
    """Sampled generation (2 samples per prompt, T 0.8, top-p 0.95) gathered from 2 ranks equals 1 rank's
    token for token, in prompt order: each request draws from its own random stream, whichever rank
    serves it. So do the scores."""
    from click.testing import CliRunner

    from mtcore.cli import main

    policy, reward, prompts, _ = world
    runner = CliRunner()
    gen = ["generate", "--policy", policy, "--prompts", prompts, "--temperature", 0.8, "--top-p", 0.95,
           "--samples", 2, "--max-new-tokens", 8, "--seed", 7]  # (not --n: torchrun takes it for its own)
    score = ["score", "--reward", reward, "--micro-batch-tokens", 128]
    for args in (gen + ["--out", tmp_path / "one.jsonl"],
                 score + ["--prompts-with-responses", tmp_path / "one.jsonl", "--out", tmp_path / "one_scored.jsonl"]):
        result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    torchrun(*gen, "--out", tmp_path / "two.jsonl")
    torchrun(*score, "--prompts-with-responses", tmp_path / "two.jsonl", "--out", tmp_path / "two_scored.jsonl")
    one, two = read_jsonl(tmp_path / "one_scored.jsonl"), read_jsonl(tmp_path / "two_scored.jsonl")
    assert len(one) == len(two) == 24
    assert [r["id"] for r in two] == list(range(24))
    assert [r["responses"] for r in one] == [r["responses"] for r in two]
    assert len({tuple(r["responses"][0]["token_ids"]) for r in one}) > 1
    assert any(r["responses"][0]["token_ids"] != r["responses"][1]["token_ids"] for r in one)  # it does sample
    for a, b in zip(one, two):
        assert a["rewards"] == pytest.approx(b["rewards"], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_torchrun_train_iteration_completes(world, tmp_path):
    """One Mutual-Taught iteration on 2 ranks: every stage done, its files consistent (pairs from the
    gathered scores), a selected policy that transformers loads, and an RM equal to one process's
    Bradley-Terry fit from the base RM on the same pairs."""
    from transformers import AutoModelForCausalLM

    from mtcore import load_model
    from mtcore.mutual_taught import mutual_pair
    from mtcore.rundir import Run
    from test_loop import TINY, refit_rm, tiny_config

    policy, reward, prompts, _ = world
    args = ["train", "--policy", policy, "--reward", reward, "--prompts", prompts, "--iters", 1,
            "--out", tmp_path / "run"]
    for k, v in TINY.items():
        args += [f"--{k.replace('_', '-')}", v]
    result = torchrun(*args, timeout=300)
    assert result.stdout.count("done: 1 iterations") == 1, result.stdout
    run = tmp_path / "run"
    state = json.loads((run / "state.json").read_text())
    assert state["done"] == [f"iter_1/{s}" for s in ("sample", "score", "pairs", "dpo", "select", "msample", "rm")]
    d = run / "iter_1"
    scored = read_jsonl(d / "scored.jsonl")
    assert len(scored) == 24 - TINY["selection_size"] - TINY["rm_split_size"]  # the gathered policy split
    assert all(len(r["responses"]) == len(r["rewards"]) == TINY["samples"] for r in scored)
    expected = [r for r in scored if mutual_pair(r["rewards"], [len(x["token_ids"]) for x in r["responses"]])]
    assert len(read_jsonl(d / "pairs.jsonl")) == len(expected) > 0
    AutoModelForCausalLM.from_pretrained(str(d / "policy"))
    assert not list(run.rglob("*.tmp-*"))  # no half-written files left behind
    # the RM stage, redone in this process from the stage's files
    mine = refit_rm([d], reward, Run(run, tiny_config(policy, reward, prompts, iters=1)).seed(1, "rm"))
    theirs = load_model(d / "reward", kind="reward", dtype=torch.float32).state_dict()
    worst = max((p - theirs[k]).abs().max().item() for k, p in mine.state_dict().items())
    assert worst < 1e-5, worst
