"""What batch invariance costs on the CPU: scoring and sampling with and without it, in one run.

    python bench/invariance.py            # a random ~34M-parameter Llama (bench/sampler.py's), fp32

Scoring (inference.Scorer's micro-batches): 512 responses of 64 to 512 tokens, --micro-batch-tokens 8192,
first-fit packed (data.pack), each micro-batch one packed sequence of at most 8192 tokens.
- unpadded: the forward as it was before (a reward's bits then follow what else is packed with it);
- padded: train.hidden_states, the default now: a sequence of padding after the packed ones, up to a
  multiple of 16 tokens (mtcore/invariant.py).

Sampling (sampler.generate, eager, the toy world's settings scaled up): 64 prompts of 40 to 200 tokens,
4 samples each, T 0.8, top-p 0.95, up to 128 new tokens, ragged stops; then few rows: 1, 2 and 8
requests of 100-token prompts, 128 new tokens.
- varying: the default (a step runs its active rows over the columns up to the longest);
- invariant: batch_invariant=True (rows padded to a multiple of 16, each row's attention over its own
  row_length of the cache, plain matmuls: mtcore/invariant.py).

Each provider is timed 3 times, alternating, after a warm-up; the table gives the median, tokens/s, the
% of an fp32 matmul peak measured in this run (useful FLOPs: profile.matmul_flops, computed), and the
ratio to the baseline.
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from mtcore import profile, sampler  # noqa: E402
from mtcore.config import LoopConfig  # noqa: E402
from mtcore.data import Example, make_batch, pack  # noqa: E402
from mtcore.train import reward_index, sequence_rewards  # noqa: E402


def random_model(kind: str):
    from mtcore.model import Llama, ModelArgs

    args = ModelArgs(vocab_size=32000, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, intermediate_size=1024,
                     rope_theta=500000.0, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                     pad_token_id=0)
    return Llama(args, kind).init_weights(seed=0).eval()


@torch.no_grad()
def score(model, examples, budget, padded: bool):
    out = []
    for b in pack([e.n_tokens for e in examples], budget):
        batch = make_batch(examples, b)
        if padded:
            out.append(sequence_rewards(model, batch))
        else:  # train.hidden_states without its padding sequence
            hidden = model(batch.tokens, batch.positions, batch.cu_seqlens, batch.max_seqlen)
            out.append(model.score_rewards(hidden[reward_index(batch, model.args.pad_token_id)]))
    return out


def sample(model, prompts, invariant: bool, n: int = 4):
    params = sampler.SamplingParams(n=n, temperature=0.8, top_p=0.95, max_new_tokens=128, seed=3,
                                    stop_ids=tuple(range(3, 40)))  # ragged stops: ~1 in 800 tokens a step
    out = sampler.generate(model, prompts, params, decode_mode="eager", batch_invariant=invariant)
    return [len(c.token_ids) for r in out for c in r]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(providers: dict, rounds: int = 3) -> dict:
    """{name: (median seconds, last output)}: a warm-up each, then rounds alternating between them."""
    for fn in providers.values():
        fn()
    runs = {name: [] for name in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            runs[name].append(timed(fn))
    return {name: (statistics.median(s for s, _ in r), r[-1][1]) for name, r in runs.items()}


def rows(results: dict, baseline: str, tokens: dict, flops: dict, peak: float) -> list[str]:
    lines = ["| provider | s (median of 3) | tokens/s | % of fp32 matmul peak | time vs " + baseline + " |",
             "|---|---:|---:|---:|---:|"]
    for name, (seconds, _) in results.items():
        lines.append(f"| {name} | {seconds:.3f} | {tokens[name] / seconds:,.0f} | "
                     f"{100 * flops[name] / seconds / peak:.1f} | {seconds / results[baseline][0]:.3f}x |")
    return lines


def main():
    torch.manual_seed(0)
    rng = random.Random(0)
    peak = profile.peak_flops("cpu")[0]
    print(common.header("batch invariance on the CPU: scoring and sampling with and without it", "cpu", "fp32",
                        "random 34M Llama (dim 384, 6 layers, vocab 32000)"))
    print(f"fp32 matmul peak measured in this run: {peak / 1e9:.1f} GFLOP/s\n")

    reward = random_model("reward")
    examples = [Example((([rng.randrange(3, 32000) for _ in range(rng.randrange(64, 513))], 20),))
                for _ in range(512)]
    budget = LoopConfig().micro_batch_tokens
    results = measure({"unpadded": lambda: score(reward, examples, budget, False),
                       "padded": lambda: score(reward, examples, budget, True)})
    lens = [e.n_tokens for e in examples]
    work = profile.matmul_flops(reward.args, lens, head_tokens=0)
    print("## Scoring: 512 responses of 64 to 512 tokens, --micro-batch-tokens 8192\n")
    print("\n".join(rows(results, "unpadded", {k: sum(lens) for k in results}, {k: work for k in results}, peak)))
    gap = (torch.cat(results["padded"][1]) - torch.cat(results["unpadded"][1])).abs().max()
    print(f"\nrewards: the two providers agree to {float(gap):.2e} (max abs difference)\n")

    policy = random_model("policy")
    prompts = [[rng.randrange(3, 32000) for _ in range(rng.randrange(40, 201))] for _ in range(64)]
    results = measure({"varying": lambda: sample(policy, prompts, False),
                       "invariant": lambda: sample(policy, prompts, True)})
    new = {k: sum(v[1]) for k, v in results.items()}
    work = {k: profile.matmul_flops(policy.args, [len(p) for p in prompts for _ in range(4)], head_tokens=0)
            + profile.matmul_flops(policy.args, [1] * new[k]) for k in results}  # prompts, then one token a step
    print("## Sampling: 64 prompts of 40 to 200 tokens, 4 samples, up to 128 new tokens (eager)\n")
    print("\n".join(rows(results, "varying", new, work, peak)))
    print(f"\nnew tokens: {new['varying']:,} (varying) and {new['invariant']:,} (invariant); % of peak counts the "
          "projections, MLP and head per token (computed), not the attention to the prefix\n")
    print("## Sampling few rows: 100-token prompts, up to 128 new tokens (eager)\n")
    print("| requests | varying s | invariant s | time vs varying |\n|---|---:|---:|---:|")
    for n_prompts, n in ((1, 1), (2, 1), (8, 1)):
        few = [[rng.randrange(3, 32000) for _ in range(100)] for _ in range(n_prompts)]
        r = measure({"varying": lambda: sample(policy, few, False, n),
                     "invariant": lambda: sample(policy, few, True, n)})
        print(f"| {n_prompts * n} | {r['varying'][0]:.3f} | {r['invariant'][0]:.3f} | "
              f"{r['invariant'][0] / r['varying'][0]:.3f}x |")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
