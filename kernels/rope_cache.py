"""Rotary embedding of q and k fused with the write of the roped k and of v into the KV cache, for the
decode step (forward only, no autograd).

q [R, Hq, D], k and v [R, Hkv, D] (any strides, last dim contiguous: in use they are column views of one
[R, (Hq + 2 Hkv) D] GEMM output); cos, sin [R, D] in q's dtype, half-split (cos = cat(freqs, freqs).cos());
k_cache, v_cache [S, L, Hkv, D] (last dim contiguous); slots [R] and pos [R] int, row r's cache slot and
the column it writes:
    rope(x) = x * cos + cat(-x2, x1) * sin       (x1, x2 the halves of the last dim; cos, sin per row)
    k_cache[slots[r], pos[r]] = rope(k[r]);  v_cache[slots[r], pos[r]] = v[r];  returns rope(q) [R, Hq, D]
fp32 math, one rounding on store. Cache addresses are int64 (slot * stride passes 2**31 in a large cache).

Bytes moved per call: q, k, v read and q_rot, k, v written (2 * R * (Hq + 2 Hkv) * D * itemsize), plus
cos, sin. Torch ropes q and k in five element-wise kernels each (chunk, neg, cat, two multiplies, add)
and writes the cache with two index_put_: on an H100 the Llama-3-8B decode step spends ~12 ms of kernels
against a ~6 ms bandwidth floor, much of it in such small kernels. Here one program per (row, head): a
query head ropes into the output, a KV head ropes k into the cache and copies v beside it. The grid is
(R, Hq + Hkv), fixed by the shapes (no host sync: it runs inside a captured CUDA graph).

The kernel serves head_dim 64 and 128 (the Llama-3 family); other shapes take rope_cache_ref.
"""

import torch

from mtcore.kernels.utils import device_guard, round_to, tl, triton, use_triton

HEAD_DIMS = (64, 128)  # the head sizes the kernel serves
NUM_WARPS = 1  # a program ropes one head of D <= 128 values: 2 to 4 a thread


@triton.jit
def _rope_cache_fwd_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, pos_ptr,
                           out_ptr, stride_q_r, stride_q_h, stride_k_r, stride_k_h, stride_v_r, stride_v_h,
                           stride_cos_r, stride_sin_r, stride_kc_s, stride_kc_l, stride_kc_h, stride_vc_s,
                           stride_vc_l, stride_vc_h, stride_out_r, stride_out_h, n_q_heads,
                           D: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """Program (r, head): head < Hq ropes q[r, head] into out; else KV head head - Hq ropes k into the
    cache at (slots[r], pos[r]) and copies v. EMULATE_RNE (interpreter only): see utils.round_to."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs = tl.arange(0, D)
    partner = (offs + D // 2) % D  # rotated[i] = -x[i + D/2] for i < D/2, x[i - D/2] after
    sign = tl.where(offs < D // 2, -1.0, 1.0)
    cos = tl.load(cos_ptr + row * stride_cos_r + offs).to(tl.float32)
    sin = tl.load(sin_ptr + row * stride_sin_r + offs).to(tl.float32)
    if head < n_q_heads:
        src = q_ptr + row * stride_q_r + head * stride_q_h
        dst = out_ptr + row * stride_out_r + head * stride_out_h
    else:
        kv_head = head - n_q_heads
        slot = tl.load(slots_ptr + row).to(tl.int64)
        pos = tl.load(pos_ptr + row).to(tl.int64)
        src = k_ptr + row * stride_k_r + kv_head * stride_k_h
        dst = k_cache_ptr + slot * stride_kc_s + pos * stride_kc_l + kv_head * stride_kc_h
        v = tl.load(v_ptr + row * stride_v_r + kv_head * stride_v_h + offs)
        tl.store(v_cache_ptr + slot * stride_vc_s + pos * stride_vc_l + kv_head * stride_vc_h + offs, v)
    x = tl.load(src + offs).to(tl.float32)
    rotated = sign * tl.load(src + partner).to(tl.float32)
    tl.store(dst + offs, round_to(x * cos + rotated * sin, dst.dtype.element_ty, EMULATE_RNE))


def kernel_serves(q: torch.Tensor) -> bool:
    """Whether the Triton kernel takes these shapes (else the torch path runs)."""
    return q.shape[-1] in HEAD_DIMS


def _check(q, k, v, cos, sin, k_cache, v_cache, slots, pos):
    if q.dim() != 3 or k.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"need q [R, Hq, D], k and v [R, Hkv, D], caches [S, L, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(k_cache.shape)}")
    R, Hq, D = q.shape
    Hkv = k.shape[1]
    if (k.shape != (R, Hkv, D) or v.shape != k.shape or cos.shape != (R, D) or sin.shape != (R, D)
            or k_cache.shape[2:] != (Hkv, D) or v_cache.shape != k_cache.shape or slots.shape != (R,)
            or pos.shape != (R,) or D % 2 or Hq % Hkv):
        raise ValueError(f"shapes do not agree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}, slots {tuple(slots.shape)}, pos {tuple(pos.shape)}")
    dtypes = {t.dtype for t in (q, k, v, cos, sin, k_cache, v_cache)}
    if len(dtypes) != 1 or not q.is_floating_point():
        raise ValueError(f"q, k, v, cos, sin and the caches need one floating dtype; got {sorted(map(str, dtypes))}")
    if slots.is_floating_point() or pos.is_floating_point():
        raise ValueError(f"slots and pos must be integers; got {slots.dtype} and {pos.dtype}")
    if any(t.stride(-1) != 1 for t in (q, k, v, cos, sin, k_cache, v_cache)):
        raise ValueError("q, k, v, cos, sin and the caches need a contiguous last (head_dim) dimension")


def _rope_cache_triton(q, k, v, cos, sin, k_cache, v_cache, slots, pos):
    R, Hq, D = q.shape
    out = torch.empty(R, Hq, D, dtype=q.dtype, device=q.device)
    if R:
        with device_guard(q):
            _rope_cache_fwd_kernel[(R, Hq + k.shape[1])](
                q, k, v, cos, sin, k_cache, v_cache, slots.to(torch.int64), pos.to(torch.int64), out,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
                sin.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
                v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), Hq, D=D,
                EMULATE_RNE=not q.is_cuda, num_warps=NUM_WARPS)
    return out


def rope_cache(q, k, v, cos, sin, k_cache, v_cache, slots, pos) -> torch.Tensor:
    """q [R, Hq, D], k and v [R, Hkv, D], cos and sin [R, D], k_cache and v_cache [S, L, Hkv, D], slots and
    pos [R] int -> rope(q) [R, Hq, D] (new, contiguous, q's dtype); writes rope(k[r]) and v[r] into the
    caches at (slots[r], pos[r]). Triton on CUDA (and under TRITON_INTERPRET=1) where kernel_serves the
    shapes; else rope_cache_ref."""
    _check(q, k, v, cos, sin, k_cache, v_cache, slots, pos)
    if use_triton(q) and kernel_serves(q):
        return _rope_cache_triton(q, k, v, cos, sin, k_cache, v_cache, slots, pos)
    return rope_cache_ref(q, k, v, cos, sin, k_cache, v_cache, slots, pos)


def rope_cache_ref(q, k, v, cos, sin, k_cache, v_cache, slots, pos) -> torch.Tensor:
    """The specification in plain torch, computing as the model does (in the tensors' dtype)."""
    cos, sin = cos[:, None], sin[:, None]  # [R, 1, D]: broadcast over heads

    def rope(x):  # [R, H, D]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    k_cache.index_put_((slots, pos), rope(k))
    v_cache.index_put_((slots, pos), v)
    return rope(q)
