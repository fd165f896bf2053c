"""The Mutual-Taught iteration (../shared/MUTUAL_TAUGHT.md), as a sequence of stages on disk.

Iteration t, from policy pi_{t-1} and reward model r_{t-1}:

  E-step     sample    pi_{t-1} samples M responses per prompt of the split policy_t
             score     r_{t-1} scores every response (re-tokenised with the RM's own tokenizer)
             pairs     chosen = the shortest response scoring above the prompt's mean,
                       rejected = the lowest-scoring one (baseline: best vs worst)
             dpo       reference log-probs of pi_{t-1} once, then DPO; a candidate every K steps
             select    candidates and pi_{t-1} answer the selection set, r_{t-1} judges; keep the
                       best candidate, or stop the run when its win rate is below tau; then the
                       others are removed (prune_candidates; --keep-candidates keeps them)
  M-step     msample   pi_t and pi_{t-1} answer the RM split; pseudo-pairs y_new > y_old, dropped
                       when r_{t-1}(y_new) - r_{t-1}(y_old) <= -eps (eps: std of r_{t-1} on y_old)
             rm        Bradley-Terry from the BASE RM on the pseudo-pairs + the E-step's pairs
  --rm-eval  rmeval    r_t's accuracy on a preference-pair file, per subset and RewardBench section
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
from typing import Callable
from pathlib import Path

import torch

from mtcore import parallel, profile, rmeval
from mtcore.checkpoint import check_checkpoint, default_device, load_model, read_json, replace_dir, resolve
from mtcore.checkpoint import stored_dtype, write_json
from mtcore.checkpoint import write_text_atomic
from mtcore.data import Example, encode_pair, encode_prompt, encode_response, load_tokenizer, make_batch
from mtcore.data import pack, prompt_of, read_jsonl, stop_ids, write_jsonl
from mtcore.errors import MtcoreError, check_ranges
from mtcore.outputs import write_json_file
from mtcore.parallel import save_model
from mtcore.sampler import DECODE_MODES, SamplingParams, generate_responses, slot_len
from mtcore.train import DPO, BradleyTerry, NonFiniteLoss, TrainConfig, cached_reference_logps, fit
from mtcore.train import fitted_examples, forward_flops, sequence_rewards

log = logging.getLogger(__name__)

# Under torchrun every rank runs the loop alike (generation, scoring and training are shared out and
# gathered); rank 0 alone writes the run's files (`if parallel.is_main():` at each write), and
# run_stage ends each stage with a barrier so that the next stage reads them on every rank.
# save_model gathers a sharded model to rank 0.

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
    kv_cache_gb: float = 0.0  # 0: sampler.cache_budget (free GPU memory less a reserve; 2 GiB off CUDA)
    decode_mode: str = "auto"
    device: str = ""
    grad_checkpointing: bool = False  # recompute each block's activations in backward (8B needs it)
    save_state_every: int = 0  # DPO/RM steps between sharded state saves, so a killed stage resumes mid-way
    keep_candidates: bool = False  # keep every DPO candidate after select (default: the chosen one only)
    rm_eval: str = ""  # preference pairs JSONL: each iteration's RM is evaluated on it (RewardBench sections)

    def __post_init__(self):
        check_ranges(self, LOOP_RANGES)


# One line of `mtcore train --help` per field: what it does (the paper's and the toy world's values
# are added from the defaults).
LOOP_HELP = {
    "policy": "Initial policy pi_0: checkpoint directory or hub id (none: the built-in toy world).",
    "reward": "Base reward model r_0: directory or hub id (default with --policy: sfairXC/FsfairX-LLaMA3-RM-v0.1).",
    "prompts": "Prompts JSONL ({\"prompt\": ...} or {\"messages\": [...]}), split into selection, RM and policy sets.",
    "iters": "Mutual-Taught iterations (E-step + M-step each).",
    "seed": "Seed of the prompt splits and of every stage's sampling and training.",
    "m_step": "Retrain the RM every iteration; --no-m-step is the fixed-RM iterative-DPO baseline.",
    "samples": "Responses sampled per prompt in the E-step (M).",
    "temperature": "Sampling temperature (0: greedy).",
    "top_p": "Nucleus sampling mass, in (0, 1].",
    "max_new_tokens": "Longest response, in tokens.",
    "beta": "DPO's beta (strength of the pull to the reference policy).",
    "dpo_lr": "DPO peak learning rate (cosine schedule).",
    "dpo_batch_size": "DPO pairs per optimizer step.",
    "dpo_epochs": "DPO epochs over each iteration's pairs.",
    "warmup_ratio": "Share of DPO and RM steps spent in linear warm-up, in [0, 1).",
    "max_length": "Tokens per sequence in DPO and RM training (responses are cut to fit).",
    "micro_batch_tokens": "Token budget of one packed forward/backward (at least twice --max-length).",
    "save_every": "DPO steps between candidate checkpoints for the selection.",
    "selection_size": "Prompts on which each candidate is judged against pi_{t-1}.",
    "tau": "Stop when the best candidate's win rate against pi_{t-1} is below this, in [0, 1].",
    "rm_split_size": "Prompts on which pi_t and pi_{t-1} answer to make the M-step's pseudo-pairs.",
    "rm_lr": "Reward-model peak learning rate (Bradley-Terry, from the base RM every iteration).",
    "rm_batch_size": "Reward-model pairs per optimizer step.",
    "rm_epochs": "Reward-model epochs over each iteration's pairs.",
    "policy_split_size": "Toy world only: prompts per E-step split (real prompts are split evenly).",
    "eval_samples": "Toy world only: test answers per prompt in the gold evaluation.",
    "chat_template": "The policy's chat template: a Jinja file, or 'llama3', when its tokenizer has none.",
    "reward_chat_template": "The reward model's chat template, likewise.",
    "kv_cache_gb": "GiB of K/V cache for sampling, which sizes the concurrent sequences (0: on CUDA the free "
                   "memory after the weights less a reserve, at most 256 sequences; 2 GiB on the CPU).",
    "decode_mode": "Sampler decode step: auto (graphs on CUDA, else eager); eager; compile (static shapes, "
                   "torch.compile); graphs (a captured CUDA graph, replayed).",
    "device": "cpu, cuda or cuda:N (default: cuda when available).",
    "grad_checkpointing": "Recompute each block's activations in backward (8B needs it).",
    "save_state_every": "DPO/RM steps between resumable sharded state saves (0: never).",
    "keep_candidates": "Keep every DPO candidate after the selection (default: only the chosen one stays).",
    "rm_eval": "Preference pairs JSONL (RewardBench's format): r_0 and each iteration's RM are evaluated on it.",
}


def _at_least(n):
    return lambda v: v >= n, f">= {n}"


LOOP_RANGES = {
    "iters": _at_least(1), "seed": (lambda v: 0 <= v < 2**63, "in [0, 2**63)"), "samples": _at_least(2),
    "temperature": _at_least(0), "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "max_new_tokens": _at_least(1),
    "beta": (lambda v: v > 0, "> 0"), "dpo_lr": (lambda v: v > 0, "> 0"), "dpo_batch_size": _at_least(1),
    "dpo_epochs": _at_least(1), "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"), "max_length": _at_least(2),
    "micro_batch_tokens": _at_least(2), "save_every": _at_least(1), "selection_size": _at_least(1),
    "tau": (lambda v: 0 <= v <= 1, "in [0, 1]"), "rm_split_size": _at_least(1), "rm_lr": (lambda v: v > 0, "> 0"),
    "rm_batch_size": _at_least(1), "rm_epochs": _at_least(1), "policy_split_size": _at_least(0),
    "eval_samples": _at_least(1), "kv_cache_gb": _at_least(0), "save_state_every": _at_least(0),
    "decode_mode": (lambda v: v in DECODE_MODES, f"one of {', '.join(DECODE_MODES)}"),
}


RUNTIME_KEYS = ("kv_cache_gb", "decode_mode", "device", "grad_checkpointing", "save_state_every", "keep_candidates", "rm_eval")
TOY_DEFAULTS = dict(iters=3, samples=5, max_new_tokens=20, beta=0.1, dpo_lr=1e-5,
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
    if real and cfg.policy_split_size:
        raise MtcoreError("--policy-split-size is for the toy world only; real prompts are split evenly over --iters")
    device = default_device(cfg.device or None)  # a device string that names none is an error now, not mid-run
    if cfg.decode_mode == "graphs" and device.type != "cuda":
        raise MtcoreError(f"--decode-mode graphs needs a CUDA device, and this run's is {device}; use eager or compile")
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
    except UnicodeDecodeError:
        raise MtcoreError(f"{path}: not UTF-8 text; save the file as UTF-8") from None
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

# The training keys a rerun may change after a stage stopped at a NaN/inf loss.
RETRY_KEYS = {"dpo": ("dpo_lr", "dpo_batch_size", "dpo_epochs", "beta"), "rm": ("rm_lr", "rm_batch_size", "rm_epochs")}


def read_state(path: Path) -> dict:
    """state.json: the stages done, where the run stopped, a stage that failed. A file mtcore did not
    write is a one-line error saying what to do."""
    if not path.exists():
        return {"done": [], "stopped_at": None, "failed": None}
    state = read_json(path)
    ok = (isinstance(state, dict) and isinstance(state.get("done"), list)
          and all(isinstance(k, str) for k in state["done"])
          and (state.get("stopped_at") is None or type(state.get("stopped_at")) is int)
          and (state.get("failed") is None or (isinstance(state["failed"], str) and state["failed"].count("/") == 1
                                               and state["failed"].rsplit("/", 1)[1] in RETRY_KEYS)))
    if not ok:
        raise MtcoreError(f"{path}: not a run state that mtcore wrote; restore it, or delete it to run every "
                          f"stage again")
    state.setdefault("failed", None)
    return state


def read_splits(path: Path, iters: int) -> dict:
    splits = read_json(path)
    names = ["selection", "rm"] + [f"policy_{t}" for t in range(1, iters + 1)]
    if not isinstance(splits, dict) or not all(isinstance(splits.get(k), list) and splits[k] for k in names):
        raise MtcoreError(f"{path}: not the prompt splits that mtcore wrote for {iters} iterations; restore it, or "
                          f"start the run in another --out")
    return splits


@dataclass
class World:
    """A world whose truth is known, as the loop meets it (mtcore/toy.py's world() is one; a real
    run has none): its initial models, its prompt splits, a gold-judged evaluation of the initial
    models (t = 0) and of each iteration's, and a plot of those numbers."""
    base_policy: Path
    base_reward: Path
    make_splits: Callable[[LoopConfig], dict]  # cfg -> {"selection", "rm", "policy_1", ..., and its own}
    evaluate: Callable  # (run, t, stage) -> dict of numbers; t = 0 evaluates the initial models
    plot: Callable[[Path, dict], None]  # (png path, metrics.json's content)


class Run:
    """A run directory: config, prompt splits, stage state, and the paths of every stage's outputs."""

    def __init__(self, out, cfg: LoopConfig, world: World | None = None):
        self.dir, self.cfg, self.world = Path(out), cfg, world
        self.device = default_device(cfg.device)
        if (world is None) == (not cfg.policy):
            raise MtcoreError("a run needs exactly one of --policy (real models) or a world (the toy world)")
        if world is not None:
            self.base_policy, self.base_reward = world.base_policy, world.base_reward
        else:
            self.base_policy, self.base_reward = resolve(cfg.policy), resolve(cfg.reward)
        if parallel.is_main():  # creates the run directory; the other ranks then read it
            self._open()
        parallel.barrier()
        if not parallel.is_main():
            self._open()

    def _open(self):
        """Check (or, for a new run, make) the run directory. A new run's config.toml is written only
        after the config, the prompts and the models it names have been checked, so a refused value
        never locks the directory."""
        config_file, splits_file = self.dir / "config.toml", self.dir / "splits.json"
        self.state = read_state(self.dir / "state.json")
        if config_file.exists():
            self._check_same_config(read_config_file(config_file))
        elif self.dir.exists() and (not self.dir.is_dir() or any(self.dir.iterdir())):
            raise MtcoreError(f"{self.dir}: exists, is not an empty directory and holds no mtcore run; "
                              f"use another --out")
        # new splits as splits.json will hold them (sorted keys), so a resumed run reads the same bytes
        self.splits = read_splits(splits_file, self.cfg.iters) if splits_file.exists() else json.loads(
            json.dumps(self._make_splits(), sort_keys=True))
        if not config_file.exists():
            check_checkpoint(self.base_policy, "policy")
            check_checkpoint(self.base_reward, "reward")
            if self.cfg.rm_eval:
                rmeval.read_pairs(self.cfg.rm_eval)
            if parallel.is_main():
                write_text_atomic(config_file, to_toml(identity(self.cfg)))
        if not splits_file.exists():
            if parallel.is_main():
                write_json(splits_file, self.splits)

    def _check_same_config(self, saved: dict) -> None:
        """The run directory's config must be this one, except the runtime keys, and the training keys
        of a stage that stopped at a NaN/inf loss (a rerun with a lower learning rate goes on from it)."""
        mine = identity(self.cfg)
        failed = self.state.get("failed")
        retry = RETRY_KEYS[failed.rsplit("/", 1)[1]] if failed else ()
        diff = [k for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)]
        if [k for k in diff if k not in retry]:
            k = [k for k in diff if k not in retry][0]
            raise MtcoreError(f"{self.dir} holds a run with another config ({k} = {saved.get(k)!r} there, "
                              f"{mine.get(k)!r} now{f', and {len(diff) - 1} more' if len(diff) > 1 else ''}); "
                              f"resume it with the same options or use another --out")
        if diff:  # the failed stage starts afresh with the new values
            log.warning("%s: %s changed after %s stopped at a non-finite loss; it restarts with them",
                        self.dir, ", ".join(diff), failed)
            stage_dir = self.dir / failed.rsplit("/", 1)[0]
            for name in ("dpo_state", "candidates", "last_good") if failed.endswith("dpo") else ("rm_state", "last_good"):
                if parallel.is_main():
                    shutil.rmtree(stage_dir / name, ignore_errors=True)
            self.state.setdefault("config_changes", []).append(
                {"at": failed, "changed": {k: [saved.get(k), mine.get(k)] for k in diff}})
            self.state["failed"] = None
            if parallel.is_main():
                write_json(self.dir / "state.json", self.state)
                write_text_atomic(self.dir / "config.toml", to_toml(mine))

    def _make_splits(self) -> dict:
        cfg = self.cfg
        if self.world is not None:
            return self.world.make_splits(cfg)
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
        if self.state.get("failed") == key:
            self.state["failed"] = None
        if parallel.is_main():
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
                                                kv_budget_bytes=int(cfg.kv_cache_gb * 2**30) or None, leave=False,
                                                decode_mode=cfg.decode_mode)]
    if stage is not None:
        lens = [len(ids) + len(r["token_ids"]) for ids, rs in zip(prompt_ids, out) for r in rs]
        sampled = sum(len(r["token_ids"]) for rs in out for r in rs)  # the head runs for these only
        stage.add(sum(lens), profile.matmul_flops(model.args, lens, head_tokens=sampled))
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
        self.truncated = 0  # sequences cut to cfg.max_length, over every call

    @torch.no_grad()
    def __call__(self, prompts: list, responses: list[list[str]], stage=None) -> list[list[float]]:
        cfg, device, tokenizer, model = self.cfg, self.device, self.tokenizer, self.model
        examples, owner = [], []
        for i, (p, texts) in enumerate(zip(prompts, responses)):
            prompt_ids = encode_prompt(tokenizer, p, f"prompt {i}") if texts else []  # once per prompt
            n = len(prompt_ids)
            for j, text in enumerate(texts):
                ids = prompt_ids + encode_response(tokenizer, text)  # the sequence rule (data.encode_sequence)
                self.truncated += len(ids) > cfg.max_length
                examples.append(Example(((ids[:cfg.max_length], min(n, cfg.max_length - 1)),)))
                owner.append((i, j))
        scores = [[0.0] * len(texts) for texts in responses]

        def score(bins):
            out = []
            for index in bins:
                batch = make_batch(examples, index).to(device)
                with parallel.precision(device).autocast:
                    out.append(sequence_rewards(model, batch).tolist())
            return out

        longest = max((ex.n_tokens for ex in examples), default=0)
        if longest > cfg.micro_batch_tokens:
            raise MtcoreError(f"a sequence of {longest} tokens does not fit --micro-batch-tokens "
                              f"{cfg.micro_batch_tokens}; raise it to at least {longest}, or lower --max-length")
        bins = pack([ex.n_tokens for ex in examples], cfg.micro_batch_tokens)
        for index, rewards in zip(bins, parallel.map_shards(score, bins)):
            for k, r in zip(index, rewards):
                i, j = owner[k]
                scores[i][j] = r
        if stage is not None:
            lens = [ex.n_tokens for ex in examples]
            stage.add(sum(lens), profile.matmul_flops(model.args, lens, head_tokens=0))
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
    if parallel.is_main():
        write_jsonl(run.iter_dir(t) / "samples.jsonl",
                    [{"prompt": p, "responses": r} for p, r in zip(prompts, responses)])
    return {"prompts": len(prompts), "responses": sum(map(len, responses))}


def stage_score(run: Run, t: int, stage) -> dict:
    rows = read_jsonl(run.iter_dir(t) / "samples.jsonl")
    scores = score_responses(run.cfg, run.device, run.reward(t - 1), [r["prompt"] for r in rows],
                             [[x["text"] for x in r["responses"]] for r in rows], stage)
    for row, s in zip(rows, scores):
        row["rewards"] = s
    if parallel.is_main():
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
    if parallel.is_main():
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


def _fit_or_keep(model, examples, objective, train_cfg, out: Path, name: str, tokenizer, on_step=None):
    """fit for the dpo or rm stage (metrics in <name>_metrics.jsonl, resumable state in <name>_state).
    At a NaN/inf loss the last good model is kept in iter_t/last_good, and the error says how to go on:
    a rerun with a lower learning rate (run_stage records the failure, Run accepts the new value)."""
    try:
        return fit(model, examples, objective, train_cfg, out / f"{name}_metrics.jsonl", desc=f"{out.name} {name}",
                   on_step=on_step, state_dir=out / f"{name}_state")
    except NonFiniteLoss as e:
        save_model(model, out / "last_good", tokenizer=tokenizer)
        raise NonFiniteLoss(f"{out.name} {name}: {e}; the model before that step is in {out / 'last_good'}; "
                            f"rerun the same command with a lower --{name}-lr to redo this stage") from None


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
    dtype = stored_dtype(run.base_policy)  # candidates as the base policy is kept (bf16 for Llama-3-8B)

    def save_candidate(step, n_steps, model):
        if step % cfg.save_every == 0 or step == n_steps:
            save_model(model, candidates / f"step_{step}", tokenizer=tokenizer, dtype=dtype)

    objective = DPO(ref_sums, ref_counts, beta=cfg.beta)
    history = _fit_or_keep(model, examples, objective, train_cfg, out, "dpo", tokenizer, on_step=save_candidate)
    _drop_state(out / "dpo_state")
    lens = [len(ids) for ex in examples for ids, _ in ex.seqs]
    stage.add(sum(lens) * (1 + cfg.dpo_epochs), forward_flops(model, examples) * (1 + 3 * cfg.dpo_epochs))
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
    if parallel.is_main():
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
    history = _fit_or_keep(model, examples, BradleyTerry(), train_cfg, out, "rm", tokenizer)
    save_model(model, out / "reward", tokenizer=tokenizer, dtype=stored_dtype(run.base_reward))
    _drop_state(out / "rm_state")
    lens = [len(ids) for ex in examples for ids, _ in ex.seqs]
    stage.add(sum(lens) * cfg.rm_epochs, 3 * cfg.rm_epochs * profile.matmul_flops(model.args, lens, head_tokens=0))
    del model
    last = history[-1]
    return {"pairs": report, "steps": len(history), "loss": last["loss"], "accuracy": last["accuracy"],
            "mean_loss": sum(r["loss"] for r in history) / len(history)}


def stage_eval(run: Run, t: int, stage) -> dict:
    """The world's gold-judged evaluation of pi_t and r_t (t = 0: the initial models)."""
    return run.world.evaluate(run, t, stage)


def stage_rmeval(run: Run, t: int, stage) -> dict:
    """r_t's accuracy on the --rm-eval pairs, per subset and per RewardBench section (t = 0: the base RM)."""
    return evaluate_rm(run.cfg, run.device, run.reward(t), run.cfg.rm_eval, stage)


def prune_candidates(run: Run, t: int, best_step: int) -> None:
    """After select is recorded, the candidates it did not choose are removed (unless --keep-candidates);
    the chosen one stays (hard links shared with iter_t/policy). train calls it again whenever it passes
    a done select, so a kill part-way through is finished by the rerun, and select never runs on a
    pruned directory."""
    if run.cfg.keep_candidates or not parallel.is_main():
        return
    for path in sorted((run.iter_dir(t) / "candidates").glob("step_*")):
        if path.name != f"step_{best_step}":
            shutil.rmtree(path)


E_STAGES = (("sample", stage_sample), ("score", stage_score), ("pairs", stage_pairs), ("dpo", stage_dpo),
            ("select", stage_select))
M_STAGES = (("msample", stage_msample), ("rm", stage_rm))


def stages_of(run: Run):
    rm_eval = (("rmeval", stage_rmeval),) if run.cfg.m_step and run.cfg.rm_eval else ()
    return E_STAGES + (M_STAGES + rm_eval if run.cfg.m_step else ()) + ((("eval", stage_eval),) if run.world else ())


def run_stage(run: Run, t: int, name: str, fn, key: str = "", result_file: Path | None = None) -> dict:
    """A stage, unless done: run it, write iter_t/<name>.json (its numbers and profile), mark it done.
    key and result_file name another place (the initial evaluation's)."""
    key, result_file = key or f"iter_{t}/{name}", result_file or run.iter_dir(t) / f"{name}.json"
    if run.is_done(key):
        return read_json(result_file)
    log.info("iteration %d: %s", t, name)
    try:
        with profile.Stage(run.device) as stage:
            result = fn(run, t, stage)
    except NonFiniteLoss:
        run.state["failed"] = key
        if parallel.is_main():
            write_json(run.dir / "state.json", run.state)
        raise
    result["profile"] = stage.record()
    if parallel.is_main():
        write_json(result_file, result)
    run.mark_done(key)
    parallel.barrier()
    return result


def train(run: Run, echo=print) -> dict:
    """Run (or resume) every iteration. Returns metrics.json's content."""
    if run.world is not None:
        run_stage(run, 0, "eval", stage_eval, key="initial/eval", result_file=run.dir / "initial.json")
    if run.cfg.rm_eval:
        run_stage(run, 0, "rmeval", stage_rmeval, key="initial/rmeval", result_file=run.dir / "initial_rmeval.json")
    metrics = None  # written after each iteration run here; a run already finished writes it once below
    for t in range(1, run.cfg.iters + 1):
        if run.state["stopped_at"] is not None:
            break
        results = {}
        for name, fn in stages_of(run):
            results[name] = run_stage(run, t, name, fn)
            if name == "select":
                prune_candidates(run, t, results[name]["best_step"])
            if name == "select" and results[name]["stopped"]:
                if run.world is not None:  # the kept models, evaluated as this iteration's
                    results["eval"] = run_stage(run, t, "eval", stage_eval)
                run.state["stopped_at"] = t
                if parallel.is_main():
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
    if (run.dir / "initial_rmeval.json").exists():
        metrics["initial_rmeval"] = read_json(run.dir / "initial_rmeval.json")
    if parallel.is_main():
        write_json(run.dir / "metrics.json", metrics)
    if run.world is not None and iterations and parallel.is_main():
        run.world.plot(run.dir / "metrics.png", metrics)
    return metrics


def _three(x) -> str:
    """An accuracy to three decimals; "-" for none (NaN, which a finished stage's JSON stores as null)."""
    return "-" if x is None or x != x else f"{x:.3f}"


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
        e, f = r["eval"], _three
        lines.append(f"gold    win rate vs initial {f(e['gold_win_rate_vs_initial'])}, gold score "
                     f"{f(e['gold_score'])}; RM accuracy: current policy {f(e['rm_accuracy_current_policy'])}"
                     + (f" (r_0 on the same pairs {f(e['rm_accuracy_current_policy_base_rm'])})"
                        if run.cfg.m_step and "rm_accuracy_current_policy_base_rm" in e else "")
                     + f", held-out {f(e['rm_accuracy_heldout'])}")
        if "estep_pairs_gold_accuracy" in e:
            lines.append(f"pairs   gold-right: E-step {f(e['estep_pairs_gold_accuracy'])} "
                         f"({e['estep_pairs_gold_ties']} gold ties), pseudo-pairs "
                         f"{f(e['pseudo_pairs_gold_accuracy'])} ({e['pseudo_pairs_gold_ties']} gold ties)")
        if "pseudo_pairs_rm_gold_accuracy" in e:
            lines.append(f"        on the pseudo-pairs r_{t - 1} is {f(e['pseudo_pairs_rm_gold_accuracy'])} gold-right; "
                         f"{e['pseudo_pairs_override']} kept against it, their labels "
                         f"{f(e['pseudo_pairs_override_gold_accuracy'])} gold-right")
    if "rmeval" in r:
        lines.append("RM eval " + rmeval.sections_line(r["rmeval"]))
    lines.append("time    " + ", ".join(f"{k} {v['profile']['seconds']:.1f}s" for k, v in r.items()))
    return "\n".join(lines)


def evaluate_rm(cfg: LoopConfig, device, reward_dir: Path, pairs_file, stage=None) -> dict:
    """RM accuracy on preference pairs the RewardBench way (mtcore/rmeval.py): every chosen and rejected
    response scored by Scorer (sharded under torchrun), ties counting half. Sequences over
    cfg.max_length are cut to it (counted in "truncated")."""
    prompts, chosen, rejected, subsets = rmeval.read_pairs(pairs_file)
    scorer = Scorer(cfg, device, Path(reward_dir))
    scores = scorer(prompts, [[c, r] for c, r in zip(chosen, rejected)], stage)
    result = rmeval.summarize(subsets, [s[0] for s in scores], [s[1] for s in scores])
    result["truncated"] = scorer.truncated
    result["reward"], result["pairs_file"] = str(reward_dir), str(pairs_file)
    return result


def rm_eval_file(reward, pairs_file, out_file, chat_template=None, max_length=2048, micro_batch_tokens=8192,
                 device=None) -> dict:
    """`mtcore eval --reward --pairs`: evaluate_rm, written as JSON (atomically, rank 0, no bare NaN)."""
    cfg = LoopConfig(reward_chat_template=chat_template or "", max_length=max_length,
                     micro_batch_tokens=micro_batch_tokens, device=str(device or ""))
    result = evaluate_rm(cfg, default_device(device), resolve(reward), pairs_file)
    write_json_file(out_file, result)  # rank 0
    return result


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
    if parallel.is_main():
        write_jsonl(out_file, rows)
    return sum(map(len, texts))


def alpaca_eval_outputs(cfg: LoopConfig, device, policy, prompts_file, out_file, generator: str) -> int:
    """`mtcore eval --prompts`: one response per prompt, written as AlpacaEval's model outputs
    [{"instruction", "output", "generator"}] (JSON, atomically) for an external judge."""
    rows = read_jsonl(prompts_file)
    prompts = [prompt_of(r, f"{prompts_file}:{r['_line']}") for r in rows]
    answers = first_answers(cfg, device, resolve(policy), prompts, cfg.seed)
    out = [{"instruction": p[-1]["content"], "output": a, "generator": generator} for p, a in zip(prompts, answers)]
    if parallel.is_main():
        write_text_atomic(out_file, json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    return len(out)
