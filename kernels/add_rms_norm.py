"""Residual add fused with RMSNorm, for the decode step (forward only, no autograd).

x [..., dim] (last dim contiguous; rows may be strided), residual the same shape and dtype or None,
weight [dim]:
    hidden = x + residual                                   (rounded to x's dtype; x itself when None)
    normed = weight * (hidden / sqrt(mean(hidden ** 2) + eps)).to(hidden.dtype)
The normalisation is fp32 and rounded to hidden's dtype before the weight multiplies it, as the model's
RMSNorm does; the product is fp32, rounded once to torch.result_type(weight, hidden). Every rounding
point of the torch code is reproduced, so the kernel's error is torch's own.

Bytes moved per call: x and residual read, hidden and normed written (4 * rows * dim * itemsize), the
weight read once per row (from L2). Torch runs the add, then pow, mean, rsqrt, two multiplies and two
casts, each a kernel reading and writing [rows, dim] (fp32 ones among them): on an H100 the Llama-3-8B
decode step spends ~12 ms of kernels against a ~6 ms bandwidth floor, much of it in such small
element-wise kernels around each norm, rotary, cache write and SiLU-mul. Here one program per row holds
the whole row in one BLOCK = next_power_of_2(dim) tile (Llama dims: 2048..8192), so the sum and the
row's mean square never leave registers.
"""

import torch

from mtcore.kernels.utils import device_guard, next_power_of_2, round_to, tl, triton, use_triton

MAX_DIM = 8192  # the widest row the kernel holds in one tile (Llama-3 70B); wider rows take the torch path


@triton.jit
def _add_rms_norm_fwd_kernel(x_ptr, residual_ptr, weight_ptr, hidden_ptr, out_ptr, stride_x, stride_residual,
                             stride_hidden, stride_out, dim, eps, BLOCK: tl.constexpr,
                             HAS_RESIDUAL: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """One row. EMULATE_RNE (interpreter only): round bf16 as the GPU does (utils.round_to)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
        h_rounded = round_to(h + r, x_ptr.dtype.element_ty, EMULATE_RNE)  # x + residual in x's dtype
        tl.store(hidden_ptr + row * stride_hidden + cols, h_rounded, mask=mask)
        h = h_rounded.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, 0) / dim + eps)  # masked columns hold 0
    normed = round_to(h * rstd, x_ptr.dtype.element_ty, EMULATE_RNE).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, round_to(w * normed, out_ptr.dtype.element_ty, EMULATE_RNE),
             mask=mask)


def launch_config(dim: int) -> tuple[int, int]:
    """(BLOCK, num_warps): the row in one tile, about 16 values a thread (8 warps at dim 4096); at least
    128 columns, a warp's worth (narrower tiles would only add configs to compile)."""
    block = max(128, next_power_of_2(dim))
    return block, min(16, max(1, block // 512))


def kernel_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the Triton kernel takes these inputs (else the torch path runs): a row of at most MAX_DIM,
    and a weight in x's dtype (the decode model holds one dtype)."""
    return x.shape[-1] <= MAX_DIM and weight.dtype == x.dtype


def _check(x, residual, weight):
    if x.dim() < 1 or weight.shape != x.shape[-1:]:
        raise ValueError(f"need x [..., dim] and weight [dim]; got {tuple(x.shape)} and {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must have x's shape and dtype: x {tuple(x.shape)} {x.dtype}, residual "
                         f"{tuple(residual.shape)} {residual.dtype}")
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"x and weight must be floating point; got {x.dtype} and {weight.dtype}")
    if x.stride(-1) != 1 or weight.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("x, residual and weight need a contiguous last dimension")


def _add_rms_norm_triton(x, residual, weight, eps):
    dim = x.shape[-1]
    rows = x.reshape(-1, dim)  # [M, dim]: a view wherever x's rows share one stride
    res = rows if residual is None else residual.reshape(-1, dim)  # [M, dim]; unread without a residual
    hidden = rows if residual is None else torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(rows.shape, dtype=torch.result_type(weight, x), device=x.device)
    block, num_warps = launch_config(dim)
    if rows.shape[0]:
        with device_guard(x):
            _add_rms_norm_fwd_kernel[(rows.shape[0],)](
                rows, res, weight, hidden, out, rows.stride(0), res.stride(0), hidden.stride(0), out.stride(0), dim,
                eps, BLOCK=block, HAS_RESIDUAL=residual is not None, EMULATE_RNE=not x.is_cuda,
                num_warps=num_warps)
    return (x if residual is None else hidden.view(x.shape)), out.view(x.shape)


def add_rms_norm(x, residual, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., dim], residual [..., dim] or None, weight [dim] -> (hidden, normed), both [..., dim]:
    hidden = x + residual in x's dtype (x itself when residual is None), normed = RMSNorm(hidden) in
    torch.result_type(weight, hidden). Triton on CUDA (and under TRITON_INTERPRET=1) where kernel_serves
    the inputs; else add_rms_norm_ref."""
    _check(x, residual, weight)
    if use_triton(x) and kernel_serves(x, weight):
        return _add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_ref(x, residual, weight, eps)


def add_rms_norm_ref(x, residual, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification in plain torch: the model's residual add, then its RMSNorm."""
    hidden = x if residual is None else x + residual
    h32 = hidden.float()
    normed = weight * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype)
    return hidden, normed
