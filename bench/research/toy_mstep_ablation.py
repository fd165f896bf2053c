"""An experiment for issue #14: which part of the M-step's data keeps r_1 from beating r_0?

At iteration 1 of the p_error-0.8 duplicates world with the paper's sampling (temperature 0.8, top-p
0.95), the run's kept pseudo-pairs were more right than r_0 on the same pairs (0.796 vs 0.759), yet
the run's r_1 was less right than r_0 on pi_1's pairs (0.724 vs 0.745). For each stored Mutual-Taught
run's iteration 1, r_0 is retrained the loop's way (Bradley-Terry from r_0, the run's RM settings) on
the run's own stored data:
- (a) its kept pseudo-pairs (iter_1/pseudo_pairs.jsonl) alone;
- (b) its E-step pairs (iter_1/pairs.jsonl, labelled by r_0) alone;
- (c) both, as the loop does (a retrain of the run's r_1 with the same data, for the spread);
and every RM (r_0, the run's r_1, (a), (b), (c)) is scored on gold-ordered pairs of pi_1's test answers
(rm_accuracy_current_policy) and on the held-out pairs. The gold judge only reads.

    python bench/research/toy_mstep_ablation.py --world /tmp/world_dup80 --runs /tmp/study_dup80_t08 --seeds 0 1 2
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_greedy_mstep import print_summary, retrained_accuracies, runs_parser, stored_iteration_1  # noqa: E402


def main():
    a = runs_parser(__doc__, [0, 1, 2]).parse_args()
    os.environ["MTCORE_TOY_ASSETS"] = str(a.world)
    import torch

    from mtcore import toy
    from mtcore.data import read_jsonl

    device = torch.device("cpu")
    rows = []
    for seed in a.seeds:
        start = time.perf_counter()
        run, cfg, models, test = stored_iteration_1(a.world, a.runs, seed)
        r0, r1 = models["r0"], models["r1"]
        pseudo = read_jsonl(run / "iter_1" / "pseudo_pairs.jsonl")
        estep = read_jsonl(run / "iter_1" / "pairs.jsonl")
        policy_pairs = toy._policy_pairs(test, toy._test_answers(cfg, device, models["pi1"], test, seed))
        heldout = read_jsonl(a.world / "heldout_pairs.jsonl")
        row = {"seed": seed, "pseudo": len(pseudo), "estep": len(estep)}
        row.update(retrained_accuracies(cfg, device, r0, {"pseudo": pseudo, "estep": estep, "both": pseudo + estep},
                                        seed, {"r0": r0, "r1 (run)": r1}, policy_pairs, heldout))
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_summary(rows, a.seeds)


if __name__ == "__main__":
    main()
