"""Memory plan: bytes per GPU of each Mutual-Taught stage for an 8B policy plus an 8B reward model
on G GPUs with FSDP2, computed from the model config (mtcore.model.FLAVOURS). Computed, not measured.

    python bench/memory_plan.py [--flavour llama3-8b] [--gpus 8] [--gpu-gib 79.6] [--micro-batch-tokens 8192]

P = parameters of the model trained in the stage (policy: embedding + blocks + lm_head; reward model:
embedding + blocks + score), G = GPUs, T = micro-batch tokens, L = layers, d = dim, I = MLP width,
kv = n_kv_heads * head_dim, V = vocabulary. Sizes: fp32 4 bytes, bf16 2.

Training (dpo, rm): fp32 master weights, bf16 compute, FSDP2 over all G GPUs (mtcore/parallel.py).
  parameters   4P/G (fp32 shards) + 2 * 2 * block (bf16 gathered: the block running and the
               next one prefetched) + 2 * root (the root -- embedding, final norm, head -- stays
               gathered in bf16 from forward to the end of backward)
  gradients    4P/G (fp32 shards) + 2 * 4 * block (fp32 reduce-scatter input of the block just
               done and the one in flight) + 2 * root (the root's bf16 gradient)
  optimizer    8P/G (AdamW: exp_avg and exp_avg_sq, fp32 shards)
  activations  what autograd keeps per token and layer, bf16 unless noted:
                 each RMSNorm: input 2d, fp32 normalised 4d, bf16 output 2d          2 x 8d
                 rotary: q and k before rotation and their rotated halves       4d + 4kv
                 attention (flash-attn varlen): q, k, v and the output         4d + 4kv
                 MLP: gate, up, silu(gate), silu(gate) * up                        8I
               a = 24d + 8kv + 8I bytes per token and layer;
               without checkpointing  T * L * a
               with checkpointing     T * L * 2d (each block's bf16 input) + T * a (one block
                                      recomputed at a time)
               plus the head: the final norm (8d per token) and, for the policy,
               fused_logprobs' logit tile (4096 x 16384 fp32, with its gradient: 2 x 256 MiB).
  The largest micro-batch: the T at which the total reaches the usable memory (the GPU's less a
  10% reserve for the CUDA context, NCCL buffers and allocator fragmentation).

Reference log-probs (dpo, before sharding): the full fp32 policy (4P) on every GPU and one forward
  layer's transients (T * (8d + 6I), no graph kept) plus the head's tile.
Generation (sample, select, msample): the full bf16 policy (2P) on every GPU, the K/V cache, and
  fp32 logits per slot (V * 4 * 2: the row and its softmax) or a prefill's transients (one layer's at
  PREFILL_TOKENS), whichever is larger. The cache is the sampler's default
  (mtcore.sampler.cache_budget): the GPU's memory less the policy, less a reserve of max(10% of the
  GPU, 2 GiB) (RESERVE_FRACTION is 15%), in slots of --slot-tokens (2 * L * kv * 2 bytes per token), at most MAX_SLOTS; or the
  --kv-cache-gb budget when given.
Scoring (score, select, msample): the full bf16 reward model (2P) and one forward layer's
  transients at T tokens.

Disk per iteration (the run directory, computed): checkpoints are saved in the source checkpoint's
dtype (bf16 for Llama-3-8B and FsfairX: 2 bytes per parameter). DPO writes a candidate every
--save-every steps and at its last step: ceil(steps / save_every) candidates. select installs the
chosen one as iter_t/policy by hard links (0 extra bytes on one filesystem) and then removes the others
unless --keep-candidates. The M-step writes iter_t/reward. While a training stage runs with
--save-state-every, its resumable state (fp32 weights 4P + AdamW's two fp32 moments 8P,
mtcore.train.STATE_BYTES_PER_PARAM) is on disk too, and removed when the stage ends; while a new one is
written it sits beside the last. Samples, pairs and reference log-probs are megabytes. The trainer
checks the free space against these rules before a stage that writes them (mtcore.train.check_training_disk).
"""

import math

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mtcore.model import FLAVOURS, ModelArgs  # noqa: E402
from mtcore.sampler import MAX_SLOTS, MIN_RESERVE_BYTES, PREFILL_TOKENS, RESERVE_FRACTION  # noqa: E402
from mtcore.train import STATE_BYTES_PER_PARAM  # noqa: E402

GIB = 2**30
RESERVE = 0.10  # of the GPU: CUDA context, NCCL buffers, allocator fragmentation
HEAD_TILE = 2 * 4096 * 16384 * 4  # fused_logprobs' fp32 logit tile and its gradient (CUDA tiles)


@dataclass
class Sizes:
    block: int  # parameters of one transformer block
    root: int  # embedding + final norm + head
    total: int


def sizes(a: ModelArgs, kind: str) -> Sizes:
    d, kv, q = a.dim, a.n_kv_heads * a.head_dim, a.n_heads * a.head_dim
    block = d * q + 2 * d * kv + q * d + 3 * d * a.intermediate_size + 2 * d
    head = a.vocab_size * d if kind == "policy" and not a.tie_word_embeddings else (d if kind == "reward" else 0)
    root = a.vocab_size * d + d + head
    return Sizes(block, root, a.n_layers * block + root)


def act_per_token_layer(a: ModelArgs) -> int:
    """a = 24d + 8kv + 8I bytes (see the module docstring)."""
    return 24 * a.dim + 8 * a.n_kv_heads * a.head_dim + 8 * a.intermediate_size


def activations(a: ModelArgs, kind: str, tokens: int, checkpointing: bool) -> int:
    per_layer = act_per_token_layer(a)
    blocks = tokens * a.n_layers * 2 * a.dim + tokens * per_layer if checkpointing else \
        tokens * a.n_layers * per_layer
    return blocks + tokens * 8 * a.dim + (HEAD_TILE if kind == "policy" else 0)


def training(a: ModelArgs, kind: str, gpus: int, tokens: int, checkpointing: bool) -> dict:
    s = sizes(a, kind)
    return {"parameters": 4 * s.total / gpus + 2 * 2 * s.block + 2 * s.root,
            "gradients": 4 * s.total / gpus + 2 * 4 * s.block + 2 * s.root,
            "optimizer": 8 * s.total / gpus,
            "activations": activations(a, kind, tokens, checkpointing), "kv cache": 0}


def largest_micro_batch(a: ModelArgs, kind: str, gpus: int, usable: float, checkpointing: bool) -> int:
    fixed = sum(training(a, kind, gpus, 0, checkpointing).values())
    per_token = activations(a, kind, 1, checkpointing) - activations(a, kind, 0, checkpointing)
    return max(0, int((usable - fixed) // per_token))


def forward_transients(a: ModelArgs, tokens: int) -> int:
    return tokens * (8 * a.dim + 6 * a.intermediate_size)


def kv_per_token(a: ModelArgs) -> int:
    return 2 * a.n_layers * a.n_kv_heads * a.head_dim * 2


def sampling_logits(a: ModelArgs, slots: int) -> int:
    """fp32 logits of every slot's next token and their softmax."""
    return slots * a.vocab_size * 4 * 2


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flavour", default="llama3-8b", choices=sorted(FLAVOURS))
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-gib", type=float, default=79.6, help="An 80 GB H100 reports 81,559 MiB = 79.6 GiB.")
    p.add_argument("--micro-batch-tokens", type=int, default=8192)
    p.add_argument("--kv-cache-gb", type=float, default=0.0, help="0: the sampler's default (see above)")
    p.add_argument("--slot-tokens", type=int, default=2048, help="Prompt + new tokens per K/V cache slot.")
    p.add_argument("--dpo-steps", type=int, default=230, help="DPO steps per iteration (paper: ~230 at batch 128).")
    p.add_argument("--save-every", type=int, default=50, help="DPO steps between candidates (paper: 50).")
    args = p.parse_args()
    a, G, T = FLAVOURS[args.flavour], args.gpus, args.micro_batch_tokens
    usable = args.gpu_gib * GIB * (1 - RESERVE)
    policy, reward = sizes(a, "policy"), sizes(a, "reward")

    def row(stage, parts, note=""):
        total = sum(parts.values())
        cells = " | ".join(f"{parts[k] / GIB:.1f}" for k in ("parameters", "gradients", "optimizer", "activations",
                                                                "kv cache"))
        fits = "yes" if total <= usable else "**no**"
        return f"| {stage} | {cells} | {total / GIB:.1f} | {fits} | {note} |"

    per_slot = args.slot_tokens * kv_per_token(a)
    gpu = args.gpu_gib * GIB
    default_budget = gpu - 2 * policy.total - max(RESERVE_FRACTION * gpu, MIN_RESERVE_BYTES)
    slots = int(args.kv_cache_gb * GIB // per_slot) if args.kv_cache_gb else min(MAX_SLOTS,
                                                                                 int(default_budget // per_slot))
    kv_budget = slots * per_slot
    print(f"# Memory plan: {args.flavour} policy ({policy.total / 1e9:.2f}B) + reward model "
          f"({reward.total / 1e9:.2f}B), {G} GPUs x {args.gpu_gib} GiB, FSDP2 | computed, not measured")
    print(f"usable per GPU {usable / GIB:.1f} GiB ({RESERVE:.0%} reserved); micro-batch {T} tokens; GiB per GPU")
    print()
    print("| stage | parameters | gradients | optimizer | activations | KV cache | total | fits | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for kind, name in (("policy", "dpo (policy)"), ("reward", "rm (reward model)")):
        for ac in (False, True):
            note = "activation checkpointing" if ac else "no checkpointing"
            print(row(name, training(a, kind, G, T, ac), note))
    print(row("dpo: reference log-probs", {"parameters": 4 * policy.total, "gradients": 0, "optimizer": 0,
                                           "activations": forward_transients(a, T) + HEAD_TILE, "kv cache": 0},
              "full fp32 policy, before sharding"))
    print(row("generate (policy)", {"parameters": 2 * policy.total, "gradients": 0, "optimizer": 0,
                                    "activations": max(sampling_logits(a, slots), forward_transients(a, PREFILL_TOKENS)),
                                    "kv cache": kv_budget},
              f"{slots} slots of {args.slot_tokens} tokens"))
    print(row("score (reward model)", {"parameters": 2 * reward.total, "gradients": 0, "optimizer": 0,
                                       "activations": forward_transients(a, T), "kv cache": 0}, "full bf16"))
    print()
    print("| largest micro-batch (tokens) | no checkpointing | activation checkpointing |")
    print("|---|---:|---:|")
    for kind, name in (("policy", "dpo"), ("reward", "rm")):
        print(f"| {name} | {largest_micro_batch(a, kind, G, usable, False):,} | "
              f"{largest_micro_batch(a, kind, G, usable, True):,} |")
    print()
    budget = f"--kv-cache-gb {args.kv_cache_gb:g}" if args.kv_cache_gb else (
        f"the default, the {default_budget / GIB:.1f} GiB left beside the bf16 policy and the reserve")
    print(f"K/V cache: {kv_per_token(a) / 2**10:.0f} KiB per token; {budget} holds {slots} slots of "
          f"{args.slot_tokens} tokens ({kv_budget / GIB:.1f} GiB).")
    print(f"Activations per token and layer: {act_per_token_layer(a) / 2**10:.0f} KiB without checkpointing, "
          f"{2 * a.dim / 2**10:.0f} KiB kept with it.")
    print()
    disk_table(policy.total, reward.total, args.dpo_steps, args.save_every)


def disk_plan(policy_params: int, reward_params: int, steps: int, save_every: int, nbytes: int = 2) -> dict:
    """Bytes on disk of one iteration's checkpoints (see the module docstring)."""
    n = math.ceil(steps / save_every)
    cand, rm = nbytes * policy_params, nbytes * reward_params
    return {"candidates": n, "policy": cand, "reward": rm,
            "default": cand + rm,  # the kept candidate shares the policy's files (hard links)
            "default, no hard links": 2 * cand + rm,
            "keep candidates": n * cand + rm,  # the chosen candidate and the policy share files
            "peak before select": n * cand,  # every candidate, before the M-step writes the RM
            "dpo state": STATE_BYTES_PER_PARAM * policy_params, "rm state": STATE_BYTES_PER_PARAM * reward_params,
            "fp32, all kept (before #15)": n * 4 * policy_params + 4 * reward_params}


def disk_table(policy_params: int, reward_params: int, steps: int, save_every: int) -> None:
    d = disk_plan(policy_params, reward_params, steps, save_every)
    gb = lambda b: f"{b / 1e9:.1f}"  # noqa: E731
    n = d["candidates"]
    print(f"# Disk per iteration: bf16 policy {gb(d['policy'])} GB + bf16 RM {gb(d['reward'])} GB; {steps} DPO steps, "
          f"a candidate every {save_every}: {n} candidates | computed, not measured")
    print()
    print("| after select | candidates kept | GB per iteration |")
    print("|---|---:|---:|")
    print(f"| default: policy + RM + the chosen candidate (hard links to the policy) | 1 | {gb(d['default'])} |")
    print(f"| default where hard links fail (a copy) | 1 | {gb(d['default, no hard links'])} |")
    print(f"| `--keep-candidates` | {n} | {gb(d['keep candidates'])} |")
    print(f"| before this plan: every candidate kept, fp32 | {n} | {gb(d['fp32, all kept (before #15)'])} |")
    print()
    print(f"Transient: {gb(d['peak before select'])} GB of candidates between dpo and select; with --save-state-every, "
          f"{gb(d['dpo state'])} GB (DPO) or {gb(d['rm state'])} GB (RM) of resumable state while the stage runs.")


if __name__ == "__main__":
    main()
