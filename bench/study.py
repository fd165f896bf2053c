"""The toy world's study: Mutual-Taught against the arms that tell its parts apart, over seeds.

The paper's Tables 1 and 2 in miniature. The arms (--arms; default all four):
  mutual-taught  the method: the mutual pairing rule and the M-step
  estep-only     --no-m-step --pair-rule mutual: the same pairs, the RM fixed at r_0 (the M-step alone differs)
  fixed-rm       --no-m-step: RLHFlow's iterative DPO, best-worst pairs, fixed RM (the paper's baseline)
  rm-data-all    --rm-data all: the M-step trains r_t on every iteration's pairs so far, not t's alone
For each arm and seed, `mtcore train` runs the built-in toy world for --iters iterations in its own
run directory (resumable: rerunning reuses finished runs); then one table gives, per iteration and
arm, the mean and spread (standard deviation over seeds) of the gold win rate against the initial
policy, the gold score, and the RM's accuracy on gold-ordered pairs of the current policy's answers,
on the fixed held-out pairs and on the shifted benchmark (the same pairs for every RM). Iteration 0
is the initial policy and base RM (shared by every arm).

Paired tables (the seeds pair the runs' prompt splits and initial models) give the differences per
iteration, mean ± standard error over the seeds and the seeds ahead: Mutual-Taught minus E-step-only
(the M-step's own effect), Mutual-Taught minus the fixed RM (the paper's comparison), and
rm-data-all minus Mutual-Taught. A last table gives the diagnostics of the iterations that ran
(stopped ones excluded): the gold accuracy of the E-step's pairs and of the kept pseudo-pairs, and
the msample stage's eps, kept, filtered and identical counts. --assets DIR runs the toy world from
another asset set (built with `mtcore build-toy --out DIR`), through MTCORE_TOY_ASSETS.

    python bench/study.py [--seeds 0 1 2] [--iters 3] [--out runs/study] [--arms mutual-taught estep-only]
                          [--extra "--dpo-lr 1e-4"] [--assets DIR] [--mt-extra "--rm-lr 3e-5" --fixed-out DIR]
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_device, header  # noqa: E402

from mtcore.toy import METRIC_KEYS as KEYS  # noqa: E402
SHORT = {"gold_win_rate_vs_initial": "win vs init", "gold_score": "gold", "rm_accuracy_current_policy": "RM acc (policy)",
         "rm_accuracy_heldout": "RM acc (held-out)", "rm_accuracy_shifted": "RM acc (shifted)"}
ARMS = {"mutual-taught": [], "estep-only": ["--no-m-step", "--pair-rule", "mutual"], "fixed-rm": ["--no-m-step"],
        "rm-data-all": ["--rm-data", "all"]}
# The paired tables: (title, arm, the arm it is compared with).
COMPARISONS = (("the M-step's own effect", "mutual-taught", "estep-only"),
               ("the paper's comparison", "mutual-taught", "fixed-rm"),
               ("the RM on every iteration's pairs", "rm-data-all", "mutual-taught"))


def has_m_step(arm: str) -> bool:
    return "--no-m-step" not in ARMS[arm]


def run(arm: str, seed: int, args) -> tuple[dict, float]:
    base = args.fixed_out if not has_m_step(arm) and args.fixed_out else args.out
    out = Path(base) / f"{arm}_seed{seed}"
    mine = args.mt_extra if has_m_step(arm) else ""
    cmd = [sys.executable, "-m", "mtcore", "train", "--iters", str(args.iters), "--seed", str(seed), "--out", str(out),
           *ARMS[arm], *shlex.split(args.extra), *shlex.split(mine)]
    start = time.perf_counter()
    env = {**os.environ, "TRITON_INTERPRET": "0", **({"MTCORE_TOY_ASSETS": args.assets} if args.assets else {})}
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return json.loads((out / "metrics.json").read_text()), time.perf_counter() - start


def series(metrics: dict, iters: int) -> list[dict]:
    """Iteration 0..iters, each KEYS' numbers (NaN for one a run from before it lacks, or for JSON's
    null); an iteration after an early stop repeats the kept models' numbers."""
    rows = [metrics["initial"]]
    by_t = {e["iteration"]: e for e in metrics["iterations"] if "gold_score" in e}
    for t in range(1, iters + 1):
        rows.append(by_t.get(t, rows[-1]))
    return [{k: float("nan") if row.get(k) is None else row[k] for k in KEYS} for row in rows]


def spread(xs: list[float]) -> str:
    mean = statistics.fmean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default="runs/study")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="The arms to run "
                        "(default: all; a paired table needs both its arms).")
    parser.add_argument("--extra", default="", help="More `mtcore train` options, for every arm.")
    parser.add_argument("--mt-extra", default="", help="More options for the arms with the M-step only (M-step "
                        "settings, which a fixed RM has no use for).")
    parser.add_argument("--fixed-out", default=None, help="Where the runs of the arms without the M-step live "
                        "(default: --out): several studies that differ only in --mt-extra share them, finished "
                        "runs being reused.")
    parser.add_argument("--plot", default=None, help="PNG path (default: OUT/study.png).")
    parser.add_argument("--assets", default=None, help="Toy asset directory (default: the package's).")
    args = parser.parse_args()
    results, seconds, raw = {}, {}, {}
    for seed in args.seeds:  # seed-major, so a cut-short study still compares the arms
        for arm in args.arms:
            metrics, took = run(arm, seed, args)
            results.setdefault(arm, []).append(series(metrics, args.iters))
            raw.setdefault(arm, []).append(metrics)
            seconds.setdefault(arm, []).append(took)
    device = default_device()  # where `mtcore train` ran
    print(header("toy-world study", device, "fp32" if device == "cpu" else "bf16",
                 f"seeds {args.seeds}, {args.iters} iterations, extra '{args.extra}'"
                 + (f", M-step arms only '{args.mt_extra}'" if args.mt_extra else "")
                 + (f", assets {args.assets}" if args.assets else "")))
    print("| iteration | arm | " + " | ".join(SHORT[k] for k in KEYS) + " |")
    print("|---|---|" + "---:|" * len(KEYS))
    for t in range(args.iters + 1):
        for arm in (args.arms if t else args.arms[:1]):
            cells = [spread([runs[t][k] for runs in results[arm]]) for k in KEYS]
            print(f"| {t} | {arm if t else 'initial'} | " + " | ".join(cells) + " |")
    print("wall time per run (s): " + ", ".join(f"{m} {spread(s)}" for m, s in seconds.items()))
    print("stopped at: " + ", ".join(f"{m} {[r['stopped_at'] for r in rs]}" for m, rs in raw.items()))
    for title, arm, other in COMPARISONS:
        if arm in results and other in results:
            paired(title, results[arm], results[other], f"{arm} - {other}", args.iters)
    diagnostics(raw, args.iters)
    plot(results, args.iters, Path(args.plot or Path(args.out) / "study.png"))


def paired(title: str, ours: list, base: list, label: str, iters: int) -> None:
    """Per iteration, one arm minus another on the same seed: mean ± standard error over the seeds, and
    how many seeds had the first ahead (issue #26's measure; the seeds pair the runs' prompt splits and
    initial models, so the differences are far less noisy than the two spreads)."""
    print(f"{title}, paired by seed ({label}, mean ± standard error over {len(ours)} seeds, seeds ahead):")
    print("| iteration | " + " | ".join(SHORT[k] for k in KEYS) + " |")
    print("|---|" + "---:|" * len(KEYS))
    for t in range(1, iters + 1):
        cells = []
        for k in KEYS:
            d = [a[t][k] - b[t][k] for a, b in zip(ours, base)]
            se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else 0.0
            cells.append(f"{statistics.fmean(d):+.3f} ± {se:.3f} ({sum(x > 0 for x in d)} of {len(d)})")
        print(f"| {t} | " + " | ".join(cells) + " |")


DIAG = {"rm_accuracy_current_policy_base_rm": "r_0 on the same policy pairs",
        "m_step_gain": "RM acc (policy) - r_0's, same pairs",
        "estep_pairs_gold_accuracy": "E-step pairs gold acc", "pseudo_pairs_gold_accuracy": "pseudo gold acc",
        "pseudo_pairs_rm_gold_accuracy": "r_{t-1} gold acc on them", "pseudo_pairs_override": "kept against r_{t-1}",
        "pseudo_pairs_override_gold_accuracy": "their gold acc", "pseudo_pairs_gold_ties": "pseudo gold ties",
        "eps": "eps", "pseudo_pairs": "kept", "filtered": "filtered", "identical": "identical"}


def diag_value(entry: dict, key: str):
    """One DIAG value of an iteration's metrics entry (msample's counts sit under "msample"); m_step_gain
    is derived: the run's RM minus r_0 on the same policy pairs."""
    if key == "m_step_gain":
        return entry["rm_accuracy_current_policy"] - entry.get("rm_accuracy_current_policy_base_rm", float("nan"))
    return entry.get(key, entry.get("msample", {}).get(key))


def diagnostics(raw: dict, iters: int) -> None:
    """Per iteration and arm, over the runs that evaluated it: mean ± sd of each DIAG value."""
    print("| iteration | arm | runs | " + " | ".join(DIAG.values()) + " |")
    print("|---|---|---:|" + "---:|" * len(DIAG))
    for t in range(1, iters + 1):
        for arm, runs in raw.items():
            entries = [e for m in runs for e in m["iterations"] if e["iteration"] == t and "gold_score" in e
                       and not e.get("select", {}).get("stopped")]
            if not entries:
                continue
            cells = []
            for key in DIAG:
                xs = [diag_value(e, key) for e in entries]
                xs = [x for x in xs if isinstance(x, (int, float)) and x == x]
                cells.append(spread(xs) if xs else "-")
            print(f"| {t} | {arm} | {len(entries)} | " + " | ".join(cells) + " |")


def plot(results: dict, iters: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KEYS), figsize=(4 * len(KEYS), 3.4), dpi=100)
    xs = list(range(iters + 1))
    for ax, key in zip(axes, KEYS):
        for arm, runs in results.items():
            means = [statistics.fmean(r[t][key] for r in runs) for t in xs]
            sds = [statistics.stdev([r[t][key] for r in runs]) if len(runs) > 1 else 0.0 for t in xs]
            ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=arm)
        ax.set_title(SHORT[key])
        ax.set_xlabel("iteration")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
