"""Benchmark: mtcore's KV-cache sampler against transformers' generate doing the same work, with the
hardware limit beside each speed.

Two tables.

1. Whole process (the default; CPU rows). Same model, prompts, n, sampling settings and lengths:
   every sequence generates exactly --max-new-tokens tokens (no stop ids), so both produce the same
   tokens. Each provider runs in its own process; "process s" is spawn to exit (imports, model load,
   generation), the target's measure; "generate s" is the generation call alone. transformers gets
   all prompts in one left-padded generate call with num_return_sequences = n (its fastest single
   call). "% of matmul peak": the generation's useful FLOPs (each prompt's forward once, each
   generated token's forward with its attention to its prefix, and the LM head where a token is
   sampled; computed, profile.matmul_flops) over its seconds, against a dense fp32 (CPU) or bf16 (GPU)
   matmul measured in this run.

2. Decode (--decode, and bench/gpu_check.py's decode section): greedy decode at 1, 16, 64, 128 and 210
   slots (210: the cache bench/memory_plan.py gives an 8B policy on an 80 GB GPU; the CPU: 1, 16, 64)
   of a random model (GPU: the Llama-3.2-1B shape and the Llama-3-8B shape in bf16), each slot a
   --decode-prompt-token prompt and --decode-new-tokens new tokens. Rows: mtcore in each decode mode
   (on CUDA eager, compile and graphs; eager on the CPU) and transformers' generate with its static
   cache (which it compiles), each timed on a second, identical call after a warm-up. The
   floor: each step must read the weights once and every slot's K/V prefix, so
       floor tokens/s = slots / ((weight bytes + mean K/V bytes of a step) / copy bandwidth),
   with the device-to-device copy bandwidth measured in this run. "same as eager" compares tokens.
   "mode:K" is a mode with K decode steps per visit of the host (--decode-steps K). Then the sampled
   E-step shape (sampled_rows): ragged prompts of about 200 tokens, up to 512 new, T 0.8, top-p 0.95,
   ragged stops, with each mode's GPU busy share (torch.profiler) on CUDA.

    python bench/sampler.py                      # whole process, CPU: a random ~34M-parameter Llama
    python bench/sampler.py --policy DIR         # any checkpoint
    python bench/sampler.py --decode             # the decode table (on a GPU: 1B and 8B shapes)
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


def generation_flops(args, prompt_lens: list[int], n: int, new: int) -> float:
    """Useful forward FLOPs of sampling n x new tokens for each prompt (computed): the prompt's forward
    once (its K/V are shared by the n samples), then each generated token's (the first comes from the
    prompt's last position), attending to its prefix, with the LM head at every sampled position."""
    from mtcore.profile import matmul_flops

    total = matmul_flops(args, prompt_lens, head_tokens=len(prompt_lens))
    for length in prompt_lens:
        total += n * (matmul_flops(args, [length + new - 1], head_tokens=new - 1) - matmul_flops(args, [length],
                                                                                                  head_tokens=0))
    return total


# ---------------------------------------------------------------------------------------------------
# 1. Whole process


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
        ids, mask = left_padded(prompts)
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                 temperature=args["temperature"], top_p=args["top_p"], top_k=0,
                                 num_return_sequences=args["n"], max_new_tokens=args["max_new_tokens"],
                                 min_new_tokens=args["max_new_tokens"], pad_token_id=0)
        elapsed = time.perf_counter() - start
        tokens = (out.shape[1] - ids.shape[1]) * out.shape[0]
    print(json.dumps({"generate_s": elapsed, "tokens": tokens}))


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask [B, T], left-padded with 0 as generation needs."""
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    return ids, mask


def make_model(path: Path) -> Path:
    from mtcore.checkpoint import save_model
    from mtcore.model import Llama, ModelArgs

    args = ModelArgs(vocab_size=32000, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, intermediate_size=1024,
                     rope_theta=500000.0, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                     pad_token_id=0)
    save_model(Llama(args).init_weights(seed=0), path)
    return path


def whole_process(args):
    from mtcore.checkpoint import inspect_checkpoint
    from mtcore.profile import _measure_matmul

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        policy = args.policy or str(make_model(Path(tmp) / "policy"))
        _, model_args, _, n_params, _ = inspect_checkpoint(policy)
        gen = torch.Generator().manual_seed(0)
        lens = torch.randint(args.min_prompt, args.max_prompt + 1, (args.prompts,), generator=gen).tolist()
        prompts = [torch.randint(3, model_args.vocab_size, (L,), generator=gen).tolist() for L in lens]
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))
        peak = _measure_matmul(torch.device(args.device), dtype, n=2048 if args.device == "cpu" else 8192)
        flops = generation_flops(model_args, lens, args.n, args.max_new_tokens)
        print(common.header("sampling: mtcore's KV-cache sampler vs transformers' generate", args.device,
                            str(dtype).removeprefix("torch."),
                            f"{n_params / 1e6:.1f}M-parameter Llama, {args.prompts} prompts of {args.min_prompt}-"
                            f"{args.max_prompt} tokens, n={args.n}, {args.max_new_tokens} new tokens each, "
                            f"temperature 0.8, top-p 0.95"))
        print(f"matmul peak measured in this run: {peak / 1e9:.1f} GFLOP/s ({str(dtype).removeprefix('torch.')}, "
              f"square {2048 if args.device == 'cpu' else 8192}); useful generation FLOPs {flops / 1e9:.1f} G "
              f"(computed)")
        rows = []
        for provider in args.providers.split(","):
            job = dict(provider=provider, policy=policy, prompts=str(prompts_file), device=args.device, n=args.n,
                       temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens, slots=args.slots)
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                                  text=True)
            process_s = time.perf_counter() - start
            if proc.returncode != 0:
                rows.append((provider, None, (proc.stderr.strip().splitlines() or ["no output"])[-1][:120]))
                continue
            rows.append((provider, process_s, json.loads(proc.stdout.strip().splitlines()[-1])))
            print(f"  {provider}: {rows[-1]}", file=sys.stderr, flush=True)
    base = next((r for r in rows if r[0] == "transformers" and r[1]), None)
    print("| provider | process s | generate s | tokens | tokens/s (generate) | % of matmul peak (generate) | "
          "process speed-up vs transformers |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for provider, process_s, r in rows:
        if process_s is None:
            print(f"| {provider} | — | — | — | — | — | not run: {r} |")
            continue
        speedup = f"{base[1] / process_s:.2f}x" if base else "—"
        print(f"| {provider} | {process_s:.1f} | {r['generate_s']:.1f} | {r['tokens']} | "
              f"{r['tokens'] / r['generate_s']:.0f} | {100 * flops / r['generate_s'] / peak:.1f}% | {speedup} |")


# ---------------------------------------------------------------------------------------------------
# 2. Decode


def decode_shapes(device: str, dry: bool) -> dict:
    """name -> ModelArgs. GPU: Llama-3.2-1B's and Llama-3-8B's shapes; dry (any device): two tiny ones."""
    from mtcore.model import FLAVOURS, ModelArgs

    if dry:
        tiny = dict(vocab_size=1000, n_kv_heads=2, head_dim=64, rope_theta=500000.0, max_position_embeddings=512)
        return {"1b-shaped (tiny)": ModelArgs(dim=128, n_layers=2, n_heads=4, intermediate_size=256,
                                              tie_word_embeddings=True, **tiny),
                "8b-shaped (tiny)": ModelArgs(dim=256, n_layers=2, n_heads=8, intermediate_size=512, **tiny)}
    return {"llama3.2-1b-shaped": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                                            intermediate_size=8192, tie_word_embeddings=True),
            "llama3-8b-shaped": FLAVOURS["llama3-8b"]}


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a device-to-device copy (read + write), the best of a few."""
    from mtcore import profile

    n = 2**28 if device == "cuda" else 2**24  # 1 GiB / 64 MiB of fp32
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(5):
        profile.sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        profile.sync(device)
        best = max(best, 2 * 4 * n / (time.perf_counter() - start))
    return best


def _timed(fn, device):
    from mtcore import profile

    profile.sync(device)
    start = time.perf_counter()
    out = fn()
    profile.sync(device)
    return out, time.perf_counter() - start


def argmax_agreement(hf, prompts: list[list[int]], completions: list[list[int]], device: str) -> float:
    """% of the completions' tokens that are transformers' argmax given the same prefix, read off one
    full forward over prompt + completion (teacher forcing): greedy decoding's definition, which stays
    comparable after two decoders part at a near-tie (random weights in bf16 have many)."""
    hits = total = 0
    for i in range(0, len(prompts), 16):  # 16 rows a forward: 16 x L x vocab logits
        rows = [p + c for p, c in zip(prompts[i:i + 16], completions[i:i + 16])]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)  # right-padded
        with torch.no_grad():
            best = hf(ids).logits.argmax(-1).tolist()  # [rows, width]: the next token's argmax
        for r, p, c in zip(best, prompts[i:i + 16], completions[i:i + 16]):
            hits += sum(r[len(p) - 1 + j] == t for j, t in enumerate(c))
            total += len(c)
    return 100 * hits / max(1, total)


def transformers_twin(ours, dtype, device):
    """transformers' LlamaForCausalLM holding ours' weights, built in dtype as from_pretrained(dtype=dtype)
    builds it: parameters in dtype, the rotary embedding's inv_freq buffer in fp32. (Built in fp32 and
    then .to(bf16), inv_freq is rounded to bf16 too: RoPE angles off by up to 2^-9 relative, 0.3 rad at
    position 190, a slightly different model from the checkpoint's, and a judge biased towards
    transformers' own decode: bench/results/decode_bf16_precision_cpu.md.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mtcore.checkpoint import args_to_config

    with torch.device(device):
        hf = LlamaForCausalLM._from_config(LlamaConfig(**args_to_config(ours.args, "policy", dtype)), dtype=dtype)
    hf.load_state_dict(ours.state_dict(), strict=False)
    return hf.eval()


def _mode(label: str) -> tuple[str, int]:
    """"graphs" -> ("graphs", 1); "graphs:8" -> ("graphs", 8); "graphs:auto" -> ("graphs", 0): a decode mode
    and its steps per host visit (0: chosen from the measured step time)."""
    mode, _, steps = label.partition(":")
    return mode, 0 if steps == "auto" else int(steps or 1)


def default_modes(device: str) -> tuple[str, ...]:
    if device == "cuda":
        return ("eager", "compile", "graphs", "compile-graphs", "graphs:4", "graphs:8", "graphs:auto")
    return ("eager", "eager:4", "eager:auto")


def gpu_busy(fn, device: str) -> float | None:
    """% of fn's wall time the GPU spent in kernels (torch.profiler; None off CUDA)."""
    if device != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from mtcore import profile as mprofile

    mprofile.sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        mprofile.sync(device)
        wall = time.perf_counter() - start
    busy = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e6
    return 100 * busy / wall


def _mode_columns(row: dict, label: str, rate: float, floor: float, busy, tokens, first) -> None:
    row[f"mtcore {label} tokens/s"] = common.sig(rate)
    row[f"mtcore {label} % of floor"] = common.sig(100 * rate / floor)
    if busy is not None:
        row[f"mtcore {label} GPU busy %"] = common.sig(busy)
    if tokens is not first:
        row[f"{label} same as {next(iter(row['_labels']))}"] = tokens == first
    row["_labels"].append(label)


def _shapes(device: str, dry: bool, shapes, dtype):
    """(name, args, ours, transformers' twin, weight bytes, K/V bytes per token) of each decode shape
    asked for; each pair of models freed after its rows."""
    from mtcore.sampler import KVCache

    for name, args in decode_shapes(device, dry).items():
        if shapes and name not in shapes:
            continue
        ours = common.random_model(args, "policy", device).to(dtype).eval()
        hf = transformers_twin(ours, dtype, device)
        weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())  # tied counted once
        yield name, args, ours, hf, weight_bytes, KVCache.bytes_per_token(ours)
        del ours, hf
        if device == "cuda":
            torch.cuda.empty_cache()


def _timed_modes(ours, prompts, params, slots: int, modes, device: str):
    """(label, tokens, seconds, run) of each mode ("mode:K"): timed on a second call after a warm-up
    (which compiles and captures)."""
    from mtcore.sampler import generate

    for label in modes:
        mode, steps = _mode(label)

        def run():
            return generate(ours, prompts, params, slots=slots, decode_mode=mode, decode_steps=steps)
        run()
        out, seconds = _timed(run, device)
        yield label, [c.token_ids for r in out for c in r], seconds, run


def decode_rows(device: str, dry: bool = False, slot_counts=None, prompt_len: int = 128, new: int = 128,
                modes: tuple[str, ...] | None = None, shapes: tuple[str, ...] | None = None,
                busy: bool = False, transformers: bool = True, on_progress=None) -> tuple[list[dict], list[str]]:
    """The decode table's greedy rows (and notes): see the module docstring. modes: decode modes, "mode:K"
    for K steps per host visit (--decode-steps); shapes: a subset of decode_shapes' names; busy: the GPU
    busy share of each mode (one more, profiled, call); transformers: its row too (on a GPU it compiles
    its static-cache step once per batch size, a minute); on_progress(rows): called with the rows so far
    (the one in progress included) after each mode, so a caller cut off by a time limit keeps them."""
    from mtcore.device import precision
    from mtcore.sampler import SamplingParams

    dtype = precision(device).dtype
    bandwidth = copy_bandwidth(device)
    modes = modes or default_modes(device)
    slot_counts = slot_counts or ((1, 16, 64, 128, 210) if device == "cuda" else (1, 16, 64))
    notes = [f"{str(dtype).removeprefix('torch.')}; copy bandwidth {bandwidth / 1e9:.4g} GB/s measured in this run; "
             f"prompts of {prompt_len} tokens, {new} new tokens, greedy; mode:K = K decode steps per host visit"]
    rows = []
    for name, args, ours, hf, weight_bytes, kv_token in _shapes(device, dry, shapes, dtype):
        g = torch.Generator().manual_seed(0)
        for slots in slot_counts:
            prompts = [torch.randint(3, args.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(slots)]
            params = SamplingParams(n=1, temperature=0, max_new_tokens=new)
            step_bytes = weight_bytes + slots * kv_token * (prompt_len + new / 2)  # mean prefix of a step
            floor = slots * bandwidth / step_bytes
            row = {"shape": name, "slots": slots, "floor tokens/s": common.sig(floor), "_labels": []}
            eager = None
            for label, tokens, seconds, run in _timed_modes(ours, prompts, params, slots, modes, device):
                eager = eager or tokens
                _mode_columns(row, label, sum(map(len, tokens)) / seconds, floor,
                              gpu_busy(run, device) if busy else None, tokens, eager)
                if on_progress:
                    on_progress(rows + [{k: v for k, v in row.items() if k != "_labels"}])
            if not transformers:
                del row["_labels"]
                rows.append(row)
                continue
            ids = torch.tensor(prompts, device=device)
            hf_kwargs = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                             attention_mask=torch.ones_like(ids))
            if device == "cuda":
                hf_kwargs["cache_implementation"] = "static"
            with torch.no_grad():
                hf.generate(ids, **hf_kwargs)  # warm-up, the same call: its static cache is sized by the call
                hf_out, hf_s = _timed(lambda: hf.generate(ids, **hf_kwargs), device)
            hf_rate = (hf_out.shape[1] - prompt_len) * slots / hf_s
            row["transformers tokens/s"] = common.sig(hf_rate)
            best = max(row[f"mtcore {label} tokens/s"] for label in row["_labels"])
            row["best mtcore / transformers"] = common.sig(best / hf_rate)
            hf_tokens = hf_out[:, prompt_len:].tolist()
            agree = [a == b for r, h in zip(eager, hf_tokens) for a, b in zip(r, h)]
            row["tokens equal to transformers %"] = common.sig(100 * sum(agree) / max(1, len(agree)))
            # teacher-forced: each decoder's tokens against transformers' full-forward argmax
            row["mtcore tokens = argmax %"] = common.sig(argmax_agreement(hf, prompts, eager, device))
            row["transformers tokens = argmax %"] = common.sig(argmax_agreement(hf, prompts, hf_tokens, device))
            del row["_labels"]
            rows.append(row)
            print(f"  {row}", file=sys.stderr, flush=True)
    return rows, notes


def sampled_rows(device: str, dry: bool = False, slot_counts=None, modes: tuple[str, ...] | None = None,
                 shapes: tuple[str, ...] | None = None) -> tuple[list[dict], list[str]]:
    """The E-step's shape: ragged prompts of about 200 tokens (150 to 250), up to 512 new tokens,
    temperature 0.8, top-p 0.95, and ragged stops: 1 token id in 256 stops a response (about 256
    tokens on average with random weights). The floor uses the mean prompt and response lengths of
    the run (computed: an upper bound, since slots drain at the end); transformers samples the same
    shape with its own random numbers, its tokens counted up to each response's stop."""
    from mtcore.device import precision
    from mtcore.sampler import SamplingParams

    dtype = precision(device).dtype
    bandwidth = copy_bandwidth(device)
    modes = modes or default_modes(device)
    slot_counts = slot_counts or ((64, 210) if device == "cuda" else (16,))
    low, high, new = (8, 16, 24) if dry else (150, 250, 512)
    notes = [f"{str(dtype).removeprefix('torch.')}; copy bandwidth {bandwidth / 1e9:.4g} GB/s; sampled E-step shape: "
             f"prompts of {low} to {high} tokens, up to {new} new, T 0.8, top-p 0.95, 1 id in 256 a stop"]
    rows = []
    for name, args, ours, hf, weight_bytes, kv_token in _shapes(device, dry, shapes, dtype):
        stops = tuple(range(3, 3 + max(1, args.vocab_size // 256)))
        g = torch.Generator().manual_seed(1)
        for slots in slot_counts:
            lens = torch.randint(low, high + 1, (slots,), generator=g).tolist()
            prompts = [torch.randint(3 + len(stops), args.vocab_size, (n,), generator=g).tolist() for n in lens]
            params = SamplingParams(n=1, temperature=0.8, top_p=0.95, max_new_tokens=new, seed=3, stop_ids=stops)
            row = {"shape": name, "slots": slots, "_labels": []}
            first = None
            for label, tokens, seconds, run in _timed_modes(ours, prompts, params, slots, modes, device):
                if first is None:
                    first = tokens
                    mean_new = sum(map(len, tokens)) / len(tokens)
                    step_bytes = weight_bytes + slots * kv_token * (sum(lens) / slots + mean_new / 2)
                    floor = slots * bandwidth / step_bytes
                    row.update({"mean new tokens": common.sig(mean_new), "floor tokens/s (computed)": common.sig(floor)})
                _mode_columns(row, label, sum(map(len, tokens)) / seconds, floor, gpu_busy(run, device), tokens, first)
            ids, mask = (t.to(device) for t in left_padded(prompts))
            hf_kwargs = dict(do_sample=True, temperature=0.8, top_p=0.95, top_k=0, max_new_tokens=new,
                             eos_token_id=list(stops), pad_token_id=0, attention_mask=mask)
            if device == "cuda":
                hf_kwargs["cache_implementation"] = "static"
            with torch.no_grad():
                hf.generate(ids, **hf_kwargs)
                hf_out, hf_s = _timed(lambda: hf.generate(ids, **hf_kwargs), device)
            hf_tokens = 0
            for r in hf_out[:, ids.shape[1]:].tolist():
                cut = next((i + 1 for i, t in enumerate(r) if t in stops), len(r))
                hf_tokens += cut
            hf_rate = hf_tokens / hf_s
            row["transformers tokens/s"] = common.sig(hf_rate)
            row["best mtcore / transformers"] = common.sig(
                max(row[f"mtcore {label} tokens/s"] for label in row["_labels"]) / hf_rate)
            del row["_labels"]
            rows.append(row)
            print(f"  {row}", file=sys.stderr, flush=True)
    return rows, notes


def _print_table(rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "—")) for k in keys) + " |")


def decode_table(args):
    modes = tuple(args.modes.split(",")) if args.modes else None
    slot_counts = tuple(int(x) for x in args.decode_slots.split(",")) if args.decode_slots else None
    rows, notes = decode_rows(args.device, dry=args.dry_run, new=args.decode_new_tokens, slot_counts=slot_counts,
                              prompt_len=args.decode_prompt_tokens, modes=modes, busy=args.busy)
    print(common.header("decode: mtcore's sampler vs the bandwidth floor and transformers' generate", args.device,
                        notes[0].split(";")[0], notes[0].split("; ", 1)[1]))
    _print_table(rows)
    rows, notes = sampled_rows(args.device, dry=args.dry_run, modes=modes)
    print()
    print(notes[0].split("; ", 2)[2])
    _print_table(rows)


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
    parser.add_argument("--decode", action="store_true", help="the decode table instead of the whole-process one")
    parser.add_argument("--decode-prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-new-tokens", type=int, default=128)
    parser.add_argument("--dry-run", action="store_true", help="decode table on tiny shapes (any device)")
    parser.add_argument("--modes", default=None,
                        help="decode modes, comma-separated; mode:K = K steps per host visit (default on CUDA: "
                             "eager,compile,graphs,graphs:4,graphs:8; CPU: eager,eager:4)")
    parser.add_argument("--decode-slots", default=None, help="slot counts, comma-separated (CUDA: 1,16,64,128,210)")
    parser.add_argument("--busy", action="store_true", help="also the GPU busy share of each greedy row (profiled)")
    args = parser.parse_args()
    decode_table(args) if args.decode else whole_process(args)


if __name__ == "__main__":
    main()
