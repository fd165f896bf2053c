"""What a step or a stage costs: model FLOPs, the device's matmul peak, peak memory.

The peak is looked up by GPU name (dense bf16 tensor-core figures from the vendors' data sheets), or
measured with a square matmul where the name is unknown and on the CPU (fp32), once per process.
"""

import functools
import resource
import time

import torch

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by a substring of torch.cuda.get_device_name.
GPU_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0,
                   "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "RTX 4090": 165.0}


def matmul_flops(args, seq_lens: list[int], head_tokens: int | None = None) -> float:
    """Forward FLOPs of a Llama over sequences of the given lengths (2 per multiply-add): the
    projections and MLP per token, causal attention per sequence, and the LM head for the
    head_tokens tokens it is computed for: by default every token; in training only the scored ones
    (fused_logprobs drops the rest before its GEMMs), in generation the sampled ones, and none for
    a reward model (its 1-wide score head is negligible): pass 0."""
    d, hd = args.dim, args.head_dim
    per_layer = 2 * d * hd * (2 * args.n_heads + 2 * args.n_kv_heads) + 2 * 3 * d * args.intermediate_size
    n_tokens = sum(seq_lens)
    head = 2 * d * args.vocab_size * (n_tokens if head_tokens is None else head_tokens)
    # QK^T and PV: 2 * 2 * heads * head_dim per (query, key) pair; causal halves the pairs.
    attention = sum(args.n_layers * 4 * args.n_heads * hd * n * (n + 1) / 2 for n in seq_lens)
    return args.n_layers * per_layer * n_tokens + head + attention


@functools.cache
def peak_flops(device: str) -> tuple[float, str]:
    """(FLOP/s, how it was found) for bf16 on a GPU, fp32 on the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        for key, tflops in GPU_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name} data sheet, bf16 dense"
        return _measure_matmul(dev, torch.bfloat16), f"{name} measured bf16 matmul"
    return _measure_matmul(dev, torch.float32), "measured fp32 matmul"


def _measure_matmul(device, dtype, n: int = 1024, reps: int = 4, trials: int = 5) -> float:
    """The best of a few timed trials of an n x n matmul (the best, since a busy machine only slows it)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(trials):
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device) -> None:
    """Start a new peak: the CUDA allocator's statistics, or the kernel's VmHWM (Linux /proc/self/clear_refs)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux: the peak stays the process's lifetime peak


def peak_memory_mib(device) -> float:
    """Peak memory since the last reset: torch.cuda.max_memory_allocated on a GPU, peak RSS (VmHWM) on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Meter:
    """Times a piece of work and counts what it processed: `with Meter(device) as m: ...; m.add(tokens, flops)`.
    m.record() -> {seconds, tokens, tokens_per_s, mfu, peak_memory_mib} (mfu against peak_flops)."""

    def __init__(self, device):
        self.device, self.tokens, self.flops = str(device), 0, 0.0

    def __enter__(self):
        reset_peak_memory(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.start

    def add(self, tokens: int, flops: float = 0.0) -> None:
        self.tokens += tokens
        self.flops += flops

    def record(self) -> dict:
        peak, source = peak_flops(self.device)
        return {"seconds": round(self.seconds, 3), "tokens": self.tokens,
                "tokens_per_s": round(self.tokens / max(self.seconds, 1e-9), 1),
                "mfu": round(self.flops / max(self.seconds, 1e-9) / peak, 5) if self.flops else None,
                "peak_memory_mib": round(peak_memory_mib(self.device), 1), "peak_flops_source": source}
