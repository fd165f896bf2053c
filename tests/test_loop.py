"""The Mutual-Taught iteration: its rules on hand-computed cases, one- and two-iteration runs on tiny
random checkpoints (every rule re-derived from the stage files), kill-and-resume, the config refusal."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import output_bytes, tiny_world
from mtcore import MtcoreError, stages
from mtcore.config import resolve_config
from mtcore.loop import ending, train
from mtcore.mutual_taught import best_worst_pair, mutual_pair, pair_rule, preference_pairs, pseudo_pair_filter
from mtcore.mutual_taught import rm_data_iterations, win_rate
from mtcore.rundir import Run


pytestmark = pytest.mark.usefixtures("torch_cpu_path")


# --- the rules ---

def test_mutual_pair_shortest_above_mean_against_lowest():
    # mean 0.5: above are 0 (len 9), 2 (len 4), 4 (len 4, higher reward) -> 4; lowest is 1
    assert mutual_pair([0.9, -1.0, 0.6, 0.2, 0.8], [9, 3, 4, 2, 4]) == (4, 1)
    assert mutual_pair([0.3, 0.3, 0.3], [1, 2, 3]) is None  # every response scores the same
    assert mutual_pair([1.0, 0.0], [5, 1]) == (0, 1)  # the only one above the mean, however long
    assert mutual_pair([0.0, 1.0, 0.0, 1.0], [4, 6, 2, 6]) == (1, 0)  # ties: same length -> the first; lowest -> the first


def test_best_worst_pair():
    assert best_worst_pair([0.9, -1.0, 0.6, 0.2, 0.8], [9, 3, 4, 2, 4]) == (0, 1)
    assert best_worst_pair([0.2, 0.2], [1, 2]) is None


# Scored samples on which the two rules differ: mean 0.3, so above it r0 (9 tokens), r2 and r4 (4 tokens,
# r4 scoring higher); the lowest is r1. Mutual: (r4, r1); best-worst: (r0, r1). q's responses tie: no pair.
SCORED = [{"prompt": "p", "rewards": [0.9, -1.0, 0.6, 0.2, 0.8],
           "responses": [{"text": f"r{i}", "token_ids": [0] * n} for i, n in enumerate([9, 3, 4, 2, 4])]},
          {"prompt": "q", "rewards": [0.5, 0.5], "responses": [{"text": "a", "token_ids": [1]}] * 2}]


def test_pair_rule_defaults_to_the_m_steps_and_is_independent_of_it():
    assert pair_rule("", True) == "mutual" and pair_rule("", False) == "best-worst"
    assert pair_rule("mutual", False) == "mutual" and pair_rule("best-worst", True) == "best-worst"
    mutual, none = preference_pairs(SCORED, "mutual")
    best_worst, _ = preference_pairs(SCORED, "best-worst")
    assert [(p["chosen"], p["rejected"]) for p in mutual] == [("r4", "r1")] and none == 1
    assert [(p["chosen"], p["rejected"]) for p in best_worst] == [("r0", "r1")]


def test_rm_data_iterations():
    assert list(rm_data_iterations(3, "iteration")) == [3]
    assert list(rm_data_iterations(3, "all")) == [1, 2, 3] and list(rm_data_iterations(1, "all")) == [1]


def test_win_rate_ties_count_half():
    assert win_rate([1.0, 0.0, 2.0, 3.0], [0.0, 1.0, 2.0, 1.0]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_pseudo_pair_filter_drops_only_at_or_below_minus_eps():
    old = [0.0, 2.0, 4.0, 6.0]  # population std = sqrt(5)
    eps = math.sqrt(5)
    # deltas: just above -eps, exactly -eps, -3 and -2.3 (both below -eps = -2.236)
    new = [0.0 - eps + 1e-9, 2.0 - eps, 4.0 - 3.0, 6.0 - 2.3]
    keep, got_eps = pseudo_pair_filter(new, old)
    assert got_eps == pytest.approx(eps)
    assert keep == [True, False, False, False]
    keep, _ = pseudo_pair_filter([1.0, 1.0, 3.9, 5.0], old)  # deltas +1, -1, -0.1, -1: slightly negative pairs stay
    assert keep == [True, True, True, True]


# --- runs on tiny random checkpoints ---

TINY = dict(samples=3, max_new_tokens=6, beta=0.5, dpo_lr=1e-3, dpo_batch_size=4, save_every=2, selection_size=4,
            rm_split_size=6, rm_lr=1e-3, rm_batch_size=4, tau=0.0, max_length=64, micro_batch_tokens=512,
            policy_split_size=0)  # 0: the prompts left split evenly over --iters


def tiny_config(policy, reward, prompts, **overrides):
    return resolve_config({}, {"policy": str(policy), "reward": str(reward), "prompts": str(prompts), "iters": 2,
                               **TINY, **overrides})


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def refit_rm(iter_dirs, reward, seed):
    """An iteration's RM stage redone here from its files: the base RM fitted with Bradley-Terry on the
    pseudo-pairs and the E-step's pairs of iter_dirs (in order), each encoded by hand (not through
    mtcore's encode_pair)."""
    from mtcore import load_model
    from mtcore.data import Example, encode_prompt, encode_sequence, cut_to_length, load_tokenizer
    from mtcore.train import BradleyTerry, TrainConfig, fit

    tok = load_tokenizer(reward)
    examples = []
    rows = [row for d in iter_dirs for row in read_jsonl(d / "pseudo_pairs.jsonl") + read_jsonl(d / "pairs.jsonl")]
    for row in rows:
        n = len(encode_prompt(tok, row["prompt"]))
        examples.append(Example(((encode_sequence(tok, row["prompt"], row["chosen"])[0], n),
                                 (encode_sequence(tok, row["prompt"], row["rejected"])[0], n))))
    examples, _ = cut_to_length(examples, TINY["max_length"])
    model = load_model(reward, kind="reward", dtype=torch.float32)
    fit(model, examples, BradleyTerry(), TrainConfig(lr=TINY["rm_lr"], batch_size=TINY["rm_batch_size"],
                                                     micro_batch_tokens=TINY["micro_batch_tokens"], seed=seed))
    return model


def test_two_iterations_follow_the_rules(tmp_path):
    from mtcore import load_model

    policy, reward, prompts = tiny_world(tmp_path)
    run = Run(tmp_path / "run", tiny_config(policy, reward, prompts))
    metrics = train(run, echo=lambda s: None)
    assert [e["iteration"] for e in metrics["iterations"]] == [1, 2]
    assert (run.dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # a real run's plot too
    for t in (1, 2):
        d = run.iter_dir(t)
        # the pair rule, re-derived from the scored samples
        scored = read_jsonl(d / "scored.jsonl")
        expected = []
        for row in scored:
            picked = mutual_pair(row["rewards"], [len(r["token_ids"]) for r in row["responses"]])
            if picked:
                expected.append((row["responses"][picked[0]]["text"], row["responses"][picked[1]]["text"]))
        assert [(p["chosen"], p["rejected"]) for p in read_jsonl(d / "pairs.jsonl")] == expected
        # the eps filter, re-derived from the M-step's scores
        m = json.loads((d / "msample.json").read_text())
        keep, eps = pseudo_pair_filter(m["new_rewards"], m["old_rewards"])
        assert m["eps"] == pytest.approx(eps)
        kept = [i for i, k in enumerate(keep) if k and m["new_texts"][i] != m["old_texts"][i]]
        assert [p["chosen"] for p in read_jsonl(d / "pseudo_pairs.jsonl")] == [m["new_texts"][i] for i in kept]
        # selection: the best candidate is the policy
        sel = json.loads((d / "select.json").read_text())
        assert sel["win_rate"] == max(sel["win_rates"].values()) and not sel["stopped"]
        best = load_model(d / "candidates" / f"step_{sel['best_step']}")
        mine = load_model(d / "policy")
        assert all(torch.equal(a, b) for a, b in zip(best.state_dict().values(), mine.state_dict().values()))
        assert {"sample", "dpo", "rm"} <= set(metrics["iterations"][t - 1]["stage_seconds"])
    # iteration 2's RM restarted from the BASE RM: retrain it from the base here and compare exactly
    d = run.iter_dir(2)
    base = refit_rm([d], reward, run.seed(2, "rm"))
    trained = load_model(d / "reward", kind="reward", dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), trained.state_dict().values()))
    from_r1 = load_model(run.iter_dir(1) / "reward", kind="reward", dtype=torch.float32)
    assert not torch.equal(from_r1.score.weight, trained.score.weight)


def test_tau_stops_early_and_keeps_the_previous_policy(tmp_path):
    from mtcore import load_model

    policy, reward, prompts = tiny_world(tmp_path)
    run = Run(tmp_path / "run", tiny_config(policy, reward, prompts, tau=1.0))
    lines = []
    metrics = train(run, echo=lines.append)
    sel = json.loads((run.iter_dir(1) / "select.json").read_text())
    assert sel["win_rate"] < 1.0 and sel["stopped"]
    assert metrics["stopped_at"] == 1 and len(metrics["iterations"]) == 1
    assert not (run.iter_dir(1) / "msample.json").exists() and not (run.iter_dir(2)).exists()
    # iteration 1 keeps the models it started from
    for kind, base in (("policy", policy), ("reward", reward)):
        kept, start = load_model(run.iter_dir(1) / kind, kind=kind), load_model(base, kind=kind)
        assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), start.state_dict().values()))
    # the run ends with the models of the iteration it kept: the base ones, named by their own paths
    assert metrics["final_iteration"] == 0
    assert (metrics["final_policy"], metrics["final_reward"]) == (str(policy), str(reward))
    assert "stopping early" in lines[0]
    assert ending(run, metrics).splitlines()[:3] == [
        "stopped early at iteration 1 (its best win rate was below tau, the method's rule; --tau sets it): the final "
        "models are the base models",
        f"  final policy  {policy}", f"  reward model  {reward}"]


def test_no_m_step_baseline_pairs_best_against_worst(tmp_path):
    policy, reward, prompts = tiny_world(tmp_path)
    run = Run(tmp_path / "run", tiny_config(policy, reward, prompts, iters=1, m_step=False))
    train(run, echo=lambda s: None)
    d = run.iter_dir(1)
    expected = []
    for row in read_jsonl(d / "scored.jsonl"):
        picked = best_worst_pair(row["rewards"], [])
        if picked:
            expected.append(row["responses"][picked[0]]["text"])
    assert [p["chosen"] for p in read_jsonl(d / "pairs.jsonl")] == expected
    assert not (d / "reward").exists() and run.reward(1) == reward


def test_estep_only_arm_pairs_by_the_mutual_rule_with_a_fixed_rm(tmp_path):
    """--no-m-step --pair-rule mutual: Mutual-Taught's pairs (re-derived from the scored samples), no
    M-step, r_0 throughout; config.toml records the rule."""
    policy, reward, prompts = tiny_world(tmp_path)
    run = Run(tmp_path / "run", tiny_config(policy, reward, prompts, iters=1, m_step=False, pair_rule="mutual"))
    metrics = train(run, echo=lambda s: None)
    d = run.iter_dir(1)
    expected = []
    for row in read_jsonl(d / "scored.jsonl"):
        picked = mutual_pair(row["rewards"], [len(r["token_ids"]) for r in row["responses"]])
        if picked:
            expected.append((row["responses"][picked[0]]["text"], row["responses"][picked[1]]["text"]))
    pairs = [(p["chosen"], p["rejected"]) for p in read_jsonl(d / "pairs.jsonl")]
    assert pairs == expected and len(pairs) > 0
    # (a random tiny policy's responses all run to max_new_tokens, where the rules agree:) the pairs
    # stage again, on scored samples where they differ
    (d / "scored.jsonl").write_text("".join(json.dumps(row) + "\n" for row in SCORED))
    assert stages.stage_pairs(run, 1, None) == {"pairs": 1, "prompts_without_pair": 1}
    assert [(p["chosen"], p["rejected"]) for p in read_jsonl(d / "pairs.jsonl")] == [("r4", "r1")]
    assert not (d / "msample.json").exists() and not (d / "reward").exists() and run.reward(1) == reward
    assert "rm" not in metrics["iterations"][0]
    text = (run.dir / "config.toml").read_text()
    assert 'pair_rule = "mutual"' in text and "m_step = false" in text


def test_rm_data_all_trains_on_every_iterations_pairs(tmp_path):
    """--rm-data all: r_2 is the base RM fitted on iterations 1 and 2's pseudo-pairs and E-step pairs
    (refitted here from those files), not on iteration 2's alone."""
    from mtcore import load_model

    policy, reward, prompts = tiny_world(tmp_path)
    run = Run(tmp_path / "run", tiny_config(policy, reward, prompts, rm_data="all"))
    metrics = train(run, echo=lambda s: None)
    assert [e["rm"]["data_iterations"] for e in metrics["iterations"]] == [[1], [1, 2]]
    trained = load_model(run.iter_dir(2) / "reward", kind="reward", dtype=torch.float32)
    both = refit_rm([run.iter_dir(1), run.iter_dir(2)], reward, run.seed(2, "rm"))
    assert all(torch.equal(a, b) for a, b in zip(both.state_dict().values(), trained.state_dict().values()))
    alone = refit_rm([run.iter_dir(2)], reward, run.seed(2, "rm"))
    assert not torch.equal(alone.score.weight, trained.score.weight)
    first = load_model(run.iter_dir(1) / "reward", kind="reward", dtype=torch.float32)  # r_1: iteration 1's alone
    again = refit_rm([run.iter_dir(1)], reward, run.seed(1, "rm"))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), first.state_dict().values()))
    assert 'rm_data = "all"' in (run.dir / "config.toml").read_text()
    with pytest.raises(MtcoreError, match="--rm-data all chooses the M-step's pairs, and --no-m-step trains no"):
        tiny_config(policy, reward, prompts, rm_data="all", m_step=False)
    with pytest.raises(MtcoreError, match="--rm-data 'some': must be one of iteration, all"):
        tiny_config(policy, reward, prompts, rm_data="some")
    with pytest.raises(MtcoreError, match="--pair-rule 'longest': must be one of mutual, best-worst"):
        tiny_config(policy, reward, prompts, pair_rule="longest")


def test_pair_rule_and_rm_data_are_part_of_a_runs_identity(tmp_path):
    """A changed --pair-rule or --rm-data is refused on resume, as any identity key; the rule a run
    uses by default may be given by name, and a config.toml written before the keys existed (neither
    key in it) resumes as the defaults."""
    policy, reward, prompts = tiny_world(tmp_path)
    baseline = Run(tmp_path / "baseline", tiny_config(policy, reward, prompts, m_step=False))
    baseline.mark_done("iter_1/sample")
    text = (tmp_path / "baseline" / "config.toml").read_text()
    assert "\npair_rule =" not in text and "\nrm_data =" not in text  # as config.toml was before the keys
    with pytest.raises(MtcoreError, match=r"another config \(pair_rule the default there, 'mutual' now\)"):
        Run(tmp_path / "baseline", tiny_config(policy, reward, prompts, m_step=False, pair_rule="mutual"))
    Run(tmp_path / "baseline", tiny_config(policy, reward, prompts, m_step=False, pair_rule="best-worst"))
    mt = Run(tmp_path / "mt", tiny_config(policy, reward, prompts))
    mt.mark_done("iter_1/sample")
    with pytest.raises(MtcoreError, match=r"another config \(rm_data the default there, 'all' now\)"):
        Run(tmp_path / "mt", tiny_config(policy, reward, prompts, rm_data="all"))
    with pytest.raises(MtcoreError, match=r"another config \(pair_rule the default there, 'best-worst' now\)"):
        Run(tmp_path / "mt", tiny_config(policy, reward, prompts, pair_rule="best-worst"))
    Run(tmp_path / "mt", tiny_config(policy, reward, prompts, pair_rule="mutual"))
    estep = Run(tmp_path / "estep", tiny_config(policy, reward, prompts, m_step=False, pair_rule="mutual"))
    estep.mark_done("iter_1/sample")
    with pytest.raises(MtcoreError, match=r"another config \(pair_rule 'mutual' there, the default now\)"):
        Run(tmp_path / "estep", tiny_config(policy, reward, prompts, m_step=False))


def test_a_different_config_is_refused_once_a_stage_finished(tmp_path):
    policy, reward, prompts = tiny_world(tmp_path)
    run = Run(tmp_path / "run", tiny_config(policy, reward, prompts))
    run.mark_done("iter_1/sample")
    with pytest.raises(MtcoreError, match=r"another config \(beta 0.5 there, 0.25 now; tau 0.0 there, 0.5 now\); "
                                          r"resume it with its own values .*extend it with a larger --iters"):
        Run(tmp_path / "run", tiny_config(policy, reward, prompts, beta=0.25, tau=0.5))
    Run(tmp_path / "run", tiny_config(policy, reward, prompts, kv_cache_gb=1.0))  # runtime options may change


def test_prompts_with_less_room_than_max_new_tokens_are_a_warning_with_the_count(tmp_path, caplog):
    """The sampler gives a slot at most the model's context (128 tokens here): a prompt with less room
    than --max-new-tokens gets a shorter response, one that fills the context is skipped; said before
    the run starts, with the counts. The batches larger than the data are named too."""
    policy, reward, _ = tiny_world(tmp_path)
    prompts = tmp_path / "long.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"sort {i} " + " ".join("9" * (130 if i == 5 else 3))}) + "\n"
                               for i in range(24)))
    with caplog.at_level("WARNING"):
        Run(tmp_path / "run", tiny_config(policy, reward, prompts, max_new_tokens=60, dpo_batch_size=64))
    assert "1 of the 24 prompts (the longest 143 tokens) leave less than --max-new-tokens 60" in caplog.text and "1 that fill it are skipped" in caplog.text
    assert "--dpo-batch-size 64 is more than an iteration's at most 7 pairs" in caplog.text
    assert (tmp_path / "run" / "config.toml").exists()


def test_a_run_in_which_no_stage_finished_takes_the_corrected_command(tmp_path, caplog):
    """A first stage that fails (here: killed mid-way, its shards on disk) leaves a directory that the
    corrected command takes: the new config and splits replace the old, the unfinished work goes."""
    policy, reward, prompts = tiny_world(tmp_path)
    Run(tmp_path / "run", tiny_config(policy, reward, prompts, seed=1))
    (tmp_path / "run" / "iter_1" / "sample.shards").mkdir(parents=True)  # a first stage's unfinished work
    old_splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    with caplog.at_level("WARNING"):
        run = Run(tmp_path / "run", tiny_config(policy, reward, prompts, seed=2))
    assert "no iteration's stage had finished; its config.toml and splits.json are replaced by this command's " \
        "(seed)" in caplog.text
    assert "seed = 2" in (tmp_path / "run" / "config.toml").read_text()
    assert json.loads((tmp_path / "run" / "splits.json").read_text()) == run.splits != old_splits
    assert not (tmp_path / "run" / "iter_1").exists()  # the seed decides the shards: they go
    (tmp_path / "run" / "iter_1" / "sample.shards").mkdir(parents=True)
    Run(tmp_path / "run", tiny_config(policy, reward, prompts, seed=2, tau=0.3))  # tau does not: they stay
    assert (tmp_path / "run" / "iter_1" / "sample.shards").is_dir() and "tau = 0.3" in (
        tmp_path / "run" / "config.toml").read_text()
    (tmp_path / "run" / "splits.json").unlink()  # a write that failed (a full disk): the rerun makes it again
    assert Run(tmp_path / "run", tiny_config(policy, reward, prompts, seed=2, tau=0.3)).splits == json.loads(
        (tmp_path / "run" / "splits.json").read_text())


def test_a_larger_iters_extends_a_finished_run(tmp_path, caplog):
    """--iters 3 on a finished 2-iteration run runs iteration 3 alone, on a new policy split; the first
    two iterations' files and splits are untouched, and metrics.json gains the third."""
    policy, reward, prompts = tiny_world(tmp_path)
    cfg = dict(policy_split_size=4)
    first = train(Run(tmp_path / "run", tiny_config(policy, reward, prompts, **cfg)), echo=lambda s: None)
    assert len(first["iterations"]) == 2
    before = {f: f.stat().st_mtime_ns for f in (tmp_path / "run").rglob("iter_[12]/**/*") if f.is_file()}
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    lines = []
    with caplog.at_level("WARNING"):
        metrics = train(Run(tmp_path / "run", tiny_config(policy, reward, prompts, iters=3, **cfg)), echo=lines.append)
    assert "extending the run from 2 to 3 iterations" in caplog.text
    assert [line.splitlines()[0] for line in lines if line.startswith("── iteration")][-1] == "── iteration 3 ──"
    assert {f: f.stat().st_mtime_ns for f in before} == before
    grown = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert {k: grown[k] for k in splits} == splits and len(grown["policy_3"]) == 4
    assert not set(map(json.dumps, grown["policy_3"])) & set(map(json.dumps, sum(splits.values(), [])))
    assert [e["iteration"] for e in metrics["iterations"]] == [1, 2, 3] and metrics["final_policy"] == "iter_3/policy"
    assert metrics["iterations"][:2] == first["iterations"]
    assert 'iters = 3' in (tmp_path / "run" / "config.toml").read_text()
    with pytest.raises(MtcoreError, match="has already begun iteration 3; give --iters 3 or more"):
        Run(tmp_path / "run", tiny_config(policy, reward, prompts, iters=2, **cfg))


def test_a_resumed_run_logs_where_it_resumes(tmp_path, caplog, monkeypatch):
    """Killed right after DPO saved its state at step 2, a rerun says "resuming iteration 1 at dpo, after
    step 2 of N" (N: the stage's steps, as its metrics show at the end); a run at a stage without saved
    state names the stage; a new run says nothing."""
    from mtcore import parallel
    from mtcore.loop import resume_point

    policy, reward, prompts = tiny_world(tmp_path)
    cfg = tiny_config(policy, reward, prompts, iters=1, save_state_every=2)
    assert resume_point(Run(tmp_path / "run", cfg)) is None
    save = parallel.save_train_state

    class Killed(Exception):
        pass

    def save_then_die(path, *args):
        save(path, *args)
        raise Killed(path)

    monkeypatch.setattr(parallel, "save_train_state", save_then_die)
    with pytest.raises(Killed):
        train(Run(tmp_path / "run", cfg), echo=lambda s: None)
    monkeypatch.setattr(parallel, "save_train_state", save)
    with caplog.at_level("INFO", logger="mtcore.loop"):
        train(Run(tmp_path / "run", cfg), echo=lambda s: None)
    steps = len(read_jsonl(tmp_path / "run" / "iter_1" / "dpo_metrics.jsonl"))
    assert steps > 2 and f"resuming iteration 1 at dpo, after step 2 of {steps}" in caplog.text
    other = Run(tmp_path / "other", cfg)
    other.mark_done("iter_1/sample")
    assert resume_point(Run(tmp_path / "other", cfg)) == "resuming iteration 1 at score"
    assert resume_point(Run(tmp_path / "run", cfg)) is None  # finished


def test_a_retry_with_a_lower_lr_and_a_larger_iters_keeps_both(tmp_path):
    """After a NaN at iter_1/dpo, a rerun with a lower --dpo-lr and a larger --iters: config.toml holds
    both new values, and the same command is accepted again."""
    from mtcore.files import write_json

    policy, reward, prompts = tiny_world(tmp_path)
    run = Run(tmp_path / "run", tiny_config(policy, reward, prompts, policy_split_size=4))
    run.state.update(done=["iter_1/sample", "iter_1/score", "iter_1/pairs"], failed="iter_1/dpo")
    write_json(run.dir / "state.json", run.state)
    again = tiny_config(policy, reward, prompts, policy_split_size=4, dpo_lr=5e-4, iters=3)
    Run(tmp_path / "run", again)
    text = (tmp_path / "run" / "config.toml").read_text()
    assert "dpo_lr = 0.0005" in text and "iters = 3" in text
    assert len(Run(tmp_path / "run", again).splits["policy_3"]) == 4


def test_a_run_that_stopped_early_stays_stopped_when_extended(tmp_path, caplog):
    policy, reward, prompts = tiny_world(tmp_path)
    run = Run(tmp_path / "run", tiny_config(policy, reward, prompts, tau=1.0, policy_split_size=4))
    assert train(run, echo=lambda s: None)["stopped_at"] == 1
    with caplog.at_level("WARNING"):
        metrics = train(Run(tmp_path / "run", tiny_config(policy, reward, prompts, tau=1.0, policy_split_size=4,
                                                          iters=3)), echo=lambda s: None)
    assert "stopped early at iteration 1" in caplog.text and "it stays stopped" in caplog.text
    assert f"start a new run with --policy {policy} --reward {reward}" in caplog.text
    assert metrics["stopped_at"] == 1 and not (tmp_path / "run" / "iter_2").exists()


def test_the_built_in_configs():
    """--config paper spells out the defaults (each key equal to LoopConfig's); --config small fits 100
    prompts; a file of that name in the working directory wins over the built-in one."""
    import dataclasses

    from mtcore.config import LoopConfig, config_file_path, read_config_file
    from mtcore.rundir import split_sizes

    paper = read_config_file(config_file_path("paper"))
    defaults = {f.name: f.default for f in dataclasses.fields(LoopConfig)}
    assert len(paper) >= 19 and all(paper[k] == defaults[k] for k in paper), paper
    small = resolve_config(read_config_file(config_file_path("small")), {"policy": "p", "prompts": "x.jsonl"})
    assert sum(split_sizes(small, 100, "x").values()) <= 100 and small.iters == 2
    assert config_file_path("my.toml") == Path("my.toml")


def test_config_resolution():
    toy = resolve_config({}, {})
    assert toy.policy == "" and toy.iters == 3
    real = resolve_config({"beta": 0.02}, {"policy": "p", "prompts": "x.jsonl", "beta": None})
    assert real.reward == "sfairXC/FsfairX-LLaMA3-RM-v0.1" and real.beta == 0.02 and real.dpo_lr == 7e-7
    assert resolve_config({"beta": 0.02}, {"policy": "p", "prompts": "x", "beta": 0.03}).beta == 0.03
    with pytest.raises(MtcoreError, match="--reward without --policy"):
        resolve_config({}, {"reward": "r"})
    with pytest.raises(MtcoreError, match="--policy needs --prompts"):
        resolve_config({}, {"policy": "p"})
    with pytest.raises(MtcoreError, match="unknown config key 'betta'"):
        resolve_config({"betta": 1}, {})
    with pytest.raises(MtcoreError, match="config key beta: expected float"):
        resolve_config({"beta": "high"}, {})
    with pytest.raises(MtcoreError, match="micro_batch_tokens 100 cannot hold a pair of max_length 64"):
        resolve_config({}, {"micro_batch_tokens": 100})  # the toy world's max_length is 64


def _outputs(run_dir: Path) -> dict:
    """Every stage output of a run, except wall times: jsonl rows, weights, losses."""
    out = {}
    for f in sorted(run_dir.rglob("*")):
        rel = str(f.relative_to(run_dir))
        if f.suffix == ".safetensors" or f.name.endswith(".jsonl") and "metrics" not in f.name:
            out[rel] = output_bytes(f)
        elif f.name.endswith("metrics.jsonl"):
            out[rel] = [(r["loss"], r["grad_norm"]) for r in read_jsonl(f)]
    return out


@pytest.mark.slow
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    policy, reward, prompts = tiny_world(tmp_path)
    args = ["--policy", str(policy), "--reward", str(reward), "--prompts", str(prompts), "--iters", "2"]
    for k, v in TINY.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    cmd = [sys.executable, "-m", "mtcore", "train"]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    subprocess.run(cmd + args + ["--out", str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd + args + ["--out", str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it once iteration 1's DPO is done, mid-iteration
        if state.exists() and "iter_1/dpo" in state.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(state.read_text())["done"]
    assert "iter_1/dpo" in done and "iter_2/rm" not in done
    resumed = subprocess.run(cmd + args + ["--out", str(tmp_path / "killed")], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    whole, killed = _outputs(tmp_path / "whole"), _outputs(tmp_path / "killed")
    assert whole.keys() == killed.keys() and len(whole) > 10
    for k in whole:
        assert whole[k] == killed[k], k


@pytest.mark.slow
def test_toy_world_iterations_give_checkpoints_transformers_loads(tmp_path):
    """The built-in default, 2 iterations (tau 0.5, so that neither stops early): every iter_<k> holds a
    policy and a reward model that transformers loads, and metrics.json has every evaluation key."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from mtcore.cli import main

    result = CliRunner().invoke(main, ["train", "--iters", "2", "--tau", "0.5", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "── iteration 2 ──" in result.output and "gold    win rate vs initial" in result.output
    assert "(r_0 on the same pairs 0." in result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [e["iteration"] for e in metrics["iterations"]] == [1, 2]
    assert 0.0 <= metrics["initial"]["rm_accuracy_shifted"] <= 1.0  # r_0's, on the same pairs
    for entry in metrics["iterations"]:
        for key in ("gold_win_rate_vs_initial", "gold_score", "rm_accuracy_current_policy", "rm_accuracy_heldout",
                    "rm_accuracy_shifted", "rm_accuracy_current_policy_base_rm"):
            assert 0.0 <= entry[key] <= 1.0
        d = tmp_path / "run" / f"iter_{entry['iteration']}"
        AutoModelForCausalLM.from_pretrained(str(d / "policy"))
        AutoModelForSequenceClassification.from_pretrained(str(d / "reward"))
    assert (tmp_path / "run" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loop_does_not_import_the_toy_world():
    """The loop meets a world through rundir.World; importing it loads no toy module."""
    import subprocess
    import sys

    code = "import sys, mtcore.loop; print('mtcore.toy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_summary_of_a_finished_stage_read_back_with_null_accuracies():
    """Resuming a finished run prints each iteration's summary from the stages' JSON, where NaN is
    stored as null (a fixed-RM run has no pseudo-pairs): the summary shows "-", not a traceback."""
    from types import SimpleNamespace

    from mtcore.loop import summary

    prof = {"profile": {"seconds": 1.0}}
    r = {"sample": {"responses": 10, "prompts": 2, **prof}, "pairs": {"pairs": 2, "prompts_without_pair": 0, **prof},
         "dpo": {"steps": 1, "loss": 0.69, "accuracy": 0.5, **prof},
         "select": {"win_rate": 0.6, "best_step": 1, **prof},
         "eval": {"gold_win_rate_vs_initial": 0.5, "gold_score": 0.7, "rm_accuracy_current_policy": None,
                  "rm_accuracy_heldout": 0.9, "estep_pairs_gold_accuracy": 0.95, "estep_pairs_gold_ties": 1,
                  "pseudo_pairs_gold_accuracy": None, "pseudo_pairs_gold_ties": 0, **prof}}
    run = SimpleNamespace(cfg=SimpleNamespace(tau=0.6, m_step=False), dir=Path("runs/x"),
                          policy=lambda t: Path(f"runs/x/iter_{t}/policy"), reward=lambda t: Path("rm"))
    text = summary(run, 1, json.loads(json.dumps(r)))
    assert "current policy -, held-out 0.900" in text and "pseudo-pairs - (0 gold ties)" in text
    assert text.splitlines()[-1] == "files   policy runs/x/iter_1/policy, reward model rm, runs/x/metrics.json"
    r["eval"]["rm_accuracy_current_policy"] = float("nan")  # as a fresh run holds it
    assert "current policy -, held-out" in summary(run, 1, r)
    r["eval"]["rm_accuracy_shifted"] = 0.8  # the shifted benchmark, where the run has it
    assert "held-out 0.900, shifted 0.800\n" in summary(run, 1, r)


def test_plot_axes_have_no_offset_notation():
    """A loss that moved by 1e-6 is labelled in plain numbers, not "1e-6+6.9314e-1" (matplotlib's offset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtcore.plots import Panel, draw_panels

    fig = draw_panels("t", [Panel("DPO loss", "loss", [1, 2, 3], [0.6931472, 0.6931462, 0.6931452], unit_range=False),
                            Panel("accuracy", "accuracy", [1, 2, 3], [0.5, 0.75, 1.0])])
    fig.canvas.draw()
    try:
        loss_ax = fig.axes[0]
        assert [ax.yaxis.get_offset_text().get_text() for ax in fig.axes] == ["", ""]
        labels = [float(t.get_text().replace("\u2212", "-")) for t in loss_ax.get_yticklabels() if t.get_text()]
        assert labels and all(0.6931 < v < 0.6932 for v in labels), labels
    finally:
        plt.close(fig)


def test_a_runs_identity_holds_its_prompts_content_not_their_path(tmp_path, caplog):
    """A renamed (or gzipped) prompts file resumes the run, and config.toml names it from then on; other
    content at the same path is refused once a stage finished. A run made before prompts.sha256 compares
    paths as it did, and gets the hash at its next resume."""
    import gzip

    policy, reward, prompts = tiny_world(tmp_path)
    run_dir = tmp_path / "run"
    Run(run_dir, tiny_config(policy, reward, prompts)).mark_done("iter_1/sample")
    digest = (run_dir / "prompts.sha256").read_text()
    renamed = tmp_path / "prompts_renamed.jsonl"
    prompts.rename(renamed)
    with caplog.at_level("WARNING"):
        Run(run_dir, tiny_config(policy, reward, renamed))
    assert "the prompts moved" in caplog.text
    assert f'prompts = "{renamed}"' in (run_dir / "config.toml").read_text()
    assert (run_dir / "prompts.sha256").read_text() == digest
    gz = tmp_path / "prompts.jsonl.gz"
    gz.write_bytes(gzip.compress(renamed.read_bytes()))
    Run(run_dir, tiny_config(policy, reward, gz))  # the same prompts, compressed
    lines = renamed.read_text().splitlines()
    renamed.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # the same prompts, another order
    with pytest.raises(MtcoreError, match=f"holds a run on other prompts: {renamed} does not hold the content"):
        Run(run_dir, tiny_config(policy, reward, renamed))
    (run_dir / "prompts.sha256").unlink()  # a run from before the hash: paths compared
    with pytest.raises(MtcoreError, match="another config"):
        Run(run_dir, tiny_config(policy, reward, renamed))
    Run(run_dir, tiny_config(policy, reward, gz))
    assert (run_dir / "prompts.sha256").read_text() == digest


def test_other_prompts_replace_a_run_in_which_no_stage_finished(tmp_path):
    policy, reward, prompts = tiny_world(tmp_path)
    Run(tmp_path / "run", tiny_config(policy, reward, prompts))
    digest = (tmp_path / "run" / "prompts.sha256").read_text()
    prompts.write_text(prompts.read_text().replace("sort", "order"))
    run = Run(tmp_path / "run", tiny_config(policy, reward, prompts))
    assert (tmp_path / "run" / "prompts.sha256").read_text() != digest and "order" in json.dumps(run.splits)


def test_a_small_run_extends_on_its_own_file_and_with_prompts_appended(tmp_path, caplog):
    """#35's newcomer: 20 prompts, 2 iterations of 4 after a selection set of 4 and an RM split of 6 (18
    used). --iters 3 extends it on the same file (the 2 prompts left make policy_3); 8 prompts appended
    extend it to 4 iterations (policy_4: 4 of them) and 5 (the other 4); where none is left for a new
    iteration the error advises only what is then accepted."""
    policy, reward, prompts = tiny_world(tmp_path, n_prompts=20)
    cfg = dict(policy_split_size=4)
    run_dir = tmp_path / "run"
    run = Run(run_dir, tiny_config(policy, reward, prompts, **cfg))
    for key in ("iter_1/sample", "iter_2/sample"):
        run.mark_done(key)
    first = json.loads((run_dir / "splits.json").read_text())
    used = [p[0]["content"] for p in sum(first.values(), [])]  # each a one-message list, as prompt_of gives it
    with caplog.at_level("WARNING"):
        third = Run(run_dir, tiny_config(policy, reward, prompts, iters=3, **cfg)).splits
    assert "2 prompts are left after the run's splits: the new policy splits take 2 each" in caplog.text
    assert {k: third[k] for k in first} == first
    everything = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()]
    assert sorted(p[0]["content"] for p in third["policy_3"]) == sorted(set(everything) - set(used))
    appended = [json.dumps({"prompt": f"sort {i} 7 1"}) for i in range(8)]
    prompts.write_text(prompts.read_text() + "\n".join(appended) + "\n")
    with pytest.raises(MtcoreError, match="holds a run on other prompts"):  # appended, but not extending
        Run(run_dir, tiny_config(policy, reward, prompts, iters=3, **cfg))
    fourth = Run(run_dir, tiny_config(policy, reward, prompts, iters=4, **cfg)).splits
    assert {k: fourth[k] for k in third} == third and len(fourth["policy_4"]) == 4
    assert {p[0]["content"] for p in fourth["policy_4"]} <= {f"sort {i} 7 1" for i in range(8)}
    assert (run_dir / "prompts.sha256").read_text().split()[1:] == ["20", "28"]
    Run(run_dir, tiny_config(policy, reward, prompts, iters=4, **cfg))  # resumed on the grown file
    with pytest.raises(MtcoreError, match=r"4 prompts left after this run's splits, fewer than one for each of the "
                                          r"5 new iterations; append prompts .* or give --iters 8 or less"):
        Run(run_dir, tiny_config(policy, reward, prompts, iters=9, **cfg))
    eighth = Run(run_dir, tiny_config(policy, reward, prompts, iters=8, **cfg)).splits  # the advice holds
    assert [len(eighth[f"policy_{t}"]) for t in range(5, 9)] == [1, 1, 1, 1]
