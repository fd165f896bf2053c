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
"""

import argparse
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


def build(args):
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU shapes: B=4, T=512, H=256 (V stays 128256), fp32")
    parser.add_argument("--B", type=int, default=4, help="pairs")
    parser.add_argument("--T", type=int)
    parser.add_argument("--H", type=int)
    parser.add_argument("--V", type=int, default=128256)
    parser.add_argument("--dtype", choices=DTYPES)
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=common.default_device())
    args = parser.parse_args()
    T = args.T or (512 if args.small else 2048)
    H = args.H or (256 if args.small else 4096)
    dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    print(common.header("DPO loss over the LM head (sigmoid, beta 0.1), reference log-probs included",
                        args.device, dtype, f"B={args.B} pairs, T={T}, H={H}, V={args.V}"))
    N = 2 * args.B * T
    rows = []
    for provider in args.providers.split(","):
        job = dict(provider=provider, device=args.device, dtype=dtype, B=args.B, T=T, H=H, V=args.V,
                   repeats=args.repeats)
        result = common.run_provider(__file__, job)
        rows.append({"provider": provider, "mode": "fwdbwd", "work": 8 * N * H * args.V, **result})
        print(f"  {provider}: {result}", file=sys.stderr, flush=True)
    print(common.table(rows))


if __name__ == "__main__":
    main()
