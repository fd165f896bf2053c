"""Generation and scoring, as the stages and commands call them: a model is loaded, used and freed
(only one is in memory at a time). Under torchrun each rank serves its share of the prompts or
micro-batches, and every rank gets all the results.

meter: a profile.Meter that counts the tokens and model FLOPs processed, or None.
"""

from pathlib import Path

import torch

from mtcore import parallel, profile
from mtcore.checkpoint import load_model
from mtcore.config import LoopConfig
from mtcore.data import Example, encode_prompt, encode_response, load_tokenizer, make_batch, pack, stop_ids
from mtcore.device import precision
from mtcore.errors import MtcoreError
from mtcore.model import Llama
from mtcore.progress import Progress
from mtcore.sampler import SamplingParams, generate, response_text, slot_len
from mtcore.train import sequence_rewards


class Sampler:
    """A policy for several sampling calls: its tokenizer now, the model at the first call (a stage
    whose shards are all saved never loads it)."""

    def __init__(self, cfg: LoopConfig, device: torch.device, policy_dir: Path):
        self.cfg, self.device, self.policy_dir = cfg, device, policy_dir
        self.tokenizer = load_tokenizer(policy_dir, cfg.chat_template or None)
        self.stops = tuple(stop_ids(self.tokenizer, policy_dir))  # once, not at every shard
        self.model = None

    def __call__(self, prompts: list, n: int, seed: int, meter=None,
                 prompt_keys: list[int] | None = None, progress=None, should_stop=None) -> list[list[dict] | None]:
        """n responses per prompt: [{"text", "token_ids", "finish_reason"}] per prompt (none for a prompt
        too long for the model). Prompt i draws from the random streams of (seed, prompt_keys[i])
        (default: its index here), so a prompt's samples do not depend on the others or on the ranks.
        Under torchrun each rank samples every world_size-th prompt; all get them all. progress: a
        progress.Progress counting responses (default: one of its own). should_stop: see generate; a
        prompt whose responses were not all finished then is None."""
        cfg, tokenizer = self.cfg, self.tokenizer
        prompt_ids = [encode_prompt(tokenizer, p, f"prompt {i}") for i, p in enumerate(prompts)]
        if self.model is None:
            self.model = load_model(self.policy_dir, "policy", device=self.device).eval()
        params = SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                seed=seed, stop_ids=self.stops)
        out = [r or [] for r in generate_responses(self.model, tokenizer, prompt_ids, params,
                                                    max_len=slot_len(self.model, prompt_ids, params),
                                                    on_overlong="skip",
                                                    kv_budget_bytes=int(cfg.kv_cache_gb * 2**30) or None, leave=False,
                                                    decode_mode=cfg.decode_mode, prompt_keys=prompt_keys,
                                                    decode_steps=cfg.decode_steps, should_stop=should_stop,
                                                    batch_invariant=cfg.batch_invariant,
                                                    progress=progress, log_every=cfg.log_every)]
        out = [None if None in r else r for r in out]  # stopped before all its responses were done
        if meter is not None:
            lens = [len(ids) + len(r["token_ids"]) for ids, rs in zip(prompt_ids, out) for r in rs or ()]
            sampled = sum(len(r["token_ids"]) for rs in out for r in rs or ())  # the head runs for these only
            meter.add(sum(lens), profile.matmul_flops(self.model.args, lens, head_tokens=sampled))
        return out

    def first_answers(self, prompts: list, seed: int, meter=None, prompt_keys: list[int] | None = None,
                      progress=None, should_stop=None) -> list[str | None]:
        """One response text per prompt ("" for a prompt too long for the model; None: not finished when
        should_stop stopped it)."""
        return [None if r is None else r[0]["text"] if r else ""
                for r in self(prompts, 1, seed, meter, prompt_keys, progress, should_stop)]


def sample_responses(cfg: LoopConfig, device: torch.device, policy_dir: Path, prompts: list, n: int, seed: int,
                     meter=None) -> list[list[dict]]:
    """Sampler(...)(prompts, n, seed): one call, the model freed after it."""
    return Sampler(cfg, device, policy_dir)(prompts, n, seed, meter)


def first_answers(cfg: LoopConfig, device: torch.device, policy_dir: Path, prompts: list, seed: int,
                  meter=None) -> list[str]:
    """One response text per prompt ("" for a prompt too long for the model)."""
    return Sampler(cfg, device, policy_dir).first_answers(prompts, seed, meter)


def score_responses(cfg: LoopConfig, device: torch.device, reward_dir: Path, prompts: list, responses: list[list[str]], meter=None) -> list[list[float]]:
    """r(prompt, response) for every response text, read at the last token of the RM's own chat format.
    Under torchrun each rank scores every world_size-th micro-batch; all get every score."""
    return Scorer(cfg, device, reward_dir)(prompts, responses, meter)


class Scorer:
    """A reward model for several score_responses calls: its tokenizer now, the model at the first
    call (a stage whose shards are all saved never loads it)."""

    def __init__(self, cfg: LoopConfig, device: torch.device, reward_dir: Path):
        self.cfg, self.device, self.reward_dir = cfg, device, reward_dir
        self.tokenizer = load_tokenizer(reward_dir, cfg.reward_chat_template or None)
        self.model = None

    def encode(self, prompts: list, responses: list[list[str]]) -> tuple[list[Example], list[tuple[int, int]], int]:
        """(one Example per response, cut to cfg.max_length; its (prompt, response) index; how many were
        cut)."""
        examples, owner, truncated = [], [], 0
        for i, (p, texts) in enumerate(zip(prompts, responses)):
            prompt_ids = encode_prompt(self.tokenizer, p, f"prompt {i}") if texts else []  # once per prompt
            n = len(prompt_ids)
            for j, text in enumerate(texts):
                ids = prompt_ids + encode_response(self.tokenizer, text)  # the sequence rule (data.encode_sequence)
                truncated += len(ids) > self.cfg.max_length
                examples.append(Example(((ids[:self.cfg.max_length], min(n, self.cfg.max_length - 1)),)))
                owner.append((i, j))
        return examples, owner, truncated

    @torch.no_grad()
    def __call__(self, prompts: list, responses: list[list[str]], meter=None, progress=None,
                 should_stop=None) -> list[list[float] | None]:
        """Every response's reward. progress: a progress.Progress counting prompts (default: one of its
        own, counting sequences). should_stop: asked before each micro-batch (preempt.stopping); once it
        says True no more are scored, and a prompt with a response left unscored is None."""
        if self.model is None:
            self.model = load_model(self.reward_dir, "reward", device=self.device).eval()
        cfg, device, model = self.cfg, self.device, self.model
        examples, owner, _ = self.encode(prompts, responses)
        scores = [[0.0] * len(texts) for texts in responses]
        own = progress is None
        bar = Progress(len(examples), "score", "sequences", log_every=cfg.log_every) if own else progress
        ranks = parallel.world_size()  # rank 0 counts its share, times the ranks (they go alike)

        def score(bins):
            out = []
            for index in bins:
                if should_stop is not None and should_stop():
                    out.append(None)
                    continue
                batch = make_batch(examples, index).to(device)
                with precision(device).autocast:
                    out.append(sequence_rewards(model, batch).tolist())
                done = len(index) if own else sum(1 / len(responses[owner[k][0]]) for k in index)  # prompts
                bar.update(done * ranks, tokens=sum(examples[k].n_tokens for k in index) * ranks)
            return out

        longest = max((ex.n_tokens for ex in examples), default=0)
        if longest > cfg.micro_batch_tokens:
            raise MtcoreError(f"a sequence of {longest} tokens does not fit --micro-batch-tokens "
                              f"{cfg.micro_batch_tokens}; raise it to at least {longest}, or lower --max-length")
        # a reward's bits do not follow the others packed with it (train.hidden_states)
        bins = pack([ex.n_tokens for ex in examples], cfg.micro_batch_tokens)
        try:
            scored = parallel.map_shards(score, bins)
        finally:
            if own:
                bar.close()
        for index, rewards in zip(bins, scored):
            for k, r in zip(index, rewards or [None] * len(index)):
                i, j = owner[k]
                scores[i][j] = r
        if meter is not None:
            lens = [ex.n_tokens for ex in examples]
            meter.add(sum(lens), profile.matmul_flops(model.args, lens, head_tokens=0))
        return [None if None in s else s for s in scores]


def generate_responses(model: Llama, tokenizer, prompts: list[list[int]], params: SamplingParams,
                       slots: int | None = None, max_len: int | None = None, on_overlong: str = "error",
                       kv_budget_bytes: int | None = None, leave: bool = True,
                       decode_mode: str = "auto", prompt_keys: list[int] | None = None, progress=None,
                       decode_steps: int = 1, should_stop=None, batch_invariant: bool = False,
                       log_every: float = 30.0) -> list[list[dict] | None]:
    """generate, with progress (responses done and tokens/s: the given progress.Progress, counting the
    responses of every rank, or one of its own), as response dicts {"text", "token_ids", "finish_reason"
    (, "logprobs")} per prompt, in prompt order (None: a prompt skipped as too long). Under torchrun
    each rank samples every world_size-th prompt and every rank gets them all; each prompt keeps its
    random streams (prompt_keys, default its index here), so the samples do not depend on the ranks.
    should_stop: see generate; a response not finished then is None in its prompt's list."""
    keyed = list(zip(range(len(prompts)) if prompt_keys is None else prompt_keys, prompts))
    own = progress is None
    bar = Progress(len(prompts) * params.n, "generate", "responses", log_every=log_every, leave=leave,
                   item_tokens=params.max_new_tokens) if own else progress
    ranks = parallel.world_size()  # rank 0 counts its share, times the ranks (they go alike)

    def step(finished, tokens):  # finished requests: one response each
        bar.update(finished * ranks, tokens=tokens * ranks)

    try:
        results = parallel.map_shards(
            lambda share: generate(model, [p for _, p in share], params, slots=slots, max_len=max_len,
                                   on_overlong=on_overlong, progress=step, kv_budget_bytes=kv_budget_bytes,
                                   decode_mode=decode_mode, prompt_keys=[k for k, _ in share],
                                   decode_steps=decode_steps, should_stop=should_stop,
                                   batch_invariant=batch_invariant),
            keyed)
        if own:
            bar.update_to(len(prompts) * params.n)  # prompts skipped as too long included
    finally:
        if own:
            bar.close()
    stops = set(params.stop_ids)
    out = []
    for completions in results:
        if completions is None:
            out.append(None)
            continue
        responses = []
        for c in completions:
            if c is None:  # not finished: should_stop stopped generate
                responses.append(None)
                continue
            response = {"text": response_text(tokenizer, c, stops), "token_ids": c.token_ids,
                        "finish_reason": c.finish_reason}
            if c.logprobs is not None:
                response["logprobs"] = c.logprobs
            responses.append(response)
        out.append(responses)
    return out


def generate_jsonl(policy: str, prompts_file: str, out_file: str, params: SamplingParams, slots: int | None = None,
                   chat_template: str | None = None, skip_overlong: bool = False, max_len: int | None = None,
                   device=None, dtype=None, kv_budget_bytes: int | None = None, decode_mode: str = "auto",
                   decode_steps: int = 1,
                   log_every: float = 30.0) -> dict:
    """`mtcore generate`: prompts JSONL -> the same rows plus "responses", in order. Returns counts.
    Under torchrun each rank samples every world_size-th prompt and rank 0 writes them all."""
    from mtcore.checkpoint import resolve
    from mtcore.data import as_source, prompt_of, read_rows, write_jsonl

    source = as_source(prompts_file)  # a path, hub id or data.Source: JSONL, Parquet or a dataset
    rows = read_rows(source)
    if not rows:
        raise MtcoreError(f"{source}: no prompts")
    path = resolve(policy)
    tokenizer = load_tokenizer(path, chat_template)
    prompts = [encode_prompt(tokenizer, prompt_of(r, r["_where"], source.prompt), r["_where"]) for r in rows]
    if not params.stop_ids:
        params.stop_ids = tuple(stop_ids(tokenizer, path))
    model = load_model(path, kind="policy", device=device, dtype=dtype).eval()
    max_len = max_len or slot_len(model, prompts, params)
    if not skip_overlong:  # name the file line before any work is done
        for row, p in zip(rows, prompts):
            if len(p) >= max_len:
                raise MtcoreError(f"{row['_where']}: the prompt has {len(p)} tokens, no room in a "
                                  f"{max_len}-token cache slot; shorten it, raise --max-len, or --skip-overlong")
    results = generate_responses(model, tokenizer, prompts, params, slots=slots, max_len=max_len,
                                 on_overlong="skip" if skip_overlong else "error", kv_budget_bytes=kv_budget_bytes,
                                 decode_mode=decode_mode, log_every=log_every, decode_steps=decode_steps)
    skipped = 0
    for row, responses in zip(rows, results):
        if responses is None:
            row["responses"], row["skipped"] = [], "prompt too long"
            skipped += 1
        else:
            row["responses"] = responses
    if parallel.is_main():
        write_jsonl(out_file, rows)
    return {"prompts": len(rows), "skipped": skipped, "responses": (len(rows) - skipped) * params.n}
