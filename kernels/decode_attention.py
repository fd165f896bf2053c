"""Decode attention: one new query per cache slot against that slot's filled K/V prefix (split-K).

Inputs: q [R, Hq, D] (one query per row); k_cache, v_cache [S, L, Hkv, D] (the cache of one layer,
any strides with a contiguous last dim); slots [R], the cache slot each row reads (None: row r reads
slot r, R = S); lens [R] int, the
keys that slot holds (1 <= lens <= L). Query head h reads KV head h // G (G = Hq / Hkv), as
grouped-query attention does.
    out[r, h] = softmax(q[r, h] . k[slots[r], :lens[r], h // G] / sqrt(D)) @ v[slots[r], :lens[r], h // G]

Bytes moved per call: each slot's filled prefix of K and V once per KV head, in the cache's dtype
(2 * sum(lens) * Hkv * D * itemsize), plus q and out. Nothing is copied out, repeated to the query
heads or upcast in memory: the G query heads of a KV head are one [BLOCK_G, D] tile of a program
that streams that head's keys, so decode reads the cache at the memory-bandwidth floor.

Split-K: a long prefix and few rows would leave most of the GPU idle, so each (row, KV head) is cut
into num_splits <= MAX_SPLITS ranges of split_len keys, each with its own program writing a partial
output and its log-sum-exp (fp32); a second kernel combines them exactly, in the output dtype. A
program loops over its range only up to the slot's length (a runtime bound, so the loop is
pipelined), and one past it does no work; the grid is fixed by (R, Hkv, L) alone: the launch is the
same at every step (CUDA-graph safe). The runtime bound needs triton >= 3.7's interpreter on the CPU
(3.6's int()s a one-element array, which numpy >= 2.4 refuses); compiled, any version. Scores, softmax
and the accumulator are fp32; the two dots take the cache dtype (fp32 dots in IEEE precision, not TF32).

The kernel serves head_dim 64 and 128 (the Llama-3 family) with up to 16 query heads per KV head;
other shapes take decode_attention_ref. Every launchable config is compiled in tests/test_compile.py.
"""

import math

import torch
import torch.nn.functional as F

from mtcore.kernels.utils import device_guard, tl, triton, use_triton

BLOCK_N = 64  # keys per tile
BLOCK_G = 16  # query heads per program (tl.dot's smallest tile), masked to the group size
HEAD_DIMS = (64, 128)  # the head sizes the kernel serves
MAX_SPLITS = 16
PROGRAMS_PER_SM = 2  # split until the grid holds about this many programs per SM


@triton.jit
def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, slots_ptr, lens_ptr, o_ptr, lse_ptr,
                        stride_q_s, stride_q_h, stride_k_s, stride_k_l, stride_k_h,
                        stride_v_s, stride_v_l, stride_v_h, stride_o_s, stride_o_h, stride_o_split,
                        stride_lse_s, stride_lse_h, scale, group,
                        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                        split_len, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """UPCAST (interpreter only): its bf16 arithmetic is wrong, so tiles are cast to fp32 after loading;
    on the GPU the dots take the cache dtype."""
    s = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(slots_ptr + s).to(tl.int64)
    n_keys = tl.load(lens_ptr + s)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + offs_g  # [BLOCK_G] the query heads of this KV head
    g_mask = offs_g < group
    q = tl.load(q_ptr + s.to(tl.int64) * stride_q_s + heads[:, None] * stride_q_h + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)  # [BLOCK_G, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + slot * stride_k_s + kv_head * stride_k_h
    v_base = v_ptr + slot * stride_v_s + kv_head * stride_v_h
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    first = split * split_len
    last = tl.minimum(first + split_len, n_keys)  # this split's keys: [first, last), none past the slot's
    for start in range(first, last, BLOCK_N):  # a runtime bound: the loop is pipelined, and stops at the prefix
        offs_n = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        n_mask = offs_n < last
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_k_l + offs_d[None, :], mask=n_mask[:, None],
                    other=0.0)  # [BLOCK_N, BLOCK_D]
        if UPCAST:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [BLOCK_G, BLOCK_N] fp32
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))  # finite: the tile holds at least one key
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_v_l + offs_d[None, :], mask=n_mask[:, None],
                    other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    has_keys = denom > 0  # a split past the slot's length has none
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, denom, 1.0)[:, None], 0.0)
    tl.store(o_ptr + s.to(tl.int64) * stride_o_s + heads[:, None] * stride_o_h + split * stride_o_split
             + offs_d[None, :], out, mask=g_mask[:, None])
    lse = tl.where(has_keys, m + tl.log(tl.where(has_keys, denom, 1.0)), float("-inf"))
    tl.store(lse_ptr + s.to(tl.int64) * stride_lse_s + heads * stride_lse_h + split, lse, mask=g_mask)


@triton.jit
def _combine_kernel(o_part_ptr, lse_ptr, out_ptr, stride_p_s, stride_p_h, stride_p_split, stride_lse_s,
                    stride_lse_h, stride_out_s, stride_out_h, num_splits, BLOCK_SPLITS: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    s = tl.program_id(0)
    h = tl.program_id(1)
    offs_sp = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    sp_mask = offs_sp < num_splits
    lse = tl.load(lse_ptr + s.to(tl.int64) * stride_lse_s + h * stride_lse_h + offs_sp, mask=sp_mask,
                  other=float("-inf"))  # [BLOCK_SPLITS]
    weights = tl.exp(lse - tl.max(lse, 0))  # split 0 always holds key 0, so the max is finite
    part = tl.load(o_part_ptr + s.to(tl.int64) * stride_p_s + h * stride_p_h + offs_sp[:, None] * stride_p_split
                   + offs_d[None, :], mask=sp_mask[:, None], other=0.0)
    out = tl.sum(weights[:, None] * part, 0) / tl.sum(weights, 0)  # [BLOCK_D]
    tl.store(out_ptr + s.to(tl.int64) * stride_out_s + h * stride_out_h + offs_d, out)


_SMS: dict[int, int] = {}  # CUDA device index -> SM count, read once


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: launch as on an H100
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def launch_config(rows: int, n_kv_heads: int, max_len: int, sms: int = 132) -> tuple[int, int]:
    """(split_len, num_splits): the grid is (rows, n_kv_heads, num_splits), each split split_len keys (a
    multiple of BLOCK_N). Splits only when rows * n_kv_heads programs would leave SMs idle, into at most
    MAX_SPLITS. Depends on the cache's length, not the slots' fill, so every step launches the same."""
    want = min(MAX_SPLITS, max(1, math.ceil(PROGRAMS_PER_SM * sms / (rows * n_kv_heads))))
    split_len = triton.cdiv(triton.cdiv(max_len, want), BLOCK_N) * BLOCK_N
    return split_len, triton.cdiv(max_len, split_len)


def kernel_serves(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the Triton kernel takes these shapes (else the torch path runs)."""
    return q.shape[-1] in HEAD_DIMS and q.shape[1] // k_cache.shape[2] <= BLOCK_G


def _check(q, k_cache, v_cache, slots, lens):
    if slots is None and q.shape[0] != k_cache.shape[0]:
        raise ValueError(f"without slots, q's rows ({q.shape[0]}) must be the cache's slots ({k_cache.shape[0]})")
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"need q [R, Hq, D] and k_cache, v_cache [S, L, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    R, Hq, D = q.shape
    if k_cache.shape[3] != D or Hq % k_cache.shape[2] or lens.shape != (R,) or (
            slots is not None and slots.shape != (R,)):
        raise ValueError(f"shapes do not agree: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}, "
                         f"slots {None if slots is None else tuple(slots.shape)}, lens {tuple(lens.shape)}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the caches need a contiguous last (head_dim) dimension")


def _decode_attention_triton(q, k_cache, v_cache, slots, lens):
    R, Hq, D = q.shape
    L, Hkv = k_cache.shape[1], k_cache.shape[2]
    q = q.to(k_cache.dtype)  # RoPE may leave q in fp32 beside a bf16 cache (autocast)
    split_len, num_splits = launch_config(R, Hkv, L, _sm_count(q.device))
    part = torch.empty(R, Hq, num_splits, D, dtype=torch.float32, device=q.device)  # partial outputs
    lse = torch.empty(R, Hq, num_splits, dtype=torch.float32, device=q.device)
    out = torch.empty(R, Hq, D, dtype=q.dtype, device=q.device)
    if slots is None:
        slots = torch.arange(R, device=q.device)
    with device_guard(q):
        _decode_attn_kernel[(R, Hkv, num_splits)](
            q, k_cache, v_cache, slots, lens.to(torch.int32), part, lse, q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
            v_cache.stride(2), part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
            1.0 / math.sqrt(D), Hq // Hkv, BLOCK_G=BLOCK_G, BLOCK_D=D, split_len=split_len, BLOCK_N=BLOCK_N,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 or not q.is_cuda else "tf32",
            UPCAST=not q.is_cuda, num_warps=4)
        _combine_kernel[(R, Hq)](part, lse, out, part.stride(0), part.stride(1), part.stride(2), lse.stride(0),
                                 lse.stride(1), out.stride(0), out.stride(1), num_splits,
                                 BLOCK_SPLITS=MAX_SPLITS, BLOCK_D=D)
    return out


def decode_attention(q, k_cache, v_cache, slots, lens) -> torch.Tensor:
    """q [R, Hq, D], k_cache and v_cache [S, L, Hkv, D], slots [R] (int) or None (R = S, row r reads slot r),
    lens [R] (int, 1 <= lens <= L)
    -> [R, Hq, D] in the cache's dtype. Triton on CUDA (and under TRITON_INTERPRET=1) where
    kernel_serves the shapes; else decode_attention_ref."""
    _check(q, k_cache, v_cache, slots, lens)
    if use_triton(q) and kernel_serves(q, k_cache):
        return _decode_attention_triton(q, k_cache, v_cache, slots, lens)
    return decode_attention_ref(q, k_cache, v_cache, slots, lens)


def decode_attention_for(device: torch.device):
    """The decode attention a device runs: the Triton kernel on CUDA, the folded torch reference on the
    CPU (where the interpreter, TRITON_INTERPRET=1, would be far slower; tests run it explicitly)."""
    return decode_attention if device.type == "cuda" else decode_attention_ref


@torch.library.custom_op("mtcore::decode_attention", mutates_args=())
def decode_attention_opaque(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slots: torch.Tensor | None, lens: torch.Tensor) -> torch.Tensor:
    """decode_attention_for(q's device) as one opaque operator, for torch.compile: inductor calls it as
    it is instead of re-compiling the Triton kernel inside its own graph (torch 2.11 with triton 3.6
    failed to, on an H100)."""
    return decode_attention_for(q.device)(q, k_cache, v_cache, slots, lens)


@decode_attention_opaque.register_fake
def _(q, k_cache, v_cache, slots, lens):
    return q.new_empty(q.shape, dtype=k_cache.dtype)


def decode_attention_ref(q, k_cache, v_cache, slots, lens) -> torch.Tensor:
    """The specification in plain torch, and the CPU path: the G query heads of a KV head attend as G
    queries of one SDPA head (no causal mask, a length mask), so each KV head is read once, in place,
    never repeated to the query heads. (Rows that read other slots than their own gather those first:
    a copy, on the CPU where the GEMMs dominate.)"""
    R, Hq, D = q.shape
    L, Hkv = k_cache.shape[1], k_cache.shape[2]
    if slots is not None:
        k_cache, v_cache = k_cache[slots], v_cache[slots]  # [R, L, Hkv, D]
    q = q.to(k_cache.dtype).view(R, Hkv, Hq // Hkv, D)  # [R, Hkv, G, D]: the group as a query sequence
    keep = torch.arange(L, device=q.device)[None, :] < lens[:, None]  # [R, L]
    out = F.scaled_dot_product_attention(q, k_cache.transpose(1, 2), v_cache.transpose(1, 2),  # [R, Hkv, L, D]
                                         attn_mask=keep[:, None, None, :])  # [R, Hkv, G, D]
    return out.reshape(R, Hq, D)


def decode_attention_rows(q, k_cache, v_cache, slots, lens) -> torch.Tensor:
    """decode_attention_ref as plain matmuls and a masked softmax: each row's numbers the same bits however
    many rows run (the CPU's SDPA does not promise that: its result for a row followed the batch size at
    head_dim 64). The batch-invariant sampler's attention (sampler.generate(batch_invariant=True))."""
    R, Hq, D = q.shape
    L, Hkv = k_cache.shape[1], k_cache.shape[2]
    if slots is not None:
        k_cache, v_cache = k_cache[slots], v_cache[slots]  # [R, L, Hkv, D]
    q = q.to(k_cache.dtype).view(R, Hkv, Hq // Hkv, D)  # [R, Hkv, G, D]
    scores = torch.matmul(q, k_cache.permute(0, 2, 3, 1)) * D ** -0.5  # [R, Hkv, G, L]
    keep = torch.arange(L, device=q.device)[None, :] < lens[:, None]  # [R, L]
    probs = scores.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1)
    return torch.matmul(probs, v_cache.transpose(1, 2)).reshape(R, Hq, D)  # [R, Hkv, G, D] -> [R, Hq, D]
