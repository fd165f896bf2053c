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
from mtcore.progress import Progress
from mtcore.sampler import SamplingParams, generate_responses, slot_len
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
                 prompt_keys: list[int] | None = None, progress=None) -> list[list[dict]]:
        """n responses per prompt: [{"text", "token_ids", "finish_reason"}] per prompt (none for a prompt
        too long for the model). Prompt i draws from the random streams of (seed, prompt_keys[i])
        (default: its index here), so a prompt's samples do not depend on the others or on the ranks.
        Under torchrun each rank samples every world_size-th prompt; all get them all. progress: a
        progress.Progress counting prompts (default: one of its own)."""
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
                                                    decode_steps=cfg.decode_steps,
                                                    progress=progress, log_every=cfg.log_every)]
        if meter is not None:
            lens = [len(ids) + len(r["token_ids"]) for ids, rs in zip(prompt_ids, out) for r in rs]
            sampled = sum(len(r["token_ids"]) for rs in out for r in rs)  # the head runs for these only
            meter.add(sum(lens), profile.matmul_flops(self.model.args, lens, head_tokens=sampled))
        return out

    def first_answers(self, prompts: list, seed: int, meter=None, prompt_keys: list[int] | None = None,
                      progress=None) -> list[str]:
        """One response text per prompt ("" for a prompt too long for the model)."""
        return [r[0]["text"] if r else "" for r in self(prompts, 1, seed, meter, prompt_keys, progress)]


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
        self.truncated = 0  # sequences cut to cfg.max_length, over every call

    @torch.no_grad()
    def __call__(self, prompts: list, responses: list[list[str]], meter=None, progress=None) -> list[list[float]]:
        """Every response's reward. progress: a progress.Progress counting prompts (default: one of its
        own, counting sequences)."""
        if self.model is None:
            self.model = load_model(self.reward_dir, "reward", device=self.device).eval()
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
        own = progress is None
        bar = Progress(len(examples), "score", "sequences", log_every=cfg.log_every) if own else progress
        ranks = parallel.world_size()  # rank 0 counts its share, times the ranks (they go alike)

        def score(bins):
            out = []
            for index in bins:
                batch = make_batch(examples, index).to(device)
                with precision(device).autocast:
                    out.append(sequence_rewards(model, batch).tolist())
                done = len(index) if own else sum(1 / len(responses[owner[k][0]]) for k in index)  # prompts
                bar.update(done * ranks, tokens=batch.n_tokens * ranks)
            return out

        longest = max((ex.n_tokens for ex in examples), default=0)
        if longest > cfg.micro_batch_tokens:
            raise MtcoreError(f"a sequence of {longest} tokens does not fit --micro-batch-tokens "
                              f"{cfg.micro_batch_tokens}; raise it to at least {longest}, or lower --max-length")
        bins = pack([ex.n_tokens for ex in examples], cfg.micro_batch_tokens)
        try:
            scored = parallel.map_shards(score, bins)
        finally:
            if own:
                bar.close()
        for index, rewards in zip(bins, scored):
            for k, r in zip(index, rewards):
                i, j = owner[k]
                scores[i][j] = r
        if meter is not None:
            lens = [ex.n_tokens for ex in examples]
            meter.add(sum(lens), profile.matmul_flops(model.args, lens, head_tokens=0))
        return scores
