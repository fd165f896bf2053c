"""How right are the M-step's pseudo-labels "y_new > y_old", and do less noisy answers help? (issue #14)

For finished Mutual-Taught runs of a toy world, re-answers each iteration's RM split with pi_t and
pi_{t-1} (their saved checkpoints) in several ways, scores both answers with r_{t-1} as the M-step
does, and tallies, with the gold judge (diagnostics only: nothing here trains), the pseudo-label's
accuracy on the non-tied differing pairs, split by what r_{t-1} says:
  agree     r_{t-1}(y_new) - r_{t-1}(y_old) > 0        (kept; teaches the RM nothing new)
  override  -eps < delta <= 0                          (kept; the only pairs that can change its mind)
  dropped   delta <= -eps                              (the eps filter drops them)
Answer modes (pi_t and pi_{t-1} answer the same way):
  sample1   one sample at the run's temperature and top-p, the loop's own msample seed (what the M-step used)
  greedy    temperature 0
  mode{k}   the most frequent of k samples at the run's settings (first seen wins a tie); uses no RM
  rbest{k}  of k samples at the run's settings, the one r_{t-1} scores highest
The M-step needs the override pairs' pseudo-label accuracy above 0.5 to improve the RM.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/research/toy_pseudo_labels.py --base WORLD_ASSETS \
        --k 8 --json out.json RUN_DIR [RUN_DIR ...]

RUN_DIR: a `mtcore train` output (mutual-taught, M-step on); --base: the world's assets directory
(pi_0 = BASE/policy, r_0 = BASE/reward), which must be the one the run used."""
import argparse
import collections
import dataclasses
import json
import random
import statistics
import time
from pathlib import Path

GROUPS = ("agree", "override", "dropped")
LENGTHS = ("shorter", "samelen", "longer")  # y_new against y_old, in digits


def tally(prompts, new, old, new_r, old_r, gold_score) -> dict:
    """Counts for one iteration and one answer mode."""
    n = len(old_r)
    mean = sum(old_r) / n
    eps = (sum((r - mean) ** 2 for r in old_r) / n) ** 0.5  # mutual_taught.pseudo_pair_filter's eps
    c = collections.Counter()
    for p, a, b, ra, rb in zip(prompts, new, old, new_r, old_r):
        ga, gb = gold_score(p, a), gold_score(p, b)
        c["gold_new"] += ga / len(prompts)
        c["gold_old"] += gb / len(prompts)
        if a == b:
            c["identical"] += 1
            continue
        d = ra - rb
        grp = "agree" if d > 0 else "override" if d > -eps else "dropped"
        kind = "better" if ga > gb else "worse" if ga < gb else "tie"
        c[f"{grp}_{kind}"] += 1
        if kind != "tie":
            c["rm_right"] += (d > 0) == (ga > gb)
            c["rm_decided"] += 1
            # by length: the off-policy RM never saw a duplicated digit (a longer answer)
            la, lb = len(a.split()), len(b.split())
            rel = "shorter" if la < lb else "longer" if la > lb else "samelen"
            c[f"{rel}_{kind}"] += 1
            c[f"{rel}_rm_right"] += (d > 0) == (ga > gb)
            c[f"{grp}_{rel}_{kind}"] += 1
    c["eps"] = eps
    return dict(c)


def answers(cfg, device, policy_dir, prompts, mode, k, seed, scorer):
    """One answer per prompt in `mode`; scorer is r_{t-1} (inference.Scorer)."""
    from mtcore.inference import first_answers, sample_responses

    if mode == "sample1":
        return first_answers(cfg, device, policy_dir, prompts, seed)
    if mode == "greedy":
        return first_answers(dataclasses.replace(cfg, temperature=0.0), device, policy_dir, prompts, seed)
    texts = [[r["text"] for r in rs] or [""] for rs in sample_responses(cfg, device, policy_dir, prompts, k, seed)]
    if mode.startswith("mode"):
        return [collections.Counter(ts).most_common(1)[0][0] for ts in texts]  # Counter keeps first-seen order
    scores = scorer(prompts, texts)
    return [max(zip(s, ts), key=lambda x: x[0])[1] for s, ts in zip(scores, texts)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()

    import tomllib

    import torch

    from mtcore.config import LoopConfig
    from mtcore.inference import Scorer
    from mtcore.toy import gold_score

    torch.set_num_threads(1)
    device = torch.device("cpu")
    modes = ("sample1", "greedy", f"mode{a.k}", f"rbest{a.k}")
    rows = []
    for run in a.runs:
        raw = tomllib.loads((run / "config.toml").read_text())
        fields = {f.name for f in dataclasses.fields(LoopConfig)}
        cfg = LoopConfig(**{k: v for k, v in raw.items() if k in fields})
        prompts = json.loads((run / "splits.json").read_text())["rm"]
        for it in sorted(run.glob("iter_*"), key=lambda p: int(p.name.split("_")[1])):
            t = int(it.name.split("_")[1])
            if not (it / "msample.json").exists():
                continue  # an iteration the early stop skipped
            pol = lambda s: a.base / "policy" if s == 0 else run / f"iter_{s}" / "policy"
            rew = a.base / "reward" if t == 1 else run / f"iter_{t - 1}" / "reward"
            seed = random.Random(f"{cfg.seed}:{t}:msample").randrange(2**31)  # Run.seed(t, "msample")
            scorer = Scorer(cfg, device, rew)
            for mode in modes:
                t0 = time.perf_counter()
                new = answers(cfg, device, pol(t), prompts, mode, a.k, seed, scorer)
                old = answers(cfg, device, pol(t - 1), prompts, mode, a.k, seed, scorer)
                scores = scorer(prompts, [[x, y] for x, y in zip(new, old)])
                c = tally(prompts, new, old, [s[0] for s in scores], [s[1] for s in scores], gold_score)
                if mode == "sample1":  # the loop's own pairs, if the sampler still reproduces them
                    m = json.loads((it / "msample.json").read_text())
                    c["reproduces_msample"] = m["new_texts"] == new and m["old_texts"] == old
                c.update(run=str(run), t=t, mode=mode, seconds=round(time.perf_counter() - t0, 1))
                rows.append(c)
                print(json.dumps(c), flush=True)
    a.json.write_text(json.dumps(rows, indent=1))
    report(rows, modes)


def pooled(rows, mode, prefix, keys) -> list[int]:
    """For one answer mode, the sum over runs and iterations of each count f"{prefix}_{key}"."""
    return [sum(r.get(f"{prefix}_{k}", 0) for r in rows if r["mode"] == mode) for k in keys]


def acc(b, w):
    return b / (b + w) if b + w else float("nan")


def report(rows, modes):
    def ms(xs):
        xs = [x for x in xs if x == x]
        if not xs:
            return "-"
        return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"

    print("\nPer iteration, mean ± sd over runs (accuracies on non-tied differing pairs):\n")
    print("| iter | mode | runs | identical | differing | pseudo-label acc | r_{t-1} acc | override pairs (better/worse/tie) "
          "| override acc | dropped acc | gold new vs old |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in sorted({r["t"] for r in rows}):
        for mode in modes:
            rs = [r for r in rows if r["t"] == t and r["mode"] == mode]
            g = lambda r, grp, k: r.get(f"{grp}_{k}", 0)
            b = lambda r: sum(g(r, x, "better") for x in GROUPS)
            w = lambda r: sum(g(r, x, "worse") for x in GROUPS)
            diff = lambda r: sum(g(r, x, k) for x in GROUPS for k in ("better", "worse", "tie"))
            ov = [f"{g(r, 'override', 'better')}/{g(r, 'override', 'worse')}/{g(r, 'override', 'tie')}" for r in rs]
            print(f"| {t} | {mode} | {len(rs)} | {ms([r.get('identical', 0) for r in rs])} | {ms([diff(r) for r in rs])} | "
                  f"{ms([acc(b(r), w(r)) for r in rs])} | {ms([acc(r.get('rm_right', 0), r.get('rm_decided', 0) - r.get('rm_right', 0)) for r in rs])} | "
                  f"{', '.join(ov)} | {ms([acc(g(r, 'override', 'better'), g(r, 'override', 'worse')) for r in rs])} | "
                  f"{ms([acc(g(r, 'dropped', 'better'), g(r, 'dropped', 'worse')) for r in rs])} | "
                  f"{statistics.fmean(r['gold_new'] for r in rs):.3f} vs {statistics.fmean(r['gold_old'] for r in rs):.3f} |")
    print("\nPooled, non-tied differing pairs by y_new's length against y_old's (in digits):\n")
    print("| mode | y_new is | pairs | pseudo-label acc | r_{t-1} acc |")
    print("|---|---|---:|---:|---:|")
    for mode in modes:
        for rel in LENGTHS:
            b, w, right = pooled(rows, mode, rel, ("better", "worse", "rm_right"))
            print(f"| {mode} | {rel} | {b + w} | {acc(b, w):.3f} | {acc(right, b + w - right):.3f} |")
    print("\nPooled, the override pairs (-eps < delta <= 0, kept against r_{t-1}) by length:\n")
    print("| mode | y_new is | override pairs (non-tie) | y_new gold-better | pseudo-label acc |")
    print("|---|---|---:|---:|---:|")
    for mode in modes:
        for rel in LENGTHS:
            b, w = pooled(rows, mode, f"override_{rel}", ("better", "worse"))
            print(f"| {mode} | {rel} | {b + w} | {b} | {acc(b, w):.3f} |")
    print("\nPooled over runs and iterations (pairs with y_new != y_old):\n")
    print("| mode | group | pairs | y_new gold-better | gold-worse | tie | pseudo-label acc (non-tie) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for mode in modes:
        for grp in GROUPS:
            b, w, tie = pooled(rows, mode, grp, ("better", "worse", "tie"))
            print(f"| {mode} | {grp} | {b + w + tie} | {b} | {w} | {tie} | {acc(b, w):.3f} |")


if __name__ == "__main__":
    main()
