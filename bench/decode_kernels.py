"""Benchmark: the decode step's element-wise kernels against the torch ops the model runs today.

Ops (kernels/add_rms_norm.py, rope_cache.py, silu_mul.py), each with two providers:
- torch: the unfused ops, which are the kernels' `*_ref`: `x + r` then RMSNorm (pow, mean, rsqrt, casts,
  weight); rotary on q and on k (chunk, neg, cat, two multiplies, add each) then two index_put_ into
  the caches; F.silu(gate) * up;
- triton: the fused kernel.
Inputs as the decode step has them: q, k, v column views of one [R, (Hq + 2 Hkv) D] GEMM output, gate and
up the halves of one [R, 2I]; the caches [R slots, L, Hkv, D] written at a permutation of the slots.
Shapes: Llama-3-8B (dim 4096, intermediate 14336, 32 query and 8 KV heads of 128) at 64 and 210 decode
rows (210: the slots bench/memory_plan.py gives an 8B policy on an 80 GB GPU), bf16 on CUDA, fp32 on
the CPU.

Time: on CUDA, --calls calls captured in one CUDA graph and replayed (as the sampler's graphs mode runs
a step: no launch overhead, which would favour the fused kernel further in eager mode); on the CPU a
loop of them. The median of --repeats replays per round, then of --rounds interleaved rounds (torch,
triton, torch, ...), per call. GB/s counts the bytes an op must move (its inputs read and outputs
written once), and "of copy" divides it by the device-to-device copy bandwidth measured in this run.
A decode step's activations are small (64 x 4096 bf16 is 512 KiB) and sit in L2, as the GEMM outputs
they come from do, so a kernel can pass the copy rate.

    python bench/decode_kernels.py              # CUDA: bf16, 64 and 210 rows
    python bench/decode_kernels.py --rows 64    # one row count
    python bench/decode_kernels.py --dry-run    # tiny shapes on the CPU, the kernels interpreted
"""

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import sampler as bench_sampler  # noqa: E402

PROVIDERS = ["torch", "triton"]
OPS = ["add_rms_norm", "rope_cache", "silu_mul"]
EPS = 1e-5


@dataclass
class Shape:
    dim: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    cache_len: int


LLAMA3_8B = Shape(4096, 14336, 32, 8, 128, 512)
TINY = Shape(256, 512, 8, 2, 64, 16)


def op_inputs(op: str, rows: int, shape: Shape, device: str, dtype: torch.dtype):
    """(the op's arguments, the bytes it must move)."""
    gen = torch.Generator().manual_seed(0)
    size = torch.finfo(dtype).bits // 8

    def randn(*dims):
        return torch.randn(*dims, generator=gen).to(device, dtype)

    if op == "add_rms_norm":  # x and residual read, hidden and normed written, the weight read
        moved = (4 * rows + 1) * shape.dim * size
        return (randn(rows, shape.dim), randn(rows, shape.dim), randn(shape.dim), EPS), moved
    if op == "silu_mul":
        gate_up = randn(rows, 2 * shape.intermediate)  # [R, 2I], one GEMM's output
        return (gate_up[:, :shape.intermediate], gate_up[:, shape.intermediate:]), 3 * rows * shape.intermediate * size
    Hq, Hkv, D = shape.n_heads, shape.n_kv_heads, shape.head_dim
    qkv = randn(rows, (Hq + 2 * Hkv) * D)  # [R, (Hq + 2 Hkv) D], one GEMM's output
    q, k, v = (part.view(rows, -1, D) for part in qkv.split([Hq * D, Hkv * D, Hkv * D], dim=1))
    angles = torch.rand(rows, D // 2, generator=gen) * 1000
    emb = torch.cat((angles, angles), dim=-1).to(device)  # [R, D]
    caches = [torch.zeros(rows, shape.cache_len, Hkv, D, device=device, dtype=dtype) for _ in range(2)]
    slots = torch.randperm(rows, generator=gen).to(device)
    pos = torch.randint(0, shape.cache_len, (rows,), generator=gen).to(device)
    moved = 2 * rows * (Hq + 2 * Hkv) * D * size + 2 * rows * D * size + 2 * rows * 8  # + cos, sin, slots, pos
    return (q, k, v, emb.cos().to(dtype), emb.sin().to(dtype), *caches, slots, pos), moved


def op_function(op: str, provider: str):
    import importlib

    module = importlib.import_module(f"mtcore.kernels.{op}")
    return getattr(module, op if provider == "triton" else f"{op}_ref")


def time_ms(fn, device: str, calls: int, repeats: int) -> float:
    """Median ms per call of fn: on CUDA, `calls` calls captured in one CUDA graph and replayed; else a loop."""
    fn()  # warm-up: compilation
    if device == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # capture wants a warm-up off the default stream
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        run = graph.replay
    else:
        def run():
            for _ in range(calls):
                fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(times)


def measure(op: str, rows: int, provider: str, shape: Shape, device: str, dtype, calls: int, repeats: int) -> dict:
    if provider == "triton" and device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return {"error": "the kernel needs CUDA (the interpreter runs in --dry-run and the tests)"}
    args, moved = op_inputs(op, rows, shape, device, dtype)
    fn = op_function(op, provider)
    return {"ms": time_ms(lambda: fn(*args), device, calls, repeats), "bytes": moved}


def table(rows: list[dict], bandwidth: float) -> str:
    lines = ["| op | rows | provider | ms | GB/s | of copy | time vs torch |", "|---|---:|---|---:|---:|---:|---:|"]
    base = {(r["op"], r["rows"]): r for r in rows if r["provider"] == "torch" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['rows']} | {r['provider']} | — | — | — | not run: {r['error']} |")
            continue
        rate = r["bytes"] / (r["ms"] * 1e-3)
        b = base.get((r["op"], r["rows"]))
        ratio = f"{r['ms'] / b['ms']:.2f}x" if b else "—"
        lines.append(f"| {r['op']} | {r['rows']} | {r['provider']} | {r['ms']:.4g} | {rate / 1e9:.4g} | "
                     f"{rate / bandwidth:.3g} | {ratio} |")
    return "\n".join(lines)


def main():
    parser = common.arg_parser(__doc__, PROVIDERS, repeats=10)
    parser.add_argument("--rows", default="64,210", help="decode rows, comma-separated")
    parser.add_argument("--calls", type=int, help="calls per timed replay (default 100 on CUDA, 3 on the CPU)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, the kernels interpreted")
    args = parser.parse_args()
    if args.dry_run:  # before any kernel module is imported: triton decides at decoration
        os.environ["TRITON_INTERPRET"] = "1"
        args.device, args.rows, args.repeats, args.rounds = "cpu", "4", 2, 1
    device, shape = args.device, TINY if args.dry_run else LLAMA3_8B
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    calls = args.calls or (100 if device == "cuda" else 3)
    row_counts = [int(n) for n in args.rows.split(",")]
    providers = args.providers.split(",")
    print(common.header("Decode element-wise kernels: residual add + RMSNorm, rotary + KV-cache write, SiLU-mul",
                        device, str(dtype).removeprefix("torch."),
                        f"rows {args.rows}, dim {shape.dim}, intermediate {shape.intermediate}, heads "
                        f"{shape.n_heads}/{shape.n_kv_heads} x {shape.head_dim}, cache {shape.cache_len}"
                        + (" (dry run: tiny shapes, the kernels interpreted)" if args.dry_run else "")))
    bandwidth = bench_sampler.copy_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e9:.4g} GB/s measured in this run; {calls} calls a timed "
          f"{'graph replay' if device == 'cuda' else 'loop'}, median of {args.repeats} x {args.rounds} rounds\n")
    jobs = [(op, n, p) for op in OPS for n in row_counts for p in providers]
    results = {job: [] for job in jobs}
    for _ in range(args.rounds):
        for job in jobs:
            results[job].append(measure(*job, shape, device, dtype, calls, args.repeats))
    rows = []
    for (op, n, provider), runs in results.items():
        ok = [r for r in runs if "error" not in r]
        merged = {"ms": statistics.median(r["ms"] for r in ok), "bytes": ok[0]["bytes"]} if ok else runs[0]
        rows.append({"op": op, "rows": n, "provider": provider, **merged})
    print(table(rows, bandwidth))


if __name__ == "__main__":
    main()
