"""An experiment for issue #14: does an M-step on *greedy* pseudo-pairs make r_1 better than r_0?

Section 7 of bench/results/toy_world_research_202611.md found greedy pi_1-vs-pi_0 labels at iteration 1
of the duplicates-only world to be the one configuration more right than r_0 (0.81 vs 0.66), but on
only ~22 of 160 prompts. Here, for each stored Mutual-Taught run's iteration 1 (pi_0 = the world's
policy, pi_1 = the run's, r_0 = the world's RM), on --prompts fresh prompts:
- pi_1 and pi_0 answer greedily; r_0 scores both; the loop's own rule (mutual_taught.pseudo_pair_filter, identical
  texts dropped) makes the pseudo-pairs;
- r_0 is retrained the loop's way (Bradley-Terry from r_0, the run's RM settings) on (a) the greedy
  pseudo-pairs alone, (b) them plus the run's E-step pairs;
- every RM (r_0, the run's own r_1, (a), (b)) is scored on gold-ordered pairs of pi_1's test answers
  (rm_accuracy_current_policy, the metric the M-step should raise) and on the held-out pairs.
The gold judge reads only; no gold label reaches training.

    python bench/research/toy_greedy_mstep.py --world /tmp/world_dup --runs /tmp/study_dup_tau0 --seeds 0 1 2 3 4
"""

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def runs_parser(doc: str, seeds: list[int]) -> argparse.ArgumentParser:
    """The research scripts' common options: the world, the stored study runs, the seeds."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--world", type=Path, required=True, help="the asset directory the runs used")
    ap.add_argument("--runs", type=Path, required=True, help="bench/study.py's output directory")
    ap.add_argument("--seeds", type=int, nargs="+", default=seeds)
    return ap


def print_summary(rows: list[dict], seeds: list[int]) -> None:
    """Mean ± sd over the seeds of every quantity in the rows (NaNs left out)."""
    print("\n| quantity | mean ± sd over seeds " + str(seeds) + " |\n|---|---:|")
    for k in [k for k in rows[0] if k != "seed"]:
        xs = [r[k] for r in rows if r[k] == r[k]]
        print(f"| {k} | {statistics.fmean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.3f} |")


def stored_iteration_1(world: Path, runs: Path, seed: int):
    """A stored Mutual-Taught run's iteration 1: (its directory, its config, the models' directories
    {pi0, pi1, r0, r1}, the toy test prompts)."""
    from mtcore import toy
    from mtcore.config import read_config_file, resolve_config

    run = runs / f"mutual-taught_seed{seed}"
    models = {"pi0": world / "policy", "pi1": run / "iter_1" / "policy", "r0": world / "reward",
              "r1": run / "iter_1" / "reward"}
    return run, resolve_config(read_config_file(run / "config.toml"), {}), models, toy.make_splits(toy.ASSET_SEED, 0)["test"]


def retrained_accuracies(cfg, device, r0, train_sets: dict, seed: int, rms: dict, policy_pairs, heldout) -> dict:
    """r_0 retrained the loop's way (Bradley-Terry from r_0, cfg's RM settings) on each named set of pairs
    (train_sets: name -> rows), then every RM (those, and the named checkpoints in rms) scored on
    policy_pairs and heldout: {"<name> policy": accuracy, "<name> heldout": accuracy}."""
    import torch

    from mtcore import toy
    from mtcore.checkpoint import load_model, save_model
    from mtcore.data import encode_pair, load_tokenizer
    from mtcore.train import BradleyTerry, TrainConfig, fit, prepare_examples

    out, rms = {}, dict(rms)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(r0)
        for name, train_rows in train_sets.items():
            examples = [encode_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"]) for r in train_rows]
            train_cfg = TrainConfig(lr=cfg.rm_lr, epochs=cfg.rm_epochs, batch_size=cfg.rm_batch_size,
                                    micro_batch_tokens=cfg.micro_batch_tokens, warmup_ratio=cfg.warmup_ratio, seed=seed)
            examples, _ = prepare_examples(examples, name, cfg.max_length, train_cfg)
            model = load_model(r0, "reward", dtype=torch.float32, device=device)
            fit(model, examples, BradleyTerry(), train_cfg, desc=f"seed {seed} {name}")
            rms[name] = Path(tmp) / name
            save_model(model, rms[name], tokenizer=tokenizer)
        for name, path in rms.items():
            out[f"{name} policy"] = toy._rm_accuracy(cfg, device, path, policy_pairs)
            out[f"{name} heldout"] = toy._rm_accuracy(cfg, device, path, heldout)
    return out


def main():
    ap = runs_parser(__doc__, [0, 1, 2, 3, 4])
    ap.add_argument("--prompts", type=int, default=640)
    a = ap.parse_args()
    os.environ["MTCORE_TOY_ASSETS"] = str(a.world)
    import torch

    from mtcore import toy
    from mtcore.data import read_jsonl
    from mtcore.inference import first_answers, score_responses
    from mtcore.mutual_taught import pseudo_pair_filter

    device = torch.device("cpu")
    rows = []
    for seed in a.seeds:
        start = time.perf_counter()
        run, cfg, models, test = stored_iteration_1(a.world, a.runs, seed)
        pi0, pi1, r0, r1 = models["pi0"], models["pi1"], models["r0"], models["r1"]
        greedy = dataclasses.replace(cfg, temperature=0.0)
        prompts = [p for p in toy.make_prompts(a.prompts + len(test), seed=10_000 + seed) if p not in set(test)]
        prompts = prompts[:a.prompts]  # fresh prompts, none a test prompt
        new = first_answers(greedy, device, pi1, prompts, seed)
        old = first_answers(greedy, device, pi0, prompts, seed)
        scores = score_responses(cfg, device, r0, prompts, [[x, y] for x, y in zip(new, old)])
        keep, eps = pseudo_pair_filter([s[0] for s in scores], [s[1] for s in scores])
        pseudo = [{"prompt": p, "chosen": x, "rejected": y, "delta": s[0] - s[1]}
                  for p, x, y, s, k in zip(prompts, new, old, scores, keep) if k and x != y]
        gold_new = [toy.gold_score(r["prompt"], r["chosen"]) for r in pseudo]
        gold_old = [toy.gold_score(r["prompt"], r["rejected"]) for r in pseudo]
        diag = toy._override_diagnostics([r["delta"] for r in pseudo], gold_new, gold_old)
        gold_acc = toy._pairwise_accuracy(gold_new, gold_old)
        estep = read_jsonl(run / "iter_1" / "pairs.jsonl")
        answers = toy._test_answers(cfg, device, pi1, test, seed)
        policy_pairs = toy._policy_pairs(test, answers)
        heldout = read_jsonl(a.world / "heldout_pairs.jsonl")
        row = {"seed": seed, "differing": sum(x != y for x, y in zip(new, old)), "kept": len(pseudo),
               "eps": eps, "pseudo_gold_acc": gold_acc, **diag}
        row.update(retrained_accuracies(cfg, device, r0, {"greedy": pseudo, "greedy+estep": pseudo + estep}, seed,
                                        {"r0": r0, "r1 (run)": r1}, policy_pairs, heldout))
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_summary(rows, a.seeds)


if __name__ == "__main__":
    main()
