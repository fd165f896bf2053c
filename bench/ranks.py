"""How far a run moves with its rank count: the same `mtcore train --batch-invariant` under torchrun on 1
rank and on 2 (one thread each, as torchrun sets), compared stage by stage.

    python bench/ranks.py                 # the toy world, --iters 2
    python bench/ranks.py --iters 3 -- --seed 1

Sampling and scoring are the same bits on any rank count with --batch-invariant (tests/test_invariance.py
holds iteration 1's). Training is not: each rank sums its own examples' gradients before the all-reduce
sums the ranks', and its packed micro-batches hold other sequences, so a forward pass's sums run in
another order too. This prints how far that moves:
- DPO and RM: the largest difference in any step's loss and gradient norm, and the first step whose
  loss differs. Each sequence's forward pass is the same bits on any ranks (tests/test_invariance.py),
  but a step's loss is a sum over the ranks too, so it may differ from step 1 (as the RM's does);
  DPO's first two steps (lr 0, then the first update) give the same loss;
- the weights each iteration ends with: the largest element difference, and the difference's norm as
  a fraction of the iteration's own update (|w_2ranks - w_1rank| / |w_1rank - w_start|);
- the files each stage writes (the same bytes or not), and the share of iteration t+1's samples that
  stayed the same after iteration t's models moved;
- metrics.json's evaluation columns on both.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

STAGE_FILES = ("samples.jsonl", "scored.jsonl", "pairs.jsonl", "pseudo_pairs.jsonl")
EVAL = ("gold_score", "gold_win_rate_vs_initial", "rm_accuracy_heldout", "rm_accuracy_shifted",
        "rm_accuracy_current_policy")


def run(world: int, out: Path, iters: int, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "mtcore", "train", "--iters", str(iters), "--batch-invariant", "--out", str(out), *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{world} rank(s) failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def step_gap(a: list[dict], b: list[dict], key: str) -> str:
    if len(a) != len(b):
        return f"{len(a)} steps against {len(b)}"
    return f"{max(abs(x[key] - y[key]) for x, y in zip(a, b)):.2e}"


def weight_gap(one: Path, two: Path, start: Path) -> tuple[float, float]:
    """(largest |w2 - w1| over every element, |w2 - w1| / |w1 - w_start| over all weights)."""
    w1, w2, w0 = (load_file(str(p / "model.safetensors")) for p in (one, two, start))
    largest, gap, update = 0.0, 0.0, 0.0
    for name, a in w1.items():
        a, b, s = a.double(), w2[name].double(), w0[name].double()
        largest = max(largest, float((b - a).abs().max()))
        gap += float(((b - a) ** 2).sum())
        update += float(((a - s) ** 2).sum())
    return largest, (gap / update) ** 0.5 if update else float("nan")


def same_lines(a: Path, b: Path) -> str:
    x, y = a.read_text().splitlines(), b.read_text().splitlines()
    if x == y:
        return "same bytes"
    return f"{sum(p == q for p, q in zip(x, y))} of {len(x)} lines the same"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="more `mtcore train` options, after --")
    args = parser.parse_args()
    from mtcore import toy

    print(common.header("training on 1 rank and on 2: how far the run moves", "cpu", "fp32",
                        f"the toy world, --iters {args.iters} --batch-invariant {' '.join(args.extra)}".strip()))
    with tempfile.TemporaryDirectory() as tmp:
        runs = {w: Path(tmp) / f"ranks{w}" for w in (1, 2)}
        seconds = {w: run(w, out, args.iters, args.extra) for w, out in runs.items()}
        print(f"\nwall time: {seconds[1]:.1f} s on 1 rank, {seconds[2]:.1f} s on 2\n")
        one, two = runs[1], runs[2]
        print("| iteration | stage | 1 rank against 2 |\n|---|---|---|")
        start = {"policy": toy.ASSETS / "policy", "reward": toy.ASSETS / "reward"}
        for t in range(1, args.iters + 1):
            it1, it2 = one / f"iter_{t}", two / f"iter_{t}"
            for name in STAGE_FILES:
                if (it1 / name).exists():
                    print(f"| {t} | {name} | {same_lines(it1 / name, it2 / name)} |")
            for stage, log in (("dpo", "dpo_metrics.jsonl"), ("rm", "rm_metrics.jsonl")):
                a, b = steps(it1 / log), steps(it2 / log)
                if not a:
                    print(f"| {t} | {stage} | not trained in this iteration (both runs) |")
                    continue
                first = next((x["step"] for x, y in zip(a, b) if x["loss"] != y["loss"]), None)
                print(f"| {t} | {stage}: largest step difference, loss / grad norm; the first step whose loss "
                      f"differs | {step_gap(a, b, 'loss')} / {step_gap(a, b, 'grad_norm')} over {len(a)} steps; "
                      f"{first or 'none'} |")
            for kind in ("policy", "reward"):
                if (it1 / kind).exists():
                    largest, share = weight_gap(it1 / kind, it2 / kind, start[kind])
                    moved = f"{share:.2e}" if share == share else "no update: the iteration kept its start"
                    print(f"| {t} | {kind} weights: largest difference; its norm / the update's | "
                          f"{largest:.2e}; {moved} |")
                    start[kind] = it1 / kind
        m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
        print("\n| iteration | " + " | ".join(EVAL) + " |\n|---|" + "---|" * len(EVAL))
        for t, (a, b) in enumerate(zip(m1["iterations"], m2["iterations"]), 1):
            cells = [f"{a['eval'].get(k, float('nan')):.4f} / {b['eval'].get(k, float('nan')):.4f}" for k in EVAL]
            print(f"| {t} (1 rank / 2) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
