"""Benchmark: the Bradley-Terry loss on [B] rewards, forward+backward (margin and centering on).

Providers: naive (bt_loss_ref under autograd), torch.compile of naive, mtcore (kernels/bt_loss.py).
The rate column is GB/s of [B] fp32 vectors read and written (forward reads 3, writes 3; backward
reads 2, writes 2). B defaults to 65536 pairs; the paper's RM batch is 512.

    python bench/bt_loss.py [--B 512]
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROVIDERS = ["naive", "compiled", "mtcore"]


def build(args):
    from mtcore.kernels.bt_loss import bt_loss, bt_loss_ref

    device, B = args["device"], args["B"]
    gen = torch.Generator().manual_seed(0)
    chosen, rejected = (torch.randn(B, generator=gen).to(device).requires_grad_() for _ in range(2))
    margin = torch.rand(B, generator=gen).to(device)
    op = {"naive": bt_loss_ref, "compiled": torch.compile(bt_loss_ref), "mtcore": bt_loss}[args["provider"]]

    def fn():
        op(chosen, rejected, margin=margin, center_coef=0.01).loss.backward()
        chosen.grad = rejected.grad = None
    return fn, device


def main():
    if "--worker" in sys.argv:
        return common.worker_main(build, sys.argv)
    parser = common.arg_parser(__doc__, PROVIDERS, repeats=20)
    parser.add_argument("--B", type=int, default=65536, help="pairs")
    args = parser.parse_args()
    print(common.header("Bradley-Terry loss (margin, center_coef 0.01), forward+backward", args.device, "fp32",
                        f"B={args.B}"))
    jobs = [dict(provider=p, device=args.device, B=args.B, repeats=args.repeats) for p in args.providers.split(",")]
    rows = [{"provider": j["provider"], "mode": "fwdbwd", "work": 4 * args.B * 10, **r}
            for j, r in zip(jobs, common.run_rounds(__file__, jobs, args.rounds))]
    print(common.table(rows, rate_unit="GB/s", rate_scale=1e9))


if __name__ == "__main__":
    main()
