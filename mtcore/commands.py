"""What `mtcore score` and `mtcore eval` do (mtcore/cli.py parses their options and calls these)."""

import json

from mtcore import parallel
from mtcore.checkpoint import resolve
from mtcore.config import LoopConfig
from mtcore.data import as_source, prompt_of, read_rows, write_jsonl
from mtcore.device import default_device
from mtcore.errors import MtcoreError
from mtcore.files import write_text_atomic
from mtcore.inference import first_answers, score_responses
from mtcore.outputs import write_json_file
from mtcore.rmeval import rm_accuracy


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
