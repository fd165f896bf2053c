"""What the commands besides `mtcore train` do (mtcore/cli.py parses their options and calls these):
`mtcore dpo`, `rm` and `sft` (read the data, train with train.fit in OUT.partial, swap the finished
output in), `score` and `eval`."""

import functools
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch

from mtcore import parallel
from mtcore.checkpoint import load_model, resolve, save_model, stored_dtype
from mtcore.config import LoopConfig, TrainConfig
from mtcore.data import as_source, load_tokenizer, prompt_of, read_demonstrations, read_pairs, read_rows, write_jsonl
from mtcore.device import default_device
from mtcore.errors import MtcoreError
from mtcore.files import write_json, write_text_atomic
from mtcore.inference import first_answers, score_responses
from mtcore.outputs import check_out_dir, commit_dir, open_partial, partial_dir, write_json_file
from mtcore.rmeval import rm_accuracy
from mtcore.train import (DPO, SFT, BradleyTerry, NonFiniteLoss, cached_reference_logps, check_training_disk, fit,
                          prepare_examples, reference_key, write_history)

log = logging.getLogger(__name__)


def rm_eval_file(reward, pairs_file, out_file, chat_template=None, max_length=2048, micro_batch_tokens=8192,
                 device=None) -> dict:
    """`mtcore eval --reward --pairs`: rmeval.rm_accuracy, written as JSON (atomically, rank 0, no bare NaN)."""
    cfg = LoopConfig(reward_chat_template=chat_template or "", max_length=max_length,
                     micro_batch_tokens=micro_batch_tokens, device=str(device or ""))
    result = rm_accuracy(cfg, default_device(device), resolve(reward), pairs_file)
    write_json_file(out_file, result)  # rank 0
    return result


def score_jsonl(reward, in_file, out_file, chat_template=None, max_length=2048, micro_batch_tokens=8192,
                device=None, log_every=30.0) -> int:
    """`mtcore score`: rows {"prompt", "responses"} -> the same rows plus "rewards"."""
    cfg = LoopConfig(reward_chat_template=chat_template or "", max_length=max_length,
                     micro_batch_tokens=micro_batch_tokens, device=device or "", log_every=log_every)
    device = default_device(device)
    rows = read_rows(in_file)
    prompts, texts = [], []
    for row in rows:
        where = row["_where"]
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
    [{"instruction", "output", "generator"}] (JSON, atomically) for an external judge. prompts_file: a
    path, hub id or data.Source (read_rows)."""
    source = as_source(prompts_file)
    rows = read_rows(source)
    prompts = [prompt_of(r, r["_where"], source.prompt) for r in rows]
    answers = first_answers(cfg, device, resolve(policy), prompts, cfg.seed)
    out = [{"instruction": p[-1]["content"], "output": a, "generator": generator} for p, a in zip(prompts, answers)]
    if parallel.is_main():
        write_text_atomic(out_file, json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    return len(out)


def _load(path: Path, kind, device, chat_template):
    """(tokenizer, model): the model first, so that a bad config.json is reported as such."""
    # fp32 master weights everywhere; CUDA computes in bf16 under autocast.
    model = load_model(path, kind=kind, dtype=torch.float32, device=device)
    bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise MtcoreError(f"{path}: {bad} holds NaN or inf values; this checkpoint cannot be trained")
    return load_tokenizer(path, chat_template), model


def _check_disk(out: Path, src: Path, examples, cfg: TrainConfig, command: str) -> None:
    """`mtcore <command>` writes one model and, with --save-state-every, its resumable state in OUT.partial."""
    saved = (partial_dir(out) / "train_state" / "trainer.json").exists()
    check_training_disk(partial_dir(out), src, examples, cfg, 1, f"`mtcore {command}`'s model and resumable state",
                        saved)


def _read(read_fn, data_file, tokenizer, max_length, cfg):
    return prepare_examples(read_fn(data_file, tokenizer), data_file, max_length, cfg)


def _train_and_commit(model, tokenizer, examples, objective, cfg, out: Path, summary, reporter=None):
    """fit in OUT.partial (metrics.jsonl, and the resumable state in train_state with
    --save-state-every; each step to the report.Reporter given, by default in OUT/tb), then save the
    model, metrics.jsonl and summary.json there and swap the whole directory in for OUT (outputs.commit_dir): OUT is the old output or the new one, never a mix. At a
    NaN/inf, OUT is left as it was and the last good model is saved in OUT.partial/last_good."""
    command, dtype = summary["command"], stored_dtype(model.source)  # saved as the source is kept
    if cfg.batch_size > len(examples):
        log.warning("--batch-size %d is more than the %d examples: %d step(s) in all (%d epoch(s) of one); lower "
                    "--batch-size for more", cfg.batch_size, len(examples), cfg.epochs, cfg.epochs)
    work = open_partial(out, command, keep=("train_state", "tb")) if parallel.is_main() else partial_dir(out)
    parallel.barrier()
    metrics_file = work / "metrics.jsonl"
    parallel.parallelize(model, cfg.grad_checkpointing)
    if reporter is not None:
        reporter.open(work / "tb")
    try:
        history = fit(model, examples, objective, cfg, metrics_file, desc=command, state_dir=work / "train_state",
                      report=reporter and reporter.step_logger(command))
    except NonFiniteLoss as e:
        save_model(model, work / "last_good", tokenizer=tokenizer, dtype=dtype)
        good = f"the good steps' metrics in {metrics_file}" if metrics_file.exists() else "no step completed"
        raise NonFiniteLoss(f"{e}; {out} is unchanged; the model before that step is in {work / 'last_good'} "
                            f"({good}); lower --lr, or check the examples named") from None
    finally:
        if reporter is not None:
            reporter.close()
    finished = save_model(model, work / "model", tokenizer=tokenizer, dtype=dtype)
    summary.update(config=asdict(cfg), world_size=parallel.world_size(), steps=len(history),
                   final=history[-1] if history else None)
    if parallel.is_main():
        write_history(finished / "metrics.jsonl", history)
        write_json(finished / "summary.json", summary)
        if (work / "tb").is_dir():  # --report-to's default directory goes with the model
            os.replace(work / "tb", finished / "tb")
        commit_dir(finished, out, command)
    parallel.barrier()
    return history


def cache_root(given=None) -> Path:
    """mtcore's cache: --cache-dir, else $MTCORE_CACHE, else $XDG_CACHE_HOME/mtcore, else ~/.cache/mtcore
    (as Hugging Face keeps its own under HF_HOME). Never beside the user's data."""
    if given:
        return Path(given).expanduser()
    if os.environ.get("MTCORE_CACHE"):
        return Path(os.environ["MTCORE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mtcore"


def reference_cache_dir(given=None) -> Path | None:
    """The directory of the reference log-prob caches (one file per pairs and reference model) under
    the cache directory, made if need be. A --cache-dir that cannot be made is an error; the default
    one, a warning (None: no cache)."""
    d = cache_root(given) / "ref_logps"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if given:
            raise MtcoreError(f"--cache-dir {given}: cannot make {d} ({e.strerror or e}); give another "
                              f"--cache-dir") from None
        log.warning("%s: cannot make the cache directory (%s); the reference log-probs are not cached (set "
                    "--cache-dir or MTCORE_CACHE)", d, e.strerror or e)
        return None
    return d


def run_dpo(policy, pairs_file, out, cfg: TrainConfig, ref=None, beta=0.01, loss_type="sigmoid",
            label_smoothing=0.0, length_normalize=False, max_length=2048, chat_template=None, device=None,
            overwrite=False, reporter=None, cache_dir=None):
    """`mtcore dpo`: read and pack the pairs, reference log-probs (cached under cache_dir, see
    cache_root), DPO, save."""
    device = default_device(device)
    path, ref_path = resolve(policy), None if ref is None else resolve(ref)
    caches = reference_cache_dir(cache_dir)
    out = check_out_dir(out, "dpo", (path, pairs_file, ref_path, chat_template), overwrite)
    tokenizer, model = _load(path, "policy", device, chat_template)
    # the responses as given, as TRL's DPOTrainer tokenizes them (the reward side renders them: rm, score)
    examples, report = _read(functools.partial(read_pairs, rendered=False), pairs_file, tokenizer, max_length, cfg)
    _check_disk(out, path, examples, cfg, "dpo")
    ref_path = ref_path or path
    reference = model if ref is None else functools.partial(load_model, ref_path, kind="policy", dtype=torch.float32,
                                                            device=device)  # loaded only if the cache misses
    key = reference_key(examples, ref_path, device)
    cache = caches / f"{key[:32]}.safetensors" if caches else None
    ref_sums, ref_counts = cached_reference_logps(reference, examples, cache, cfg.micro_batch_tokens,
                                                  cfg.reference_ops, cfg.log_every, key=key)
    objective = DPO(ref_sums, ref_counts, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                    length_normalize=length_normalize)
    summary = {"command": "dpo", "policy": str(path), "ref": str(ref_path), "pairs": str(pairs_file),
               "data": report, "beta": beta, "loss_type": loss_type, "label_smoothing": label_smoothing,
               "length_normalize": length_normalize, "max_length": max_length, "ref_cache": str(cache)}
    return _train_and_commit(model, tokenizer, examples, objective, cfg, out, summary, reporter)


def run_rm(reward, pairs_file, out, cfg: TrainConfig, center_coef=0.0, max_length=2048, chat_template=None,
           device=None, overwrite=False, reporter=None):
    """`mtcore rm`: Bradley-Terry training of a reward model on preference pairs, from `reward`."""
    return _fit_command("rm", ("reward", reward), ("pairs", pairs_file), read_pairs, BradleyTerry(center_coef), out,
                        cfg, max_length, chat_template, device, overwrite, reporter, center_coef=center_coef)


def run_sft(policy, data_file, out, cfg: TrainConfig, max_length=2048, chat_template=None, device=None,
            overwrite=False, reporter=None):
    """`mtcore sft`: supervised fine-tuning on {"prompt", "response"} demonstrations."""
    return _fit_command("sft", ("policy", policy), ("data_file", data_file), read_demonstrations, SFT(), out, cfg,
                        max_length, chat_template, device, overwrite, reporter)


def _fit_command(command, model_arg, data_arg, read_fn, objective, out, cfg: TrainConfig, max_length, chat_template,
                 device, overwrite, reporter, **settings):
    """`mtcore rm` and `sft`: OUT checked, the model (model_arg: its kind and where it is) and the data
    (data_arg: summary.json's name for it, and the file) read, then trained and committed."""
    (kind, src), (data_key, data_file) = model_arg, data_arg
    device = default_device(device)
    path = resolve(src)
    out = check_out_dir(out, command, (path, data_file, chat_template), overwrite)
    tokenizer, model = _load(path, kind, device, chat_template)
    examples, report = _read(read_fn, data_file, tokenizer, max_length, cfg)
    _check_disk(out, path, examples, cfg, command)
    summary = {"command": command, kind: str(path), data_key: str(data_file), "data": report, **settings,
               "max_length": max_length}
    return _train_and_commit(model, tokenizer, examples, objective, cfg, out, summary, reporter)
