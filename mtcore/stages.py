"""The stages of one Mutual-Taught iteration on real models (mtcore/mutual_taught.py has the rules).

Each stage reads its inputs from the run directory (rundir.Run), calls the algorithm's rules and the
services (inference: sampling and scoring; train: DPO and Bradley-Terry), and writes its outputs
atomically under iter_t/. It returns the numbers of iter_t/<stage>.json; loop.run_stage writes that
file and marks the stage done. A stage is seeded by (seed, t, stage) and reads only files, so a rerun
computes what an uninterrupted run did. Only the model a stage needs is in memory.

Under torchrun every rank runs each stage alike (generation, scoring and training are shared out and
gathered); rank 0 alone writes the run's files.
"""

import contextlib
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from mtcore import mutual_taught, parallel, preempt, profile, rmeval
from mtcore.checkpoint import load_model, save_model, stored_dtype
from mtcore.data import Example, encode_pair, encode_prompt, load_tokenizer, read_jsonl, write_jsonl
from mtcore.errors import MtcoreError
from mtcore.files import replace_dir, write_text_atomic
from mtcore.inference import Sampler, Scorer
from mtcore.progress import Progress
from mtcore.rundir import Run
from mtcore.train import DPO, BradleyTerry, NonFiniteLoss, TrainConfig, cached_reference_logps, fit
from mtcore.train import check_training_disk, forward_flops, global_batches, prepare_examples, reference_key

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# Shards: the long stages save their work as they go
# ------------------------------------------------------------------------------------------------

def shard_dir(run: Run, t: int, stage: str) -> Path:
    """Where a stage keeps its finished shards until it is done (loop.run_stage removes it then); the
    initial evaluations' (t = 0) beside their results, in the run's directory."""
    return run.dir / f"initial_{stage}.shards" if t == 0 else run.iter_dir(t) / f"{stage}.shards"


def in_shards(run: Run, t: int, stage: str, part: str, n: int, fn, progress=None, weight: int = 1) -> list:
    """fn(indices, progress) -> one JSON-able result per index, over the items 0..n-1 in shards of
    cfg.shard_prompts per rank (consecutive, on a fixed grid: the same in a resumed run as in an
    uninterrupted one). Each finished shard is saved in <stage>.shards/<part>/ before the next starts,
    and a rerun reads the saved ones instead of computing them again: a kill loses at most the shard
    in progress. After each shard, a stop signal stops the run here (preempt.check). fn stops early
    on a stop signal (its loops ask preempt.stopping) and gives None for the items it did not finish:
    the finished ones are saved, so a shard of thousands of prompts need not end before the run stops.
    progress: the stage's progress.Progress, counting `weight` per item (default: one of this call's
    own); fn updates it as it goes, and each shard's end sets the exact count."""
    directory = shard_dir(run, t, stage) / part
    saved = _read_shards(directory)
    size = run.cfg.shard_prompts * parallel.world_size()
    results = [saved.get(i) for i in range(n)]
    with (contextlib.nullcontext(progress) if progress else stage_progress(run, t, stage, n)) as progress:
        progress.resume(weight * sum(i in saved for i in range(n)))
        base, computed = progress.done, 0
        for start in range(0, n, size):
            todo = [i for i in range(start, min(n, start + size)) if i not in saved]
            if not todo:
                continue
            for i, r in zip(todo, fn(todo, progress)):
                results[i] = r
            finished = [i for i in todo if results[i] is not None]  # all of them, unless a signal cut it short
            computed += len(finished)
            progress.update_to(base + weight * computed)
            _save_shard(run, t, stage, part, directory, finished, results, n)
    return results


def stage_progress(run: Run, t: int, stage: str, total: int, unit: str = "prompts", item_tokens: int = 0) -> Progress:
    return Progress(total, f"iteration {t} {stage}" if t else f"initial {stage}", unit, log_every=run.cfg.log_every,
                    item_tokens=item_tokens)


def _save_shard(run: Run, t: int, stage: str, part: str, directory: Path, finished: list[int], results: list,
                n: int) -> None:
    """A shard's finished items, saved (the file named by the first and last: the items of one shard cut
    short and of its rest never share both); then a stop signal stops the run here."""
    if parallel.is_main() and finished:
        write_text_atomic(directory / f"{finished[0]:07d}-{finished[-1]:07d}.json",
                          json.dumps({"indices": finished, "results": [results[i] for i in finished]}))
    parallel.barrier()
    saved = sum(r is not None for r in results)
    where = f"iteration {t}" if t else "the initial evaluation"
    preempt.check(f"in {where}'s {stage} stage, with {saved} of {n} items of {part} saved in {directory}")


def _read_shards(directory: Path) -> dict:
    """{item index: result} of the shards saved in directory; a file that is not one is skipped (its
    items are computed again)."""
    saved = {}
    for f in sorted(directory.glob("*.json")) if directory.is_dir() else ():
        try:
            shard = json.loads(f.read_text(encoding="utf-8"))
            saved.update(zip(shard["indices"], shard["results"], strict=True))
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            log.warning("%s: not a shard mtcore wrote (%s); its items are computed again", f, e)
    if saved:
        log.info("%s: %d items saved by an earlier run", directory, len(saved))
    return saved


def _answers(run: Run, t: int, stage: str, part: str, sampler: Sampler, prompts: list, seed: int, meter,
             progress=None) -> list[str]:
    """One answer per prompt from `sampler`, in shards; prompt i draws from the streams of (seed, i)."""
    return in_shards(run, t, stage, part, len(prompts), lambda idx, bar: sampler.first_answers(
        [prompts[i] for i in idx], seed, meter, prompt_keys=idx, progress=bar, should_stop=preempt.stopping),
        progress)


def _scores(run: Run, t: int, stage: str, part: str, scorer: Scorer, prompts: list, responses: list[list[str]],
            meter, progress=None) -> list[list[float]]:
    """scorer's rewards of every response, in shards of prompts."""
    return in_shards(run, t, stage, part, len(prompts), lambda idx, bar: scorer(
        [prompts[i] for i in idx], [responses[i] for i in idx], meter, progress=bar, should_stop=preempt.stopping),
        progress)


# ------------------------------------------------------------------------------------------------
# E-step
# ------------------------------------------------------------------------------------------------


def stage_sample(run: Run, t: int, meter) -> dict:
    """pi_{t-1} samples M responses to each prompt of the split policy_t (prompt i from the random
    streams of (seed, i), in shards). Its progress counts responses, each at most max_new_tokens."""
    prompts, seed, m = run.splits[f"policy_{t}"], run.seed(t, "sample"), run.cfg.samples
    sampler = Sampler(run.cfg, run.device, run.policy(t - 1))
    with stage_progress(run, t, "sample", m * len(prompts), "responses", run.cfg.max_new_tokens) as bar:
        responses = in_shards(run, t, "sample", "responses", len(prompts),
                              lambda idx, bar: sampler([prompts[i] for i in idx], m, seed, meter, prompt_keys=idx,
                                                       progress=bar, should_stop=preempt.stopping), bar, weight=m)
    if parallel.is_main():
        write_jsonl(run.iter_dir(t) / "samples.jsonl",
                    [{"prompt": p, "responses": r} for p, r in zip(prompts, responses)])
    return {"prompts": len(prompts), "responses": sum(map(len, responses))}


def stage_score(run: Run, t: int, meter) -> dict:
    """r_{t-1} scores every response (re-tokenised with the reward model's own tokenizer), in shards."""
    rows = read_jsonl(run.iter_dir(t) / "samples.jsonl")
    scores = _scores(run, t, "score", "rewards", Scorer(run.cfg, run.device, run.reward(t - 1)),
                     [r["prompt"] for r in rows], [[x["text"] for x in r["responses"]] for r in rows], meter)
    for row, s in zip(rows, scores):
        row["rewards"] = s
    if parallel.is_main():
        write_jsonl(run.iter_dir(t) / "scored.jsonl", rows)
    flat = [x for s in scores for x in s]
    return {"mean_reward": sum(flat) / max(1, len(flat))}


def stage_pairs(run: Run, t: int, meter) -> dict:
    """One DPO pair per prompt (mutual_taught.preference_pairs, by the run's pair_rule)."""
    rule = mutual_taught.pair_rule(run.cfg.pair_rule, run.cfg.m_step)
    pairs, no_pair = mutual_taught.preference_pairs(read_jsonl(run.iter_dir(t) / "scored.jsonl"), rule)
    if parallel.is_main():
        write_jsonl(run.iter_dir(t) / "pairs.jsonl", pairs)
    return {"pairs": len(pairs), "prompts_without_pair": no_pair}


def train_config_for(run: Run, lr, batch_size, epochs, t, stage_name) -> TrainConfig:
    return TrainConfig(lr=lr, epochs=epochs, batch_size=batch_size, micro_batch_tokens=run.cfg.micro_batch_tokens,
                       warmup_ratio=run.cfg.warmup_ratio, seed=run.seed(t, stage_name),
                       grad_checkpointing=run.cfg.grad_checkpointing, save_state_every=run.cfg.save_state_every,
                       log_every=run.cfg.log_every)


def _drop_state(path: Path) -> None:
    """A finished stage's resumable training state (an 8B optimizer's is ~100 GB) is not kept."""
    if parallel.is_main():
        shutil.rmtree(path, ignore_errors=True)


def _train_stage(run: Run, model, examples, objective, train_cfg, out: Path, name: str, tokenizer, on_step=None):
    """train.fit for the dpo or rm stage (metrics in <name>_metrics.jsonl, resumable state in <name>_state).
    At a NaN/inf loss the last good model is kept in iter_t/last_good, and the error says how to go on:
    a rerun with a lower learning rate (run_stage records the failure, Run accepts the new value).
    Each step's row also goes to train's --report-to (run.reporter), as iter_t/<name>/<key>."""
    parallel.parallelize(model, train_cfg.grad_checkpointing)
    try:
        return fit(model, examples, objective, train_cfg, out / f"{name}_metrics.jsonl", desc=f"{out.name} {name}",
                   on_step=on_step, state_dir=out / f"{name}_state",
                   report=run.reporter and run.reporter.step_logger(f"{out.name}/{name}"))
    except NonFiniteLoss as e:
        save_model(model, out / "last_good", tokenizer=tokenizer)
        raise NonFiniteLoss(f"{out.name} {name}: {e}; the model before that step is in {out / 'last_good'}; "
                            f"rerun the same command with a lower --{name}-lr to redo this stage") from None


def stage_dpo(run: Run, t: int, meter) -> dict:
    """Reference log-probs of pi_{t-1} once, then DPO from pi_{t-1}; a candidate every save_every steps
    and at the end, in iter_t/candidates/step_<k>."""
    cfg, out = run.cfg, run.iter_dir(t)
    policy_dir = run.policy(t - 1)
    rows = read_jsonl(out / "pairs.jsonl")
    if not rows:
        raise MtcoreError(f"iteration {t}: no pairs (every prompt's responses scored alike); nothing to train")
    tokenizer = load_tokenizer(policy_dir, cfg.chat_template or None)
    examples = []
    for row in rows:  # the policy trains on its own sampled token ids
        prompt = encode_prompt(tokenizer, row["prompt"])
        n = len(prompt)
        examples.append(Example(((prompt + row["chosen_ids"], n), (prompt + row["rejected_ids"], n)), row["_line"]))
    train_cfg = train_config_for(run, cfg.dpo_lr, cfg.dpo_batch_size, cfg.dpo_epochs, t, "dpo")
    examples, report = prepare_examples(examples, out / "pairs.jsonl", cfg.max_length, train_cfg)
    n_candidates = _candidates_left(out / "candidates", len(global_batches(examples, train_cfg)), cfg.save_every)
    check_training_disk(out, policy_dir, examples, train_cfg, n_candidates, f"iteration {t}'s dpo stage "
                        f"({n_candidates} candidates and the resumable state)", _state_saved(out / "dpo_state"))
    model = load_model(policy_dir, "policy", dtype=torch.float32, device=run.device)
    key = reference_key(examples, policy_dir, run.device)  # the pairs and pi_{t-1} now (a redone stage: others)
    ref_sums, ref_counts = cached_reference_logps(model, examples, out / "ref_logps.safetensors",
                                                  cfg.micro_batch_tokens, log_every=cfg.log_every, key=key,
                                                  where=f"in iteration {t}'s dpo stage")
    candidates = out / "candidates"
    dtype = stored_dtype(run.base_policy)  # candidates as the base policy is kept (bf16 for Llama-3-8B)

    def save_candidate(step, n_steps, model):
        if step % cfg.save_every == 0 or step == n_steps:
            save_model(model, candidates / f"step_{step}", tokenizer=tokenizer, dtype=dtype)

    objective = DPO(ref_sums, ref_counts, beta=cfg.beta)
    history = _train_stage(run, model, examples, objective, train_cfg, out, "dpo", tokenizer, on_step=save_candidate)
    _drop_state(out / "dpo_state")
    lens = [len(ids) for ex in examples for ids, _ in ex.seqs]
    meter.add(sum(lens) * (1 + cfg.dpo_epochs), forward_flops(model, examples) * (1 + 3 * cfg.dpo_epochs))
    del model
    last = history[-1]
    return {"pairs": report, "steps": len(history), "loss": last["loss"], "accuracy": last["accuracy"],
            "margin": last["margin"], "mean_loss": sum(r["loss"] for r in history) / len(history)}


def _candidates_left(candidates: Path, n_steps: int, save_every: int) -> int:
    """How many candidates a DPO stage of n_steps has still to save (one every save_every steps and one
    at the end; a resumed stage saved some)."""
    steps = set(range(save_every, n_steps + 1, save_every)) | {n_steps}
    return sum(not (candidates / f"step_{step}").exists() for step in steps)


def _state_saved(state_dir: Path) -> bool:
    return (state_dir / "trainer.json").exists()


def stage_select(run: Run, t: int, meter) -> dict:
    """Win rate of each candidate against pi_{t-1} on the selection set, judged by r_{t-1}; the best
    becomes pi_t, or the run stops (mutual_taught.choose_candidate)."""
    cfg, out = run.cfg, run.iter_dir(t)
    prompts = run.splits["selection"]
    seed = run.seed(t, "select")  # the same for every side: common random numbers
    steps = sorted(int(p.name.split("_")[1]) for p in (out / "candidates").glob("step_*"))
    # Every policy answers first (one model in memory at a time), then r_{t-1} is loaded once to
    # judge them all, each candidate in a call of its own as pi_{t-1}'s. Each part is saved in shards.
    # One progress over it all: (1 + candidates) x prompts answered, then as many judged.
    def answers_of(part, policy_dir):
        return _answers(run, t, "select", part, Sampler(cfg, run.device, policy_dir), prompts, seed, meter, progress)

    def rewards(part, texts):
        scored = _scores(run, t, "select", f"{part}_rewards", scorer, prompts, [[a] for a in texts], meter, progress)
        return [s[0] for s in scored]

    with stage_progress(run, t, "select", 2 * (1 + len(steps)) * len(prompts), "answers") as progress:
        previous = answers_of("previous", run.policy(t - 1))
        answers = {step: answers_of(f"step_{step}", out / "candidates" / f"step_{step}") for step in steps}
        scorer = Scorer(cfg, run.device, run.reward(t - 1))

        previous = rewards("previous", previous)
        rates = {step: mutual_taught.win_rate(rewards(f"step_{step}", answers[step]), previous) for step in steps}
    del scorer
    best, stopped = mutual_taught.choose_candidate(rates, cfg.tau)
    if not stopped:
        _install(out / "candidates" / f"step_{best}", out / "policy")
    else:  # the run ends here, keeping pi_{t-1} and r_{t-1}: they are this iteration's models
        _install(run.policy(t - 1), out / "policy")
        if cfg.m_step:
            _install(run.reward(t - 1), out / "reward")
    return {"win_rates": {str(k): v for k, v in rates.items()}, "best_step": best, "win_rate": rates[best],
            "stopped": stopped}


def _install(src: Path, dst: Path) -> None:
    """dst becomes a copy of the checkpoint directory src (hard links where the filesystem allows:
    checkpoints are never modified in place), atomically (rank 0)."""
    if not parallel.is_main():
        return

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, copy_function=link)
        replace_dir(tmp, dst)
    except OSError as e:  # a full or read-only disk; shutil.Error gathers copytree's (src, dst, why)
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.args[0][0][2] if isinstance(e, shutil.Error) else e.strerror or e
        raise MtcoreError(f"{dst}: cannot install {src} there ({reason})") from None


def prune_candidates(run: Run, t: int, best_step: int) -> None:
    """After select is recorded, the candidates it did not choose are removed (unless --keep-candidates);
    the chosen one stays (hard links shared with iter_t/policy). The loop calls it again whenever it
    passes a done select, so a kill part-way through is finished by the rerun, and select never runs on
    a pruned directory."""
    if run.cfg.keep_candidates or not parallel.is_main():
        return
    for path in sorted((run.iter_dir(t) / "candidates").glob("step_*")):
        if path.name != f"step_{best_step}":
            shutil.rmtree(path)


# ------------------------------------------------------------------------------------------------
# M-step
# ------------------------------------------------------------------------------------------------

def stage_msample(run: Run, t: int, meter) -> dict:
    """pi_t and pi_{t-1} answer the RM split; r_{t-1} scores both; pseudo-pairs y_new > y_old, filtered
    (mutual_taught.pseudo_pairs)."""
    prompts = run.splits["rm"]
    seed = run.seed(t, "msample")  # the same for both sides: common random numbers
    with stage_progress(run, t, "msample", 3 * len(prompts), "answers") as progress:  # new, old, then judged
        new = _answers(run, t, "msample", "new", Sampler(run.cfg, run.device, run.policy(t)), prompts, seed, meter,
                       progress)
        old = _answers(run, t, "msample", "old", Sampler(run.cfg, run.device, run.policy(t - 1)), prompts, seed,
                       meter, progress)
        scores = _scores(run, t, "msample", "rewards", Scorer(run.cfg, run.device, run.reward(t - 1)), prompts,
                         [[a, b] for a, b in zip(new, old)], meter, progress)
    new_rewards, old_rewards = [s[0] for s in scores], [s[1] for s in scores]
    pairs, counts = mutual_taught.pseudo_pairs(prompts, new, old, new_rewards, old_rewards)
    if parallel.is_main():
        write_jsonl(run.iter_dir(t) / "pseudo_pairs.jsonl", pairs)
    return {**counts, "new_texts": new, "old_texts": old, "new_rewards": new_rewards, "old_rewards": old_rewards}


def stage_rm(run: Run, t: int, meter) -> dict:
    """Bradley-Terry from the BASE RM on the filtered pseudo-pairs plus the E-step's pairs (as text,
    re-tokenised with the RM's tokenizer): this iteration's, or with --rm-data all every iteration's so
    far (mutual_taught.rm_data_iterations)."""
    cfg, out = run.cfg, run.iter_dir(t)
    tokenizer = load_tokenizer(run.base_reward, cfg.reward_chat_template or None)
    iterations = mutual_taught.rm_data_iterations(t, cfg.rm_data)
    rows = [row for k in iterations for row in mutual_taught.rm_training_pairs(
        read_jsonl(run.iter_dir(k) / "pseudo_pairs.jsonl"), read_jsonl(run.iter_dir(k) / "pairs.jsonl"))]
    examples = [encode_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"]) for row in rows]
    train_cfg = train_config_for(run, cfg.rm_lr, cfg.rm_batch_size, cfg.rm_epochs, t, "rm")
    examples, report = prepare_examples(examples, f"iteration {t}'s RM pairs", cfg.max_length, train_cfg)
    check_training_disk(out, run.base_reward, examples, train_cfg, 1, f"iteration {t}'s rm stage (the reward model "
                        f"and the resumable state)", _state_saved(out / "rm_state"))
    model = load_model(run.base_reward, "reward", dtype=torch.float32, device=run.device)
    history = _train_stage(run, model, examples, BradleyTerry(), train_cfg, out, "rm", tokenizer)
    save_model(model, out / "reward", tokenizer=tokenizer, dtype=stored_dtype(run.base_reward))
    _drop_state(out / "rm_state")
    lens = [len(ids) for ex in examples for ids, _ in ex.seqs]
    meter.add(sum(lens) * cfg.rm_epochs, 3 * cfg.rm_epochs * profile.matmul_flops(model.args, lens, head_tokens=0))
    del model
    last = history[-1]
    return {"pairs": report, "steps": len(history), "loss": last["loss"], "accuracy": last["accuracy"],
            "mean_loss": sum(r["loss"] for r in history) / len(history), "data_iterations": list(iterations)}


# ------------------------------------------------------------------------------------------------
# Evaluation (not part of the algorithm: it reads the models, never changes them)
# ------------------------------------------------------------------------------------------------

def stage_eval(run: Run, t: int, meter) -> dict:
    """The world's gold-judged metrics of pi_t and r_t (t = 0: the initial models)."""
    return run.world.gold_metrics(run, t, meter)


def stage_rmeval(run: Run, t: int, meter) -> dict:
    """r_t's accuracy on the --rm-eval pairs, per subset and per RewardBench section (t = 0: the base RM)."""
    def in_saved_shards(scorer, prompts, pairs):  # a stop signal stops it at a micro-batch
        # --rm-eval may change between runs: the shards of other pairs are in another part
        digest = hashlib.sha256(json.dumps([prompts, pairs], ensure_ascii=False).encode()).hexdigest()[:16]
        return _scores(run, t, "rmeval", f"rewards-{digest}", scorer, prompts, pairs, meter)

    return rmeval.rm_accuracy(run.cfg, run.device, run.reward(t), run.cfg.rm_eval, meter, score=in_saved_shards)


STAGES = {"sample": stage_sample, "score": stage_score, "pairs": stage_pairs, "dpo": stage_dpo,
          "select": stage_select, "msample": stage_msample, "rm": stage_rm, "eval": stage_eval,
          "rmeval": stage_rmeval}


def stages_of(run: Run) -> tuple[tuple[str, object], ...]:
    """(name, stage function) of one iteration of this run: the algorithm's steps, then the RM
    evaluation (--rm-eval, with the M-step) and the toy world's gold evaluation."""
    names = mutual_taught.steps(run.cfg.m_step)
    names += ("rmeval",) if run.cfg.m_step and run.cfg.rm_eval else ()
    names += ("eval",) if run.world else ()
    return tuple((name, STAGES[name]) for name in names)
