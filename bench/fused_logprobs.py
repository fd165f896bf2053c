"""Benchmark: per-token log-probs over the LM head, forward and forward+backward.

Providers: mtcore (kernels/fused_logprobs.py), naive torch (full logits, fp32 upcast: TRL's way),
torch.compile of naive, Liger-Kernel's fused linear cross-entropy (reduction='none', = -logps) where
it is installed and the device is CUDA. FLOPs counted: forward 2NHV, forward+backward 6NHV (mtcore's
backward recomputes the logits, 8NHV done; the rate column counts only the 6NHV a model needs).

    python bench/fused_logprobs.py                   # Llama-3-8B head on CUDA: N=8192, H=4096, V=128256
    python bench/fused_logprobs.py --small           # CPU target: N=2048, H=256, V=128256, fp32
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROVIDERS = ["naive", "compiled", "liger", "mtcore"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(args):
    from mtcore.kernels.fused_logprobs import fused_logprobs, fused_logprobs_ref

    device, dtype = args["device"], DTYPES[args["dtype"]]
    N, H, V = args["N"], args["H"], args["V"]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) * H ** -0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=gen).to(device)
    provider = args["provider"]
    if provider == "naive":
        op = fused_logprobs_ref
    elif provider == "compiled":
        op = torch.compile(fused_logprobs_ref)
    elif provider == "mtcore":
        op = fused_logprobs
    elif provider == "liger":
        if device != "cuda":
            raise RuntimeError("Liger's fused linear cross-entropy is Triton-only: needs CUDA")
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        # fp32 gradient accumulation, as mtcore does (Liger's default accumulates in the input dtype)
        loss = LigerFusedLinearCrossEntropyLoss(reduction="none", accum_dtype=torch.float32)

        def op(h, w, y):
            return -loss(w, h, y)
    else:
        raise ValueError(provider)

    if args["mode"] == "fwd":
        def fn():
            with torch.no_grad():
                op(hidden, weight, labels)
    else:
        grad = torch.randn(N, generator=gen).to(device)

        def fn():  # the gradients are freed after each call, so every call's peak includes them
            (op(hidden, weight, labels) * grad).sum().backward()
            hidden.grad = weight.grad = None
    return fn, device


def main():
    if "--worker" in sys.argv:
        return common.worker_main(build, sys.argv)
    parser = common.arg_parser(__doc__, PROVIDERS)
    parser.add_argument("--small", action="store_true", help="CPU shapes: N=2048, H=256 (V stays 128256), fp32")
    parser.add_argument("--N", type=int)
    parser.add_argument("--H", type=int)
    parser.add_argument("--V", type=int, default=128256)
    parser.add_argument("--dtype", choices=DTYPES)
    parser.add_argument("--modes", default="fwd,fwdbwd")
    args = parser.parse_args()
    N = args.N or (2048 if args.small else 8192)
    H = args.H or (256 if args.small else 4096)
    dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    print(common.header("fused_logprobs: log p(label | hidden) over the LM head", args.device, dtype,
                        f"N={N} H={H} V={args.V}"))
    jobs = [dict(provider=provider, mode=mode, device=args.device, dtype=dtype, N=N, H=H, V=args.V,
                 repeats=args.repeats) for mode in args.modes.split(",") for provider in args.providers.split(",")]
    results = common.run_rounds(__file__, jobs, args.rounds)
    rows = [{"provider": j["provider"], "mode": j["mode"], "work": (2 if j["mode"] == "fwd" else 6) * N * H * args.V,
             **r} for j, r in zip(jobs, results)]
    print(common.table(rows))
    peak = common.matmul_peak_tflops(args.device, DTYPES[dtype])
    if peak:
        best = max((r for r in rows if r["provider"] == "mtcore" and r["mode"] == "fwdbwd" and "ms" in r),
                   key=lambda r: r["work"], default=None)
        if best:
            rate = best["work"] / (best["ms"] * 1e-3) / 1e12
            print(f"measured {dtype} matmul peak {peak:.1f} TFLOP/s; mtcore fwd+bwd at {rate:.1f} = "
                  f"{100 * rate / peak:.0f}% (6NHV counted; 8NHV done)")


if __name__ == "__main__":
    main()
