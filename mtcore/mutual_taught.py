"""Mutual-Taught (Shi et al., ACL 2025), the algorithm alone: docs/algorithm.md says it in words.

Iteration t turns (pi_{t-1}, r_{t-1}) into (pi_t, r_t), with no new human label:

  E-step: the policy learns from the current reward model
    sample    pi_{t-1} samples M responses to each prompt of this iteration's policy split
    score     r_{t-1} scores every response
    pairs     one (chosen, rejected) pair per prompt           -> pair_rule, preference_pairs
    dpo       DPO from pi_{t-1} (the reference), a candidate every K steps
    select    each candidate answers the selection set against pi_{t-1}; r_{t-1} judges;
              the best candidate is pi_t, or the run stops       -> win_rate, choose_candidate
  M-step: the reward model learns from the policy's own improvement
    msample   pi_t and pi_{t-1} answer the RM split: y_new, y_old
              pseudo-pairs y_new > y_old, filtered by r_{t-1}    -> pseudo_pairs
    rm        Bradley-Terry from the BASE reward model r_0 on the pseudo-pairs plus the
              E-step's pairs (this iteration's, or every one's so far) -> rm_training_pairs

Everything here is a pure function of numbers and texts: no file, no model, no process group.
mtcore/stages.py runs each step on real models and the run directory; mtcore/loop.py runs the
steps in this order and resumes them. The hyper-parameters (M, beta, K, tau, ...) are
mtcore/config.py's LoopConfig, whose defaults are the paper's.
"""

import math
import random

# The steps of one iteration, in order (the stage names of the run directory).
E_STEP = ("sample", "score", "pairs", "dpo", "select")
M_STEP = ("msample", "rm")


def steps(m_step: bool) -> tuple[str, ...]:
    """One iteration's steps; without the M-step the reward model stays r_0 (the fixed-RM
    iterative-DPO baseline, RLHFlow's recipe), which the paper compares against."""
    return E_STEP + (M_STEP if m_step else ())


# ------------------------------------------------------------------------------------------------
# E-step
# ------------------------------------------------------------------------------------------------

def mutual_pair(rewards: list[float], lengths: list[int]) -> tuple[int, int] | None:
    """(chosen, rejected) of one prompt's M responses (paper, E-step: pair construction with a length
    control): chosen = the shortest response scoring above the prompt's mean (ties: the higher reward,
    then the first), rejected = the lowest-scoring (ties: the first). None when every response
    scores the same."""
    mean = sum(rewards) / len(rewards)
    above = [i for i, r in enumerate(rewards) if r > mean]
    if not above:
        return None
    chosen = min(above, key=lambda i: (lengths[i], -rewards[i], i))
    rejected = min(range(len(rewards)), key=lambda i: (rewards[i], i))
    return chosen, rejected


def best_worst_pair(rewards: list[float], lengths: list[int]) -> tuple[int, int] | None:
    """The fixed-RM baseline's rule (paper, baselines: RLHFlow's iterative DPO): the highest- against
    the lowest-scoring response."""
    best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
    worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
    return None if rewards[best] == rewards[worst] else (best, worst)


PAIR_RULES = {"mutual": mutual_pair, "best-worst": best_worst_pair}  # by --pair-rule's name


def pair_rule(given: str, m_step: bool) -> str:
    """The E-step's pairing rule: the one given, else the M-step's own (mutual with it; best-worst
    without, the fixed-RM baseline's). The two are independent: no M-step with the mutual rule is the
    E-step-only arm, which differs from Mutual-Taught by the M-step alone."""
    return given or ("mutual" if m_step else "best-worst")


ARMS = {(True, "mutual"): "Mutual-Taught", (False, "best-worst"): "fixed-RM baseline",
        (False, "mutual"): "E-step only: Mutual-Taught's pairs, fixed RM",
        (True, "best-worst"): "Mutual-Taught with best-worst pairs"}


def arm(m_step: bool, given_rule: str = "") -> str:
    """The arm that the M-step setting and the pairing rule make, as a run names itself."""
    return ARMS[m_step, pair_rule(given_rule, m_step)]


def preference_pairs(rows: list[dict], rule: str) -> tuple[list[dict], int]:
    """The E-step's DPO pairs from scored samples, one per prompt where the rule finds one.

    rows: {"prompt", "responses": [{"text", "token_ids"}], "rewards": [float]} per prompt. rule names
    one of PAIR_RULES (pair_rule); a response's length is its token count.
    Returns (pairs {"prompt", "chosen", "rejected", "chosen_ids", "rejected_ids", "chosen_reward",
    "rejected_reward"}, the number of prompts without a pair)."""
    pick = PAIR_RULES[rule]
    pairs, no_pair = [], 0
    for row in rows:
        rs = row["responses"]
        picked = pick(row["rewards"], [len(r["token_ids"]) for r in rs]) if len(rs) >= 2 else None
        if picked is None:
            no_pair += 1
            continue
        c, r = picked
        pairs.append({"prompt": row["prompt"], "chosen": rs[c]["text"], "rejected": rs[r]["text"],
                      "chosen_ids": rs[c]["token_ids"], "rejected_ids": rs[r]["token_ids"],
                      "chosen_reward": row["rewards"][c], "rejected_reward": row["rewards"][r]})
    return pairs, no_pair


def win_rate(candidate: list[float], previous: list[float]) -> float:
    """Share of prompts where the candidate's response scores higher than pi_{t-1}'s (paper, E-step:
    checkpoint selection on D_MS); ties count half."""
    wins = sum(1.0 if c > p else 0.5 if c == p else 0.0 for c, p in zip(candidate, previous))
    return wins / len(candidate)


def choose_candidate(rates: dict[int, float], tau: float) -> tuple[int, bool]:
    """(the candidate step with the best win rate, whether the run stops): the run stops, keeping
    pi_{t-1} and r_{t-1}, when even the best candidate wins less than tau (paper, checkpoint
    selection: tau = 0.6). Equal rates: the later step."""
    best = max(rates, key=lambda step: (rates[step], step))
    return best, rates[best] < tau


# ------------------------------------------------------------------------------------------------
# M-step
# ------------------------------------------------------------------------------------------------

def pseudo_pair_filter(new: list[float], old: list[float]) -> tuple[list[bool], float]:
    """Keep pair i (y_new > y_old) unless new_i - old_i <= -eps, eps = the population std of r_{t-1}'s
    scores of y_old over the RM split (paper, M-step: the filter; slightly negative pairs stay, as a
    regulariser). Returns (keep flags, eps)."""
    n = len(old)
    mean = sum(old) / n
    eps = math.sqrt(sum((r - mean) ** 2 for r in old) / n)
    return [nw - od > -eps for nw, od in zip(new, old)], eps


def pseudo_pairs(prompts: list, new: list[str], old: list[str], new_rewards: list[float],
                 old_rewards: list[float]) -> tuple[list[dict], dict]:
    """The M-step's pseudo-labelled pairs (paper, M-step: the policy's update is assumed an
    improvement, so y_new > y_old), filtered by pseudo_pair_filter. The same text on both sides
    carries no preference and is dropped. Returns (pairs {"prompt", "chosen", "rejected", "delta"},
    {"eps", "pseudo_pairs", "identical", "filtered"})."""
    keep, eps = pseudo_pair_filter(new_rewards, old_rewards)
    pairs, identical = [], 0
    for p, a, b, ra, rb, k in zip(prompts, new, old, new_rewards, old_rewards, keep):
        if a == b:
            identical += 1
        elif k:
            pairs.append({"prompt": p, "chosen": a, "rejected": b, "delta": ra - rb})
    return pairs, {"eps": eps, "pseudo_pairs": len(pairs), "identical": identical,
                   "filtered": len(prompts) - identical - len(pairs)}


def rm_training_pairs(pseudo: list[dict], estep: list[dict]) -> list[dict]:
    """The RM's data (paper, M-step: pseudo-pairs plus the E-step's "self-training" pairs; either alone
    was worse in its ablation). The RM trains on them from the base RM r_0 every iteration, not from
    r_{t-1}, so the reused RM split is not fitted twice."""
    return pseudo + estep


RM_DATA = ("iteration", "all")  # --rm-data's values


def rm_data_iterations(t: int, rm_data: str) -> range:
    """The iterations whose pairs (rm_training_pairs of each) train r_t. "iteration": t's alone, the
    paper's as far as its sources say; since r_t starts from r_0, what r_{t-1} learnt is then not
    carried into r_t. "all": every iteration's so far, 1 to t, so it is."""
    return range(1, t + 1) if rm_data == "all" else range(t, t + 1)


# ------------------------------------------------------------------------------------------------
# Randomness
# ------------------------------------------------------------------------------------------------

def stage_seed(seed: int, t: int, stage: str) -> int:
    """The seed of one step of one iteration: a rerun draws the same numbers, so a resumed run ends as
    an uninterrupted one. The two sides of a comparison (select: each candidate and pi_{t-1}; msample:
    pi_t and pi_{t-1}) draw from the same seed, prompt by prompt: common random numbers, which make
    the new-versus-old contrast cleaner (measured on the toy world: iteration-1 pseudo-labels 0.844
    gold-right with a shared seed, 0.774 with independent ones)."""
    return random.Random(f"{seed}:{t}:{stage}").randrange(2**31)
