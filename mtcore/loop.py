"""The Mutual-Taught iteration (../shared/MUTUAL_TAUGHT.md), as a sequence of stages on disk.

Iteration t, from policy pi_{t-1} and reward model r_{t-1}:

  E-step     sample    pi_{t-1} samples M responses per prompt of the split policy_t
             score     r_{t-1} scores every response (re-tokenised with the RM's own tokenizer)
             pairs     chosen = the shortest response scoring above the prompt's mean,
                       rejected = the lowest-scoring one (baseline: best vs worst)
             dpo       reference log-probs of pi_{t-1} once, then DPO; a candidate every K steps
             select    candidates and pi_{t-1} answer the selection set, r_{t-1} judges; keep the
                       best candidate, or stop the run when its win rate is below tau
  M-step     msample   pi_t and pi_{t-1} answer the RM split; pseudo-pairs y_new > y_old, dropped
                       when r_{t-1}(y_new) - r_{t-1}(y_old) <= -eps (eps: std of r_{t-1} on y_old)
             rm        Bradley-Terry from the BASE RM on the pseudo-pairs + the E-step's pairs
  toy only   eval      gold-judged metrics of the new policy and RM

Every stage reads its inputs from the run directory and writes its outputs there atomically; it is
marked done in state.json only after. Re-running resumes at the first stage not done, and, since
each stage is seeded by (seed, iteration, stage) and reads only files, ends as an uninterrupted run.
Only the model a stage needs is in memory, and it is freed when the stage ends.
"""

import dataclasses
import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mtcore import parallel, profile
from mtcore.checkpoint import default_device, load_model, read_json, replace_dir, resolve, write_json
from mtcore.checkpoint import write_text_atomic
from mtcore.data import Example, encode_pair, encode_prompt, encode_sequence, load_tokenizer, make_batch
from mtcore.data import pack, prompt_of, read_jsonl, stop_ids, write_jsonl
from mtcore.errors import MtcoreError
from mtcore.parallel import save_model
from mtcore.sampler import SamplingParams, generate_responses, slot_len
from mtcore.train import DPO, BradleyTerry, TrainConfig, cached_reference_logps, fit, fitted_examples
from mtcore.train import sequence_rewards

log = logging.getLogger(__name__)

# Under torchrun every rank runs the loop alike (generation, scoring and training are shared out and
# gathered); rank 0 alone writes the run's files, and run_stage ends each stage with a barrier so
# that the next stage reads them on every rank. save_model gathers a sharded model to rank 0.
write_json, write_jsonl, write_text_atomic = map(parallel.on_main, (write_json, write_jsonl, write_text_atomic))

DEFAULT_REWARD = "sfairXC/FsfairX-LLaMA3-RM-v0.1"


@dataclass
class LoopConfig:
    """Every hyper-parameter of the method. The defaults are the paper's (8B); TOY_DEFAULTS scales
    them to the built-in toy world. Each field is a `mtcore train` option and a TOML key."""
    policy: str = ""  # empty: the built-in toy world
    reward: str = ""
    prompts: str = ""
    iters: int = 2
    seed: int = 0
    m_step: bool = True  # False: the fixed-RM iterative-DPO baseline (best vs worst of M)
    # E-step sampling
    samples: int = 5
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 1024
    # DPO
    beta: float = 0.01
    dpo_lr: float = 7e-7
    dpo_batch_size: int = 128
    dpo_epochs: int = 1
    warmup_ratio: float = 0.1
    max_length: int = 2048
    micro_batch_tokens: int = 8192
    # checkpoint selection
    save_every: int = 50
    selection_size: int = 2000
    tau: float = 0.6
    # M-step
    rm_split_size: int = 2000
    rm_lr: float = 2e-6
    rm_batch_size: int = 512
    rm_epochs: int = 1
    # toy world only
    policy_split_size: int = 0  # prompts per E-step split (real data: all prompts, split evenly)
    eval_samples: int = 4  # test-set samples per prompt for the gold evaluation
    # runtime (not part of a run's identity)
    chat_template: str = ""
    reward_chat_template: str = ""
    kv_cache_gb: float = 2.0
    device: str = ""
    grad_checkpointing: bool = False  # recompute each block's activations in backward (8B needs it)
    save_state_every: int = 0  # DPO/RM steps between sharded state saves, so a killed stage resumes mid-way


RUNTIME_KEYS = ("kv_cache_gb", "device", "grad_checkpointing", "save_state_every")
TOY_DEFAULTS = dict(iters=3, samples=5, temperature=1.0, top_p=1.0, max_new_tokens=20, beta=0.1, dpo_lr=1e-5,
                    dpo_batch_size=16, dpo_epochs=2, max_length=64, micro_batch_tokens=4096, save_every=10,
                    selection_size=64, rm_split_size=160, rm_lr=1e-5, rm_batch_size=32, rm_epochs=2,
                    policy_split_size=320)


def resolve_config(file_values: dict, cli_values: dict) -> LoopConfig:
    """Defaults (the paper's, or the toy world's), then the config file, then the command line."""
    fields = {f.name: f for f in dataclasses.fields(LoopConfig)}
    for key in list(file_values) + list(cli_values):
        if key not in fields:
            raise MtcoreError(f"unknown config key {key!r}; the keys are {', '.join(fields)}")
    merged = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    real = [k for k in ("policy", "reward", "prompts") if merged.get(k)]
    if real and not merged.get("policy"):
        raise MtcoreError(f"--{real[0]} without --policy: give --policy (and --prompts) for real models, "
                          f"or none of them for the built-in toy world")
    values = {} if real else dict(TOY_DEFAULTS)
    values.update(merged)
    if real:
        values.setdefault("reward", DEFAULT_REWARD)
        if not values.get("prompts"):
            raise MtcoreError("--policy needs --prompts FILE (JSONL of {\"prompt\": ...}, e.g. UltraFeedback's prompts)")
    for key, value in values.items():
        want = fields[key].type
        if want is float and type(value) is int:
            value = values[key] = float(value)
        if type(value) is not want:
            raise MtcoreError(f"config key {key}: expected {want.__name__}, got {value!r}")
    cfg = LoopConfig(**values)
    if not (cfg.iters >= 1 and cfg.samples >= 2 and cfg.save_every >= 1 and 0 <= cfg.tau <= 1 and cfg.beta > 0):
        raise MtcoreError("need iters >= 1, samples >= 2, save_every >= 1, 0 <= tau <= 1, beta > 0")
    if cfg.micro_batch_tokens < 2 * cfg.max_length:  # a pair, each side up to max_length, shares a micro-batch
        raise MtcoreError(f"micro_batch_tokens {cfg.micro_batch_tokens} cannot hold a pair of max_length "
                          f"{cfg.max_length}: raise --micro-batch-tokens to at least {2 * cfg.max_length}, or lower "
                          f"--max-length")
    return cfg


def read_config_file(path) -> dict:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise MtcoreError(f"{path}: cannot read ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise MtcoreError(f"{path}: not valid TOML ({e})") from None


def to_toml(values: dict) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


def identity(cfg: LoopConfig) -> dict:
    """What must match for a run directory to be resumed."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_KEYS}


# ------------------------------------------------------------------------------------------------
# The run directory
# ------------------------------------------------------------------------------------------------

class Run:
    """A run directory: config, prompt splits, stage state, and the paths of every stage's outputs."""

    def __init__(self, out, cfg: LoopConfig):
        self.dir, self.cfg = Path(out), cfg
        self.device = default_device(cfg.device)
        self.toy = not cfg.policy
        if self.toy:
            from mtcore import toy
            self.base_policy, self.base_reward = toy.asset("policy"), toy.asset("reward")
        else:
            self.base_policy, self.base_reward = resolve(cfg.policy), resolve(cfg.reward)
        if parallel.is_main():  # creates the run directory; the other ranks then read it
            self._open()
        parallel.barrier()
        if not parallel.is_main():
            self._open()

    def _open(self):
        config_file = self.dir / "config.toml"
        if config_file.exists():
            saved = read_config_file(config_file)
            mine = identity(self.cfg)
            diff = [k for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)]
            if diff:
                k = diff[0]
                raise MtcoreError(f"{self.dir} holds a run with another config ({k} = {saved.get(k)!r} there, "
                                  f"{mine.get(k)!r} now{f', and {len(diff) - 1} more' if len(diff) > 1 else ''}); "
                                  f"resume it with the same options or use another --out")
        else:
            if self.dir.exists() and any(self.dir.iterdir()):
                raise MtcoreError(f"{self.dir}: exists, is not empty and holds no mtcore run; use another --out")
            write_text_atomic(config_file, to_toml(identity(self.cfg)))
        self.state = read_json(self.dir / "state.json") if (self.dir / "state.json").exists() else {
            "done": [], "stopped_at": None}
        if not (self.dir / "splits.json").exists():
            write_json(self.dir / "splits.json", self._make_splits())
        self.splits = read_json(self.dir / "splits.json")

    def _make_splits(self) -> dict:
        cfg = self.cfg
        if self.toy:
            from mtcore import toy
            return toy.make_splits(cfg.seed, cfg.iters, {"policy": cfg.policy_split_size, "rm": cfg.rm_split_size,
                                                         "selection": cfg.selection_size})
        rows = read_jsonl(cfg.prompts)
        prompts = [prompt_of(r, f"{cfg.prompts}:{r['_line']}") for r in rows]
        random.Random(cfg.seed).shuffle(prompts)
        n_fixed = cfg.selection_size + cfg.rm_split_size
        if len(prompts) < n_fixed + cfg.iters:
            raise MtcoreError(f"{cfg.prompts}: {len(prompts)} prompts, too few for a selection set of "
                              f"{cfg.selection_size}, an RM split of {cfg.rm_split_size} and {cfg.iters} policy splits")
        splits = {"selection": prompts[:cfg.selection_size], "rm": prompts[cfg.selection_size:n_fixed]}
        rest = prompts[n_fixed:]
        per = len(rest) // cfg.iters
        for k in range(cfg.iters):
            splits[f"policy_{k + 1}"] = rest[k * per:(k + 1) * per]
        return splits

    def iter_dir(self, t: int) -> Path:
        return self.dir / f"iter_{t}"

    def policy(self, t: int) -> Path:
        """pi_t: the base policy for t = 0."""
        return self.base_policy if t == 0 else self.iter_dir(t) / "policy"

    def reward(self, t: int) -> Path:
        """r_t: the base RM for t = 0, and always with the M-step off."""
        return self.base_reward if t == 0 or not self.cfg.m_step else self.iter_dir(t) / "reward"

    def is_done(self, key: str) -> bool:
        return key in self.state["done"]

    def mark_done(self, key: str) -> None:
        self.state["done"].append(key)
        write_json(self.dir / "state.json", self.state)

    def seed(self, t: int, stage: str) -> int:
        return random.Random(f"{self.cfg.seed}:{t}:{stage}").randrange(2**31)


# ------------------------------------------------------------------------------------------------
# Models in and out of memory, generation and scoring
# ------------------------------------------------------------------------------------------------

def sample_responses(cfg: LoopConfig, device: torch.device, policy_dir: Path, prompts: list, n: int, seed: int, stage=None) -> list[list[dict]]:
    """n responses per prompt from a policy: [{"text", "token_ids", "finish_reason"}] per prompt (none
    for a prompt too long for the model). Under torchrun each rank samples every world_size-th
    prompt (seed + rank); all get them all."""
    tokenizer = load_tokenizer(policy_dir, cfg.chat_template or None)
    prompt_ids = [encode_prompt(tokenizer, p, f"prompt {i}") for i, p in enumerate(prompts)]
    model = load_model(policy_dir, "policy", device=device).eval()
    params = SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                            seed=seed, stop_ids=tuple(stop_ids(tokenizer, policy_dir)))
    out = [r or [] for r in generate_responses(model, tokenizer, prompt_ids, params,
                                                max_len=slot_len(model, prompt_ids, params), on_overlong="skip",
                                                kv_budget_bytes=int(cfg.kv_cache_gb * 2**30), leave=False)]
    if stage is not None:
        lens = [len(ids) + len(r["token_ids"]) for ids, rs in zip(prompt_ids, out) for r in rs]
        stage.add(sum(lens), profile.matmul_flops(model.args, lens))
    del model
    return out


def first_answers(cfg: LoopConfig, device: torch.device, policy_dir: Path, prompts: list, seed: int,
                  stage=None) -> list[str]:
    """One response text per prompt ("" for a prompt too long for the model)."""
    return [r[0]["text"] if r else "" for r in sample_responses(cfg, device, policy_dir, prompts, 1, seed, stage)]


def score_responses(cfg: LoopConfig, device: torch.device, reward_dir: Path, prompts: list, responses: list[list[str]], stage=None) -> list[list[float]]:
    """r(prompt, response) for every response text, read at the last token of the RM's own chat format.
    Under torchrun each rank scores every world_size-th micro-batch; all get every score."""
    return Scorer(cfg, device, reward_dir)(prompts, responses, stage)


class Scorer:
    """A reward model loaded once (the tokenizer with it) for several score_responses calls."""

    def __init__(self, cfg: LoopConfig, device: torch.device, reward_dir: Path):
        self.cfg, self.device = cfg, device
        self.tokenizer = load_tokenizer(reward_dir, cfg.reward_chat_template or None)
        self.model = load_model(reward_dir, "reward", device=device).eval()

    @torch.no_grad()
    def __call__(self, prompts: list, responses: list[list[str]], stage=None) -> list[list[float]]:
        cfg, device, tokenizer, model = self.cfg, self.device, self.tokenizer, self.model
        examples, owner = [], []
        for i, (p, texts) in enumerate(zip(prompts, responses)):
            for j, text in enumerate(texts):
                ids, n = encode_sequence(tokenizer, p, text, f"prompt {i}")
                examples.append(Example(((ids[:cfg.max_length], min(n, cfg.max_length - 1)),)))
                owner.append((i, j))
        scores = [[0.0] * len(texts) for texts in responses]

        def score(bins):
            out = []
            for index in bins:
                batch = make_batch(examples, index).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    out.append(sequence_rewards(model, batch).tolist())
            return out

        bins = pack([ex.n_tokens for ex in examples], cfg.micro_batch_tokens)
        for index, rewards in zip(bins, parallel.map_shards(score, bins)):
            for k, r in zip(index, rewards):
                i, j = owner[k]
                scores[i][j] = r
        if stage is not None:
            lens = [ex.n_tokens for ex in examples]
            stage.add(sum(lens), profile.matmul_flops(model.args, lens, with_head=False))
        return scores


# ------------------------------------------------------------------------------------------------
# The pairing and filtering rules (pure functions, tested on hand-computed cases)
# ------------------------------------------------------------------------------------------------

def mutual_pair(rewards: list[float], lengths: list[int]) -> tuple[int, int] | None:
    """(chosen, rejected) of one prompt's M responses: chosen = the shortest response scoring above
    the mean (ties: the higher reward, then the first), rejected = the lowest-scoring (ties: the first).
    None when every response scores the same."""
    mean = sum(rewards) / len(rewards)
    above = [i for i, r in enumerate(rewards) if r > mean]
    if not above:
        return None
    chosen = min(above, key=lambda i: (lengths[i], -rewards[i], i))
    rejected = min(range(len(rewards)), key=lambda i: (rewards[i], i))
    return chosen, rejected


def best_worst_pair(rewards: list[float], lengths: list[int]) -> tuple[int, int] | None:
    """The fixed-RM baseline's rule (RLHFlow): the highest- against the lowest-scoring response."""
    best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
    worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
    return None if rewards[best] == rewards[worst] else (best, worst)


def win_rate(candidate: list[float], previous: list[float]) -> float:
    """Share of prompts where the candidate's response scores higher; ties count half."""
    wins = sum(1.0 if c > p else 0.5 if c == p else 0.0 for c, p in zip(candidate, previous))
    return wins / len(candidate)


def pseudo_pair_filter(new: list[float], old: list[float]) -> tuple[list[bool], float]:
    """Keep pair i (y_new > y_old) unless new_i - old_i <= -eps, eps = std of the old scores
    (population std over the RM split). Returns (keep flags, eps)."""
    n = len(old)
    mean = sum(old) / n
    eps = math.sqrt(sum((r - mean) ** 2 for r in old) / n)
    return [nw - od > -eps for nw, od in zip(new, old)], eps


# ------------------------------------------------------------------------------------------------
# The stages
# ------------------------------------------------------------------------------------------------

def stage_sample(run: Run, t: int, stage) -> dict:
    prompts = run.splits[f"policy_{t}"]
    responses = sample_responses(run.cfg, run.device, run.policy(t - 1), prompts, run.cfg.samples, run.seed(t, "sample"), stage)
    write_jsonl(run.iter_dir(t) / "samples.jsonl", [{"prompt": p, "responses": r} for p, r in zip(prompts, responses)])
    return {"prompts": len(prompts), "responses": sum(map(len, responses))}


def stage_score(run: Run, t: int, stage) -> dict:
    rows = read_jsonl(run.iter_dir(t) / "samples.jsonl")
    scores = score_responses(run.cfg, run.device, run.reward(t - 1), [r["prompt"] for r in rows],
                             [[x["text"] for x in r["responses"]] for r in rows], stage)
    for row, s in zip(rows, scores):
        row["rewards"] = s
    write_jsonl(run.iter_dir(t) / "scored.jsonl", rows)
    flat = [x for s in scores for x in s]
    return {"mean_reward": sum(flat) / max(1, len(flat))}


def stage_pairs(run: Run, t: int, stage) -> dict:
    rule = mutual_pair if run.cfg.m_step else best_worst_pair
    pairs, no_pair = [], 0
    for row in read_jsonl(run.iter_dir(t) / "scored.jsonl"):
        rs = row["responses"]
        picked = rule(row["rewards"], [len(r["token_ids"]) for r in rs]) if len(rs) >= 2 else None
        if picked is None:
            no_pair += 1
            continue
        c, r = picked
        pairs.append({"prompt": row["prompt"], "chosen": rs[c]["text"], "rejected": rs[r]["text"],
                      "chosen_ids": rs[c]["token_ids"], "rejected_ids": rs[r]["token_ids"],
                      "chosen_reward": row["rewards"][c], "rejected_reward": row["rewards"][r]})
    write_jsonl(run.iter_dir(t) / "pairs.jsonl", pairs)
    return {"pairs": len(pairs), "prompts_without_pair": no_pair}


def _train_config(run: Run, lr, batch_size, epochs, t, stage_name) -> TrainConfig:
    return TrainConfig(lr=lr, epochs=epochs, batch_size=batch_size, micro_batch_tokens=run.cfg.micro_batch_tokens,
                       warmup_ratio=run.cfg.warmup_ratio, seed=run.seed(t, stage_name),
                       grad_checkpointing=run.cfg.grad_checkpointing, save_state_every=run.cfg.save_state_every)


def _drop_state(path: Path) -> None:
    """A finished stage's resumable training state (an 8B optimizer's is ~100 GB) is not kept."""
    if parallel.is_main():
        shutil.rmtree(path, ignore_errors=True)


def stage_dpo(run: Run, t: int, stage) -> dict:
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
    train_cfg = _train_config(run, cfg.dpo_lr, cfg.dpo_batch_size, cfg.dpo_epochs, t, "dpo")
    examples, report = fitted_examples(examples, out / "pairs.jsonl", cfg.max_length, train_cfg)
    model = load_model(policy_dir, "policy", dtype=torch.float32, device=run.device)
    ref_sums, ref_counts = cached_reference_logps(model, examples, out / "ref_logps.safetensors", cfg.micro_batch_tokens)
    candidates = out / "candidates"

    def save_candidate(step, n_steps, model):
        if step % cfg.save_every == 0 or step == n_steps:
            save_model(model, candidates / f"step_{step}", tokenizer=tokenizer)

    history = fit(model, examples, DPO(ref_sums, ref_counts, beta=cfg.beta), train_cfg, out / "dpo_metrics.jsonl",
                  desc=f"iter {t} dpo", on_step=save_candidate, state_dir=out / "dpo_state")
    _drop_state(out / "dpo_state")
    lens = [len(ids) for ex in examples for ids, _ in ex.seqs]
    stage.add(sum(lens) * (1 + cfg.dpo_epochs), profile.matmul_flops(model.args, lens) * (1 + 3 * cfg.dpo_epochs))
    del model
    last = history[-1]
    return {"pairs": report, "steps": len(history), "loss": last["loss"], "accuracy": last["accuracy"],
            "margin": last["margin"], "mean_loss": sum(r["loss"] for r in history) / len(history)}


def stage_select(run: Run, t: int, stage) -> dict:
    """Win rate of each candidate against pi_{t-1} on the selection set, judged by r_{t-1}."""
    cfg, out = run.cfg, run.iter_dir(t)
    prompts = run.splits["selection"]
    seed = run.seed(t, "select")
    steps = sorted(int(p.name.split("_")[1]) for p in (out / "candidates").glob("step_*"))
    # Every policy answers first (one model in memory at a time), then r_{t-1} is loaded once to
    # judge them all, each candidate in a call of its own as pi_{t-1}'s.
    previous = first_answers(cfg, run.device, run.policy(t - 1), prompts, seed, stage)
    answers = {step: first_answers(cfg, run.device, out / "candidates" / f"step_{step}", prompts, seed, stage)
               for step in steps}
    scorer = Scorer(cfg, run.device, run.reward(t - 1))
    previous = [s[0] for s in scorer(prompts, [[a] for a in previous], stage)]
    rates = {step: win_rate([s[0] for s in scorer(prompts, [[a] for a in answers[step]], stage)], previous)
             for step in steps}
    del scorer
    best = max(steps, key=lambda s: (rates[s], s))
    stopped = rates[best] < cfg.tau
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
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=link)
    replace_dir(tmp, dst)


def stage_msample(run: Run, t: int, stage) -> dict:
    """pi_t and pi_{t-1} answer the RM split; r_{t-1} scores both; pseudo-pairs y_new > y_old, filtered."""
    prompts = run.splits["rm"]
    seed = run.seed(t, "msample")
    new = first_answers(run.cfg, run.device, run.policy(t), prompts, seed, stage)
    old = first_answers(run.cfg, run.device, run.policy(t - 1), prompts, seed, stage)
    scores = score_responses(run.cfg, run.device, run.reward(t - 1), prompts, [[a, b] for a, b in zip(new, old)], stage)
    keep, eps = pseudo_pair_filter([s[0] for s in scores], [s[1] for s in scores])
    pairs, identical = [], 0
    for p, a, b, s, k in zip(prompts, new, old, scores, keep):
        if a == b:  # the same text on both sides carries no preference
            identical += 1
        elif k:
            pairs.append({"prompt": p, "chosen": a, "rejected": b, "delta": s[0] - s[1]})
    write_jsonl(run.iter_dir(t) / "pseudo_pairs.jsonl", pairs)
    return {"eps": eps, "pseudo_pairs": len(pairs), "identical": identical,
            "filtered": len(prompts) - identical - len(pairs), "new_texts": new, "old_texts": old,
            "new_rewards": [s[0] for s in scores], "old_rewards": [s[1] for s in scores]}


def stage_rm(run: Run, t: int, stage) -> dict:
    """Bradley-Terry from the base RM on the filtered pseudo-pairs plus the E-step's pairs (as text,
    re-tokenised with the RM's tokenizer)."""
    cfg, out = run.cfg, run.iter_dir(t)
    tokenizer = load_tokenizer(run.base_reward, cfg.reward_chat_template or None)
    rows = read_jsonl(out / "pseudo_pairs.jsonl") + read_jsonl(out / "pairs.jsonl")
    examples = [encode_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"]) for row in rows]
    train_cfg = _train_config(run, cfg.rm_lr, cfg.rm_batch_size, cfg.rm_epochs, t, "rm")
    examples, report = fitted_examples(examples, f"iteration {t}'s RM pairs", cfg.max_length, train_cfg)
    model = load_model(run.base_reward, "reward", dtype=torch.float32, device=run.device)
    history = fit(model, examples, BradleyTerry(), train_cfg, out / "rm_metrics.jsonl", desc=f"iter {t} rm",
                  state_dir=out / "rm_state")
    save_model(model, out / "reward", tokenizer=tokenizer)
    _drop_state(out / "rm_state")
    lens = [len(ids) for ex in examples for ids, _ in ex.seqs]
    stage.add(sum(lens) * cfg.rm_epochs, 3 * cfg.rm_epochs * profile.matmul_flops(model.args, lens, with_head=False))
    del model
    last = history[-1]
    return {"pairs": report, "steps": len(history), "loss": last["loss"], "accuracy": last["accuracy"],
            "mean_loss": sum(r["loss"] for r in history) / len(history)}


def stage_eval(run: Run, t: int, stage) -> dict:
    from mtcore import toy

    return toy.evaluate(run, t, stage)


E_STAGES = (("sample", stage_sample), ("score", stage_score), ("pairs", stage_pairs), ("dpo", stage_dpo),
            ("select", stage_select))
M_STAGES = (("msample", stage_msample), ("rm", stage_rm))


def stages_of(run: Run):
    return E_STAGES + (M_STAGES if run.cfg.m_step else ()) + ((("eval", stage_eval),) if run.toy else ())


def run_stage(run: Run, t: int, name: str, fn, key: str = "", result_file: Path | None = None) -> dict:
    """A stage, unless done: run it, write iter_t/<name>.json (its numbers and profile), mark it done.
    key and result_file name another place (the initial evaluation's)."""
    key, result_file = key or f"iter_{t}/{name}", result_file or run.iter_dir(t) / f"{name}.json"
    if run.is_done(key):
        return read_json(result_file)
    log.info("iteration %d: %s", t, name)
    with profile.Stage(run.device) as stage:
        result = fn(run, t, stage)
    result["profile"] = stage.record()
    write_json(result_file, result)
    run.mark_done(key)
    parallel.barrier()
    return result


def train(run: Run, echo=print) -> dict:
    """Run (or resume) every iteration. Returns metrics.json's content."""
    if run.toy:
        from mtcore import toy
        run_stage(run, 0, "eval", toy.evaluate_initial, key="initial/eval", result_file=run.dir / "initial.json")
    metrics = None  # written after each iteration run here; a run already finished writes it once below
    for t in range(1, run.cfg.iters + 1):
        if run.state["stopped_at"] is not None:
            break
        results = {}
        for name, fn in stages_of(run):
            results[name] = run_stage(run, t, name, fn)
            if name == "select" and results[name]["stopped"]:
                if run.toy:  # the kept models, evaluated as this iteration's
                    results["eval"] = run_stage(run, t, "eval", stage_eval)
                run.state["stopped_at"] = t
                write_json(run.dir / "state.json", run.state)
                echo(f"iteration {t}: best win rate {results[name]['win_rate']:.3f} < tau {run.cfg.tau}; "
                     f"stopping early; iter_{t} keeps the models it started from")
                break
        metrics = write_metrics(run)
        if results.get("select", {}).get("stopped") is False:
            echo(summary(run, t, results))
    return metrics if metrics is not None else write_metrics(run)


def write_metrics(run: Run) -> dict:
    """metrics.json from the per-stage result files: one entry per finished iteration."""
    iterations = []
    for t in range(1, run.cfg.iters + 1):
        entry = {"iteration": t}
        for name, _ in stages_of(run):
            f = run.iter_dir(t) / f"{name}.json"
            if f.exists():
                entry[name] = read_json(f)
        if len(entry) == 1:
            break
        entry["stage_seconds"] = {k: v["profile"]["seconds"] for k, v in entry.items() if isinstance(v, dict)}
        if "eval" in entry:
            entry.update({k: v for k, v in entry["eval"].items() if k != "profile"})
        iterations.append(entry)
    done = [e["iteration"] for e in iterations if (run.iter_dir(e["iteration"]) / "policy").exists()]
    metrics = {"iterations": iterations, "stopped_at": run.state["stopped_at"],
               "final_policy": str(run.policy(done[-1] if done else 0))}
    if (run.dir / "initial.json").exists():
        metrics["initial"] = read_json(run.dir / "initial.json")
    write_json(run.dir / "metrics.json", metrics)
    if run.toy and iterations and parallel.is_main():
        from mtcore import toy
        toy.plot(run.dir / "metrics.png", metrics)
    return metrics


def summary(run: Run, t: int, r: dict) -> str:
    """One screen after an iteration."""
    lines = [f"── iteration {t} ──"]
    s, p, d, sel = r["sample"], r["pairs"], r["dpo"], r["select"]
    lines.append(f"E-step  {s['responses']} responses for {s['prompts']} prompts; {p['pairs']} pairs "
                 f"({p['prompts_without_pair']} prompts without one); DPO {d['steps']} steps, loss {d['loss']:.4f}, "
                 f"accuracy {d['accuracy']:.3f}")
    lines.append(f"select  win rate {sel['win_rate']:.3f} (step {sel['best_step']}; tau {run.cfg.tau})")
    if "rm" in r:
        m, rm = r["msample"], r["rm"]
        lines.append(f"M-step  {m['pseudo_pairs']} pseudo-pairs kept (eps {m['eps']:.3f}, {m['filtered']} filtered, "
                     f"{m['identical']} identical); RM {rm['steps']} steps, loss {rm['loss']:.4f}, "
                     f"accuracy {rm['accuracy']:.3f}")
    if "eval" in r:
        e = r["eval"]
        lines.append(f"gold    win rate vs initial {e['gold_win_rate_vs_initial']:.3f}, gold score "
                     f"{e['gold_score']:.3f}; RM accuracy: current policy {e['rm_accuracy_current_policy']:.3f}, "
                     f"held-out {e['rm_accuracy_heldout']:.3f}")
    lines.append("time    " + ", ".join(f"{k} {v['profile']['seconds']:.1f}s" for k, v in r.items()))
    return "\n".join(lines)


def score_jsonl(reward, in_file, out_file, chat_template=None, max_length=2048, micro_batch_tokens=8192,
                device=None) -> int:
    """`mtcore score`: rows {"prompt", "responses"} -> the same rows plus "rewards"."""
    cfg = LoopConfig(reward_chat_template=chat_template or "", max_length=max_length,
                     micro_batch_tokens=micro_batch_tokens, device=device or "")
    device = default_device(device)
    rows = read_jsonl(in_file)
    prompts, texts = [], []
    for row in rows:
        where = f"{in_file}:{row['_line']}"
        prompts.append(prompt_of(row, where))
        responses = row.get("responses")
        if not isinstance(responses, list) or not all(
                isinstance(r, str) or (isinstance(r, dict) and isinstance(r.get("text"), str)) for r in responses):
            raise MtcoreError(f'{where}: needs "responses": a list of strings or of {{"text": ...}} objects')
        texts.append([r if isinstance(r, str) else r["text"] for r in responses])
    for row, s in zip(rows, score_responses(cfg, device, resolve(reward), prompts, texts)):
        row["rewards"] = s
    write_jsonl(out_file, rows)
    return sum(map(len, texts))


def alpaca_eval_outputs(cfg: LoopConfig, device, policy, prompts_file, out_file, generator: str) -> int:
    """`mtcore eval --prompts`: one response per prompt, written as AlpacaEval's model outputs
    [{"instruction", "output", "generator"}] (JSON, atomically) for an external judge."""
    rows = read_jsonl(prompts_file)
    prompts = [prompt_of(r, f"{prompts_file}:{r['_line']}") for r in rows]
    answers = first_answers(cfg, device, resolve(policy), prompts, cfg.seed)
    out = [{"instruction": p[-1]["content"], "output": a, "generator": generator} for p, a in zip(prompts, answers)]
    write_text_atomic(out_file, json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    return len(out)
