"""Tokenizer, chat format and the sequence rule.

A sequence is the prompt's ids (the chat template with the generation prompt, e.g.
`<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{prompt}<|eot_id|>
<|start_header_id|>assistant<|end_header_id|>\\n\\n`), then the response's ids (the response text
as the template renders it, Llama-3's trimmed, encoded without special tokens), then the end-of-turn
id (`<|eot_id|>` for Llama-3): apply_chat_template's ids of the whole conversation. The policy scores
the response ids and the end-of-turn id; the reward model reads the last token that is not its pad id
(train.reward_index: the end-of-turn id, or the token before it when the pad id is <|eot_id|>).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mtcore import sources
from mtcore.checkpoint import config_to_args, resolve
from mtcore.errors import MtcoreError
from mtcore.files import read_json, write_text_atomic


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
        if (path / "config.json").is_file():  # a bad config.json breaks the tokenizer too: name the real cause
            config_to_args(read_json(path / "config.json"), str(path / "config.json"))
        raise MtcoreError(
            f"{path}: no usable tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if chat_template in BUILTIN_TEMPLATES:
        tokenizer.chat_template = BUILTIN_TEMPLATES[chat_template]
    elif chat_template is not None:
        template_file = Path(chat_template)
        if not template_file.is_file():
            raise MtcoreError(f"--chat-template {chat_template}: neither a file nor one of "
                              f"{', '.join(BUILTIN_TEMPLATES)}")
        try:
            tokenizer.chat_template = template_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MtcoreError(f"--chat-template {chat_template}: cannot read it as UTF-8 text ({e})") from None
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


ROLES = ("system", "user", "assistant")


def as_messages(prompt, where: str = "prompt") -> list[dict]:
    """A prompt string or a chat message list -> a validated message list (roles: ROLES; another one,
    e.g. "tool", is refused rather than passed to a template that may render it as anything)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not (isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt)):
        raise MtcoreError(f"{where}: a prompt must be a string or a non-empty list of "
                          f'{{"role": ..., "content": ...}} messages')
    bad = next((i for i, m in enumerate(prompt) if m["role"] not in ROLES), None)
    if bad is not None:
        raise MtcoreError(f'{where}: message {bad} has the role {prompt[bad]["role"]!r}; roles are '
                          f'{", ".join(ROLES)}')
    return prompt


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


# How a chat template renders an assistant message's content, by template text (content_rule).
_CONTENT_RULES: dict[str, str] = {}
_STRIPS = {"as is": lambda s: s, "lstrip": str.lstrip, "rstrip": str.rstrip, "trim": str.strip}


def content_rule(tokenizer) -> str:
    """What the chat template does to an assistant message's content: "as is", "lstrip", "rstrip" or
    "trim" (Llama-3's `message['content'] | trim`), found once per template by rendering a probe."""
    template = tokenizer.chat_template or ""
    if template not in _CONTENT_RULES:
        probe = " \n\tmtcore-probe \n\t"
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": probe}], tokenize=False)
        except Exception:  # a template that refuses a finished conversation: leave the text as it is
            text = probe
        _CONTENT_RULES[template] = next((name for name, strip in _STRIPS.items() if strip(probe) in text), "as is")
    return _CONTENT_RULES[template]


def encode_response(tokenizer, text: str, rendered: bool = True) -> list[int]:
    """Response ids: the text as the chat template renders an assistant message's content (Llama-3's
    trims it, so ids equal apply_chat_template's for the whole conversation), without special tokens,
    then the end-of-turn id.

    Special-token spellings inside the text ("<|eot_id|>") are split into ordinary tokens, so a
    response can end only at the end-of-turn id we append.
    """
    shown = _STRIPS[content_rule(tokenizer)](text) if rendered else text  # rendered=False: as given (mtcore dpo)
    ids = tokenizer(shown, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids + [end_of_turn_id(tokenizer)]


def encode_sequence(tokenizer, prompt, response: str, where: str = "prompt") -> tuple[list[int], int]:
    """(prompt ids + response ids, number of prompt ids)."""
    prompt_ids = encode_prompt(tokenizer, prompt, where)
    return prompt_ids + encode_response(tokenizer, response), len(prompt_ids)


def not_text(value, field: str = "") -> str | None:
    """The field (e.g. 'messages[1].content') of the first string in a JSON value that is not text a
    tokenizer can take, or None: a lone surrogate, which JSON's "\\ud800" escapes decode to and UTF-8
    cannot hold (tokenizers raise a TypeError on it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return field or "the row"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        shown = key.encode("utf-8", "backslashreplace").decode() if isinstance(key, str) else key
        name = f"{field}[{key}]" if isinstance(key, int) else f"{field}.{shown}" if field else shown
        bad = not_text(key, name + " (its name)") if isinstance(key, str) else None
        bad = bad or not_text(item, name)
        if bad:
            return bad
    return None


def _check_text(row: dict, raw: bytes | None, where: str) -> None:
    """A row whose strings hold a lone surrogate is one error naming the field. Only a JSONL line with
    a \\u escape can hold one, so other lines cost nothing (raw None: a table's row, always checked)."""
    if raw is None or b"\\u" in raw:
        field = not_text(row)
        if field:
            raise MtcoreError(f'{where}: "{field}" holds a lone surrogate (a \\ud800-\\udfff escape that is half '
                              f'of a pair), which is not text; fix or remove it')


GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"


def _open_bytes(path):
    """A file's bytes, gunzipped where it is gzip (a .jsonl.gz, as datasets reads it)."""
    import gzip

    with open(path, "rb") as f:
        gzipped = f.read(2) == GZIP_MAGIC
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_jsonl(path) -> list[dict]:
    """JSON objects, one per line (blank lines skipped; a UTF-8 byte order mark at the start, and gzip
    compression, are read through); a malformed line, or one holding a string that is not text
    (not_text), is an error naming it."""
    rows = []
    try:
        with _open_bytes(path) as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1 and raw.startswith(UTF8_BOM):  # Windows editors write one; json refuses it
                    raw = raw[len(UTF8_BOM):]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise MtcoreError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line); "
                                      f"save the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MtcoreError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise MtcoreError(f"{path}:{lineno}: each line must be a JSON object")
                _check_text(row, raw, f"{path}:{lineno}")
                row["_line"] = lineno
                rows.append(row)
    except (OSError, EOFError) as e:  # EOFError: a gzip file cut short
        raise MtcoreError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    return rows


def write_jsonl(path, rows) -> None:
    """Write rows atomically (files.write_text_atomic), dropping the "_line" and "_where" bookkeeping
    fields. A value JSON has no type for (a Parquet timestamp, bytes) is written as its str()."""
    write_text_atomic(path, "".join(json.dumps({k: v for k, v in row.items() if k not in ("_line", "_where")},
                                               ensure_ascii=False, default=str) + "\n" for row in rows))


@dataclass(frozen=True)
class Source:
    """A user's data: a JSONL or Parquet file, a Hugging Face dataset directory or a cached hub id
    (sources.py), the split to read (datasets only; None: the only one) and the names of its columns.
    os.fspath gives `path`, so it stands wherever a file name did (str: `path[split]`)."""
    path: str
    split: str | None = None
    split_option: str = "--split"  # the option naming the split, for errors
    prompt: str = "prompt"  # "prompt" also falls back to "messages"
    chosen: str = "chosen"
    rejected: str = "rejected"
    response: str = "response"

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return f"{self.path}[{self.split}]" if self.split else str(self.path)

    def is_hub_id(self) -> bool:
        return sources.kind_of(self.path) == "hub"


def as_source(source) -> Source:
    return source if isinstance(source, Source) else Source(str(source))


def _prompt_columns(source: Source) -> tuple[str, ...]:
    return ("prompt", "messages") if source.prompt == "prompt" else (source.prompt,)


def read_rows(source, need=("prompt",)) -> list[dict]:
    """The rows of a user's data (a path, hub id or Source), each with "_line" and "_where" (the
    location errors name): JSONL's line number and "FILE:LINE", or a table's row index (from 0, as
    `dataset[N]`) and "SOURCE[SPLIT] row N". need: the columns (by their Source attribute: "prompt",
    "chosen", ...) a table must have, checked once before any row is read."""
    source = as_source(source)
    if sources.kind_of(source.path) == "jsonl":
        if source.split:
            raise MtcoreError(f"{source.split_option} {source.split}: {source.path} is JSONL, which has no splits; "
                              f"leave the split out")
        rows = read_jsonl(source.path)
        for row in rows:
            row["_where"] = f"{source.path}:{row['_line']}"
        return rows
    columns = [(_prompt_columns(source) if key == "prompt" else (getattr(source, key),),
                f"--{key}-field") for key in need]
    name, rows = sources.read_table(source.path, source.split, source.split_option, columns)
    for i, row in enumerate(rows):
        where = f"{name} row {i}"
        _check_text(row, None, where)
        row["_line"], row["_where"] = i, where
    return rows


def prompt_of(row: dict, where: str, field: str = "prompt"):
    """The prompt of a row: `field` (a string or messages), or with the default field "messages"."""
    if field in row:
        return as_messages(row[field], where)
    if field == "prompt" and "messages" in row:
        return as_messages(row["messages"], where)
    if field != "prompt":
        raise MtcoreError(f'{where}: needs a "{field}" field (--prompt-field)')
    raise MtcoreError(f'{where}: needs a "prompt" or a "messages" field (another name: --prompt-field)')


def response_of(row: dict, key: str, where: str, prompt: list[dict], option: str = "") -> str:
    """A response: a string, or a conversation (UltraFeedback's layout) whose last message is the
    assistant's response and whose messages before it are the prompt's, role and content."""
    value = row.get(key)
    if isinstance(value, str):
        return value
    hint = f" (another name: {option})" if option and key not in row else ""
    if not isinstance(value, list) or not value:
        raise MtcoreError(f'{where}: needs a "{key}" string field, or a list of messages ending with the '
                          f'assistant\'s response{hint}')
    messages = as_messages(value, f'{where}: "{key}"')
    if messages[-1]["role"] != "assistant":
        raise MtcoreError(f'{where}: "{key}" must end with an assistant message (the response), not '
                          f'{messages[-1]["role"]!r}')
    before = [(m["role"], m["content"]) for m in messages[:-1]]
    if before and before != [(m["role"], m["content"]) for m in prompt]:
        raise MtcoreError(f'{where}: "{key}" holds a conversation whose messages before its last differ from the '
                          f'prompt; the prompt must be that conversation (or leave it out of "{key}")')
    return messages[-1]["content"]


# ---------------------------------------------------------------------------------------------
# Training examples and packing.
#
# An example is one or more sequences that must share a micro-batch: a preference pair is
# (chosen, rejected), an SFT demonstration is (sequence,). Each sequence is (ids, n_prompt): the
# prompt's ids are context, the rest are scored. Micro-batches hold whole examples, placed by
# first-fit decreasing into token budgets; the tensors of a batch are built once, on the CPU.
# ---------------------------------------------------------------------------------------------

IGNORE_INDEX = -100


@dataclass
class Example:
    seqs: tuple[tuple[list[int], int], ...]  # ((ids, n_prompt), ...): chosen then rejected for a pair
    line: int = 0  # the JSONL line it came from (0: built in code)
    margin: float | None = None  # a pair's Bradley-Terry margin, from the row's "margin" field

    @property
    def n_tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.seqs)


def _cut(ids: list[int], n_prompt: int, max_length: int) -> list[int] | None:
    """The length rule: the prompt is never cut; a response is cut at its end to fit max_length
    (losing its end-of-turn id); a prompt that leaves no room for one response token drops the example."""
    if n_prompt >= max_length:
        return None
    return ids[:max_length]


def cut_to_length(examples: list[Example], max_length: int) -> tuple[list[Example], dict]:
    """Apply the length rule to every sequence. Returns (kept examples, {"kept", "truncated", "dropped"})."""
    kept, truncated = [], 0
    for ex in examples:
        cut = [_cut(ids, n_prompt, max_length) for ids, n_prompt in ex.seqs]
        if any(c is None for c in cut):
            continue
        if any(len(f) < len(ids) for f, (ids, _) in zip(cut, ex.seqs)):
            truncated += 1
        kept.append(Example(tuple((f, n_prompt) for f, (_, n_prompt) in zip(cut, ex.seqs)), ex.line, ex.margin))
    return kept, {"kept": len(kept), "truncated": truncated, "dropped": len(examples) - len(kept)}


def encode_pair(tokenizer, prompt, chosen: str, rejected: str, where: str = "prompt", line: int = 0,
                margin: float | None = None, rendered: bool = True) -> Example:
    """A preference pair by the sequence rule: the prompt's ids (encoded once) before each response's
    (rendered: as the chat template shows them, encode_response)."""
    prompt_ids = encode_prompt(tokenizer, prompt, where)
    n = len(prompt_ids)
    return Example(((prompt_ids + encode_response(tokenizer, chosen, rendered), n),
                    (prompt_ids + encode_response(tokenizer, rejected, rendered), n)), line, margin)


def read_pair(row: dict, source: Source) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen text, rejected text) of a row read by read_rows from `source`."""
    where = row["_where"]
    prompt = prompt_of(row, where, source.prompt)
    return (prompt, response_of(row, source.chosen, where, prompt, "--chosen-field"),
            response_of(row, source.rejected, where, prompt, "--rejected-field"))


def read_pairs(path, tokenizer, rendered: bool = True) -> list[Example]:
    """Preference pairs from rows {"prompt": str | messages, "chosen": str | messages, "rejected": str |
    messages, "margin"?: float} (read_rows: JSONL, Parquet or a dataset; read_pair), each tokenised by
    the sequence rule; a malformed row is an error naming where it is."""
    examples, path = [], as_source(path)
    for row in read_rows(path, ("prompt", "chosen", "rejected")):
        where = row["_where"]
        prompt, chosen, rejected = read_pair(row, path)
        margin = row.get("margin")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
            raise MtcoreError(f'{where}: "margin" must be a number, got {margin!r}')
        examples.append(encode_pair(tokenizer, prompt, chosen, rejected, where, row["_line"], margin, rendered))
    if not examples:
        raise MtcoreError(f"{path}: no pairs")
    return examples


def read_demonstrations(path, tokenizer) -> list[Example]:
    """SFT demonstrations from rows {"prompt": str | messages, "response": str | messages} (read_rows)."""
    examples, path = [], as_source(path)
    for row in read_rows(path, ("prompt", "response")):
        where = row["_where"]
        prompt = prompt_of(row, where, path.prompt)
        ids, n = encode_sequence(tokenizer, prompt, response_of(row, path.response, where, prompt, "--response-field"),
                                 where)
        examples.append(Example(((ids, n),), row["_line"]))
    if not examples:
        raise MtcoreError(f"{path}: no demonstrations")
    return examples


def pack(sizes: list[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: item indices grouped into bins of at most `budget` tokens each.
    Within a bin, items keep their input order (so the packing never changes what is computed)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if sizes[i] > budget:
            raise ValueError(f"an item of {sizes[i]} tokens does not fit a {budget}-token micro-batch")
        for b, r in enumerate(room):
            if sizes[i] <= r:
                bins[b].append(i)
                room[b] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(budget - sizes[i])
    return [sorted(b) for b in bins]


@dataclass
class Batch:
    """The tensors of one micro-batch, S sequences (a pair's chosen at 2j, rejected at 2j + 1).

    packed: tokens [N] back to back, cu_seqlens [S+1] int32, positions [N], max_seqlen;
    padded: tokens [S, T] right-padded with attention_mask [S, T] (for comparisons and benchmarks).
    Either way labels [N'] (N' = N or S*T, flat) hold the next token where it is scored and -100
    elsewhere; seq_bounds [S+1] cut the flat tokens into sequences and last_index [S] is each
    sequence's last real token in the flat order (train.reward_index reads rewards from it).
    """
    tokens: torch.Tensor
    labels: torch.Tensor
    seq_bounds: torch.Tensor
    last_index: torch.Tensor
    index: list[int]  # which examples (by position in the dataset) this batch holds
    n_tokens: int  # real tokens
    margins: torch.Tensor | None = None  # [pairs] fp32, for Bradley-Terry
    cu_seqlens: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    max_seqlen: int = 0
    attention_mask: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in self.__dict__.items()}
        return Batch(**moved)


def _labels(ids: list[int], n_prompt: int) -> list[int]:
    """Position i predicts token i + 1; only response tokens are scored."""
    return [IGNORE_INDEX] * (n_prompt - 1) + ids[n_prompt:] + [IGNORE_INDEX]


def make_batch(examples: list[Example], index: list[int], padded: bool = False) -> Batch:
    """Build the tensors of the micro-batch holding examples[i] for i in index; padded: [S, T], T the
    longest sequence."""
    seqs = [s for i in index for s in examples[i].seqs]
    lens = [len(ids) for ids, _ in seqs]
    margins = None
    if len(examples[index[0]].seqs) == 2:
        margins = torch.tensor([examples[i].margin or 0.0 for i in index], dtype=torch.float32)
    common = dict(index=list(index), n_tokens=sum(lens), margins=margins)
    if not padded:
        cu = torch.tensor([0] + lens).cumsum(0)  # [S+1]
        return Batch(tokens=torch.tensor([t for ids, _ in seqs for t in ids]),
                     labels=torch.tensor([t for ids, n in seqs for t in _labels(ids, n)]),
                     seq_bounds=cu, last_index=cu[1:] - 1, cu_seqlens=cu.to(torch.int32),
                     positions=torch.cat([torch.arange(n) for n in lens]), max_seqlen=max(lens), **common)
    T = max(lens)
    tokens = torch.zeros(len(seqs), T, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for s, (ids, n) in enumerate(seqs):
        tokens[s, :len(ids)] = torch.tensor(ids)
        labels[s, :len(ids)] = torch.tensor(_labels(ids, n))
        mask[s, :len(ids)] = 1
    bounds = torch.arange(len(seqs) + 1) * T  # [S+1]
    return Batch(tokens=tokens, labels=labels.flatten(), seq_bounds=bounds,
                 last_index=bounds[:-1] + torch.tensor(lens) - 1, attention_mask=mask, **common)
