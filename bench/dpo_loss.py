"""Benchmark: the whole DPO loss over the LM head, forward+backward, reference log-probs included.

Inputs as Liger-Kernel's chunked DPO takes them: policy hidden [2B, T, H] (chosen rows first), the
policy's LM head weight [V, H] (trained), reference hidden and weight (frozen), labels [2B, T].
One call = reference log-probs (no grad) + policy log-probs + sigmoid DPO loss + backward.

Providers:
- naive: full logits, fp32 log-softmax, gather, sums, DPO loss (TRL / OpenRLHF's way);
- compiled: torch.compile of naive;
- liger: Liger-Kernel's LigerFusedLinearDPOLoss (chunked over pairs, compiled), where installed;
- mtcore: fused_logprobs (reference under no_grad) -> sequence sums -> dpo_loss.
FLOPs counted: reference forward 2NHV + policy forward+backward 6NHV, N = 2BT.

    python bench/dpo_loss.py              # Llama-3-8B head on CUDA: B=4 pairs, T=2048, H=4096, V=128256
    python bench/dpo_loss.py --small      # CPU target: B=4, T=512, H=256, V=128256, fp32
    python bench/dpo_loss.py --loss-only  # the loss kernel alone on [B] log-probs, B=65536 (GB/s)
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROVIDERS = ["naive", "compiled", "liger", "mtcore"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BETA = 0.1


def naive_dpo(weight, hidden, labels, ref_hidden, ref_weight):
    """TRL-style: full logits, upcast, log-softmax, gather, per-sequence sums, sigmoid DPO."""
    def seq_logps(h, w):
        logps = (h @ w.T).float().log_softmax(-1)  # [2B, T, V]
        mask = labels != -100
        tok = logps.gather(2, torch.where(mask, labels, 0).unsqueeze(2)).squeeze(2)
        return (tok * mask).sum(1)  # [2B]

    with torch.no_grad():
        ref = seq_logps(ref_hidden, ref_weight)
    pol = seq_logps(hidden, weight)
    B = pol.shape[0] // 2
    m = (pol[:B] - pol[B:]) - (ref[:B] - ref[B:])
    return -F.logsigmoid(BETA * m).mean()


def mtcore_dpo(weight, hidden, labels, ref_hidden, ref_weight):
    from mtcore.kernels import dpo_loss, fused_logprobs

    two_b, T, H = hidden.shape
    flat_labels = labels.reshape(-1)
    with torch.no_grad():
        ref = fused_logprobs(ref_hidden.reshape(-1, H), ref_weight, flat_labels).view(two_b, T).sum(1)
    pol = fused_logprobs(hidden.reshape(-1, H), weight, flat_labels).view(two_b, T).sum(1)
    B = two_b // 2
    return dpo_loss(pol[:B], pol[B:], ref[:B], ref[B:], beta=BETA).loss


def build_loss_only(args):
    """The loss kernel alone on [B] sequence log-probs: naive = dpo_loss_ref under autograd."""
    from mtcore.kernels.dpo_loss import dpo_loss, dpo_loss_ref

    device, B = args["device"], args["B"]
    gen = torch.Generator().manual_seed(0)
    pc, pr = (torch.randn(B, generator=gen).to(device).requires_grad_() for _ in range(2))
    rc, rr = (torch.randn(B, generator=gen).to(device) for _ in range(2))
    op = {"naive": dpo_loss_ref, "compiled": torch.compile(dpo_loss_ref), "mtcore": dpo_loss}.get(args["provider"])
    if op is None:
        raise RuntimeError(f"no {args['provider']} provider for the loss alone")

    def fn():
        op(pc, pr, rc, rr, beta=BETA).loss.backward()
        pc.grad = pr.grad = None
    return fn, device


def build(args):
    if args.get("loss_only"):
        return build_loss_only(args)
    device, dtype = args["device"], DTYPES[args["dtype"]]
    B, T, H, V = args["B"], args["T"], args["H"], args["V"]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * B, T, H, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) * H ** -0.5).to(device, dtype).requires_grad_()
    ref_hidden = torch.randn(2 * B, T, H, generator=gen).to(device, dtype)
    ref_weight = (torch.randn(V, H, generator=gen) * H ** -0.5).to(device, dtype)
    labels = torch.randint(0, V, (2 * B, T), generator=gen).to(device)
    provider = args["provider"]
    if provider == "naive":
        op = naive_dpo
    elif provider == "compiled":
        op = torch.compile(naive_dpo)
    elif provider == "mtcore":
        op = mtcore_dpo
    elif provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        liger = LigerFusedLinearDPOLoss(beta=BETA, compiled=True, use_ref_model=True, compute_nll_loss=False)

        def op(w, h, y, rh, rw):
            out = liger(w, h, y, None, rh, rw)
            return out[0] if isinstance(out, tuple) else out
    else:
        raise ValueError(provider)

    def fn():  # the gradients are freed after each call, so every call's peak includes them
        op(weight, hidden, labels, ref_hidden, ref_weight).backward()
        hidden.grad = weight.grad = None
    return fn, device


def main():
    if "--worker" in sys.argv:
        return common.worker_main(build, sys.argv)
    parser = common.arg_parser(__doc__, PROVIDERS)
    parser.add_argument("--small", action="store_true", help="CPU shapes: B=4, T=512, H=256 (V stays 128256), fp32")
    parser.add_argument("--B", type=int, default=4, help="pairs")
    parser.add_argument("--T", type=int)
    parser.add_argument("--H", type=int)
    parser.add_argument("--V", type=int, default=128256)
    parser.add_argument("--dtype", choices=DTYPES)
    parser.add_argument("--loss-only", action="store_true", help="the loss on [B] log-probs; B defaults to 65536")
    args = parser.parse_args()
    if args.loss_only:
        B = 65536 if args.B == 4 else args.B
        print(common.header("DPO loss alone (sigmoid, beta 0.1), forward+backward", args.device, "fp32", f"B={B}"))
        jobs = [dict(provider=p, device=args.device, B=B, loss_only=True, repeats=args.repeats)
                for p in args.providers.split(",") if p != "liger"]
        # bytes: read 4 [B] inputs, write loss terms, rewards and the saved gradient; backward reads 1, writes 2
        rows = [{"provider": j["provider"], "mode": "fwdbwd", "work": 4 * B * 11, **r}
                for j, r in zip(jobs, common.run_rounds(__file__, jobs, args.rounds))]
        print(common.table(rows, rate_unit="GB/s", rate_scale=1e9))
        return
    T = args.T or (512 if args.small else 2048)
    H = args.H or (256 if args.small else 4096)
    dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    print(common.header("DPO loss over the LM head (sigmoid, beta 0.1), reference log-probs included",
                        args.device, dtype, f"B={args.B} pairs, T={T}, H={H}, V={args.V}"))
    N = 2 * args.B * T
    jobs = [dict(provider=p, device=args.device, dtype=dtype, B=args.B, T=T, H=H, V=args.V, repeats=args.repeats)
            for p in args.providers.split(",")]
    rows = [{"provider": j["provider"], "mode": "fwdbwd", "work": 8 * N * H * args.V, **r}
            for j, r in zip(jobs, common.run_rounds(__file__, jobs, args.rounds))]
    print(common.table(rows))


if __name__ == "__main__":
    main()
