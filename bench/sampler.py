"""Benchmark: mtcore's KV-cache sampler against transformers' generate doing the same work.

Same model, prompts, n, sampling settings and lengths: every sequence generates exactly
--max-new-tokens tokens (no stop ids), so both produce the same number of tokens. Each provider
runs in its own process; "process s" is spawn to exit (imports, model load, generation), the
target's measure; "generate s" is the generation call alone. transformers gets all prompts in one
left-padded generate call with num_return_sequences = n (its fastest single call).

    python bench/sampler.py                      # CPU: a random ~34M-parameter Llama-shaped model
    python bench/sampler.py --policy DIR         # any checkpoint (e.g. 8B on a GPU)
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def worker(args):
    from mtcore.checkpoint import load_model

    prompts = json.loads(Path(args["prompts"]).read_text())
    device = args["device"]
    if args["provider"] == "mtcore":
        from mtcore.sampler import SamplingParams, generate

        model = load_model(args["policy"], device=device).eval()
        params = SamplingParams(n=args["n"], temperature=args["temperature"], top_p=args["top_p"],
                                max_new_tokens=args["max_new_tokens"], seed=0)
        start = time.perf_counter()
        results = generate(model, prompts, params, slots=args["slots"])
        elapsed = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for r in results for c in r)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args["policy"], dtype=torch.float32 if device == "cpu"
                                                     else torch.bfloat16).to(device).eval()
        T = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), T, dtype=torch.long)
        mask = torch.zeros(len(prompts), T, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding, as generation needs
            ids[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = 1
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                 temperature=args["temperature"], top_p=args["top_p"], top_k=0,
                                 num_return_sequences=args["n"], max_new_tokens=args["max_new_tokens"],
                                 min_new_tokens=args["max_new_tokens"], pad_token_id=0)
        elapsed = time.perf_counter() - start
        tokens = (out.shape[1] - T) * out.shape[0]
    print(json.dumps({"generate_s": elapsed, "tokens": tokens}))


def make_model(path: Path) -> Path:
    from mtcore.checkpoint import save_model
    from mtcore.model import Llama, ModelArgs

    args = ModelArgs(vocab_size=32000, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, intermediate_size=1024,
                     rope_theta=500000.0, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                     pad_token_id=0)
    save_model(Llama(args).init_weights(seed=0), path)
    return path


def main():
    if "--worker" in sys.argv:
        return worker(json.loads(sys.argv[sys.argv.index("--worker") + 1]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", help="checkpoint directory (default: a random ~34M Llama built here)")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=None, help="mtcore's concurrent sequences (default: all)")
    parser.add_argument("--device", default=common.default_device())
    parser.add_argument("--providers", default="transformers,mtcore")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        policy = args.policy or str(make_model(Path(tmp) / "policy"))
        from mtcore.checkpoint import inspect_checkpoint

        _, model_args, _, n_params, _ = inspect_checkpoint(policy)
        gen = torch.Generator().manual_seed(0)
        lens = torch.randint(args.min_prompt, args.max_prompt + 1, (args.prompts,), generator=gen).tolist()
        prompts = [torch.randint(3, model_args.vocab_size, (L,), generator=gen).tolist() for L in lens]
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))
        print(common.header("sampling: mtcore's KV-cache sampler vs transformers' generate", args.device,
                            "fp32" if args.device == "cpu" else "bf16",
                            f"{n_params / 1e6:.1f}M-parameter Llama, {args.prompts} prompts of {args.min_prompt}-"
                            f"{args.max_prompt} tokens, n={args.n}, {args.max_new_tokens} new tokens each, "
                            f"temperature 0.8, top-p 0.95"))
        rows = []
        for provider in args.providers.split(","):
            job = dict(provider=provider, policy=policy, prompts=str(prompts_file), device=args.device, n=args.n,
                       temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens, slots=args.slots)
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                                  text=True)
            process_s = time.perf_counter() - start
            if proc.returncode != 0:
                rows.append((provider, None, proc.stderr.strip().splitlines()[-1][:120]))
                continue
            rows.append((provider, process_s, json.loads(proc.stdout.strip().splitlines()[-1])))
            print(f"  {provider}: {rows[-1]}", file=sys.stderr, flush=True)
    base = next((r for r in rows if r[0] == "transformers" and r[1]), None)
    print("| provider | process s | generate s | tokens | tokens/s (generate) | process speed-up vs transformers |")
    print("|---|---:|---:|---:|---:|---:|")
    for provider, process_s, r in rows:
        if process_s is None:
            print(f"| {provider} | — | — | — | — | not run: {r} |")
            continue
        speedup = f"{base[1] / process_s:.2f}x" if base else "—"
        print(f"| {provider} | {process_s:.1f} | {r['generate_s']:.1f} | {r['tokens']} | "
              f"{r['tokens'] / r['generate_s']:.0f} | {speedup} |")


if __name__ == "__main__":
    main()
