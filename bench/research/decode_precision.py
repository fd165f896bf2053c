"""bf16 precision of mtcore's KV-cache decode step, against a float64 (or fp32) reference.

A random model (bench/common.random_model) in bf16 greedily decodes random prompts with mtcore's own
prefill + decode_step. Then, teacher-forced on those token sequences, each path's logits at every
generated position are compared with the reference logits of one full forward of the same weights in
float64 (--ref float32 on a GPU whose memory cannot hold a float64 copy; TF32 stays off):

  mtcore decode                  prefill(prompt), then decode_step per token, with the device's decode
                                 attention (CPU: decode_attention_ref, torch SDPA; CUDA: the Triton kernel)
  mtcore decode, kernel rounding (CPU only) the same with the Triton kernel's GPU arithmetic in torch:
                                 probabilities rounded to bf16 per 64-key tile before the dot with v
  mtcore decode, triton interp   (--triton, CPU only) the kernel under TRITON_INTERPRET=1, which upcasts
                                 its tiles to fp32: not the GPU's bf16 dot
  mtcore full                    mtcore's bf16 full forward (Llama.logits) over prompt + completion
  hf full / hf decode            transformers' LlamaForCausalLM with the same weights in bf16, built as
                                 from_pretrained(dtype=bf16) builds it (bench/sampler.transformers_twin:
                                 the rotary inv_freq buffer in fp32); full forward, and its own cache
                                 decode (prompt forward, then one token at a time with past_key_values)
  hf ... (inv_freq bf16)         the same model after .to(bf16) had also rounded inv_freq to bf16: what
                                 bench/sampler.py's decode table used as its judge before 2026-11-27

Columns: mean relative L2 error of the logits rows, ||l - l_ref|| / ||l_ref||, at the first generated
position (prefill's logits, for the decoders) and at the later ones (decode steps); the % of positions
whose argmax equals the reference's; the same against the old judge (transformers' bf16 full forward
with bf16 inv_freq: bench/sampler.argmax_agreement's metric as the H100 table measured it); and the
distance to that judge's logits.

    OMP_NUM_THREADS=1 python bench/research/decode_precision.py        # 8B head geometry (D 128, G 4), ~2 min
    OMP_NUM_THREADS=1 python bench/research/decode_precision.py --head-dim 64 --heads 16 --kv-heads 4
    OMP_NUM_THREADS=1 python bench/research/decode_precision.py --triton --layers 4 --rows 4 --new 16
    python bench/research/decode_precision.py --device cuda --shape llama3-8b --ref float32 --rows 16 --new 64
"""

import argparse
import copy
import os
import sys
from pathlib import Path

if "--triton" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before mtcore's kernels are imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common.py, sampler.py
import common  # noqa: E402
from sampler import transformers_twin  # noqa: E402


def mtcore_decode(model, prompts, completions, attention):
    """Teacher-forced: logits [B, new, V] fp32 of prefill (position 0) and decode_step (the rest)."""
    from mtcore.sampler import KVCache, decode_step, prefill

    B, P, new = len(prompts), len(prompts[0]), len(completions[0])
    device = next(model.parameters()).device
    cache, slots = KVCache(model, B, P + new), torch.arange(B, device=device)
    out = [prefill(model, cache, prompts, [[s] for s in range(B)])]
    for j in range(new - 1):
        tokens = torch.tensor([c[j] for c in completions], device=device)
        pos = torch.full((B,), P + j, device=device)
        out.append(decode_step(model, cache, tokens, slots, pos, P + j + 1, attention))
    return torch.stack(out, 1)


def mtcore_greedy(model, prompts, new, attention):
    """mtcore's own greedy completions (prefill + decode_step), as lists of token ids."""
    from mtcore.sampler import KVCache, decode_step, prefill

    B, P = len(prompts), len(prompts[0])
    device = next(model.parameters()).device
    cache, slots = KVCache(model, B, P + new), torch.arange(B, device=device)
    tokens = prefill(model, cache, prompts, [[s] for s in range(B)]).argmax(-1)
    out = [tokens]
    for j in range(new - 1):
        pos = torch.full((B,), P + j, device=device)
        tokens = decode_step(model, cache, tokens, slots, pos, P + j + 1, attention).argmax(-1)
        out.append(tokens)
    return torch.stack(out, 1).tolist()


def kernel_rounding(q, k_cache, v_cache, slots, lens, block_n=64):
    """The Triton decode kernel's arithmetic on the GPU, in torch: fp32 scores from the cache-dtype q and
    k, an online softmax over tiles of block_n keys in fp32, each tile's probabilities rounded to the cache
    dtype before the dot with v (tl.dot(p.to(v.dtype), v)), fp32 accumulator and denominator, the output
    rounded once. (The interpreter keeps p in fp32 instead.)"""
    R, Hq, D = q.shape
    L, Hkv = k_cache.shape[1], k_cache.shape[2]
    if slots is not None:
        k_cache, v_cache = k_cache[slots], v_cache[slots]
    q = q.to(k_cache.dtype).float().view(R, Hkv, Hq // Hkv, D)  # [R, Hkv, G, D]
    k, v = (t.float().transpose(1, 2) for t in (k_cache, v_cache))  # [R, Hkv, L, D]
    m = torch.full(q.shape[:-1], float("-inf"), device=q.device)
    denom, acc = torch.zeros(q.shape[:-1], device=q.device), torch.zeros(q.shape, device=q.device)
    for start in range(0, L, block_n):
        keys = torch.arange(start, min(L, start + block_n), device=q.device)
        scores = q @ k[:, :, keys].transpose(-1, -2) / D ** 0.5  # [R, Hkv, G, n]
        scores = scores.masked_fill((keys[None, :] >= lens[:, None])[:, None, None, :], float("-inf"))
        m_new = torch.maximum(m, scores.amax(-1))  # finite: key 0 is in the first tile
        alpha, p = (m - m_new).exp(), (scores - m_new[..., None]).exp()
        denom = denom * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + p.to(k_cache.dtype).float() @ v[:, :, keys]
        m = m_new
    return (acc / denom[..., None]).to(k_cache.dtype).reshape(R, Hq, D)


def hf_decode(hf, ids, new):
    """transformers' cache decode, teacher-forced on ids [B, P + new]: logits [B, new, V] fp32."""
    P = ids.shape[1] - new
    out = hf(ids[:, :P], use_cache=True)
    past, logits = out.past_key_values, [out.logits[:, -1].float()]
    for j in range(new - 1):
        out = hf(ids[:, P + j:P + j + 1], past_key_values=past, use_cache=True,
                 position_ids=torch.full((ids.shape[0], 1), P + j, device=ids.device))
        past = out.past_key_values
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1)


def shape_args(opts):
    from mtcore.model import FLAVOURS, ModelArgs

    if opts.shape == "llama3-8b":
        return FLAVOURS["llama3-8b"]
    if opts.shape == "llama3.2-1b":
        return ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, intermediate_size=8192,
                         tie_word_embeddings=True)
    return ModelArgs(vocab_size=opts.vocab, dim=opts.dim, n_layers=opts.layers, n_heads=opts.heads,
                     n_kv_heads=opts.kv_heads, head_dim=opts.head_dim, intermediate_size=int(2.75 * opts.dim),
                     tie_word_embeddings=opts.tied, max_position_embeddings=1024, initializer_range=opts.init)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("custom", "llama3-8b", "llama3.2-1b"), default="custom",
                        help="custom: the sizes below; else a real model's shape (a GPU's work)")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--init", type=float, default=0.02, help="initializer_range (custom shapes); the "
                        "attention scores' spread grows as init^2 * dim: 0.04 at dim 1024 matches 0.02 at 4096")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ref", choices=("float64", "float32"), default="float64")
    parser.add_argument("--triton", action="store_true", help="also the Triton kernel under TRITON_INTERPRET=1")
    opts = parser.parse_args()

    from mtcore.kernels.decode_attention import decode_attention
    from mtcore.sampler import decode_attention_for

    torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 reference in fp32
    device, args = opts.device, shape_args(opts)
    master = common.random_model(args, "policy", device).eval()  # fp32
    ours = copy.deepcopy(master).to(torch.bfloat16)
    ref_model = master.to(getattr(torch, opts.ref))  # in place: the fp32 copy becomes the reference
    hf = transformers_twin(ours, torch.bfloat16, device)
    rope = hf.model.rotary_emb
    assert rope.inv_freq.dtype == torch.float32

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, args.vocab_size, (opts.prompt,), generator=g).tolist() for _ in range(opts.rows)]
    attention = decode_attention_for(torch.device(device))
    completions = mtcore_greedy(ours, prompts, opts.new, attention)
    ids = torch.tensor([p + c for p, c in zip(prompts, completions)], device=device)
    at = slice(opts.prompt - 1, opts.prompt - 1 + opts.new)  # the positions that predict the completion

    with torch.no_grad():
        ref = ref_model.logits(ids)[:, at].double()  # [B, new, V]
        del ref_model, master
        paths = {"mtcore decode": mtcore_decode(ours, prompts, completions, attention)}
        if device == "cpu":
            paths["mtcore decode, kernel rounding"] = mtcore_decode(ours, prompts, completions, kernel_rounding)
        if opts.triton:
            paths["mtcore decode, triton interp"] = mtcore_decode(ours, prompts, completions, decode_attention)
        paths["mtcore full"] = ours.logits(ids)[:, at].float()
        paths["hf full"] = hf(ids).logits[:, at].float()
        paths["hf decode"] = hf_decode(hf, ids, opts.new)
        fp32_freq = rope.inv_freq
        rope.inv_freq = fp32_freq.to(torch.bfloat16)  # as hf.to(torch.bfloat16) leaves it
        paths["hf full (inv_freq bf16)"] = hf(ids).logits[:, at].float()
        paths["hf decode (inv_freq bf16)"] = hf_decode(hf, ids, opts.new)
        rope.inv_freq = fp32_freq

    judge = paths["hf full (inv_freq bf16)"]
    best_ref, best_judge = ref.argmax(-1), judge.argmax(-1)
    print(common.header("bf16 decode precision: each path's logits against a full forward in " + opts.ref,
                        device, "bfloat16",
                        f"{opts.shape}: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, "
                        f"{args.n_kv_heads} KV heads, head_dim {args.head_dim}, vocab {args.vocab_size}, "
                        f"{'tied' if args.tie_word_embeddings else 'untied'}, init std {args.initializer_range}; {opts.rows} rows, {opts.prompt}-token "
                        f"random prompts, {opts.new} tokens (mtcore's bf16 greedy), teacher-forced"))
    print(f"| path | rel err vs {opts.ref}: first | later | argmax = {opts.ref} %: first | later | "
          "argmax = old judge %: first | later | distance to old judge: later |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, logits in paths.items():
        logits = logits.double()
        err = (logits - ref).norm(dim=-1) / ref.norm(dim=-1)  # [B, new]
        dist = (logits - judge.double()).norm(dim=-1) / ref.norm(dim=-1)
        same_ref, same_judge = (logits.argmax(-1) == best_ref).double(), (logits.argmax(-1) == best_judge).double()
        print(f"| {name} | {err[:, 0].mean():.3e} | {err[:, 1:].mean():.3e} | {100 * same_ref[:, 0].mean():.1f} | "
              f"{100 * same_ref[:, 1:].mean():.1f} | {100 * same_judge[:, 0].mean():.1f} | "
              f"{100 * same_judge[:, 1:].mean():.1f} | {dist[:, 1:].mean():.3e} |")


if __name__ == "__main__":
    main()
