"""The KV-cache batch sampler: continuous batching over a fixed set of cache slots.

- KVCache: per layer K and V of [slots, max_len, n_kv_heads, head_dim], preallocated; each slot
  holds one sequence and its own length. Nothing ever attends past a slot's length, so padding is
  never seen.
- prefill: the prompts of the requests that just got slots, packed (cu_seqlens) through the model;
  each prompt's K/V are written once into every slot that samples from it (n samples of a prompt
  share one prefill).
- decode_step: one token for every slot, each at its own position, attending to its own prefix.
- sample: greedy (temperature 0), temperature, top-k, top-p.
- generate: the scheduler. Requests (prompt, sample) wait in a queue far longer than the slot count;
  when a sequence stops (a stop id or max_new_tokens) its slot takes the next request.

The model's modules are reused as they are (embedding, norms, Attention.qkv, o_proj, MLP, head);
model.py knows nothing of caches. Greedy results do not depend on the slot count or queue order
beyond floating-point noise; sampled results are reproducible for a given seed and slot count.
"""

import logging
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mtcore.errors import MtcoreError
from mtcore.model import Llama, _flash_attn, attend, flash_attn_usable, make_layout, packed_positions, rope_cos_sin

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    n: int = 1  # samples per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    logprobs: bool = False  # also return each sampled token's log-prob under the model (temperature 1)

    def __post_init__(self):
        if self.n < 1 or self.max_new_tokens < 1:
            raise MtcoreError(f"n and max_new_tokens must be >= 1, got {self.n} and {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise MtcoreError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {self.temperature}, "
                              f"{self.top_p}, {self.top_k}")


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop id, included in token_ids) or "length"
    logprobs: list[float] | None = None


class KVCache:
    def __init__(self, model: Llama, slots: int, max_len: int):
        a = model.args
        p = next(model.parameters())
        shape = (a.n_layers, slots, max_len, a.n_kv_heads, a.head_dim)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.lens = torch.zeros(slots, dtype=torch.long, device=p.device)  # tokens held per slot
        self.slots, self.max_len = slots, max_len

    @staticmethod
    def slots_for(model: Llama, budget_bytes: int, max_len: int) -> int:
        """How many slots of max_len tokens fit a K+V budget in bytes (at least one)."""
        a = model.args
        per_token = 2 * a.n_layers * a.n_kv_heads * a.head_dim * next(model.parameters()).element_size()
        return max(1, budget_bytes // (max_len * per_token))


def _block(layer, x, cos, sin, cache_and_attend):
    """One transformer block as Block.forward computes it, with attention replaced by a function of
    (q, k, v) that also writes the K/V cache."""
    attn = layer.self_attn
    q, k, v = attn.qkv(layer.input_layernorm(x), cos, sin)
    x = x + attn.o_proj(cache_and_attend(q, k, v).flatten(-2))
    return x + layer.mlp(layer.post_attention_layernorm(x))


@torch.no_grad()
def prefill(model: Llama, cache: KVCache, prompts: list[list[int]], slots: list[list[int]]) -> torch.Tensor:
    """Run prompts (packed) through the model, write each prompt's K/V into all of its slots.

    prompts[p]: token ids; slots[p]: the cache slots that sample from prompt p.
    Returns the last-position logits, [len(prompts), V] fp32.
    """
    device = cache.k.device
    lens = [len(p) for p in prompts]
    cu_seqlens = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)  # [P+1]
    tokens = torch.tensor([t for p in prompts for t in p], device=device)  # [N]
    positions = packed_positions(cu_seqlens)  # [N]
    # Where each token's K/V goes: (slot, position) for every slot of its prompt.
    src, dst_slot = [], []
    for p, (start, n) in enumerate(zip(cu_seqlens[:-1].tolist(), lens)):
        for s in slots[p]:
            src.extend(range(start, start + n))
            dst_slot.extend([s] * n)
    src = torch.tensor(src, device=device)
    dst_slot = torch.tensor(dst_slot, device=device)
    dst_pos = positions[src]

    body = model.model
    x = body.embed_tokens(tokens)  # [N, dim]
    cos, sin = rope_cos_sin(body.inv_freq(device), positions, x.dtype)
    layout = make_layout(x, cu_seqlens, max(lens))
    for i, layer in enumerate(body.layers):
        def cache_and_attend(q, k, v, i=i):  # q [N, H, D]; called within this iteration
            cache.k[i, dst_slot, dst_pos] = k[src]
            cache.v[i, dst_slot, dst_pos] = v[src]
            return attend(q, k, v, layout)
        x = _block(layer, x, cos, sin, cache_and_attend)
    for p, n in enumerate(lens):
        cache.lens[slots[p]] = n
    last = body.norm(x[cu_seqlens[1:].long() - 1])  # [P, dim]
    return model.lm_head(last).float()


@torch.no_grad()
def decode_step(model: Llama, cache: KVCache, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """One token for every slot: tokens [S] at position cache.lens. Returns logits [S, V] fp32.

    Inactive slots run too (static shapes) but write at position 0 and are never read. On CUDA with
    flash-attn, flash_attn_with_kvcache appends the new K/V and attends in one call; otherwise the
    cache is written here and SDPA attends under a per-slot length mask."""
    S = cache.slots
    pos = torch.where(active, cache.lens, 0)  # [S]
    if int(pos.max()) >= cache.max_len:
        raise RuntimeError("KV cache overflow: a slot is full")  # generate() sizes the cache so it cannot
    kv_len = int(pos.max()) + 1
    body = model.model
    x = body.embed_tokens(tokens[:, None])  # [S, 1, dim]
    cos, sin = rope_cos_sin(body.inv_freq(x.device), pos[:, None], x.dtype)  # [S, 1, D]
    mask = (torch.arange(kv_len, device=x.device)[None, :] <= pos[:, None])[:, None, None, :]  # [S, 1, 1, kv_len]
    rows = torch.arange(S, device=x.device)
    flash = _flash_attn() if flash_attn_usable(x) else None
    seqlens = pos.to(torch.int32)
    for i, layer in enumerate(body.layers):
        def cache_and_attend(q, k, v, i=i):  # q [S, 1, Hq, D] -> [S, 1, Hq, D]
            if flash is not None:  # writes k, v at seqlens into the cache in place, attends to [0, seqlens]
                return flash.flash_attn_with_kvcache(q, cache.k[i], cache.v[i], k=k, v=v, cache_seqlens=seqlens,
                                                     causal=True)
            cache.k[i, rows, pos] = k[:, 0]
            cache.v[i, rows, pos] = v[:, 0]
            keys = cache.k[i, :, :kv_len].transpose(1, 2)  # [S, Hkv, kv_len, D]
            values = cache.v[i, :, :kv_len].transpose(1, 2)
            return F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                                  enable_gqa=True).transpose(1, 2)
        x = _block(layer, x, cos, sin, cache_and_attend)  # [S, 1, dim]
    cache.lens += active.long()
    return model.lm_head(body.norm(x[:, 0])).float()


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """logits [R, V] fp32 -> token ids [R]. Order as transformers: temperature, top-k, top-p.

    Top-p without sorting the vocabulary: draw from the (top-k) distribution by inverse CDF, and keep
    the draw if it lies in the nucleus (the probability mass strictly above it is < top_p); redraw the
    rows that do not. Rejection from p restricted to a set samples p renormalised on that set, so
    this is the nucleus distribution exactly, at a cost of a few passes over [R, V] instead of a sort
    (a sort was 70% of sampling time on CPU). A draw is rejected with probability <= 1 - top_p.
    """
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]  # [R, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)  # [R, V]
    cdf = probs.cumsum(-1)  # [R, V]
    tokens = _draw(probs, cdf, params.top_p, generator)
    while params.top_p < 1.0:
        redo = (tokens < 0).nonzero().squeeze(1)  # rows whose draw fell outside the nucleus
        if not redo.numel():
            break
        tokens[redo] = _draw(probs[redo], cdf[redo], params.top_p, generator)
    return tokens


def _draw(probs, cdf, top_p, generator):
    """One inverse-CDF draw per row; -1 where the draw lies outside the top_p nucleus."""
    u = torch.rand(probs.shape[0], 1, generator=generator).to(probs.device) * cdf[:, -1:]
    draw = torch.searchsorted(cdf, u).squeeze(1).clamp_(max=probs.shape[1] - 1)  # [R]
    if top_p >= 1.0:
        return draw
    p_draw = probs.gather(1, draw[:, None])  # [R, 1]
    mass_above = torch.where(probs > p_draw, probs, 0.0).sum(-1)  # [R]
    return torch.where(mass_above < top_p, draw, -1)


@dataclass
class _Slot:
    request: int = -1  # index into the request list; -1 = free
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)


def slot_len(model: Llama, prompts: list[list[int]], params: SamplingParams) -> int:
    """Default tokens per cache slot: the longest prompt plus max_new_tokens, within the model's context."""
    longest = max((len(p) for p in prompts), default=1)
    return min(longest + params.max_new_tokens, model.args.max_position_embeddings)


def generate(model: Llama, prompts: list[list[int]], params: SamplingParams, slots: int | None = None,
             max_len: int | None = None, on_overlong: str = "error", progress=None,
             kv_budget_bytes: int = 2 * 2**30) -> list[list[Completion] | None]:
    """Sample params.n completions for each prompt (token ids). Returns, in prompt order, a list of n
    Completions per prompt, or None for a prompt skipped as too long (on_overlong="skip").

    slots: concurrent sequences (default: as many as kv_budget_bytes of K/V cache holds, at most one
    per request). max_len: tokens per slot
    (default: longest prompt + max_new_tokens, capped at the model's max_position_embeddings).
    progress: called with the number of requests finished at each step (for a progress bar).
    """
    if on_overlong not in ("error", "skip"):
        raise ValueError("on_overlong must be 'error' or 'skip'")
    max_len = max_len or slot_len(model, prompts, params)
    keep = []
    for i, p in enumerate(prompts):
        if not p:
            raise MtcoreError(f"prompt {i}: empty")
        if len(p) >= max_len:  # room for at least one generated token
            if on_overlong == "error":
                raise MtcoreError(f"prompt {i}: {len(p)} tokens leave no room in a {max_len}-token cache slot; "
                                  f"shorten it, raise the limit, or skip over-long prompts")
            log.warning("prompt %d: %d tokens, too long for a %d-token slot; skipped", i, len(p), max_len)
            continue
        keep.append(i)
    requests = [(i, j) for i in keep for j in range(params.n)]
    results: list[list[Completion] | None] = [None] * len(prompts)
    for i in keep:
        results[i] = [None] * params.n
    if not requests:
        return results
    n_slots = min(slots or KVCache.slots_for(model, kv_budget_bytes, max_len), len(requests))
    cache = KVCache(model, n_slots, max_len)
    device = cache.k.device
    generator = torch.Generator(device="cpu").manual_seed(params.seed)
    stop = set(params.stop_ids)
    queue = deque(range(len(requests)))
    state = [_Slot() for _ in range(n_slots)]
    last = torch.zeros(n_slots, dtype=torch.long, device=device)
    active = torch.zeros(n_slots, dtype=torch.bool, device=device)

    def accept(slot_ids: list[int], logits: torch.Tensor) -> int:
        """Sample one token for each slot from its logits row; finish the slots that stop. One
        device-to-host copy of the tokens, one write of `last` and one of `active` per step."""
        tokens = sample(logits, params, generator)
        last[slot_ids] = tokens
        logps = logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1).tolist() if params.logprobs else None
        finished = []
        for row, (s, token) in enumerate(zip(slot_ids, tokens.tolist())):
            st = state[s]
            st.tokens.append(token)
            if logps is not None:
                st.logprobs.append(logps[row])
            prompt_len = len(prompts[requests[st.request][0]])
            reason = "stop" if token in stop else (
                "length" if len(st.tokens) >= params.max_new_tokens or prompt_len + len(st.tokens) >= max_len
                else None)
            if reason:
                i, j = requests[st.request]
                results[i][j] = Completion(st.tokens, reason, st.logprobs if params.logprobs else None)
                state[s] = _Slot()
                finished.append(s)
        if finished:
            active[finished] = False
        return len(finished)

    while queue or bool(active.any()):
        free = [s for s in range(n_slots) if state[s].request < 0]
        if free and queue:
            groups: dict[int, list[int]] = {}  # prompt -> newly assigned slots
            for s in free[:len(queue)]:
                r = queue.popleft()
                state[s].request = r
                groups.setdefault(requests[r][0], []).append(s)
            order = list(groups)
            logits = prefill(model, cache, [prompts[i] for i in order], [groups[i] for i in order])
            slot_ids = [s for i in order for s in groups[i]]
            rows = torch.tensor([k for k, i in enumerate(order) for _ in groups[i]], device=device)
            active[slot_ids] = True
            finished = accept(slot_ids, logits[rows])
            if progress and finished:
                progress(finished)
            continue  # refill the slots that finished at once, before the next decode step
        slot_ids = active.nonzero().squeeze(1).tolist()
        logits = decode_step(model, cache, last, active)
        finished = accept(slot_ids, logits[slot_ids])
        if progress and finished:
            progress(finished)
    return results


def response_text(tokenizer, completion: Completion, stops: set[int]) -> str:
    """A completion's text: its tokens without the stop id that ended it, decoded exactly.

    clean_up_tokenization_spaces is passed False: Llama-3's tokenizer_config sets it True, which strips
    spaces before punctuation in transformers 4.x ("a , b" -> "a, b"), so the RM would score other
    tokens than the policy wrote; transformers 5 ignores it but warns at every decode."""
    ids = completion.token_ids
    if completion.finish_reason == "stop" and ids[-1] in stops:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def generate_responses(model: Llama, tokenizer, prompts: list[list[int]], params: SamplingParams,
                       slots: int | None = None, max_len: int | None = None, on_overlong: str = "error",
                       kv_budget_bytes: int = 2 * 2**30, leave: bool = True) -> list[list[dict] | None]:
    """generate, with a progress bar, as response dicts {"text", "token_ids", "finish_reason"
    (, "logprobs")} per prompt, in prompt order (None: a prompt skipped as too long). Under torchrun
    each rank samples every world_size-th prompt (seed + rank) and every rank gets them all."""
    from dataclasses import replace

    from tqdm import tqdm

    from mtcore import parallel

    mine = replace(params, seed=params.seed + parallel.rank())  # world size 1: params as given
    with tqdm(total=len(prompts[parallel.rank()::parallel.world_size()]) * params.n, desc="generate", unit="seq",
              disable=parallel.progress_disabled(), leave=leave) as bar:
        results = parallel.map_shards(
            lambda share: generate(model, share, mine, slots=slots, max_len=max_len, on_overlong=on_overlong,
                                   progress=bar.update, kv_budget_bytes=kv_budget_bytes), prompts)
    stops = set(params.stop_ids)
    out = []
    for completions in results:
        if completions is None:
            out.append(None)
            continue
        responses = []
        for c in completions:
            response = {"text": response_text(tokenizer, c, stops), "token_ids": c.token_ids,
                        "finish_reason": c.finish_reason}
            if c.logprobs is not None:
                response["logprobs"] = c.logprobs
            responses.append(response)
        out.append(responses)
    return out


def generate_jsonl(policy: str, prompts_file: str, out_file: str, params: SamplingParams, slots: int | None = None,
                   chat_template: str | None = None, skip_overlong: bool = False, max_len: int | None = None,
                   device=None, dtype=None, kv_budget_bytes: int = 2 * 2**30) -> dict:
    """`mtcore generate`: prompts JSONL -> the same rows plus "responses", in order. Returns counts.
    Under torchrun each rank samples every world_size-th prompt (seed + rank) and rank 0 writes them all."""
    from mtcore import parallel
    from mtcore.checkpoint import load_model, resolve
    from mtcore.data import encode_prompt, load_tokenizer, prompt_of, read_jsonl, stop_ids, write_jsonl

    rows = read_jsonl(prompts_file)
    if not rows:
        raise MtcoreError(f"{prompts_file}: no prompts")
    path = resolve(policy)
    tokenizer = load_tokenizer(path, chat_template)
    prompts = [encode_prompt(tokenizer, prompt_of(r, f"{prompts_file}:{r['_line']}"), f"{prompts_file}:{r['_line']}")
               for r in rows]
    if not params.stop_ids:
        params.stop_ids = tuple(stop_ids(tokenizer, path))
    model = load_model(path, kind="policy", device=device, dtype=dtype).eval()
    max_len = max_len or slot_len(model, prompts, params)
    if not skip_overlong:  # name the file line before any work is done
        for row, p in zip(rows, prompts):
            if len(p) >= max_len:
                raise MtcoreError(f"{prompts_file}:{row['_line']}: the prompt has {len(p)} tokens, no room in a "
                                  f"{max_len}-token cache slot; shorten it, raise --max-len, or --skip-overlong")
    results = generate_responses(model, tokenizer, prompts, params, slots=slots, max_len=max_len,
                                 on_overlong="skip" if skip_overlong else "error", kv_budget_bytes=kv_budget_bytes)
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
