"""The `mtcore` command: parse, then call. No logic lives here.

Every user error, click's own usage errors included, is one `error:` line on stderr and exit 2:
library code raises MtcoreError, `user_errors` prints it, and `OneLineGroup` prints click's.
"""

import dataclasses
import errno
import functools
import logging
import math
import os
import sys
from pathlib import Path

import click

from mtcore.config import DECODE_MODES, LOG_EVERY_HELP
from mtcore.errors import MtcoreError


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


# A disk that is full or cannot be written: the user's to mend, wherever in the code it is met.
DISK_ERRORS = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
               errno.EROFS: "make it writable or write elsewhere", errno.EACCES: "make it writable or write elsewhere",
               errno.EPERM: "make it writable or write elsewhere"}


def user_errors(fn):
    """Report a MtcoreError, or a disk's error (DISK_ERRORS) that no handler named, as one line on
    stderr and exit 2, without a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MtcoreError as e:
            click.echo(f"error: {_one_line(e)}", err=True)
            sys.exit(2)
        except OSError as e:
            if e.errno not in DISK_ERRORS:
                raise
            click.echo(f"error: {e.filename or 'a file'}: {e.strerror}; {DISK_ERRORS[e.errno]}, then rerun the same "
                       f"command (what was written whole is kept)", err=True)
            sys.exit(2)
    return wrapper


def stops_at_safe_points(fn):
    """SIGTERM and SIGUSR1 stop the command at its next safe point (mtcore/preempt.py): one line saying
    where (rank 0's, under torchrun), and exit 143; the same command resumes."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mtcore import parallel, preempt

        preempt.install()
        try:
            return fn(*args, **kwargs)
        except preempt.Preempted as e:
            if parallel.is_main():
                click.echo(_one_line(e), err=True)
            sys.exit(preempt.EXIT_STATUS)
        finally:
            preempt.uninstall()
    return wrapper


class OneLineGroup(click.Group):
    """click's usage errors (unknown option, bad value, missing argument) as one `error:` line and
    exit 2, where click prints three; Ctrl-C as one line and exit 130."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            command = f" (see `mtcore {e.ctx.info_name} --help`)" if getattr(e, "ctx", None) and e.ctx.parent else ""
            click.echo(f"error: {_one_line(e.format_message())}{command}", err=True)
            sys.exit(2)
        except click.Abort:
            click.echo("error: interrupted; outputs are as they were before the command, or complete", err=True)
            sys.exit(130)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


class Finite(click.FloatRange):
    """A float in a range, never NaN or infinite (click's FloatRange lets NaN through)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{rv} is not a finite number.", param, ctx)
        return rv


class FiniteFloat(click.types.FloatParamType):
    """Any float but NaN and the infinities (a config dataclass checks its range)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{rv} is not a finite number.", param, ctx)
        return rv


FINITE = FiniteFloat()
POSITIVE = Finite(min=0, min_open=True)
AT_LEAST_0 = Finite(min=0)
PROBABILITY = Finite(min=0, max=1, min_open=True)
COUNT = click.IntRange(min=1)
SEED = click.IntRange(min=0, max=2**63 - 1)
DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when available)."
TEMPLATE_HELP = "A Jinja file, or 'llama3', when the tokenizer has none."
REPORT_TO_HELP = ("Log every training step (loss, accuracy, lr, ...) to tensorboard, wandb, or both (comma-separated); "
                  "needs the extra of that name: pip install 'mtcore[tensorboard]'.")
OVERWRITE_HELP = "Replace an --out that holds something else than this command's previous output."
SOURCE_HELP = ("JSONL, Parquet, or a Hugging Face dataset (a save_to_disk directory, or a hub id in the local cache: "
               "never downloaded)")
COLUMN_HELP = {"prompt": 'The column (JSONL: field) holding each prompt: a string or a messages list ("prompt" also '
                         'takes "messages").',
               "chosen": "The column holding the chosen response: a string, or messages ending with it.",
               "rejected": "The column holding the rejected response, likewise.",
               "response": "The column holding the response, likewise."}


def source_options(option: str, *columns: str):
    """--OPTION-split, and --COLUMN-field for each column the data needs (data.Source)."""
    def decorate(fn):
        for column in reversed(columns):
            fn = click.option(f"--{column}-field", default=column, show_default=True, help=COLUMN_HELP[column])(fn)
        return click.option(f"--{option}-split", default=None, metavar="SPLIT",
                            help=f"The split of a --{option} dataset to read (default: its only one).")(fn)
    return decorate


def _source(path, option: str, kw: dict, *columns: str):
    """The data.Source of --OPTION with its split and column options (read from kw)."""
    from mtcore.data import Source

    return Source(path, kw[f"{option}_split"], f"--{option}-split", **{c: kw[f"{c}_field"] for c in columns})


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mtcore")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose):
    """mtcore: Mutual-Taught co-adaptation of a LLaMA-3 policy and its reward model.

    Under torchrun (`torchrun --nproc_per_node N -m mtcore ...`) every command runs on all ranks;
    rank 0 alone logs information, shows progress and writes the outputs."""
    main_rank = True
    if _under_torchrun():  # (torch is imported only then, or by the command that needs it: --help is quick)
        from mtcore import parallel

        parallel.init()
        main_rank = parallel.is_main()
    level = logging.DEBUG if verbose else logging.INFO if main_rank else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


@main.result_callback()
def _finished(*_, **__):
    """After a command that succeeded under torchrun: leave together and exit (parallel.finish)."""
    if _under_torchrun():
        from mtcore import parallel

        parallel.finish()


def echo(message: str) -> None:
    """click.echo on rank 0 only (every rank would print the same line)."""
    if _under_torchrun():
        from mtcore import parallel

        if not parallel.is_main():
            return
    click.echo(message)


@main.command()
@click.argument("src")
@user_errors
def info(src):
    """Describe the checkpoint SRC (directory or hub id) from its config and weight headers."""
    from mtcore import checkpoint

    path, a, kind, n_params, dtypes = checkpoint.inspect_checkpoint(src)
    click.echo(f"{path}: Llama {kind}, {n_params / 1e6:.2f}M parameters ({', '.join(sorted(dtypes))}), "
               f"{a.n_layers} layers, dim {a.dim}, heads {a.n_heads}/{a.n_kv_heads} (q/kv), head_dim {a.head_dim}, "
               f"vocab {a.vocab_size}, rope {(a.rope_scaling or {}).get('rope_type', 'default')} "
               f"theta {a.rope_theta:g}, tied {a.tie_word_embeddings}")


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--kind", type=click.Choice(["policy", "reward"]), default=None,
              help="Policy or reward model (default: from config.json's architectures).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True,
              help="Dtype of the written weights.")
@click.option("--max-shard-gb", type=POSITIVE, default=5.0, show_default=True,
              help="Largest weights file, in GiB; bigger checkpoints are sharded with an index.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@user_errors
def convert(src, dst, kind, dtype, max_shard_gb, overwrite):
    """Re-save the checkpoint SRC into the directory DST (dtype, sharding) in Hugging Face format."""
    from mtcore import checkpoint
    from mtcore.outputs import one_writer

    with one_writer(dst):
        echo(f"wrote {checkpoint.convert(src, dst, kind, dtype, int(max_shard_gb * 2**30), overwrite)}")


@main.command()
@click.option("--policy", required=True, help="Policy checkpoint: directory or hub id.")
@click.option("--prompts", "prompts_file", required=True, metavar="SOURCE",
              help=f'{SOURCE_HELP}: rows {{"prompt": ...}} or {{"messages": [...]}}, extra fields kept.')
@source_options("prompts", "prompt")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False),
              help="Output JSONL: each prompt's row plus its \"responses\".")
@click.option("--samples", "--n", "n", default=1, show_default=True, type=COUNT,
              help="Samples per prompt (--n is the same option; under torchrun write --samples, since torchrun "
                   "takes --n for a prefix of its own --nnodes/--nproc-per-node).")
@click.option("--temperature", default=1.0, show_default=True, type=AT_LEAST_0, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=PROBABILITY, help="Nucleus sampling mass, in (0, 1].")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0),
              help="Sample among the k most likely tokens only (0 = off).")
@click.option("--max-new-tokens", default=256, show_default=True, type=COUNT, help="Longest response, in tokens.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Sampling seed.")
@click.option("--slots", default=None, type=COUNT,
              help="Concurrent sequences (default: what the K/V cache budget holds, at most 256).")
@click.option("--kv-cache-gb", default=None, type=POSITIVE,
              help="K/V cache budget that sizes the slots, in GiB (default: on CUDA the free memory after the "
                   "weights less a reserve of 15%; 2 GiB on the CPU).")
@click.option("--decode-mode", default="auto", show_default=True,
              type=click.Choice(DECODE_MODES),
              help="Decode step: auto (graphs on CUDA, else eager); eager (the active slots only); compile "
                   "(static shapes through torch.compile); graphs (a captured CUDA graph, replayed, with mtcore's "
                   "fused kernels); compile-graphs (compiled, then captured).")
@click.option("--decode-steps", default=1, show_default=True, type=click.IntRange(min=0),
              help="Decode steps per visit of the host, the stop checks on the device: the same tokens, fewer "
                   "syncs (a GPU stays busy; a slot that stops inside a block wastes at most K-1 steps). "
                   "0: chosen from the first steps' measured device and host times.")
@click.option("--max-len", default=None, type=click.IntRange(min=2),
              help="Tokens per cache slot (default: longest prompt + new).")
@click.option("--skip-overlong", is_flag=True, help="Skip (and count) prompts too long for a slot, not fail.")
@click.option("--chat-template", default=None, help=TEMPLATE_HELP)
@click.option("--logprobs", is_flag=True, help="Also write each sampled token's log-prob.")
@click.option("--device", default=None, help=DEVICE_HELP)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--log-every", default=30.0, show_default=True, type=AT_LEAST_0, help=LOG_EVERY_HELP)
@user_errors
def generate(policy, prompts_file, out_file, n, temperature, top_p, top_k, max_new_tokens, seed, slots, kv_cache_gb,
             decode_mode, decode_steps, max_len, skip_overlong, chat_template, logprobs, device, overwrite, log_every,
             **source):
    """Sample responses for PROMPTS with the KV-cache batch sampler."""
    from mtcore.device import default_device
    from mtcore.outputs import check_out_file
    from mtcore.inference import generate_jsonl
    from mtcore.sampler import SamplingParams

    check_out_file(out_file, (prompts_file, chat_template), overwrite, looks_like=lambda row: "responses" in row)
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                            seed=seed, logprobs=logprobs)
    device = default_device(device)
    prompts = _source(prompts_file, "prompts", source, "prompt")
    counts = generate_jsonl(policy, prompts, out_file, params, slots=slots, chat_template=chat_template,
                            skip_overlong=skip_overlong, max_len=max_len, device=device,
                            kv_budget_bytes=None if kv_cache_gb is None else int(kv_cache_gb * 2**30),
                            decode_mode=decode_mode, log_every=log_every, decode_steps=decode_steps)
    echo(f"wrote {out_file}: {counts['responses']} responses for {counts['prompts']} prompts"
         + (f", {counts['skipped']} skipped as too long" if counts["skipped"] else ""))


def _field_option(f, default, help_text):
    """A click option for a config dataclass field: a flag pair for bools, a finite float for floats."""
    name = f.name.replace("_", "-")
    if f.type is bool:
        return click.option(f"--{name}/--no-{name}", f.name, default=default, help=help_text)
    kind = FINITE if f.type is float else f.type
    return click.option(f"--{name}", f.name, type=kind, default=default, help=help_text)


def training_options(lr, batch_size):
    """The options every trainer command shares: TrainConfig's fields (lr and batch size default to
    the paper's per command; TrainConfig checks the ranges), then the data and output options."""
    from mtcore.config import TRAIN_HELP, TrainConfig

    def decorate(fn):
        defaults = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)}, "lr": lr, "batch_size": batch_size}
        options = [
            click.option("--out", required=True, type=click.Path(file_okay=False),
                         help="Output directory: the trained model (Hugging Face format), metrics.jsonl, "
                              "summary.json; written in OUT.partial and swapped in when done."),
            *[_field_option(f, defaults[f.name], f"{TRAIN_HELP[f.name]} [default: {defaults[f.name]}]")
              for f in dataclasses.fields(TrainConfig)],
            click.option("--max-length", default=2048, show_default=True, type=click.IntRange(min=2),
                         help="Tokens per sequence: responses are cut at the end to fit; a prompt that alone "
                              "fills it drops the example (counted)."),
            click.option("--chat-template", default=None, help=TEMPLATE_HELP),
            click.option("--device", default=None, help=DEVICE_HELP),
            click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP),
            click.option("--report-to", default="", help=REPORT_TO_HELP),
            click.option("--run-name", default=None, help="The TensorBoard/wandb run's name (default: OUT's name)."),
            click.option("--logging-dir", default=None, type=click.Path(file_okay=False),
                         help="Where --report-to writes (default: OUT/tb, swapped in with the model)."),
        ]
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def _train_config(kw):
    """TrainConfig from the options (it checks every range), the rest left in kw."""
    from mtcore.config import TrainConfig

    return TrainConfig(**{f.name: kw.pop(f.name) for f in dataclasses.fields(TrainConfig)})


def _reporter(kw):
    """--report-to's report.Reporter (None without it), checked before any work; its options left out of kw."""
    from mtcore import report

    report_to, run_name, logging_dir = kw.pop("report_to"), kw.pop("run_name"), kw.pop("logging_dir")
    return report.reporter(report_to, run_name or Path(kw["out"]).name, logging_dir)


def _report(out, history):
    last = history[-1]
    echo(f"wrote {out}: {len(history)} steps, final loss {last['loss']:.4f}"
         + (f", accuracy {last['accuracy']:.3f}" if "accuracy" in last else "")
         + f", {sum(r['tokens'] for r in history) / sum(r['seconds'] for r in history):.0f} tokens/s")


@main.command()
@click.option("--policy", required=True, help="Policy checkpoint: directory or hub id.")
@click.option("--pairs", "pairs_file", required=True, metavar="SOURCE",
              help=f'{SOURCE_HELP}: rows {{"prompt": str | messages, "chosen": str, "rejected": str}}.')
@source_options("pairs", "prompt", "chosen", "rejected")
@click.option("--ref", default=None, help="Reference model (default: the policy as given).")
@click.option("--beta", default=0.01, show_default=True, type=POSITIVE,
              help="Strength of the pull to the reference policy.")
@click.option("--loss-type", type=click.Choice(["sigmoid", "ipo", "hinge"]), default="sigmoid", show_default=True,
              help="DPO's sigmoid loss, IPO's squared loss, or the hinge (SLiC) loss.")
@click.option("--label-smoothing", default=0.0, show_default=True, type=Finite(min=0, max=0.5, max_open=True),
              help="Conservative DPO's assumed label-noise rate, in [0, 0.5).")
@click.option("--length-normalize", is_flag=True, help="Mean instead of sum of the response tokens' log-probs.")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Where the reference log-probs are cached, keyed by the pairs and the reference model, so a "
                   "rerun skips that pass (default: $MTCORE_CACHE, else $XDG_CACHE_HOME/mtcore, else "
                   "~/.cache/mtcore). Nothing is written beside the data.")
@training_options(lr=7e-7, batch_size=128)
@user_errors
@stops_at_safe_points
def dpo(policy, pairs_file, ref, beta, loss_type, label_smoothing, length_normalize, cache_dir, **kw):
    """DPO of a policy on preference pairs, with reference log-probs computed once (cached in --cache-dir)."""
    from mtcore.outputs import one_writer
    from mtcore.commands import run_dpo

    cfg, reporter = _train_config(kw), _reporter(kw)
    with one_writer(kw["out"]):
        pairs = _source(pairs_file, "pairs", kw, "prompt", "chosen", "rejected")
        history = run_dpo(policy, pairs, kw["out"], cfg, ref=ref, beta=beta, loss_type=loss_type,
                          label_smoothing=label_smoothing, length_normalize=length_normalize,
                          max_length=kw["max_length"], chat_template=kw["chat_template"], device=kw["device"],
                          overwrite=kw["overwrite"], reporter=reporter, cache_dir=cache_dir)
    _report(kw["out"], history)


@main.command()
@click.option("--reward", required=True, help="Reward model checkpoint to start from: directory or hub id.")
@click.option("--pairs", "pairs_file", required=True, metavar="SOURCE",
              help=f'{SOURCE_HELP}: rows {{"prompt", "chosen", "rejected", "margin"?: float}}.')
@source_options("pairs", "prompt", "chosen", "rejected")
@click.option("--center-coef", default=0.0, show_default=True, type=AT_LEAST_0,
              help="Weight of the reward-centering term (mean squared reward).")
@training_options(lr=2e-6, batch_size=512)
@user_errors
@stops_at_safe_points
def rm(reward, pairs_file, center_coef, **kw):
    """Bradley-Terry training of a reward model on preference pairs."""
    from mtcore.outputs import one_writer
    from mtcore.commands import run_rm

    cfg, reporter = _train_config(kw), _reporter(kw)
    with one_writer(kw["out"]):
        pairs = _source(pairs_file, "pairs", kw, "prompt", "chosen", "rejected")
        history = run_rm(reward, pairs, kw["out"], cfg, center_coef=center_coef, max_length=kw["max_length"],
                         chat_template=kw["chat_template"], device=kw["device"], overwrite=kw["overwrite"], reporter=reporter)
    _report(kw["out"], history)


@main.command()
@click.option("--policy", required=True, help="Policy checkpoint: directory or hub id.")
@click.option("--data", "data_file", required=True, metavar="SOURCE",
              help=f'{SOURCE_HELP}: rows {{"prompt": str | messages, "response": str}}.')
@source_options("data", "prompt", "response")
@training_options(lr=1e-5, batch_size=64)
@user_errors
@stops_at_safe_points
def sft(policy, data_file, **kw):
    """Supervised fine-tuning: the mean NLL of the response tokens."""
    from mtcore.outputs import one_writer
    from mtcore.commands import run_sft

    cfg, reporter = _train_config(kw), _reporter(kw)
    with one_writer(kw["out"]):
        data = _source(data_file, "data", kw, "prompt", "response")
        history = run_sft(policy, data, kw["out"], cfg, max_length=kw["max_length"],
                          chat_template=kw["chat_template"], device=kw["device"], overwrite=kw["overwrite"], reporter=reporter)
    _report(kw["out"], history)


def loop_options(fn):
    """One option per LoopConfig field (default None: the config file's value, then the defaults),
    each with its line of help, the paper's value and the toy world's where it differs."""
    from mtcore.config import LOOP_HELP, TOY_DEFAULTS, LoopConfig

    for f in reversed(dataclasses.fields(LoopConfig)):
        values = ([f"paper: {f.default!r}"] if f.default != "" else []) + (
            [f"toy: {TOY_DEFAULTS[f.name]!r}"] if f.name in TOY_DEFAULTS else [])
        fn = _field_option(f, None, LOOP_HELP[f.name] + (f" [{'; '.join(values)}]" if values else ""))(fn)
    return fn


@main.command()
@click.option("--out", default="runs/mtcore", show_default=True, type=click.Path(file_okay=False),
              help="Run directory; re-running the same command there resumes it.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="TOML file of the options below (keys with underscores; the command line wins), or a built-in "
                   "one: 'small' (trying your own models on 100+ prompts, minutes) or 'paper' (the defaults, "
                   "spelled out). See mtcore/configs/.")
@click.option("--redo", default=None, metavar="STAGE",
              help="Do the finished stage STAGE (as state.json's \"done\" names it, e.g. iter_1/dpo) and every "
                   "stage after it again, e.g. when a model it wrote is damaged.")
@loop_options
@user_errors
@stops_at_safe_points
def train(out, config_file, redo, **options):
    """The Mutual-Taught iteration. With no --policy/--reward/--prompts: the built-in toy world.

    --no-m-step runs the fixed-RM iterative-DPO baseline; with --pair-rule mutual, the E-step-only arm
    (Mutual-Taught less its M-step). Every option is also a config-file key."""
    from mtcore import loop, report, toy
    from mtcore.config import config_file_path, read_config_file, resolve_config
    from mtcore.mutual_taught import arm
    from mtcore.outputs import one_writer
    from mtcore.rundir import Run

    cfg = resolve_config(read_config_file(config_file_path(config_file)) if config_file else {}, options)
    reporter = report.reporter(cfg.report_to, cfg.run_name or Path(out).name, cfg.logging_dir or None)
    with one_writer(out):
        run = Run(out, cfg, world=None if cfg.policy else toy.world(), redo=redo)
        echo(f"run directory {out} ({'toy world' if run.world else cfg.policy}; "
             f"{arm(cfg.m_step, cfg.pair_rule)}, {cfg.iters} iterations)")
        metrics = loop.train(run, echo=echo, reporter=reporter)
    echo(loop.ending(run, metrics))


@main.command(name="build-toy")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Where to write the assets (default: the package's toy_assets).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of every asset.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--base-rm", default="offpolicy", show_default=True, type=click.Choice(["offpolicy", "onpolicy"]),
              help="The base RM's gold-labelled pairs: synthetic swaps of the sorted digits (never a wrong "
                   "length), or the initial policy's own samples.")
@click.option("--demo-errors", default="duplicate", show_default=True, type=click.Choice(["duplicate", "swap", "both"]),
              help="The kind of error in the SFT demonstrations, hence in the initial policy's answers.")
@click.option("--p-error", default=0.9, show_default=True, type=Finite(0, 1),
              help="The share of SFT demonstrations that are wrong (lower: a stronger initial policy).")
@click.option("--min-digits", default=4, show_default=True, type=click.IntRange(1, 12),
              help="Fewest digits in a prompt (every split's; training runs read it from build.json).")
@click.option("--max-digits", default=8, show_default=True, type=click.IntRange(1, 12),
              help="Most digits in a prompt (longer: a harder task, and more room for the policy to improve).")
@click.option("--length-bias", default=0.0, show_default=True, type=Finite(0, 1),
              help="The share of base-RM prompts given one more pair that prefers an answer with a duplicated "
                   "digit to the same answer without it (real RMs' taste for length; off-policy base RM only).")
@user_errors
def build_toy(out, seed, overwrite, base_rm, demo_errors, p_error, min_digits, max_digits, length_bias):
    """Rebuild the toy world's tokenizer, SFT policy, base RM and held-out pairs from a seed.

    The defaults built the committed assets (an AMD EPYC Zen 4, torch 2.13.0; one torch thread; about 2
    minutes), before the trainer took transformers' warm-up: they now build a similar world, not the
    same bytes, as other CPUs (which round floats differently) always did. The first toy world, whose
    study docs/toy-world.md keeps: --base-rm onpolicy --demo-errors both --p-error 0.5. Anything but
    the defaults is an experiment: give --out, and point `mtcore train` at it with MTCORE_TOY_ASSETS=DIR."""
    from mtcore import toy
    from mtcore.outputs import one_writer

    try:
        toy.check_digits(min_digits, max_digits)
    except ValueError as e:
        raise MtcoreError(f"--min-digits/--max-digits: {e}") from None
    if length_bias and base_rm != "offpolicy":
        raise MtcoreError("--length-bias biases the off-policy base RM's pairs: give --base-rm offpolicy, or no "
                          "--length-bias")
    with one_writer(out or toy.ASSETS):
        built = toy.build_assets(out or toy.ASSETS, seed, overwrite=overwrite, base_rm=base_rm,
                                 demo_errors=demo_errors, p_error=p_error, min_digits=min_digits,
                                 max_digits=max_digits, length_bias=length_bias)
    click.echo(f"wrote {built}")


@main.command()
@click.option("--reward", required=True, help="Reward model: directory or hub id.")
@click.option("--prompts-with-responses", "in_file", required=True, type=click.Path(dir_okay=False),
              help='JSONL rows {"prompt": ..., "responses": [str | {"text": ...}, ...]} (mtcore generate\'s output).')
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False),
              help='Output JSONL: the same rows plus "rewards".')
@click.option("--chat-template", default=None, help=TEMPLATE_HELP)
@click.option("--max-length", default=2048, show_default=True, type=click.IntRange(min=2),
              help="Tokens per sequence; longer responses are cut at the end.")
@click.option("--micro-batch-tokens", default=8192, show_default=True, type=click.IntRange(min=2),
              help="Token budget of one packed forward (at least the longest sequence).")
@click.option("--device", default=None, help=DEVICE_HELP)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--log-every", default=30.0, show_default=True, type=AT_LEAST_0, help=LOG_EVERY_HELP)
@user_errors
def score(reward, in_file, out_file, chat_template, max_length, micro_batch_tokens, device, overwrite, log_every):
    """Score every response with a reward model: the same rows plus "rewards"."""
    from mtcore.commands import score_jsonl
    from mtcore.outputs import check_out_file

    check_out_file(out_file, (in_file, chat_template), overwrite, looks_like=lambda row: "rewards" in row)
    n = score_jsonl(reward, in_file, out_file, chat_template, max_length, micro_batch_tokens, device, log_every)
    echo(f"wrote {out_file}: {n} responses scored")


@main.command(name="eval")
@click.option("--policy", default=None, help="Policy to evaluate (default, toy world: the built-in initial policy).")
@click.option("--reward", default=None, help="The RM to measure: with --pairs any RM; toy world: default the "
              "built-in base RM.")
@click.option("--prompts", "prompts_file", default=None, metavar="SOURCE",
              help=f"Real models: prompts ({SOURCE_HELP}); writes AlpacaEval-format outputs for an external judge.")
@source_options("prompts", "prompt")
@click.option("--pairs", "pairs_file", default=None, metavar="SOURCE",
              help=f'With --reward: RM accuracy on pairs {{"prompt" | "messages", "chosen", "rejected", "subset"?}} '
                   f'({SOURCE_HELP}) per subset and RewardBench section.')
@source_options("pairs", "chosen", "rejected")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), help="Output JSON.")
@click.option("--temperature", default=None, type=AT_LEAST_0, help="Default: greedy (real models), 0.8 with top-p 0.95 (toy world).")
@click.option("--max-new-tokens", default=None, type=COUNT, help="Default: 1024 (real models), 20 (toy world).")
@click.option("--samples", default=4, show_default=True, type=COUNT, help="Toy world: test answers per prompt.")
@click.option("--generator", default=None, help="AlpacaEval's generator name (default: the policy's directory name).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Sampling seed.")
@click.option("--chat-template", default=None, help=TEMPLATE_HELP)
@click.option("--device", default=None, help=DEVICE_HELP)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@user_errors
def eval_command(policy, reward, prompts_file, pairs_file, out_file, temperature, max_new_tokens, samples, generator,
             seed, chat_template, device, overwrite, **source):
    """Evaluate a policy: toy world gold metrics (no --prompts), or AlpacaEval outputs (--prompts); or an RM
    on preference pairs (--reward --pairs: RewardBench's sections)."""
    from mtcore import commands, rmeval, toy
    from mtcore.checkpoint import resolve
    from mtcore.config import LoopConfig, resolve_config
    from mtcore.device import default_device
    from mtcore.outputs import check_out_file, write_json_file

    check_out_file(out_file, (prompts_file, pairs_file, chat_template), overwrite, jsonl=False,
                   looks_like=lambda obj: isinstance(obj, (dict, list)))
    device = default_device(device)
    if pairs_file:
        if not reward:
            raise MtcoreError("--pairs needs --reward")
        pairs = _source(pairs_file, "pairs", source, "prompt", "chosen", "rejected")
        result = commands.rm_eval_file(reward, pairs, out_file, chat_template=chat_template, device=device)
        echo(f"{rmeval.table(result)}\nwrote {out_file}")
        return
    if prompts_file:
        if not policy:
            raise MtcoreError("--prompts needs --policy")
        cfg = LoopConfig(temperature=0.0 if temperature is None else temperature, top_p=1.0,
                         max_new_tokens=max_new_tokens or 1024, seed=seed, chat_template=chat_template or "")
        prompts = _source(prompts_file, "prompts", source, "prompt")
        n = commands.alpaca_eval_outputs(cfg, device, policy, prompts, out_file, generator or resolve(policy).name)
        echo(f"wrote {out_file}: {n} AlpacaEval outputs")
        return
    cfg = resolve_config({}, {"temperature": temperature, "max_new_tokens": max_new_tokens,
                              "eval_samples": samples})
    result = toy.gold_metrics_of(cfg, device, resolve(policy) if policy else toy.asset("policy"),
                                 resolve(reward) if reward else toy.asset("reward"), seed)
    write_json_file(out_file, result)
    echo(", ".join(f"{k} {v:.3f}" for k, v in result.items()))
