"""What every kernel file shares: the dispatch rule, and triton where it is installed.

Dispatch: Triton runs on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 (read at call
time; triton itself reads it when the kernels are decorated, so set it before importing mtcore).
Otherwise CPU tensors take the torch implementation of the same algorithm.

MTCORE_TORCH_KERNELS=1 (read at call time) sends CUDA tensors to the torch implementation too: the
way off Triton on a machine where it cannot build its launcher (no C compiler, no Python.h) or a
kernel misbehaves. The GEMMs are cuBLAS' either way; only the fused O(N V) passes change.

triton has no wheels for macOS or Windows: there the kernels are stubs that are never launched.

round_to: the interpreter truncates fp32 -> bf16 (casts and stores) where the GPU rounds to nearest even
(cvt.rn.bf16.f32); kernels that must match torch's bf16 rounding round through it.
"""

import contextlib
import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a laptop without triton: the torch paths serve every CPU call
    triton = SimpleNamespace(jit=lambda fn=None, **kwargs: fn, next_power_of_2=None)
    tl = SimpleNamespace(constexpr=None)
    HAS_TRITON = False
else:
    HAS_TRITON = True


@triton.jit
def round_to(x, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """fp32 x rounded to nearest even in dtype (returned in dtype). EMULATE_RNE (interpreter only):
    a bf16 target first has its bits rounded by hand, so the truncating cast is exact."""
    if EMULATE_RNE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


def torch_kernels_forced() -> bool:
    return os.environ.get("MTCORE_TORCH_KERNELS", "0") == "1"


def use_triton(x: torch.Tensor) -> bool:
    if x.is_cuda:
        if torch_kernels_forced():
            return False
        if not HAS_TRITON:
            raise RuntimeError("CUDA tensors need triton; pip install triton, or set MTCORE_TORCH_KERNELS=1")
        return True
    return HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def device_guard(x: torch.Tensor):
    """Launch on x's GPU, whichever is current (triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
