"""The KV-cache batch sampler: continuous batching over a fixed set of cache slots.

- KVCache: per layer K and V of [slots, max_len, n_kv_heads, head_dim], preallocated (batch-invariant:
  row_length(max_len) columns, mtcore/invariant.py). On CUDA the slot count comes from the memory left
  after the weights (cache_budget); each slot holds one sequence.
- prefill: the prompts of newly admitted requests, packed (cu_seqlens) through the model's own blocks;
  each prompt's K/V are written once into every slot that samples from it (n samples of a prompt share
  one prefill). Refills are batched: freed slots wait until enough of them have freed (or a few steps)
  and are prefilled together.
- decode_step: one token for each row (slot), at its own position, attending to its own filled prefix
  through kernels/decode_attention.py (Triton on CUDA: each KV head read once, in the cache's dtype).
- sample: greedy, temperature, top-k, top-p, on the logits' device, each row from its own random stream.
- generate: the scheduler, as small functions (admit, refill, decode, accept) over a SlotBatch that holds
  the slots' state on the host. The host knows every slot's length without reading the device; the
  one device-to-host copy per step is the sampled tokens, for the stop checks.

Decode modes (DECODE_MODES), all giving the same tokens:
- auto (the default): graphs on CUDA, eager elsewhere;
- eager: each step runs the active slots only, over the columns up to the longest;
- compile: the static step (every slot, every column: the same shapes at every step) through
  torch.compile(fullgraph=True), the decode attention as one opaque operator; inductor fuses the
  element-wise work;
- graphs: the static step captured once as a CUDA graph and replayed (CUDA only). On an H100
  (bench/results/gpu_nvidia-h100-80gb-hbm3_20261127.md) it gave eager's tokens and ran 3.6x faster
  on the Llama-3.2-1B shape and 2.1x on Llama-3-8B's, at 64 slots: eager's step is bound by the host;
- compile-graphs: the compiled static step, captured as a CUDA graph (CUDA only).
On CUDA, eager and graphs run mtcore's fused kernels (decode_ops_for): the residual add with each
RMSNorm, rotary with the K/V cache write, SiLU with the multiply; generate merges q/k/v and gate/up
into one GEMM each (model.merge_projections) in every mode.

decode_steps K > 1 runs K steps per visit of the host (mtcore/decode_blocks.py); in the static modes
the host also runs one block behind the device (pipelined). 0 chooses K from the first steps' times.

The model's modules are reused as they are: each Block is handed an attention function that also
writes the cache (model.py knows nothing of caches). Greedy results do not depend on the slot count,
the mode or queue order beyond floating-point noise. Sampled ones draw from one counter-based random
stream per request (mtcore/draws.py): for a seed they do not depend on the slot count, the ranks or
the order either, on one kind of device.
"""

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from mtcore.config import DECODE_MODES, batch_invariant_fits
from mtcore.decode_blocks import FIELDS, SlotState, StepTimer, choose_steps, run_block
from mtcore.draws import Draws, request_word
from mtcore.errors import MtcoreError
from mtcore.invariant import ROW_MULTIPLE, attention_by_width, pad_rows
from mtcore.kernels.decode_attention import decode_attention, decode_attention_for, decode_attention_opaque
from mtcore.kernels.add_rms_norm import add_rms_norm
from mtcore.kernels.rope_cache import rope_cache, rope_cache_ref
from mtcore.kernels.silu_mul import silu_mul
from mtcore.model import (LayerOps, Llama, add_norm, apply_rope, attend, make_layout, merge_projections,
                          packed_positions, rope_cos_sin, row_length)
from mtcore.sampling import sample

log = logging.getLogger(__name__)

CPU_CACHE_BYTES = 2 * 2**30  # the K/V budget off CUDA
RESERVE_FRACTION = 0.15  # of a GPU's memory kept beside the cache: prefill activations, logits, fragmentation
MIN_RESERVE_BYTES = 2 * 2**30
MAX_SLOTS = 256  # the default cap on concurrent sequences on CUDA
PREFILL_TOKENS = 16384  # prompt tokens per prefill forward (bounds its activations)
REFILL_EVERY = 8  # decode steps a freed slot may wait for others before a refill
REFILL_FRACTION = 8  # ... or until 1/REFILL_FRACTION of the slots are free


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
        shape = (slots, max_len, a.n_kv_heads, a.head_dim)
        # One tensor per layer, written in place with index_put_: under torch.compile, a write into a
        # view of one [layers, ...] tensor became a copy of the whole layer's cache at every step.
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(a.n_layers)]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(a.n_layers)]
        self.device = p.device
        self.inv_freq = model.model.inv_freq(p.device)  # [head_dim // 2]
        self.slots, self.max_len = slots, max_len
        self.row_multiple = 1  # ROW_MULTIPLE where generate is batch-invariant

    @staticmethod
    def bytes_per_token(model: Llama) -> int:
        a = model.args
        return 2 * a.n_layers * a.n_kv_heads * a.head_dim * next(model.parameters()).element_size()

    @staticmethod
    def slots_for(model: Llama, budget_bytes: int, max_len: int) -> int:
        """How many slots of max_len tokens fit a K+V budget in bytes (at least one)."""
        return max(1, budget_bytes // (max_len * KVCache.bytes_per_token(model)))


def cache_budget(device: torch.device) -> int:
    """Bytes the K/V cache may take: on CUDA, the free memory now (after the weights) less a reserve of
    max(RESERVE_FRACTION of the GPU, MIN_RESERVE_BYTES); elsewhere CPU_CACHE_BYTES."""
    if device.type != "cuda":
        return CPU_CACHE_BYTES
    torch.cuda.empty_cache()  # what the allocator holds unused (after a training stage: most of it) is free too
    free, total = torch.cuda.mem_get_info(device)
    return max(0, free - max(int(RESERVE_FRACTION * total), MIN_RESERVE_BYTES))


def slot_count(model: Llama, max_len: int, requests: int, slots: int | None = None,
               kv_budget_bytes: int | None = None, device: torch.device | None = None) -> int:
    """Concurrent sequences: `slots` if given, else what the budget (default cache_budget) holds, on CUDA
    at most MAX_SLOTS (past which a decode step gains little); never more than the requests. (On the CPU
    more rows make the GEMMs more efficient, so only the budget limits them.)"""
    if slots is None:
        device = device or next(model.parameters()).device
        slots = KVCache.slots_for(model, cache_budget(device) if kv_budget_bytes is None else kv_budget_bytes,
                                  max_len)
        if device.type == "cuda":
            slots = min(MAX_SLOTS, slots)
    return max(1, min(slots, requests))


@dataclass
class _LayerCache:
    """What one block's attention function needs: that layer's K and V, and where the step's tokens go."""
    k: torch.Tensor  # [S, L, Hkv, D]
    v: torch.Tensor
    slots: torch.Tensor  # [R] (decode) or [M] (prefill: one entry per token written)
    pos: torch.Tensor  # same shape as slots: the column each K/V is written at
    src: torch.Tensor | None = None  # prefill: the packed token each entry writes
    layout: object = None  # prefill: the packed AttnLayout
    kv_len: int = 0  # decode: columns read
    attention: object = None  # decode: decode_attention or decode_attention_ref
    rope_write: object = None  # decode: rope_cache or rope_cache_ref (rotary, and the K/V written)
    all_slots: bool = False  # decode: row r is slot r, for every slot (attention reads the cache in place)


def _prefill_attend(q, k, v, cos, sin, c: _LayerCache):
    """q [N, Hq, D], k, v [N, Hkv, D] packed: rotary, write each prompt's K/V into its slots, attend packed."""
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    c.k.index_put_((c.slots, c.pos), k[c.src])
    c.v.index_put_((c.slots, c.pos), v[c.src])
    return attend(q, k, v, c.layout)


def _decode_attend(q, k, v, cos, sin, c: _LayerCache):
    """q [R, Hq, D], k, v [R, Hkv, D], cos, sin [R, D]: rotary, write the new K/V at each row's position
    (rope_cache: one Triton kernel for both on CUDA), attend to the row's prefix."""
    q = c.rope_write(q, k, v, cos, sin, c.k, c.v, c.slots, c.pos)  # [R, Hq, D]
    slots = None if c.all_slots else c.slots
    return c.attention(q, c.k[:, :c.kv_len], c.v[:, :c.kv_len], slots, c.pos + 1)


def _fused_add_norm(x, residual, norm):
    return add_rms_norm(x, residual, norm.weight, norm.eps)


PREFILL_OPS = LayerOps(attend=_prefill_attend)
DECODE_OPS = {"torch": LayerOps(attend=_decode_attend),
              "fused": LayerOps(attend=_decode_attend, add_norm=_fused_add_norm, silu_mul=silu_mul)}


def decode_ops_for(device: torch.device, mode: str) -> str:
    """Which element-wise operations a decode step runs: the fused Triton kernels (mtcore/kernels/
    add_rms_norm.py, rope_cache.py, silu_mul.py) on CUDA, except under torch.compile, which fuses the
    torch ones itself; the torch operations elsewhere (the interpreter would be far slower; tests run
    the kernels explicitly)."""
    return "fused" if device.type == "cuda" and "compile" not in mode else "torch"


def _to_device(values: list[int], device, out: torch.Tensor | None = None) -> torch.Tensor:
    """A host list as a device tensor (or copied into `out`) without a host sync: pinned memory and a
    non-blocking copy on CUDA."""
    t = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        t = t.pin_memory()
    if out is not None:
        return out.copy_(t, non_blocking=True)
    return t.to(device, non_blocking=True) if device.type == "cuda" else t


@torch.no_grad()
def prefill(model: Llama, cache: KVCache, prompts: list[list[int]], slots: list[list[int]]) -> torch.Tensor:
    """Run prompts (packed) through the model, write each prompt's K/V into all of its slots. prompts[p]: token
    ids; slots[p]: the cache slots that sample from prompt p. Returns the last logits [len(prompts), V] fp32."""
    device, n_prompts, extra = cache.device, len(prompts), -sum(map(len, prompts)) % cache.row_multiple
    if extra:  # a packed sequence more, of padding, written nowhere (pad_rows)
        prompts, slots = prompts + [[0] * extra], slots + [[]]
    lens = [len(p) for p in prompts]
    starts = [0, *itertools.accumulate(lens)]
    src = [t for p, n in enumerate(lens) for _ in slots[p] for t in range(starts[p], starts[p] + n)]
    dst_slot = [s for p, n in enumerate(lens) for s in slots[p] for _ in range(n)]
    dst_pos = [i for p, n in enumerate(lens) for _ in slots[p] for i in range(n)]
    cu_seqlens = _to_device(starts, device).to(torch.int32)  # [P+1]
    tokens = _to_device([t for p in prompts for t in p], device)  # [N]
    src, dst_slot, dst_pos = (_to_device(x, device) for x in (src, dst_slot, dst_pos))
    body = model.model
    x = body.embed_tokens(tokens)  # [N, dim]
    cos, sin = rope_cos_sin(cache.inv_freq, packed_positions(cu_seqlens), x.dtype)
    layout = make_layout(x, cu_seqlens, max(lens))
    residual = None
    for i, layer in enumerate(body.layers):
        x, residual = layer(x, residual, cos, sin, _LayerCache(cache.k[i], cache.v[i], dst_slot, dst_pos, src, layout),
                            PREFILL_OPS)
    last = cu_seqlens[1:n_prompts + 1].long() - 1  # [P]
    hidden = pad_rows(add_norm(x[last], residual[last], body.norm)[1], cache.row_multiple)  # [P', dim]
    return model.lm_head(hidden)[:n_prompts].float()  # [P, V]


@torch.no_grad()
def decode_step(model: Llama, cache: KVCache, tokens: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor,
                kv_len: int, attention=decode_attention, ops: str = "torch") -> torch.Tensor:
    """One token for each row: tokens [R] into cache slots [R] (distinct, increasing) at columns pos [R],
    each attending to its slot's first pos + 1 columns (of the kv_len read). Returns logits [R, V] fp32.
    No host sync: shapes depend on R and kv_len only, so with R = every slot and kv_len = max_len the
    step is static. With every slot, attention reads the cache in place (no gather of the rows' slots).
    ops: "torch", or "fused" (the Triton kernels of decode_ops_for)."""
    body, layer_ops, rows = model.model, DECODE_OPS[ops], len(tokens)
    rope_write = rope_cache if ops == "fused" else rope_cache_ref
    tokens, slots, pos = (pad_rows(t, cache.row_multiple) for t in (tokens, slots, pos))  # row 0's work again
    all_slots = rows == cache.slots and cache.row_multiple == 1  # (batch-invariant: no in-place read)
    x, residual = body.embed_tokens(tokens), None  # [R, dim]
    cos, sin = rope_cos_sin(cache.inv_freq, pos, x.dtype)  # [R, head_dim]
    for i, layer in enumerate(body.layers):
        c = _LayerCache(cache.k[i], cache.v[i], slots, pos, kv_len=kv_len, attention=attention,
                        rope_write=rope_write, all_slots=all_slots)
        x, residual = layer(x, residual, cos, sin, c, layer_ops)  # [R, dim] each
    return model.lm_head(layer_ops.add_norm(x, residual, body.norm)[1])[:rows].float()


def slot_len(model: Llama, prompts: list[list[int]], params: SamplingParams) -> int:
    """Default tokens per cache slot: the longest prompt plus max_new_tokens, within the model's context."""
    longest = max((len(p) for p in prompts), default=1)
    return min(longest + params.max_new_tokens, model.args.max_position_embeddings)


@dataclass
class SlotBatch:
    """The scheduler's view of the cache slots, on the host; `last` is the one device-side piece."""
    last: torch.Tensor  # [S] the token each slot feeds to the next decode step
    request: list[int] = field(default_factory=list)  # per slot: index into the requests; -1 = free
    prompt_len: list[int] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)  # generated so far
    logprobs: list[list[float]] = field(default_factory=list)
    word: list[int] = field(default_factory=list)  # per slot: its request's random stream (draws.request_word)
    idle_steps: int = 0  # decode steps run while a slot was free and requests waited

    @classmethod
    def empty(cls, slots: int, device) -> "SlotBatch":
        return cls(torch.zeros(slots, dtype=torch.long, device=device), [-1] * slots, [0] * slots,
                   [[] for _ in range(slots)], [[] for _ in range(slots)], [0] * slots)

    def free(self) -> list[int]:
        return [s for s, r in enumerate(self.request) if r < 0]

    def active(self) -> list[int]:
        return [s for s, r in enumerate(self.request) if r >= 0]

    def position(self, s: int) -> int:
        """The cache column slot s's last sampled token goes to (it is not in the cache yet)."""
        return self.prompt_len[s] + len(self.tokens[s]) - 1


@dataclass
class _Job:
    """What one generate call is doing: its requests (prompt, sample), parameters and results."""
    prompts: list[list[int]]
    requests: list[tuple[int, int]]
    params: SamplingParams
    max_len: int
    results: list
    prompt_keys: list[int]  # per prompt: the key of its random streams (its index in the caller's whole list)
    stops: set[int]


def admit(batch: SlotBatch, queue: deque, job: _Job) -> dict[int, list[int]]:
    """Give free slots to waiting requests: {prompt index: its newly assigned slots}."""
    groups: dict[int, list[int]] = {}
    for s in batch.free()[:len(queue)]:
        r = queue.popleft()
        prompt, sample_index = job.requests[r]
        batch.request[s], batch.prompt_len[s] = r, len(job.prompts[prompt])
        batch.tokens[s], batch.logprobs[s] = [], []
        batch.word[s] = request_word(job.params.seed, job.prompt_keys[prompt], sample_index)
        groups.setdefault(prompt, []).append(s)
    return groups


def refill(model: Llama, cache: KVCache, groups: dict[int, list[int]], job: _Job) -> tuple[list[int], torch.Tensor]:
    """Prefill the admitted prompts, PREFILL_TOKENS at a time: (slot ids, their next-token logits [R, V])."""
    order, chunk, chunks = list(groups), [], []
    for i in order:
        if chunk and sum(len(job.prompts[j]) for j in chunk) + len(job.prompts[i]) > PREFILL_TOKENS:
            chunks.append(chunk)
            chunk = []
        chunk.append(i)
    chunks.append(chunk)
    logits = torch.cat([prefill(model, cache, [job.prompts[i] for i in c], [groups[i] for i in c]) for c in chunks])
    rows = _to_device([k for k, i in enumerate(order) for _ in groups[i]], logits.device)
    return [s for i in order for s in groups[i]], logits[rows]


def accept(batch: SlotBatch, slot_ids: list[int], logits: torch.Tensor, job: _Job) -> int:
    """Sample a token for each slot from its logits row; finish the slots that stop. The tokens (and
    log-probs) come to the host in one copy, the step's only sync. Returns the number finished."""
    params = job.params
    draws = None if params.temperature == 0 else Draws(
        _to_device([[batch.word[s], len(batch.tokens[s])] for s in slot_ids], logits.device))  # [R, 2]
    tokens = sample(logits, params, draws)  # [R]
    batch.last[_to_device(slot_ids, tokens.device)] = tokens
    if params.logprobs:
        logps = logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)  # [R]
        host = torch.stack([tokens.double(), logps.double()], 1).tolist()
    else:
        host = [[t] for t in tokens.tolist()]
    return sum(take_token(batch, s, int(row[0]), row[1] if params.logprobs else None, job)
               for s, row in zip(slot_ids, host))


def take_token(batch: SlotBatch, s: int, token: int, logprob: float | None, job: _Job) -> bool:
    """Slot s's next token (and log-prob), and the stop rule: a stop id, max_new_tokens, or the slot's
    length ends the completion and frees the slot. Returns whether it finished."""
    params = job.params
    batch.tokens[s].append(token)
    if params.logprobs:
        batch.logprobs[s].append(logprob)
    n = len(batch.tokens[s])
    reason = "stop" if token in job.stops else (
        "length" if n >= params.max_new_tokens or batch.prompt_len[s] + n >= job.max_len else None)
    if reason:
        i, j = job.requests[batch.request[s]]
        job.results[i][j] = Completion(batch.tokens[s], reason, batch.logprobs[s] if params.logprobs else None)
        batch.request[s] = -1
    return reason is not None


def eager_decoder(model: Llama, cache: KVCache, on_launch=None):
    """Decode the active slots only, over the columns up to the longest (batch-invariant: each row over its
    own row_length, attention_by_width): shapes change step to step. on_launch(), where given, is called as
    the step's device work begins (StepTimer.device_start)."""
    invariant, ops = cache.row_multiple > 1, decode_ops_for(cache.device, "eager")
    attention = attention_by_width if invariant else decode_attention_for(cache.device)

    def step(batch: SlotBatch) -> tuple[list[int], torch.Tensor]:
        active = batch.active()
        positions = [batch.position(s) for s in active]
        slots = _to_device(active, cache.device)
        if on_launch:
            on_launch()
        return active, decode_step(model, cache, batch.last[slots], slots, _to_device(positions, cache.device),
                                   cache.max_len if invariant else max(positions) + 1, attention, ops)
    return step


def static_decoder(model: Llama, cache: KVCache, mode: str, on_launch=None):
    """Decode every slot over every column (a free slot writes column 0 of its own, unused, cache): the
    same shapes at every step, compiled ("compile"), captured as a CUDA graph ("graphs"), or compiled
    and then captured ("compile-graphs"). on_launch(), where given, is called just before the launch."""
    device = cache.device
    attention, ops = static_attention(mode, device), decode_ops_for(device, mode)
    all_slots = torch.arange(cache.slots, device=device)
    pos = torch.zeros(cache.slots, dtype=torch.long, device=device)  # the step's input, updated in place

    def forward(tokens):
        return decode_step(model, cache, tokens, all_slots, pos, cache.max_len, attention, ops)

    run = torch.compile(forward, fullgraph=True) if "compile" in mode else forward
    if "graphs" in mode:
        run = _cuda_graph(run, device)

    def step(batch: SlotBatch) -> tuple[list[int], torch.Tensor]:
        active = batch.active()
        positions = [0] * cache.slots
        for s in active:
            positions[s] = batch.position(s)
        _to_device(positions, device, out=pos)
        if on_launch:
            on_launch()
        return active, run(batch.last)[_to_device(active, device)]  # only the active rows are sampled
    return step


def static_attention(mode: str, device: torch.device):
    """The static modes' decode attention: under compile one opaque operator (inductor does not
    re-compile the Triton kernel), else the device's own."""
    return decode_attention_opaque if "compile" in mode else decode_attention_for(device)


def load_block_state(state: SlotState, batch: SlotBatch, job: _Job, slot_ids: list[int]) -> None:
    """SlotState of slot_ids, from the host's SlotBatch, in one copy (a free slot: done, at column 0)."""
    columns = [(batch.position(s), len(batch.tokens[s]), min(job.params.max_new_tokens, job.max_len - batch.prompt_len[s]),
                batch.word[s], 0) if batch.request[s] >= 0 else (0, 0, 1, 0, 1) for s in slot_ids]
    _to_device([v for field in zip(*columns) for v in field], state.table.device, out=state.table.view(-1))


def accept_block(batch: SlotBatch, slot_ids: list[int], tokens: torch.Tensor, logps, job: _Job) -> tuple[int, int]:
    """A block's tokens [K, R] to the host (its one copy), each slot's taken in order until it finishes
    (take_token: the plain step's rule). Returns (slots finished, tokens taken)."""
    host_tokens = tokens.t().tolist()  # [R][K]
    host_logps = logps.t().double().tolist() if logps is not None else None
    finished = taken = 0
    for r, s in enumerate(slot_ids):
        for k, token in enumerate(host_tokens[r]):
            taken += 1
            if take_token(batch, s, token, host_logps[r][k] if host_logps else None, job):
                finished += 1
                break
    return finished, taken


def block_decoder(model: Llama, cache: KVCache, mode: str, steps: int, job: _Job):
    """decode(batch) -> (slots finished, tokens taken): one block of `steps` steps (mtcore/decode_blocks.py)
    over the active slots (eager: those only, over the columns up to the longest; compile/graphs: every
    slot, every column, the same shapes at every block; graphs: the block captured once), then
    accept_block."""
    device = cache.device
    stop_ids = torch.tensor(sorted(job.stops) or [-1], dtype=torch.long, device=device)
    ops = decode_ops_for(device, mode)
    if mode == "eager":
        attention = decode_attention_for(device)

        def decode(batch: SlotBatch) -> tuple[int, int]:
            active = batch.active()
            slots, state = _to_device(active, device), SlotState(len(active), device)
            load_block_state(state, batch, job, active)
            first = max(batch.position(s) for s in active)  # the host knows every column without a sync

            def step(tokens, pos, k):
                return decode_step(model, cache, tokens, slots, pos, min(first + k + 1, cache.max_len), attention, ops)
            last, tokens, logps = run_block(step, state, batch.last[slots], steps, job.params, stop_ids)
            batch.last[slots] = last
            return accept_block(batch, active, tokens, logps, job)
        return decode

    all_slots, state = torch.arange(cache.slots, device=device), SlotState(cache.slots, device)
    attention = static_attention(mode, device)

    def forward(tokens, pos):
        return decode_step(model, cache, tokens, all_slots, pos, cache.max_len, attention, ops)

    run = torch.compile(forward, fullgraph=True) if "compile" in mode else forward

    def one_block(last):
        return run_block(lambda tokens, pos, k: run(tokens, pos), state, last, steps, job.params, stop_ids)

    graphed = "graphs" in mode
    block = _cuda_graph(one_block, device) if graphed else one_block
    return pipelined(block, state, cache.slots, steps, job, captured=not graphed)


def pipelined(block, state: SlotState, n_slots: int, steps: int, job: _Job, captured: bool):
    """decode(batch) -> (slots finished, tokens taken) of the static modes' blocks, with the host one
    block behind the device: each call launches block c, then reads block c - 1's tokens (copied to
    pinned memory without blocking, behind an event) while block c runs. The slots' state stays on the
    device from block to block (a slot that finished in block c - 1 runs block c as done, harmlessly);
    the host loads only the columns of slots whose request changed since it last loaded them (refills,
    and freed slots), between blocks. A block's tokens are taken for a slot only while it still serves
    the request it served at that block's launch. A slot waits at most 2K - 1 steps for its refill."""
    device = state.table.device
    pinned = device.type == "cuda"
    loaded: list[int | None] = [None] * n_slots  # per slot: the request whose state the device holds
    pending = None  # the block in flight: (its launch's requests per slot, host tokens, host logps, event)

    def load_changed(batch: SlotBatch) -> None:
        changed = [s for s in range(n_slots) if batch.request[s] != loaded[s]]
        if changed:
            columns = torch.empty(len(FIELDS), len(changed), dtype=torch.long, device=device)
            load_block_state(SlotState.of(columns), batch, job, changed)
            state.table[:, _to_device(changed, device)] = columns
            for s in changed:
                loaded[s] = batch.request[s]

    def to_host(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)
        return host.copy_(t, non_blocking=pinned)

    def take(batch: SlotBatch, requests: list[int], tokens: torch.Tensor, logps) -> tuple[int, int]:
        rows = [s for s, r in enumerate(requests) if r >= 0 and batch.request[s] == r]
        return accept_block(batch, rows, tokens[:, rows], None if logps is None else logps[:, rows], job)

    def decode(batch: SlotBatch) -> tuple[int, int]:
        nonlocal pending, captured, loaded
        if not captured:  # the capture's warm-up ran blocks from this state: load it again (the columns
            load_changed(batch)  # they wrote are written again, alike, before any step reads them)
            block(batch.last)
            loaded = [None] * n_slots
            captured = True
        load_changed(batch)
        last, tokens, logps = block(batch.last)
        batch.last.copy_(last)
        launched = (list(batch.request), to_host(tokens), to_host(logps), _event(device))
        done = (0, 0)
        if pending is not None:
            requests, host_tokens, host_logps, event = pending
            if event is not None:
                event.synchronize()
            done = take(batch, requests, host_tokens, host_logps)
        pending = launched
        return done
    return decode


def _event(device: torch.device):
    """A CUDA event recorded now on device's stream (None off CUDA, where every copy is synchronous)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _cuda_graph(forward, device):
    """Capture forward(tokens) once (after warm-up on a side stream, which compiles the Triton kernels)
    and return a function that copies tokens into the captured input and replays."""
    static_tokens = None
    graph, out = torch.cuda.CUDAGraph(), None

    def run(last):
        with torch.cuda.device(device):  # capture and replay on the cache's GPU, whichever is current
            if static_tokens is None:
                with record_function("mtcore.capture"):
                    capture(last)
            static_tokens.copy_(last)
            graph.replay()
            return out

    def capture(last):
        nonlocal static_tokens, out
        static_tokens = last.clone()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward(static_tokens)
        torch.cuda.current_stream(device).wait_stream(stream)
        with torch.cuda.graph(graph):
            out = forward(static_tokens)
    return run


def generate(model: Llama, prompts: list[list[int]], params: SamplingParams, slots: int | None = None,
             max_len: int | None = None, on_overlong: str = "error", progress=None,
             kv_budget_bytes: int | None = None, decode_mode: str = "auto",
             prompt_keys: list[int] | None = None, decode_steps: int = 1,
             should_stop=None, batch_invariant: bool = False) -> list[list[Completion] | None]:
    """Sample params.n completions for each prompt (token ids). Returns, in prompt order, a list of n
    Completions per prompt, or None for a prompt skipped as too long (on_overlong="skip").

    Sample j of prompt i draws from its own random stream, keyed by (params.seed, prompt_keys[i], j)
    (default keys: the prompts' indices): it does not depend on the slots, the other prompts, or the
    order they are served in. Give each prompt its index in the whole list when serving a part of it.

    slots: concurrent sequences (default: slot_count, from kv_budget_bytes or the free GPU memory). max_len:
    tokens per slot (default: longest prompt + max_new_tokens, within max_position_embeddings). progress:
    called at each step with (requests finished, tokens sampled). decode_mode: one of DECODE_MODES.
    decode_steps: decode steps per host visit (mtcore/decode_blocks.py), the same tokens; 0: chosen from
    the first plain steps' times. should_stop: asked before each step (preempt.stopping); once True,
    generate returns, the unfinished requests None in their prompt's list (a rerun draws them again).
    batch_invariant: each request's tokens and log-probs the same bits whatever is served beside it
    (mtcore/invariant.py: rows padded to ROW_MULTIPLE, each row's attention over its own width); on the CPU,
    in eager one-step decode only (config.batch_invariant_fits)."""
    if on_overlong not in ("error", "skip"):
        raise ValueError("on_overlong must be 'error' or 'skip'")
    if decode_mode not in DECODE_MODES:
        raise MtcoreError(f"decode mode must be one of {', '.join(DECODE_MODES)}; got {decode_mode!r}")
    if decode_steps < 0:
        raise MtcoreError(f"decode steps per host visit must be >= 1 (0: automatic); got {decode_steps}")
    if batch_invariant:
        batch_invariant_fits(next(model.parameters()).device, decode_mode, decode_steps)
    max_len = max_len or slot_len(model, prompts, params)
    keep = _fitting(prompts, max_len, on_overlong)
    results: list[list[Completion] | None] = [None] * len(prompts)
    for i in keep:
        results[i] = [None] * params.n
    requests = [(i, j) for i in keep for j in range(params.n)]
    if not requests:
        return results
    width = row_length(max_len) if batch_invariant else max_len  # (attention_by_width's widths)
    cache = KVCache(model, slot_count(model, width, len(requests), slots, kv_budget_bytes), width)
    device = cache.device
    cache.row_multiple = ROW_MULTIPLE if batch_invariant else 1
    prompt_keys = list(range(len(prompts))) if prompt_keys is None else prompt_keys
    job = _Job(prompts, requests, params, max_len, results, prompt_keys, set(params.stop_ids))
    if decode_mode == "auto":
        decode_mode = "graphs" if device.type == "cuda" else "eager"
    if "graphs" in decode_mode and device.type != "cuda":
        raise MtcoreError(f"decode mode '{decode_mode}' needs a CUDA device; use 'eager' or 'compile'")
    merge_projections(model)  # q/k/v and gate/up as one GEMM each (the parameters become views: no copy)
    timer = StepTimer(device) if decode_steps == 0 else None  # automatic: K from the first plain steps' times
    decode_steps = decode_steps or 1
    if decode_steps > 1:
        decode_block = block_decoder(model, cache, decode_mode, decode_steps, job)
    else:
        on_launch = timer.device_start if timer else None
        decode = (eager_decoder(model, cache, on_launch) if decode_mode == "eager"
                  else static_decoder(model, cache, decode_mode, on_launch))
    batch, queue = SlotBatch.empty(cache.slots, device), deque(range(len(requests)))
    timed = False  # whether this pass through the loop decoded a timed step
    while True:
        if should_stop is not None and should_stop():
            return results
        active, free = batch.active(), len(batch.free())
        if queue and free and (not active or free * REFILL_FRACTION >= cache.slots
                               or batch.idle_steps >= REFILL_EVERY):
            with record_function("mtcore.refill"):  # the phases, named for torch.profiler (bench/decode_profile.py)
                slot_ids, logits = refill(model, cache, admit(batch, queue, job), job)
            batch.idle_steps = 0
        elif active and decode_steps > 1:
            with record_function("mtcore.decode"):
                finished, taken = decode_block(batch)
            batch.idle_steps += decode_steps * bool(queue and free)
            if progress:
                progress(finished, taken)
            continue
        elif active:
            if timer:
                timer.start()
            with record_function("mtcore.decode"):
                slot_ids, logits = decode(batch)
            batch.idle_steps += bool(queue and free)
            if timer:
                timer.launched()
            timed = timer is not None
        else:
            return results
        with record_function("mtcore.accept"):
            finished = accept(batch, slot_ids, logits, job)
        if progress:
            progress(finished, len(slot_ids))
        if timed:
            timed = False
            timer.stop()
            if timer.ready():
                device_s, host_s = timer.measured()
                decode_steps = choose_steps(device_s, host_s, params.max_new_tokens)
                log.info("decode steps per host visit: %d (a plain step: %.2f ms on the device, %.2f ms of host "
                         "time it waited)", decode_steps, 1e3 * device_s, 1e3 * host_s)
                timer = None
                if decode_steps > 1:
                    decode_block = block_decoder(model, cache, decode_mode, decode_steps, job)
                    decode = None  # the plain step's graph (or compiled step) is not used again: free it


def _fitting(prompts: list[list[int]], max_len: int, on_overlong: str) -> list[int]:
    """The indices of the prompts that leave room for a generated token in a max_len slot."""
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
    return keep


def response_text(tokenizer, completion: Completion, stops: set[int]) -> str:
    """A completion's text: its tokens without the stop id that ended it, decoded exactly.

    clean_up_tokenization_spaces is passed False: Llama-3's tokenizer_config sets it True, which strips
    spaces before punctuation in transformers 4.x ("a , b" -> "a, b"), so the RM would score other
    tokens than the policy wrote; transformers 5 ignores it but warns at every decode."""
    ids = completion.token_ids
    if completion.finish_reason == "stop" and ids[-1] in stops:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
