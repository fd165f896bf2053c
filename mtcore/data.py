"""Tokenizer, chat format and the sequence rule.

A sequence is the prompt's ids (the chat template with the generation prompt, e.g.
`<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{prompt}<|eot_id|>
<|start_header_id|>assistant<|end_header_id|>\\n\\n`), then the response's ids (the response text
encoded without special tokens), then the end-of-turn id (`<|eot_id|>` for Llama-3). The policy
scores the response ids and the end-of-turn id; the reward model reads the last one.
"""

from pathlib import Path

from mtcore.checkpoint import read_json, resolve
from mtcore.errors import MtcoreError


# Meta-Llama-3-8B-Instruct's chat template, for tokenizers that ship without one (`--chat-template llama3`).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"llama3": LLAMA3_CHAT_TEMPLATE}


def load_tokenizer(src, chat_template: str | None = None):
    """transformers' AutoTokenizer of a checkpoint, with a chat template.

    chat_template: None (the checkpoint's own), a built-in name ("llama3"), or a Jinja file's path.
    """
    from transformers import AutoTokenizer

    path = resolve(src)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise MtcoreError(
            f"{path}: no usable tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if chat_template in BUILTIN_TEMPLATES:
        tokenizer.chat_template = BUILTIN_TEMPLATES[chat_template]
    elif chat_template is not None:
        template_file = Path(chat_template)
        if not template_file.is_file():
            raise MtcoreError(f"--chat-template {chat_template}: neither a file nor one of "
                              f"{', '.join(BUILTIN_TEMPLATES)}")
        tokenizer.chat_template = template_file.read_text()
    if not tokenizer.chat_template:
        raise MtcoreError(f"{path}: the tokenizer has no chat template; pass --chat-template FILE "
                          f"(a Jinja template) or --chat-template llama3")
    try:  # a broken template fails here, once, not at the first prompt of a long run
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    except Exception as e:
        raise MtcoreError(f"{chat_template or path}: the chat template does not render a user message "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return tokenizer


def end_of_turn_id(tokenizer) -> int:
    """The id that closes a response: <|eot_id|> where the vocabulary has it, else the eos id."""
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    if isinstance(eot, int) and eot != tokenizer.unk_token_id and eot is not None:
        return eot
    if tokenizer.eos_token_id is None:
        raise MtcoreError("the tokenizer has neither <|eot_id|> nor an eos token; cannot end a response")
    return tokenizer.eos_token_id


def stop_ids(tokenizer, checkpoint_dir=None) -> list[int]:
    """Ids that end generation: the end-of-turn id, the tokenizer's eos, and generation_config's eos."""
    ids = [end_of_turn_id(tokenizer)]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if checkpoint_dir is not None and (Path(checkpoint_dir) / "generation_config.json").exists():
        eos = read_json(Path(checkpoint_dir) / "generation_config.json").get("eos_token_id")
        ids.extend(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return sorted(set(ids))


def as_messages(prompt, where: str = "prompt") -> list[dict]:
    """A prompt string or a chat message list -> a validated message list."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        return prompt
    raise MtcoreError(f"{where}: a prompt must be a string or a non-empty list of "
                      f'{{"role": ..., "content": ...}} messages')


def encode_prompt(tokenizer, prompt, where: str = "prompt") -> list[int]:
    """Prompt ids from the chat template with the generation prompt (special tokens in the template)."""
    try:
        text = tokenizer.apply_chat_template(as_messages(prompt, where), add_generation_prompt=True, tokenize=False)
    except MtcoreError:
        raise
    except Exception as e:  # the template's own raise_exception, e.g. roles that do not alternate
        raise MtcoreError(f"{where}: the chat template rejects this prompt "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return tokenizer.encode(text, add_special_tokens=False)


def encode_response(tokenizer, text: str) -> list[int]:
    """Response ids: the text without special tokens, then the end-of-turn id.

    Special-token spellings inside the text ("<|eot_id|>") are split into ordinary tokens, so a
    response can end only at the end-of-turn id we append.
    """
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids + [end_of_turn_id(tokenizer)]


def encode_sequence(tokenizer, prompt, response: str, where: str = "prompt") -> tuple[list[int], int]:
    """(prompt ids + response ids, number of prompt ids)."""
    prompt_ids = encode_prompt(tokenizer, prompt, where)
    return prompt_ids + encode_response(tokenizer, response), len(prompt_ids)


def read_jsonl(path) -> list[dict]:
    """JSON objects, one per line (blank lines skipped); a malformed line is an error naming it."""
    import json

    rows = []
    try:
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MtcoreError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise MtcoreError(f"{path}:{lineno}: each line must be a JSON object")
                row["_line"] = lineno
                rows.append(row)
    except OSError as e:
        raise MtcoreError(f"{path}: cannot read ({e.strerror or e})") from None
    return rows


def write_jsonl(path, rows) -> None:
    """Write rows atomically (checkpoint.write_text_atomic), dropping the "_line" bookkeeping field."""
    import json

    from mtcore.checkpoint import write_text_atomic

    write_text_atomic(path, "".join(json.dumps({k: v for k, v in row.items() if k != "_line"}, ensure_ascii=False)
                                    + "\n" for row in rows))


def prompt_of(row: dict, where: str):
    """The prompt of a JSONL row: "prompt" (a string or messages) or "messages"."""
    if "prompt" in row:
        return as_messages(row["prompt"], where)
    if "messages" in row:
        return as_messages(row["messages"], where)
    raise MtcoreError(f'{where}: needs a "prompt" or a "messages" field')
