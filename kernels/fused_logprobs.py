"""Fused per-token log-probabilities over the full vocabulary, never holding more than one tile of logits.

    logps[i] = z[i, y_i] - logsumexp_v z[i, v],   z = hidden @ weight.T
    hidden [N, H], weight [V, H], labels [N] (int, -100 = unscored) -> logps [N] fp32 (0 where unscored)

Gradients, with g = dL/dlogps [N] and p = softmax(z):
    dz[i, v] = g_i * (1[v == y_i] - p[i, v])
    d hidden = dz @ weight                    [N, H]
    d weight = dz.T @ hidden                  [V, H], accumulated in fp32 across chunks

Algorithm. Unscored tokens are dropped before any matmul. The scored tokens go in chunks of C, and
the vocabulary in tiles of VT; one [C, VT] tile of logits exists at a time.
- forward: for each tile, z = h_c @ W_tile.T (a torch GEMM: cuBLAS on GPU), then one fused pass over
  the tile folds it into a running (max, sum-of-exp) per row and picks out the label's logit.
  Only lse [N] fp32 is kept for backward.
- backward (vocabulary tiles outside, chunks inside): recompute z, turn it in place into dz in one
  fused pass, then two GEMMs add dz @ W_tile into d hidden (fp32, [Ns, H]) and dz.T @ h_c into the
  tile's fp32 weight-gradient accumulator, written once per tile in the weight's dtype.

Why the GEMMs stay in torch: they are all of the O(N H V) work (8 N H V FLOPs: forward, recompute
and two gradients), and cuBLAS/oneDNN already run them near peak (measured on this repo's CPU:
150-178 GFLOP/s for these shapes against 194 for a square GEMM; 88% of fwd+bwd time is in them).
What torch cannot do is the softmax, gather and logit gradient without materialising [N, V] several
times; that O(N V) memory-bound work is what Triton fuses, each tile read once (forward) and read
and written once (backward).

The fused passes are `_lse_update_kernel` and `_logit_grad_kernel` (Triton) and
`_lse_update_torch` / `_logit_grad_torch` (the same pass in torch for CPU tensors). Both paths share
the chunking, the GEMMs and the fp32 accumulators; the torch CPU path alone computes a short last
chunk's logits over rows padded to a multiple of 16 (`_padded`), in both passes, so that a token's
log-prob does not follow how many others are scored with it.
"""

import functools
import logging

import torch

from mtcore.kernels.utils import device_guard, next_power_of_2, tl, triton, use_triton

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
MAX_BLOCK_V = 4096
# (tokens per chunk, vocabulary tile) by device. CPU: an [256, 8192] fp32 tile is 8 MiB and stays in
# L3; measured fastest or tied of 128..1024 x 2048..16384 at N=2048, H=256, V=128256. CUDA (not
# measured: no GPU yet): GEMMs of [4096, H] @ [H, 16384], a 128 MiB bf16 logits tile and a 256 MiB
# fp32 partial weight gradient at H=4096.
CHUNKS = {"cpu": (256, 8192), "cuda": (4096, 16384)}
# The torch CPU path pads a chunk of fewer tokens (the last) to a multiple of this many rows, or to the
# chunk size where that is smaller (_padded): a CPU GEMM's and a reduction's result for a row then does
# not follow the chunk's row count (mtcore/invariant.py).
CPU_ROW_MULTIPLE = 16


@triton.jit
def _lse_update_kernel(logits_ptr, stride_logits_row, stride_logits_col, labels_ptr, max_ptr, sumexp_ptr, label_logit_ptr,
                       v_start, n_cols, BLOCK_V: tl.constexpr, N_BLOCKS: tl.constexpr):
    """One row of a [C, VT] logits tile: fold it into the row's running max and sum of exp, and
    store the label's logit if the label falls in this tile. N_BLOCKS = cdiv(n_cols, BLOCK_V)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits_row
    tile_max = float("-inf")
    tile_sum = 0.0
    for block in range(N_BLOCKS):
        cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols * stride_logits_col, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(tile_max, tl.max(z, axis=0))
        tile_sum = tile_sum * tl.exp(tile_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        tile_max = new_max
    run_max = tl.load(max_ptr + row)
    run_sum = tl.load(sumexp_ptr + row)
    new_max = tl.maximum(run_max, tile_max)
    tl.store(sumexp_ptr + row, run_sum * tl.exp(run_max - new_max) + tile_sum * tl.exp(tile_max - new_max))
    tl.store(max_ptr + row, new_max)
    local = tl.load(labels_ptr + row) - v_start
    in_tile = (local >= 0) & (local < n_cols)
    label_logit = tl.load(row_ptr + tl.where(in_tile, local, 0) * stride_logits_col).to(tl.float32)
    tl.store(label_logit_ptr + row, label_logit, mask=in_tile)


@triton.jit
def _logit_grad_kernel(logits_ptr, stride_logits_row, stride_logits_col, labels_ptr, lse_ptr, grad_ptr, v_start, n_cols,
                       BLOCK_V: tl.constexpr, N_BLOCKS: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """One row of a [C, VT] logits tile, overwritten in place by dz = g * (onehot(label) - softmax).

    EMULATE_RNE (interpreter only): the interpreter truncates fp32 -> bf16 stores where the GPU
    rounds to nearest even (the sm_90 PTX has cvt.rn.bf16.f32, checked in tests/test_compile.py);
    rounding the bits by hand first makes the interpreter store what the GPU stores."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits_row
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_ptr + row)
    local = tl.load(labels_ptr + row) - v_start
    for block in range(N_BLOCKS):
        cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = tl.load(row_ptr + cols * stride_logits_col, mask=mask, other=0.0).to(tl.float32)
        dz = tl.where(cols == local, g, 0.0) - g * tl.exp(z - lse)
        if EMULATE_RNE:
            bits = dz.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            dz = bits.to(tl.float32, bitcast=True)
        tl.store(row_ptr + cols * stride_logits_col, dz.to(logits_ptr.dtype.element_ty), mask=mask)


def launch_config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_V, N_BLOCKS, num_warps) for a tile of n_cols columns. The only configs ever launched.

    The column loop's trip count is a constexpr, not range(0, n_cols, BLOCK_V): triton 3.6's
    interpreter turns a runtime bound into a Python int with int() on a 1-element array, which
    numpy >= 2.4 refuses. A CUDA tile takes one N_BLOCKS (16384 and Llama-3's last 13568 columns: 4)."""
    block_v = min(MAX_BLOCK_V, max(256, next_power_of_2(n_cols)))
    return block_v, -(-n_cols // block_v), 8 if block_v >= 2048 else 4


def _lse_update_triton(z, labels, run_max, run_sum, label_logit, v_start):
    block_v, n_blocks, num_warps = launch_config(z.shape[1])
    with device_guard(z):
        _lse_update_kernel[(z.shape[0],)](z, z.stride(0), z.stride(1), labels, run_max, run_sum, label_logit,
                                          v_start, z.shape[1], BLOCK_V=block_v, N_BLOCKS=n_blocks,
                                          num_warps=num_warps)


def _logit_grad_triton(z, labels, lse, grad, v_start):
    block_v, n_blocks, num_warps = launch_config(z.shape[1])
    with device_guard(z):
        _logit_grad_kernel[(z.shape[0],)](z, z.stride(0), z.stride(1), labels, lse, grad, v_start, z.shape[1],
                                          BLOCK_V=block_v, N_BLOCKS=n_blocks,
                                          EMULATE_RNE=not z.is_cuda and z.dtype == torch.bfloat16,
                                          num_warps=num_warps)


def _label_in_tile(labels, v_start, n_cols):
    local = labels - v_start  # [C]
    in_tile = (local >= 0) & (local < n_cols)
    return local.clamp(0, n_cols - 1).unsqueeze(1), in_tile  # [C, 1], [C]


def _lse_update_torch(z, labels, run_max, run_sum, label_logit, v_start):
    """The same pass as _lse_update_kernel, in torch, on a tile it may overwrite (upcast to fp32 first
    when it is bf16/fp16: CUDA tensors under MTCORE_TORCH_KERNELS=1)."""
    z = z.float()  # [C, VT]; z itself when fp32
    local, in_tile = _label_in_tile(labels, v_start, z.shape[1])
    label_logit.copy_(torch.where(in_tile, z.gather(1, local).squeeze(1), label_logit))
    new_max = torch.maximum(run_max, z.amax(dim=1))
    run_sum.mul_((run_max - new_max).exp_())
    run_sum.add_(z.sub_(new_max.unsqueeze(1)).exp_().sum(dim=1))
    run_max.copy_(new_max)


def _logit_grad_torch(z, labels, lse, grad, v_start):
    """The same pass as _logit_grad_kernel, in torch, in place on the tile: computed in fp32 and stored
    in z's dtype (rounded to nearest even, as the kernel's store)."""
    local, in_tile = _label_in_tile(labels, v_start, z.shape[1])
    dz = z.float()  # [C, VT]; z itself when fp32
    dz.sub_(lse.unsqueeze(1)).exp_().mul_(-grad.unsqueeze(1))
    dz.scatter_add_(1, local, torch.where(in_tile, grad, 0.0).unsqueeze(1))
    if dz is not z:
        z.copy_(dz)


@functools.cache
def _mm_out_dtype_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.mm(a, b, out_dtype=fp32) runs for `dtype` tiles on `device`: checked once per
    (device, dtype) on a real 16 x 16 product against the fp32 GEMM of the same tiles. Where it does
    not, the fallback (fp32 GEMMs of upcast tiles: exact, but without tensor cores) is logged once."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=gen).to(dtype).to(device) for _ in range(2))
    try:
        ok = torch.allclose(torch.mm(a, b, out_dtype=torch.float32), a.float() @ b.float(), rtol=1e-3, atol=1e-3)
        reason = "its result differs from the fp32 GEMM's"
    except (TypeError, RuntimeError, NotImplementedError) as e:
        ok, reason = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not ok:
        log.warning("torch %s: mm(..., out_dtype=float32) on %s %s tiles does not work (%s); the fused "
                    "log-probs' gradient GEMMs fall back to fp32 GEMMs of upcast tiles (slower)",
                    torch.__version__, device.type, dtype, reason)
    return ok


def _add_mm(acc, a, b):
    """acc += a @ b into an fp32 acc, with no rounding of the partial product to a's dtype: on CUDA a
    bf16 GEMM with fp32 output (cuBLAS accumulates in fp32), on CPU an fp32 GEMM of the upcast tiles."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and _mm_out_dtype_works(a.device, a.dtype):
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    else:  # CPU (the interpreter's bf16 tests), or a CUDA torch without out_dtype (logged once)
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _cpu_torch(hidden, triton_path) -> bool:
    """The torch path on the CPU, which runs its GEMMs in fp32 (bf16 GEMMs are slow on CPU) and in
    oneDNN's faster layout. Triton, and the torch path on CUDA (MTCORE_TORCH_KERNELS=1), run them in
    the input dtype on row-major tiles."""
    return not triton_path and not hidden.is_cuda


def _logits_tile(h_c, w_t, cpu_torch):
    """[c, H] x [vt, H] -> z [c, vt]. On the torch CPU path z is a view of a contiguous [vt, c]
    product: oneDNN runs that layout ~15% faster for all three GEMMs of these shapes (measured at
    c=256, H=256, vt=8192: 171/170/178 GFLOP/s against 145/163/167). Elsewhere z is row-major, so
    each token's logits are read contiguously; the interpreter tests see that layout."""
    if not cpu_torch:
        return torch.mm(h_c, w_t.T)
    return torch.mm(w_t, h_c.T).T


def _chunks(device, chunk_tokens, vocab_tile):
    c, v = CHUNKS["cuda" if device.type == "cuda" else "cpu"]
    return chunk_tokens or c, vocab_tile or v


def _padded(rows, C, cpu_torch):
    """A chunk's scored rows [c]; on the torch CPU path with its first row again up to a multiple of
    CPU_ROW_MULTIPLE rows (within the chunk size C): its logits are then the first c rows of [c', vt]."""
    extra = min(-(-len(rows) // CPU_ROW_MULTIPLE) * CPU_ROW_MULTIPLE, C) - len(rows) if cpu_torch else 0
    return torch.cat([rows, rows[:1].expand(extra)]) if extra > 0 else rows


def _gemm_dtype(hidden, cpu_torch):
    return torch.float32 if cpu_torch else hidden.dtype


def _check(hidden, weight, labels):
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(f"expected hidden [N, H], weight [V, H], labels [N]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(labels.shape)}")
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
                         f"labels {tuple(labels.shape)}")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"hidden and weight must share one of fp32, bf16, fp16; got {hidden.dtype} and "
                         f"{weight.dtype}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be int32 or int64, got {labels.dtype}")
    if hidden.device != weight.device or hidden.device != labels.device:
        raise ValueError("hidden, weight and labels must be on one device")


def fused_logprobs_forward(hidden, weight, labels, chunk_tokens=None, vocab_tile=None):
    """-> (logps [N] fp32, lse [Ns] fp32, scored index [Ns]) for the Ns tokens whose label is not -100."""
    _check(hidden, weight, labels)
    N, V = hidden.shape[0], weight.shape[0]
    scored = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # [Ns]
    y = labels[scored].long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= V):
        raise ValueError(f"labels must be -100 or in [0, {V}); got values in [{int(y.min())}, {int(y.max())}]")
    triton_path = use_triton(hidden)
    cpu_torch = _cpu_torch(hidden, triton_path)
    update = _lse_update_triton if triton_path else _lse_update_torch
    C, VT = _chunks(hidden.device, chunk_tokens, vocab_tile)
    dtype = _gemm_dtype(hidden, cpu_torch)
    logps = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(scored.numel(), dtype=torch.float32, device=hidden.device)
    for s in range(0, scored.numel(), C):
        rows = _padded(scored[s:s + C], C, cpu_torch)
        n, y_c = min(C, scored.numel() - s), labels[rows].long()
        h_c = hidden[rows].to(dtype)  # [c', H]
        run_max = torch.full((h_c.shape[0],), float("-inf"), device=hidden.device)
        run_sum = torch.zeros(h_c.shape[0], device=hidden.device)
        label_logit = torch.zeros(h_c.shape[0], device=hidden.device)
        for v in range(0, V, VT):
            z = _logits_tile(h_c, weight[v:v + VT].to(dtype), cpu_torch)  # [c, vt]: the one live tile
            update(z, y_c, run_max, run_sum, label_logit, v)
        lse[s:s + C] = (run_max + run_sum.log())[:n]
        logps[scored[s:s + C]] = label_logit[:n] - lse[s:s + C]
    return logps, lse, scored


def fused_logprobs_backward(grad_logps, hidden, weight, labels, lse, scored, chunk_tokens=None, vocab_tile=None,
                            need_hidden=True, need_weight=True):
    """-> (d hidden [N, H] in hidden's dtype or None, d weight [V, H] in weight's dtype or None).

    Vocabulary tiles outside, token chunks inside: each tile's weight gradient is accumulated in fp32
    over all chunks, then written once in the weight's dtype, so no fp32 [V, H] copy exists beside
    the gradient itself. d hidden is accumulated in fp32 over the tiles ([Ns, H])."""
    V = weight.shape[0]
    triton_path = use_triton(hidden)
    cpu_torch = _cpu_torch(hidden, triton_path)
    grad_pass = _logit_grad_triton if triton_path else _logit_grad_torch
    C, VT = _chunks(hidden.device, chunk_tokens, vocab_tile)
    dtype = _gemm_dtype(hidden, cpu_torch)
    g = grad_logps.float()[scored]  # [Ns]
    y = labels[scored].long()
    grad_scored = torch.zeros(scored.numel(), hidden.shape[1], dtype=torch.float32, device=hidden.device)
    grad_weight = torch.zeros_like(weight) if need_weight else None
    for v in range(0, V, VT):
        w_t = weight[v:v + VT].to(dtype)  # [vt, H]
        acc_w = None
        if need_weight:  # fp32 weights accumulate in place; others in an fp32 tile
            acc_w = grad_weight[v:v + VT] if weight.dtype == torch.float32 else torch.zeros(
                w_t.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, scored.numel(), C):
            n = min(C, scored.numel() - s)
            h_c = hidden[_padded(scored[s:s + C], C, cpu_torch)].to(dtype)  # [c', H]
            z = _logits_tile(h_c, w_t, cpu_torch)[:n]  # [c, vt], recomputed as the forward computed them
            grad_pass(z, y[s:s + C], lse[s:s + C], g[s:s + C], v)  # z := dz
            if need_hidden:
                _add_mm(grad_scored[s:s + C], z, w_t)
            if need_weight:
                _add_mm(acc_w, z.T, h_c[:n])
        if need_weight and acc_w.data_ptr() != grad_weight[v:v + VT].data_ptr():
            grad_weight[v:v + VT] = acc_w
    grad_hidden = None
    if need_hidden:
        grad_hidden = torch.zeros_like(hidden)
        grad_hidden[scored] = grad_scored.to(hidden.dtype)
    return grad_hidden, grad_weight


class FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, vocab_tile):
        with torch.autocast(hidden.device.type, enabled=False):
            logps, lse, scored = fused_logprobs_forward(hidden, weight, labels, chunk_tokens, vocab_tile)
        ctx.save_for_backward(hidden, weight, labels, lse, scored)
        ctx.chunks = (chunk_tokens, vocab_tile)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, labels, lse, scored = ctx.saved_tensors
        with torch.autocast(hidden.device.type, enabled=False):
            grad_hidden, grad_weight = fused_logprobs_backward(
                grad_logps, hidden, weight, labels, lse, scored, *ctx.chunks,
                need_hidden=ctx.needs_input_grad[0], need_weight=ctx.needs_input_grad[1])
        return grad_hidden, grad_weight, None, None, None


def fused_logprobs(hidden, weight, labels, chunk_tokens=None, vocab_tile=None):
    """log p(label | hidden) per token, [N] fp32, 0 where the label is -100. Differentiable in hidden
    and weight. chunk_tokens / vocab_tile override the per-device tile shape.

    Under torch.autocast both inputs are cast to the autocast dtype first (as a matmul would be), and
    the forward and the backward then run with autocast off, so both see the same logits."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    return FusedLogprobs.apply(hidden, weight, labels, chunk_tokens, vocab_tile)


def fused_logprobs_ref(hidden, weight, labels):
    """The specification: full logits (upcast to fp32 from bf16/fp16, as TRL does), log-softmax, gather."""
    logits = hidden @ weight.T  # [N, V]
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    scored = labels != IGNORE_INDEX
    logps = logits.log_softmax(-1).gather(1, torch.where(scored, labels, 0).long().unsqueeze(1)).squeeze(1)
    return torch.where(scored, logps, 0.0)


def sequence_logps(logps, cu_seqlens, labels):
    """Per-token logps [N] -> (per-sequence sums [B], scored-token counts [B]) by cu_seqlens [B+1].

    Differentiable in logps. Length-normalised variants divide the sums by the counts.
    """
    if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != logps.shape[0]:
        raise ValueError(f"cu_seqlens must run from 0 to N={logps.shape[0]}, got {cu_seqlens.tolist()}")
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [B]
    if (lens < 0).any():
        raise ValueError(f"cu_seqlens must not decrease, got {cu_seqlens.tolist()}")
    seq_ids = torch.repeat_interleave(torch.arange(lens.numel(), device=logps.device), lens)  # [N]
    sums = torch.zeros(lens.numel(), dtype=logps.dtype, device=logps.device).index_add(0, seq_ids, logps)
    counts = torch.zeros(lens.numel(), dtype=torch.long, device=logps.device).index_add_(
        0, seq_ids, (labels != IGNORE_INDEX).long())
    return sums, counts
