"""The run's configuration: every hyper-parameter of Mutual-Taught and every runtime setting, one
dataclass field each, which is also a `mtcore train` option and a key of the TOML file --config reads.
The defaults are the paper's (8B); TOY_DEFAULTS scales them to the built-in toy world. A run
directory's config.toml holds the fields that identify it (all but RUNTIME_KEYS). TrainConfig is the
trainer's (`mtcore dpo|rm|sft` and each training stage). Nothing here imports torch, so `--help` is quick."""

import dataclasses
import json
from dataclasses import dataclass

from mtcore.errors import MtcoreError, check_ranges
from mtcore.mutual_taught import PAIR_RULES, RM_DATA, pair_rule

# The sampler's decode steps (mtcore/sampler.py), all giving the same tokens.
DECODE_MODES = ("auto", "eager", "compile", "graphs", "compile-graphs")

DEFAULT_REWARD = "sfairXC/FsfairX-LLaMA3-RM-v0.1"


@dataclass
class LoopConfig:
    """Every hyper-parameter of the method. The defaults are the paper's (8B); TOY_DEFAULTS scales
    them to the built-in toy world. Each field is a `mtcore train` option and a TOML key."""
    policy: str = ""  # empty: the built-in toy world
    reward: str = ""
    prompts: str = ""
    prompts_split: str = ""  # a dataset's split ("": its only one)
    prompt_field: str = "prompt"
    iters: int = 2
    seed: int = 0
    m_step: bool = True  # False: the fixed-RM iterative-DPO baseline (best vs worst of M)
    pair_rule: str = ""  # the E-step's pairing rule; "": the M-step's (mutual with it, best-worst without)
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
    rm_split_size: int = 20000  # a third of ~60,000 prompts (docs/algorithm.md says where each size comes from)
    rm_lr: float = 2e-6
    rm_batch_size: int = 512
    rm_epochs: int = 1
    rm_data: str = "iteration"  # the RM's pairs: this iteration's (the paper's), or "all" iterations' so far
    policy_split_size: int = 18000  # prompts per E-step split (0: the rest split evenly over iters)
    # toy world only
    eval_samples: int = 4  # test-set samples per prompt for the gold evaluation
    # runtime (not part of a run's identity)
    chat_template: str = ""
    reward_chat_template: str = ""
    kv_cache_gb: float = 0.0  # 0: sampler.cache_budget (free GPU memory less a reserve; 2 GiB off CUDA)
    decode_mode: str = "auto"
    decode_steps: int = 1  # decode steps per visit of the host (mtcore/decode_blocks.py); 0: automatic
    device: str = ""
    grad_checkpointing: bool = False  # recompute each block's activations in backward (8B needs it)
    save_state_every: int = 25  # DPO/RM steps between sharded state saves, so a killed stage resumes mid-way
    shard_prompts: int = 256  # prompts per rank between the saves of a sampling or scoring stage
    keep_candidates: bool = False  # keep every DPO candidate after select (default: the chosen one only)
    batch_invariant: bool = False  # samples the same bits however the work is cut (CPU; mtcore/invariant.py)
    rm_eval: str = ""  # preference pairs JSONL: each iteration's RM is evaluated on it (RewardBench sections)
    log_every: float = 30.0  # seconds between progress log lines when stderr is not a terminal
    report_to: str = ""  # tensorboard, wandb, or both comma-separated (mtcore/report.py)
    run_name: str = ""  # the TensorBoard/wandb run's name (default: the run directory's name)
    logging_dir: str = ""  # where --report-to writes (default: <out>/tb)

    def __post_init__(self):
        check_ranges(self, LOOP_RANGES)


# --log-every's help, for train (LOOP_HELP), dpo/rm/sft (TRAIN_HELP), generate and score (cli)
LOG_EVERY_HELP = "Seconds between progress lines in the log when stderr is not a terminal (there: a bar)."

# One line of `mtcore train --help` per field: what it does (the paper's and the toy world's values
# are added from the defaults).
LOOP_HELP = {
    "policy": "Initial policy pi_0: checkpoint directory or hub id (none: the built-in toy world).",
    "reward": "Base reward model r_0: directory or hub id (default with --policy: sfairXC/FsfairX-LLaMA3-RM-v0.1).",
    "prompts": "Prompts: JSONL ({\"prompt\": ...} or {\"messages\": [...]}), Parquet, or a Hugging Face dataset "
               "(a save_to_disk directory, or a hub id in the local cache), split into selection, RM and policy sets.",
    "prompts_split": "The split of a --prompts dataset to read (default: its only split).",
    "prompt_field": "The --prompts column or field holding each prompt (a string or a messages list; \"prompt\" "
                    "falls back to \"messages\").",
    "iters": "Mutual-Taught iterations (E-step + M-step each).",
    "seed": "Seed of the prompt splits and of every stage's sampling and training.",
    "m_step": "Retrain the RM every iteration; --no-m-step is the fixed-RM iterative-DPO baseline (with its "
              "best-worst pairs unless --pair-rule says otherwise).",
    "pair_rule": "The E-step's pairs: mutual (the shortest response above the prompt's mean reward against the "
                 "lowest) or best-worst (the highest against the lowest, RLHFlow's); default: mutual with the "
                 "M-step, best-worst with --no-m-step. --no-m-step --pair-rule mutual: the E-step-only arm.",
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
    "rm_split_size": "Prompts on which pi_t and pi_{t-1} answer to make the M-step's pseudo-pairs (the paper's, "
                     "as its secondary sources give it: a third of ~60,000 UltraFeedback prompts).",
    "rm_lr": "Reward-model peak learning rate (Bradley-Terry, from the base RM every iteration).",
    "rm_batch_size": "Reward-model pairs per optimizer step.",
    "rm_epochs": "Reward-model epochs over each iteration's pairs.",
    "rm_data": "The RM's pairs (pseudo-pairs and E-step pairs) at iteration t: iteration (t's own, the paper's) "
               "or all (iterations 1 to t's), always trained from the base RM.",
    "policy_split_size": "Prompts in each iteration's E-step split, taken after the selection set and the RM split "
                         "(the paper's other two thirds of ~60,000 UltraFeedback prompts, one an iteration); fixed, "
                         "so a larger --iters extends a run. 0: the rest split evenly over --iters (no extending).",
    "eval_samples": "Toy world only: test answers per prompt in the gold evaluation.",
    "chat_template": "The policy's chat template: a Jinja file, or 'llama3', when its tokenizer has none.",
    "reward_chat_template": "The reward model's chat template, likewise.",
    "kv_cache_gb": "GiB of K/V cache for sampling, which sizes the concurrent sequences (0: on CUDA the free "
                   "memory after the weights less a reserve, at most 256 sequences; 2 GiB on the CPU).",
    "decode_steps": "Sampler decode steps per visit of the host, the stop checks on the device (the same tokens; "
                    "1: a visit every step; 0: chosen from the first steps' measured device and host times). "
                    "Larger values keep a GPU busy; not yet measured on one.",
    "decode_mode": "Sampler decode step: auto (graphs on CUDA, else eager); eager; compile (static shapes, "
                   "torch.compile); graphs (a captured CUDA graph, replayed, with mtcore's fused kernels); "
                   "compile-graphs (compiled, then captured).",
    "device": "cpu, cuda or cuda:N (default: cuda when available).",
    "grad_checkpointing": "Recompute each block's activations in backward (8B needs it).",
    "save_state_every": "DPO/RM steps between resumable state saves (0: never), so a killed stage redoes at "
                        "most this many steps; SIGTERM/SIGUSR1 save the state at the end of the current step.",
    "shard_prompts": "Prompts per rank in each saved shard of the sample, score, select and msample stages: a "
                     "killed stage redoes at most one shard, and SIGTERM/SIGUSR1 stop the run after the current "
                     "one (256 prompts x 5 samples of up to 1024 tokens at the 3,960 tokens/s measured for the "
                     "8B shape on an H100: 2 to 6 minutes, computed).",
    "keep_candidates": "Keep every DPO candidate after the selection (default: only the chosen one stays).",
    "batch_invariant": ("Sample each request in shapes of its own (rows padded to 16, each row's attention over "
                        "its own length), so that on the CPU samples and scores are the same bits whatever "
                        "--shard-prompts, the slot count, the ranks or a resume mid-shard (scoring is so always; "
                        "training on other rank counts differs in its last bits: bench/ranks.py). Sampling costs "
                        "1.3x to 2.1x at 1 to 8 requests, 0.82x at 256 (bench/invariance.py). CPU and eager "
                        "one-step decode only."),
    "rm_eval": "Preference pairs (RewardBench's format; JSONL, Parquet, or a dataset with one split): r_0 and each "
               "iteration's RM are evaluated on it.",
    "log_every": LOG_EVERY_HELP,
    "report_to": "Log every DPO/RM step and each iteration's metrics to tensorboard, wandb, or both "
                 "(comma-separated); needs the extra of that name: pip install 'mtcore[tensorboard]'.",
    "run_name": "The TensorBoard/wandb run's name (default: the --out directory's name).",
    "logging_dir": "Where --report-to writes: TensorBoard's events, and wandb's run under wandb/ (default: <out>/tb).",
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
    "shard_prompts": _at_least(1), "log_every": _at_least(0), "decode_steps": _at_least(0),
    "decode_mode": (lambda v: v in DECODE_MODES, f"one of {', '.join(DECODE_MODES)}"),
    "pair_rule": (lambda v: v in ("", *PAIR_RULES), f"one of {', '.join(PAIR_RULES)}"),
    "rm_data": (lambda v: v in RM_DATA, f"one of {', '.join(RM_DATA)}"),
}


RUNTIME_KEYS = ("kv_cache_gb", "decode_mode", "decode_steps", "device", "grad_checkpointing", "save_state_every", "shard_prompts",
                "keep_candidates", "batch_invariant", "rm_eval", "log_every", "report_to", "run_name", "logging_dir")
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
    if cfg.rm_data != "iteration" and not cfg.m_step:
        raise MtcoreError(f"--rm-data {cfg.rm_data} chooses the M-step's pairs, and --no-m-step trains no reward "
                          f"model; leave --rm-data out")
    if not real and (cfg.prompts_split or cfg.prompt_field != "prompt"):
        raise MtcoreError("--prompts-split and --prompt-field name what to read in --prompts; the toy world has none")
    from mtcore.device import default_device  # (torch: not imported for --help)

    device = default_device(cfg.device or None)  # a device string that names none is an error now, not mid-run
    if "graphs" in cfg.decode_mode and device.type != "cuda":
        raise MtcoreError(f"--decode-mode {cfg.decode_mode} needs a CUDA device, and this run's is {device}; use eager "
                          "or compile")
    if cfg.batch_invariant:
        batch_invariant_fits(device, cfg.decode_mode, cfg.decode_steps)
    if cfg.micro_batch_tokens < 2 * cfg.max_length:  # a pair, each side up to max_length, shares a micro-batch
        raise MtcoreError(f"micro_batch_tokens {cfg.micro_batch_tokens} cannot hold a pair of max_length "
                          f"{cfg.max_length}: raise --micro-batch-tokens to at least {2 * cfg.max_length}, or lower "
                          f"--max-length")
    return cfg


def batch_invariant_fits(device, decode_mode: str, decode_steps: int) -> None:
    """--batch-invariant is built for the CPU's eager one-step decode (mtcore/invariant.py): refuse the rest."""
    if device.type != "cpu":
        raise MtcoreError(f"--batch-invariant is built for the CPU only, and this run's device is {device} (cuBLAS "
                          "picks its kernels by shape there); leave it out")
    wrong = ([f"--decode-mode {decode_mode}"] if decode_mode not in ("auto", "eager") else []) + (
        [f"--decode-steps {decode_steps}"] if decode_steps != 1 else [])
    if wrong:
        raise MtcoreError(f"--batch-invariant decodes one eager step at a time; leave out {' and '.join(wrong)}")


@dataclass
class TrainConfig:
    lr: float = 7e-7
    epochs: int = 1
    batch_size: int = 128  # examples (pairs) per optimizer step
    micro_batch_tokens: int = 8192  # token budget of one packed forward/backward
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping (the norm is still measured)
    seed: int = 0
    grad_checkpointing: bool = False
    padded: bool = False  # right-padded [B, T] batches instead of packed ones (for comparisons)
    reference_ops: bool = False  # the plain-torch *_ref kernels instead of the fused ones
    save_state_every: int = 0  # optimizer steps between resumable (sharded) state saves; 0: none
    log_every: float = 30.0  # seconds between progress log lines when stderr is not a terminal

    def __post_init__(self):
        check_ranges(self, TRAIN_RANGES)


# One line of --help per TrainConfig field (`mtcore dpo|rm|sft` make their options from the fields).
TRAIN_HELP = {
    "lr": "Peak learning rate (AdamW; linear warm-up, then cosine decay to 0).",
    "epochs": "Passes over the data.",
    "batch_size": "Examples (pairs) per optimizer step; micro-batches accumulate to it.",
    "micro_batch_tokens": "Token budget of one packed forward/backward.",
    "warmup_ratio": "Share of the steps spent in linear warm-up, in [0, 1).",
    "weight_decay": "AdamW's decoupled weight decay.",
    "max_grad_norm": "Clip the gradients' total L2 norm to this (0: no clipping).",
    "seed": "Seed of the data order (and of any sampling).",
    "grad_checkpointing": "Recompute each block's activations in backward (less memory, ~30% more compute).",
    "padded": "Right-padded batches instead of packed ones (for comparison).",
    "reference_ops": "The plain-torch reference ops instead of the fused kernels (slow; for checking).",
    "save_state_every": "Save the (sharded) model and optimizer state every N steps to OUT.partial/train_state; "
                        "a rerun resumes from it (0: never).",
    "log_every": LOG_EVERY_HELP,
}

TRAIN_RANGES = {
    "lr": (lambda v: v > 0, "> 0"), "epochs": (lambda v: v >= 1, ">= 1"),
    "batch_size": (lambda v: v >= 1, ">= 1"), "micro_batch_tokens": (lambda v: v >= 2, ">= 2"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"), "weight_decay": (lambda v: v >= 0, ">= 0"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0 (0: no clipping)"), "seed": (lambda v: 0 <= v < 2**63, "in [0, 2**63)"),
    "save_state_every": (lambda v: v >= 0, ">= 0 (0: never)"), "log_every": (lambda v: v >= 0, ">= 0"),
}


BUILTIN_CONFIGS = ("paper", "small")  # mtcore/configs/<name>.toml, for --config <name>


def config_file_path(name):
    """--config's value: a TOML file, or the name of a built-in config (mtcore/configs/)."""
    from pathlib import Path

    if name in BUILTIN_CONFIGS and not Path(name).exists():
        return Path(__file__).parent / "configs" / f"{name}.toml"
    if not Path(name).exists() and not Path(name).suffix and len(Path(name).parts) == 1:  # a name, mistyped ("smal")
        raise MtcoreError(f"--config {name}: no such file, and not a built-in config (those are "
                          f"{', '.join(BUILTIN_CONFIGS)}: --config small, or a TOML file)")
    return Path(name)


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


# Keys added after runs were made: left out of the identity at their default, so those runs resume.
LATER_KEYS = {"prompts_split": "", "prompt_field": "prompt", "pair_rule": "", "rm_data": "iteration"}


def identity(cfg: LoopConfig) -> dict:
    """What must match for a run directory to be resumed. The pairing rule is the one the run uses,
    left out where it is the M-step's default (so --pair-rule mutual with the M-step is the run without it)."""
    rule = pair_rule(cfg.pair_rule, cfg.m_step)
    values = {**dataclasses.asdict(cfg), "pair_rule": "" if rule == pair_rule("", cfg.m_step) else rule}
    return {k: v for k, v in values.items()
            if k not in RUNTIME_KEYS and not (k in LATER_KEYS and v == LATER_KEYS[k])}
