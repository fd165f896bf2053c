"""Benchmark: tokens/s and peak memory of DPO and Bradley-Terry (reward-model) training steps, mtcore
against TRL's DPOTrainer and RewardTrainer on the same model and the same token ids (issue #5).

Setup: a random ~4M-parameter Llama (vocabulary 2048, hidden 256, 4 layers, 4 heads, intermediate
688, untied), saved once as transformers checkpoints (LlamaForCausalLM and
LlamaForSequenceClassification with num_labels=1, same seed) that every provider loads; 256 seeded
preference pairs with prompts of 16-128 tokens and responses of 8-256 tokens (+ the end-of-sequence
id), 8 pairs per optimizer step, fp32, 1 epoch, beta 0.1, lr 1e-6, CPU. TRL gets the same ids as
text through a word-level tokenizer of exactly 2048 ids ("w3".."w2047" are ids 3..2047); the worker
checks that TRL tokenised them to exactly those ids and that both sides counted the same tokens.

Providers, each in its own process, interleaved over --rounds rounds (the table shows the median):
- trl-dpo: DPOTrainer with its defaults (a reference model in memory, gradient checkpointing on),
  but fp32, use_cpu, report_to="none", no eval, no saving, max_length 1024 (nothing is truncated);
- trl-dpo-precompute: the same with precompute_ref_log_probs=True (one reference pass first);
- mtcore-dpo-packed / -padded: mtcore.train.fit with DPO, TrainConfig(padded=False / True),
  micro_batch_tokens 8192 (a step's 8 pairs are one micro-batch), after one reference_logps pass;
- mtcore-dpo-packed-mb2048: packed, micro_batch_tokens 2048 (several micro-batches per step);
- trl-rm: RewardTrainer with its defaults (gradient checkpointing on), same overrides;
- mtcore-rm-packed / -padded: fit with BradleyTerry;
- not run by default: trl-dpo-nockpt (trl-dpo with gradient_checkpointing=False) and
  mtcore-dpo-packed-ckpt (mtcore-dpo-packed with grad_checkpointing=True).

tokens/s: real (non-pad) tokens of the chosen and rejected sequences (prompt included, as TRL's own
num_tokens counts them) of optimizer steps 2..N over their wall time; step 1 is the warm-up. TRL:
from the end of step 1 to the end of step N (callbacks), so collation, forward, backward, clipping,
optimizer and its logging are all in. mtcore: the sum of fit's per-step seconds (the same work; the
loop's bookkeeping between steps is outside, microseconds). "incl. ref" charges the one-off
reference pass (reference log-probs of all pairs) to the epoch: total / (total / rate + ref s); TRL's
default does its reference forward inside each step, so its two columns are equal.
peak RSS MiB: the worker process's peak resident memory (VmHWM: imports, model, data, reference
pass, training), as the issue measured TRL. train +MiB: the peak during training above the RSS at
its start (VmHWM reset after malloc_trim). Ratios are to trl-dpo for the DPO rows and to trl-rm for
the RM rows: time = seconds per token (0.50x = twice the tokens/s), memory = peak RSS.
runnable: the mean number of tasks runnable on the machine during the run, less the sampler (the
worker alone shows 1.8-2.0: its main and OpenMP threads). The two cores here are shared with other
sessions' work, and two OpenMP processes on two cores slow each other several-fold; so each run starts
once the machine has been quiet for 3 s, and a run with runnable > --max-runnable is repeated (at
most --tries runs, the least disturbed kept).

    python bench/train.py                # 256 pairs, 2 rounds (about 13 minutes on 2 quiet CPU cores)
    python bench/train.py --small        # 32 pairs, 1 round: a smoke run
    python bench/train.py --providers trl-dpo,mtcore-dpo-packed,mtcore-dpo-packed-ckpt,trl-dpo-nockpt
"""

import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROVIDERS = ["trl-dpo", "trl-dpo-precompute", "mtcore-dpo-packed", "mtcore-dpo-padded", "mtcore-dpo-packed-mb2048",
             "trl-rm", "mtcore-rm-packed", "mtcore-rm-padded"]
OPTIONAL = ["trl-dpo-nockpt", "mtcore-dpo-packed-ckpt"]
BASELINE = {"dpo": "trl-dpo", "rm": "trl-rm"}
MODEL = dict(vocab_size=2048, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=688, tie_word_embeddings=False, max_position_embeddings=1024, rms_norm_eps=1e-5,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2; words "w3".."w2047" are ids 3..2047
EOS = 2
BETA, LR, SEED = 0.1, 1e-6, 0


# ---- setup (parent) ----

def make_pairs(n: int, seed: int, prompt=(16, 128), response=(8, 256)) -> list[dict]:
    """n pairs of token ids: a shared prompt, two responses of independent lengths, each ending in EOS."""
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(len(SPECIALS), MODEL["vocab_size"]) for _ in range(rng.randint(lo, hi))]

    return [{"prompt": ids(*prompt), "chosen": ids(*response) + [EOS], "rejected": ids(*response) + [EOS]}
            for _ in range(n)]


def build_setup(root: Path, n_pairs: int) -> dict:
    """The tokenizer, the policy and reward checkpoints and the pairs, written under root."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), MODEL["vocab_size"])})
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>")
    assert len(tokenizer) == MODEL["vocab_size"]
    paths = {"policy": root / "policy", "reward": root / "reward", "pairs": root / "pairs.json"}
    for kind, cls in (("policy", LlamaForCausalLM), ("reward", LlamaForSequenceClassification)):
        torch.manual_seed(SEED)
        config = LlamaConfig(**MODEL, num_labels=1)
        model = cls(config)
        model.save_pretrained(str(paths[kind]))
        tokenizer.save_pretrained(str(paths[kind]))
        if kind == "policy":
            n_params = sum(p.numel() for p in model.parameters())
    pairs = make_pairs(n_pairs, SEED)
    paths["pairs"].write_text(json.dumps(pairs))
    return {**{k: str(v) for k, v in paths.items()}, "n_params": n_params,
            "tokens": sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs)}


# ---- worker ----

def _trim_and_reset_peak() -> float:
    """Return freed heap to the OS, reset VmHWM; the RSS now (MiB)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return common._reset_peak("cpu")


def run_mtcore(args: dict, pairs: list[dict]) -> dict:
    from mtcore import load_model, parallel
    from mtcore.data import Example
    from mtcore.train import DPO, BradleyTerry, TrainConfig, fit, reference_logps
    from transformers import AutoTokenizer

    # `mtcore dpo` / `mtcore rm` load the checkpoint's tokenizer: so does this process, for a like footprint
    AutoTokenizer.from_pretrained(args["policy"])
    objective_name = args["objective"]
    model = load_model(args["policy" if objective_name == "dpo" else "reward"],
                       kind="policy" if objective_name == "dpo" else "reward", dtype=torch.float32)
    examples = [Example(tuple((p["prompt"] + p[side], len(p["prompt"])) for side in ("chosen", "rejected")), line=i + 1)
                for i, p in enumerate(pairs)]
    cfg = TrainConfig(lr=LR, epochs=1, batch_size=args["batch"], micro_batch_tokens=args["micro_batch_tokens"],
                      padded=args["padded"], grad_checkpointing=args["checkpointing"], seed=SEED)
    ref_s = None
    if objective_name == "dpo":
        start = time.perf_counter()
        ref_sums, ref_counts = reference_logps(model, examples, cfg.micro_batch_tokens, padded=cfg.padded)
        ref_s = time.perf_counter() - start
        objective = DPO(ref_sums, ref_counts, beta=BETA)
    else:
        objective = BradleyTerry()
    setup_peak = common._rss_mib()[1]
    rss0 = _trim_and_reset_peak()
    parallel.parallelize(model, cfg.grad_checkpointing)
    history = fit(model, examples, objective, cfg)
    train_peak = common._rss_mib()[1]
    steps = [(row["seconds"], row["tokens"]) for row in history]
    return {"steps": steps, "ref_s": ref_s, "peak_rss": max(setup_peak, train_peak), "train_mib": train_peak - rss0,
            "rss_start": rss0}


def run_trl(args: dict, pairs: list[dict]) -> dict:
    import datasets
    from transformers import PreTrainedTokenizerFast, TrainerCallback

    datasets.disable_progress_bars()
    objective_name = args["objective"]
    if objective_name == "dpo":
        from trl import DPOConfig as Config, DPOTrainer as Trainer
    else:
        from trl import RewardConfig as Config, RewardTrainer as Trainer

    def text(ids):  # ids of words only (the trainer appends the eos token itself)
        return " ".join(f"w{t}" for t in ids)

    # Prompt and response are joined by string concatenation: the leading space keeps the words apart.
    data = datasets.Dataset.from_dict({"prompt": [text(p["prompt"]) for p in pairs],
                                       "chosen": [" " + text(p["chosen"][:-1]) for p in pairs],
                                       "rejected": [" " + text(p["rejected"][:-1]) for p in pairs]})
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args["policy"])
    extra = {}
    if objective_name == "dpo":
        extra = dict(beta=BETA, precompute_ref_log_probs=args["precompute"])
        if args["no_checkpointing"]:
            extra["gradient_checkpointing"] = False
    config = Config(output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=args["batch"],
                    gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=LR, bf16=False, fp16=False,
                    use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no", max_length=1024,
                    seed=SEED, disable_tqdm=True, **extra)

    class Steps(TrainerCallback):
        """(time, tokens counted by the trainer so far) at the end of every optimizer step."""
        def __init__(self):
            self.trainer, self.ends = None, []

        def on_train_begin(self, *a, **k):
            self.ends.append((time.perf_counter(), 0))

        def on_step_end(self, *a, **k):
            self.ends.append((time.perf_counter(), self.trainer._total_train_tokens))

    class TimedTrainer(Trainer):
        ref_s = None

        def _precompute_ref_logps(self, *a, **k):  # DPOTrainer's one-off reference pass, in __init__
            start = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            self.ref_s = (self.ref_s or 0.0) + time.perf_counter() - start
            return out

    steps_cb = Steps()
    model = args["policy" if objective_name == "dpo" else "reward"]
    trainer = TimedTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                           callbacks=[steps_cb])
    steps_cb.trainer = trainer
    check_trl_ids(trainer.train_dataset, pairs, objective_name)
    setup_peak = common._rss_mib()[1]
    rss0 = _trim_and_reset_peak()
    trainer.train()
    train_peak = common._rss_mib()[1]
    ends = steps_cb.ends
    steps = [(t1 - t0, n1 - n0) for (t0, n0), (t1, n1) in zip(ends, ends[1:])]
    return {"steps": steps, "ref_s": trainer.ref_s, "peak_rss": max(setup_peak, train_peak),
            "train_mib": train_peak - rss0, "rss_start": rss0}


def check_trl_ids(dataset, pairs: list[dict], objective_name: str) -> None:
    """TRL must train on exactly the ids mtcore gets (sorted, since the trainer may reorder)."""
    if objective_name == "dpo":
        got = sorted((r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in dataset)
        want = sorted((p["prompt"], p["chosen"], p["rejected"]) for p in pairs)
    else:
        got = sorted((r["chosen_ids"], r["rejected_ids"]) for r in dataset)
        want = sorted((p["prompt"] + p["chosen"], p["prompt"] + p["rejected"]) for p in pairs)
    if got != want:
        raise RuntimeError("TRL's tokenisation differs from the benchmark's token ids")


def worker(argv):
    args = json.loads(argv[argv.index("--worker") + 1])
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TQDM_DISABLE"):
        os.environ[key] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    pairs = json.loads(Path(args["pairs"]).read_text())
    try:
        if args["provider"].startswith("trl"):
            try:
                import trl  # noqa: F401
            except ImportError:
                raise RuntimeError("trl not installed") from None
            out = run_trl(args, pairs)
        else:
            out = run_mtcore(args, pairs)
        total = sum(n for _, n in out["steps"])
        if total != args["tokens"]:  # both sides must count the same real tokens
            raise RuntimeError(f"counted {total} real tokens, expected {args['tokens']}")
        measured = out["steps"][1:] if len(out["steps"]) > 1 else out["steps"]  # step 1 is the warm-up
        seconds = sum(s for s, _ in measured)
        tokens = sum(n for _, n in measured)
        result = {"tokens_per_s": tokens / seconds, "ms_per_step": seconds / len(measured) * 1e3,
                  "ref_s": out["ref_s"], "peak_rss": out["peak_rss"], "train_mib": out["train_mib"],
                  "rss_start": out["rss_start"],
                  "steps": len(out["steps"]), "total_tokens": total}
    except Exception as e:  # a provider that cannot run here gets a row saying why
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]}
    print(json.dumps(result))


# ---- parent ----

def job(provider: str, setup: dict, batch: int) -> dict:
    objective = "dpo" if "-dpo" in provider else "rm"
    return dict(provider=provider, objective=objective, policy=setup["policy"], reward=setup["reward"],
                pairs=setup["pairs"], tokens=setup["tokens"], batch=batch,
                micro_batch_tokens=2048 if provider.endswith("mb2048") else 8192, padded=provider.endswith("padded"),
                precompute=provider == "trl-dpo-precompute", no_checkpointing=provider == "trl-dpo-nockpt",
                checkpointing=provider.endswith("-ckpt"))


def runnable_tasks() -> int:
    """Tasks (threads) running or ready to run on this machine now (/proc/stat procs_running), less the
    one reading it."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("procs_running"):
                return int(line.split()[1]) - 1
    return 0


def wait_for_quiet(seconds: float = 3.0, timeout: float = 300.0) -> bool:
    """Wait until nothing else has been runnable for `seconds` (at most `timeout`): this machine's two
    cores are shared, and two OpenMP processes on two cores slow each other several-fold."""
    deadline = time.monotonic() + timeout
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        if runnable_tasks() > 0:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= seconds:
            return True
        time.sleep(0.25)
    return False


def run_watched(j: dict, max_runnable: float, tries: int) -> dict:
    """run_provider once the machine is quiet, sampling its runnable tasks every 0.5 s meanwhile: the
    worker itself accounts for 1-2 (its main and OpenMP threads). A run during which more than
    max_runnable were runnable on average shared the cores with something else: it is repeated, up to
    `tries` runs in all, and the least disturbed one is kept."""
    runs = []
    for _ in range(tries):
        if not wait_for_quiet():
            print("  (the machine stayed busy for 300 s; measuring anyway)", file=sys.stderr, flush=True)
        samples, stop = [], threading.Event()

        def watch():
            while not stop.wait(0.5):
                samples.append(runnable_tasks())

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        result = common.run_provider(__file__, j)
        stop.set()
        watcher.join()
        result["runnable"] = statistics.mean(samples) if samples else 0.0
        runs.append(result)
        if "error" in result or result["runnable"] <= max_runnable:
            break
        print(f"  {j['provider']}: disturbed (runnable {result['runnable']:.1f}): {result}", file=sys.stderr,
              flush=True)
    return min(runs, key=lambda r: r["runnable"])


def merge(results: list[dict]) -> dict:
    """Median over the rounds of the rates and times, the largest peaks."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    med = lambda key: statistics.median(r[key] for r in ok)  # noqa: E731
    return {"tokens_per_s": med("tokens_per_s"), "ms_per_step": med("ms_per_step"),
            "ref_s": med("ref_s") if ok[0]["ref_s"] is not None else None,
            "peak_rss": max(r["peak_rss"] for r in ok), "train_mib": max(r["train_mib"] for r in ok),
            "rss_start": med("rss_start"), "total_tokens": ok[0]["total_tokens"], "rounds": len(ok),
            "runnable": max(r["runnable"] for r in ok)}


def table(rows: list[dict]) -> str:
    lines = ["| provider | tokens/s | tokens/s incl. ref | ms/step | ref pass s | peak RSS MiB | train +MiB | "
             "time vs TRL | memory vs TRL | runnable |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = {r["objective"]: r for r in rows if r["provider"] == BASELINE[r["objective"]] and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['provider']} | — | — | — | — | — | — | — | — | not run: {r['error']} |")
            continue
        rate = r["tokens_per_s"]
        incl = rate if r["ref_s"] is None else r["total_tokens"] / (r["total_tokens"] / rate + r["ref_s"])
        incl_text = f"{incl:,.0f}" if r["objective"] == "dpo" else "—"
        ref_text = f"{r['ref_s']:.1f}" if r["ref_s"] is not None else "—"
        b = base.get(r["objective"])
        t_ratio = f"{b['tokens_per_s'] / rate:.2f}x" if b else "—"
        m_ratio = f"{r['peak_rss'] / b['peak_rss']:.2f}x" if b else "—"
        lines.append(f"| {r['provider']} | {rate:,.0f} | {incl_text} | {r['ms_per_step']:.0f} | {ref_text} | "
                     f"{r['peak_rss']:.0f} | {r['train_mib']:.0f} | {t_ratio} | {m_ratio} | {r['runnable']:.1f} |")
    return "\n".join(lines)


def versions() -> str:
    import transformers

    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    return f"transformers {transformers.__version__} | trl {trl_version}"


def main():
    if "--worker" in sys.argv:
        return worker(sys.argv)
    parser = common.arg_parser(__doc__, PROVIDERS)
    parser.add_argument("--small", action="store_true", help="32 pairs, 1 round: a smoke run")
    parser.add_argument("--pairs", type=int, help="preference pairs (default 256, 32 with --small)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--max-runnable", type=float, default=2.2,
                        help="repeat a run during which more tasks than this were runnable on average")
    parser.add_argument("--tries", type=int, default=3, help="runs at most per provider and round")
    args = parser.parse_args()
    if args.device != "cpu":
        print("note: this benchmark runs on the CPU (the issue's setup); --device is ignored", file=sys.stderr)
    n_pairs = args.pairs or (32 if args.small else 256)
    rounds = 1 if args.small and "--rounds" not in sys.argv else args.rounds
    providers = args.providers.split(",")
    unknown = [p for p in providers if p not in PROVIDERS + OPTIONAL]
    if unknown:
        parser.error(f"unknown providers {unknown}; choose from {PROVIDERS + OPTIONAL}")
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as root:
        setup = build_setup(Path(root), n_pairs)
        jobs = [job(p, setup, args.batch) for p in providers]
        results = [[] for _ in jobs]
        for _ in range(rounds):
            for j, out in zip(jobs, results):
                start = time.perf_counter()
                out.append(run_watched(j, args.max_runnable, args.tries))
                print(f"  {j['provider']}: {out[-1]} ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
                      flush=True)
    rows = [{"provider": j["provider"], "objective": j["objective"], **merge(out)} for j, out in zip(jobs, results)]
    steps = -(-n_pairs // args.batch)
    print(common.header("training steps: DPO and Bradley-Terry, mtcore vs TRL", "cpu", "fp32",
                        f"{versions()} | {setup['n_params'] / 1e6:.1f}M-param Llama (V=2048, H=256, 4 layers), "
                        f"{n_pairs} pairs (prompts 16-128, responses 8-256 tokens), {args.batch} pairs/step, "
                        f"{steps} steps (step 1 = warm-up), {setup['tokens']} real tokens/epoch, median of {rounds} "
                        f"round(s)"))
    print(table(rows))


if __name__ == "__main__":
    main()
