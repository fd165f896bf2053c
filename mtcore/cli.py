"""The `mtcore` command: parse, then call. No logic lives here."""

import functools
import logging
import sys

import click

from mtcore.errors import MtcoreError


def user_errors(fn):
    """Report a MtcoreError as one line on stderr and exit 2, without a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MtcoreError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mtcore")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose):
    """mtcore: Mutual-Taught co-adaptation of a LLaMA-3 policy and its reward model.

    Under torchrun (`torchrun --nproc_per_node N -m mtcore ...`) every command runs on all ranks;
    rank 0 alone logs information, shows progress and writes the outputs."""
    from mtcore import parallel

    parallel.init()
    level = logging.DEBUG if verbose else logging.INFO if parallel.is_main() else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.result_callback()
def _finished(*_, **__):
    """After a command that succeeded under torchrun: leave together and exit (parallel.finish)."""
    from mtcore import parallel

    parallel.finish()


def echo(message: str) -> None:
    """click.echo on rank 0 only (every rank would print the same line)."""
    from mtcore import parallel

    if parallel.is_main():
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
              help="Default: from config.json's architectures.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option("--max-shard-gb", type=float, default=5.0, show_default=True)
@user_errors
def convert(src, dst, kind, dtype, max_shard_gb):
    """Re-save the checkpoint SRC into DST (dtype, sharding) in Hugging Face format."""
    from mtcore import checkpoint

    path = checkpoint.resolve(src)
    kind = kind or checkpoint.kind_of(checkpoint.read_json(path / "config.json"))
    model = checkpoint.load_model(path, kind=kind, dtype=dtype)
    checkpoint.save_model(model, dst, max_shard_bytes=int(max_shard_gb * 2**30))
    click.echo(f"wrote {dst}")


@main.command()
@click.option("--policy", required=True, help="Policy checkpoint: directory or hub id.")
@click.option("--prompts", "prompts_file", required=True, type=click.Path(dir_okay=False),
              help='JSONL: {"prompt": ...} or {"messages": [...]}, extra fields kept.')
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), help="Output JSONL.")
@click.option("--n", default=1, show_default=True, help="Samples per prompt.")
@click.option("--temperature", default=1.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--top-k", default=0, show_default=True, help="0 = off.")
@click.option("--max-new-tokens", default=256, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--slots", default=None, type=int, help="Concurrent sequences (default: what --kv-cache-gb holds).")
@click.option("--kv-cache-gb", default=2.0, show_default=True, help="K/V cache budget that sizes the slots.")
@click.option("--max-len", default=None, type=int, help="Tokens per cache slot (default: longest prompt + new).")
@click.option("--skip-overlong", is_flag=True, help="Skip (and count) prompts too long for a slot, not fail.")
@click.option("--chat-template", default=None, help="A Jinja file, or 'llama3', when the tokenizer has none.")
@click.option("--logprobs", is_flag=True, help="Also write each sampled token's log-prob.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@user_errors
def generate(policy, prompts_file, out_file, n, temperature, top_p, top_k, max_new_tokens, seed, slots, kv_cache_gb,
             max_len, skip_overlong, chat_template, logprobs, device):
    """Sample responses for PROMPTS with the KV-cache batch sampler."""
    from mtcore.checkpoint import default_device
    from mtcore.sampler import SamplingParams, generate_jsonl

    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                            seed=seed, logprobs=logprobs)
    device = default_device(device)
    counts = generate_jsonl(policy, prompts_file, out_file, params, slots=slots, chat_template=chat_template,
                            skip_overlong=skip_overlong, max_len=max_len, device=device,
                            kv_budget_bytes=int(kv_cache_gb * 2**30))
    echo(f"wrote {out_file}: {counts['responses']} responses for {counts['prompts']} prompts"
               + (f", {counts['skipped']} skipped as too long" if counts["skipped"] else ""))


def training_options(lr, batch_size):
    """The options every trainer command shares; lr and batch size default to the paper's per command."""
    def decorate(fn):
        options = [
            click.option("--out", required=True, type=click.Path(file_okay=False),
                         help="Output directory: the trained model (Hugging Face format), metrics.jsonl, summary.json."),
            click.option("--lr", default=lr, show_default=True, type=float),
            click.option("--batch-size", default=batch_size, show_default=True,
                         help="Examples (pairs) per optimizer step; micro-batches accumulate to it."),
            click.option("--micro-batch-tokens", default=8192, show_default=True,
                         help="Token budget of one packed forward/backward."),
            click.option("--epochs", default=1, show_default=True),
            click.option("--warmup-ratio", default=0.1, show_default=True),
            click.option("--weight-decay", default=0.0, show_default=True),
            click.option("--max-grad-norm", default=1.0, show_default=True, help="0 = no clipping."),
            click.option("--max-length", default=2048, show_default=True,
                         help="Tokens per sequence: responses are cut at the end to fit; a prompt that alone "
                              "fills it drops the example (counted)."),
            click.option("--seed", default=0, show_default=True),
            click.option("--grad-checkpointing", is_flag=True, help="Recompute each block's activations in backward."),
            click.option("--save-state-every", default=0, show_default=True,
                         help="Save the (sharded) model and optimizer state to OUT/train_state every N steps; "
                              "a rerun resumes from it. 0 = never."),
            click.option("--padded", is_flag=True, help="Right-padded batches instead of packed (for comparison)."),
            click.option("--chat-template", default=None, help="A Jinja file, or 'llama3', when the tokenizer has none."),
            click.option("--device", default=None, help="cpu or cuda (default: cuda when available)."),
        ]
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def _train_config(kw):
    from mtcore.train import TrainConfig

    names = ("lr", "batch_size", "micro_batch_tokens", "epochs", "warmup_ratio", "weight_decay", "max_grad_norm",
             "seed", "grad_checkpointing", "padded", "save_state_every")
    return TrainConfig(**{k: kw.pop(k) for k in names})


def _report(out, history):
    last = history[-1]
    echo(f"wrote {out}: {len(history)} steps, final loss {last['loss']:.4f}"
               + (f", accuracy {last['accuracy']:.3f}" if "accuracy" in last else "")
               + f", {sum(r['tokens'] for r in history) / sum(r['seconds'] for r in history):.0f} tokens/s")


@main.command()
@click.option("--policy", required=True, help="Policy checkpoint: directory or hub id.")
@click.option("--pairs", "pairs_file", required=True, type=click.Path(dir_okay=False),
              help='JSONL: {"prompt": str | messages, "chosen": str, "rejected": str}.')
@click.option("--ref", default=None, help="Reference model (default: the policy as given).")
@click.option("--beta", default=0.01, show_default=True)
@click.option("--loss-type", type=click.Choice(["sigmoid", "ipo", "hinge"]), default="sigmoid", show_default=True)
@click.option("--label-smoothing", default=0.0, show_default=True)
@click.option("--length-normalize", is_flag=True, help="Mean instead of sum of the response tokens' log-probs.")
@training_options(lr=7e-7, batch_size=128)
@user_errors
def dpo(policy, pairs_file, ref, beta, loss_type, label_smoothing, length_normalize, **kw):
    """DPO of a policy on preference pairs, with reference log-probs computed once (cached beside PAIRS)."""
    from mtcore.train import run_dpo

    cfg = _train_config(kw)
    history = run_dpo(policy, pairs_file, kw["out"], cfg, ref=ref, beta=beta, loss_type=loss_type,
                      label_smoothing=label_smoothing, length_normalize=length_normalize,
                      max_length=kw["max_length"], chat_template=kw["chat_template"], device=kw["device"])
    _report(kw["out"], history)


@main.command()
@click.option("--reward", required=True, help="Reward model checkpoint to start from: directory or hub id.")
@click.option("--pairs", "pairs_file", required=True, type=click.Path(dir_okay=False),
              help='JSONL: {"prompt", "chosen", "rejected", "margin"?: float}.')
@click.option("--center-coef", default=0.0, show_default=True, help="Weight of the reward-centering term.")
@training_options(lr=2e-6, batch_size=512)
@user_errors
def rm(reward, pairs_file, center_coef, **kw):
    """Bradley-Terry training of a reward model on preference pairs."""
    from mtcore.train import run_rm

    cfg = _train_config(kw)
    history = run_rm(reward, pairs_file, kw["out"], cfg, center_coef=center_coef, max_length=kw["max_length"],
                     chat_template=kw["chat_template"], device=kw["device"])
    _report(kw["out"], history)


@main.command()
@click.option("--policy", required=True, help="Policy checkpoint: directory or hub id.")
@click.option("--data", "data_file", required=True, type=click.Path(dir_okay=False),
              help='JSONL: {"prompt": str | messages, "response": str}.')
@training_options(lr=1e-5, batch_size=64)
@user_errors
def sft(policy, data_file, **kw):
    """Supervised fine-tuning: the mean NLL of the response tokens."""
    from mtcore.train import run_sft

    cfg = _train_config(kw)
    history = run_sft(policy, data_file, kw["out"], cfg, max_length=kw["max_length"],
                      chat_template=kw["chat_template"], device=kw["device"])
    _report(kw["out"], history)


def loop_options(fn):
    """One option per LoopConfig field (default None: the config file's value, then the defaults)."""
    import dataclasses

    from mtcore.loop import LoopConfig

    for f in reversed(dataclasses.fields(LoopConfig)):
        name = f.name.replace("_", "-")
        if f.type is bool:
            option = click.option(f"--{name}/--no-{name}", f.name, default=None,
                                  help=f"[paper default: {f.default}]")
        else:
            option = click.option(f"--{name}", f.name, type=f.type, default=None,
                                  help=f"[paper default: {f.default!r}]")
        fn = option(fn)
    return fn


@main.command()
@click.option("--out", default="runs/mtcore", show_default=True, type=click.Path(file_okay=False),
              help="Run directory; re-running the same command there resumes it.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="TOML file of the options below (keys with underscores).")
@loop_options
@user_errors
def train(out, config_file, **options):
    """The Mutual-Taught iteration. With no --policy/--reward/--prompts: the built-in toy world.

    --no-m-step runs the fixed-RM iterative-DPO baseline. Every option is also a config-file key."""
    from mtcore import loop

    cfg = loop.resolve_config(loop.read_config_file(config_file) if config_file else {}, options)
    run = loop.Run(out, cfg)
    echo(f"run directory {out} ({'toy world' if run.toy else cfg.policy}; "
               f"{'Mutual-Taught' if cfg.m_step else 'fixed-RM baseline'}, {cfg.iters} iterations)")
    metrics = loop.train(run, echo=echo)
    echo(f"done: {len(metrics['iterations'])} iterations; final policy {metrics['final_policy']}; "
               f"metrics in {out}/metrics.json")


@main.command(name="build-toy")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Where to write the assets (default: the package's toy_assets).")
@click.option("--seed", default=0, show_default=True)
@user_errors
def build_toy(out, seed):
    """Rebuild the toy world's tokenizer, SFT policy, base RM and held-out pairs from a seed."""
    from mtcore import toy

    click.echo(f"wrote {toy.build_assets(out or toy.ASSETS, seed)}")


@main.command()
@click.option("--reward", required=True, help="Reward model: directory or hub id.")
@click.option("--prompts-with-responses", "in_file", required=True, type=click.Path(dir_okay=False),
              help='JSONL rows {"prompt": ..., "responses": [str | {"text": ...}, ...]} (mtcore generate\'s output).')
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False))
@click.option("--chat-template", default=None, help="A Jinja file, or 'llama3', when the tokenizer has none.")
@click.option("--max-length", default=2048, show_default=True)
@click.option("--micro-batch-tokens", default=8192, show_default=True)
@click.option("--device", default=None)
@user_errors
def score(reward, in_file, out_file, chat_template, max_length, micro_batch_tokens, device):
    """Score every response with a reward model: the same rows plus "rewards"."""
    from mtcore.loop import score_jsonl

    n = score_jsonl(reward, in_file, out_file, chat_template, max_length, micro_batch_tokens, device)
    echo(f"wrote {out_file}: {n} responses scored")


@main.command(name="eval")
@click.option("--policy", default=None, help="Policy to evaluate (default, toy world: the built-in initial policy).")
@click.option("--reward", default=None, help="Toy world: the RM to measure (default: the built-in base RM).")
@click.option("--prompts", "prompts_file", default=None, type=click.Path(dir_okay=False),
              help="Real models: prompts JSONL; writes AlpacaEval-format outputs for an external judge.")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), help="Output JSON.")
@click.option("--temperature", default=None, type=float, help="Default: greedy (real models), 1.0 (toy world).")
@click.option("--max-new-tokens", default=None, type=int, help="Default: 1024 (real models), 20 (toy world).")
@click.option("--samples", default=4, show_default=True, help="Toy world: test answers per prompt.")
@click.option("--generator", default=None, help="AlpacaEval's generator name (default: the policy's directory name).")
@click.option("--seed", default=0, show_default=True)
@click.option("--chat-template", default=None, help="A Jinja file, or 'llama3', when the tokenizer has none.")
@click.option("--device", default=None)
@user_errors
def evaluate(policy, reward, prompts_file, out_file, temperature, max_new_tokens, samples, generator, seed,
             chat_template, device):
    """Evaluate a policy: toy world gold metrics (no --prompts), or AlpacaEval outputs (--prompts)."""
    import json

    from mtcore import loop, toy
    from mtcore.checkpoint import default_device, resolve

    device = default_device(device)
    if prompts_file:
        if not policy:
            raise MtcoreError("--prompts needs --policy")
        cfg = loop.LoopConfig(temperature=0.0 if temperature is None else temperature, top_p=1.0,
                              max_new_tokens=max_new_tokens or 1024, seed=seed, chat_template=chat_template or "")
        n = loop.alpaca_eval_outputs(cfg, device, policy, prompts_file, out_file,
                                     generator or resolve(policy).name)
        echo(f"wrote {out_file}: {n} AlpacaEval outputs")
        return
    cfg = loop.resolve_config({}, {"temperature": temperature, "max_new_tokens": max_new_tokens,
                                   "eval_samples": samples})
    result = toy.evaluate_models(cfg, device, resolve(policy) if policy else toy.asset("policy"),
                                 resolve(reward) if reward else toy.asset("reward"), seed)
    loop.write_text_atomic(out_file, json.dumps(result, indent=2) + "\n")  # rank 0 writes
    echo(", ".join(f"{k} {v:.3f}" for k, v in result.items()))
