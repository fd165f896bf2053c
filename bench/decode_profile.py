"""Where a greedy decode's time goes: one generate of random Llama weights under torch.profiler, per
decode mode. Prints, for each mode, the wall time, the GPU's busy time (the kernels' summed time) and
its share of the wall, the top kernels by time, and the top host ops by self time; so a slow mode
reads as host-bound (the GPU idles between launches) or device-bound (which kernels). The sampler's
phases (mtcore.refill, .decode, .accept, .capture: torch.profiler.record_function) get their host
time: a phase that waits on the GPU (accept's token copy) counts that wait.

    python bench/decode_profile.py                          # 1B shape, 64 slots, eager and graphs
    python bench/decode_profile.py --shape llama3-8b-shaped --modes eager,compile,graphs
    python bench/decode_profile.py --dry-run                # tiny shapes on the CPU
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import sampler as bench_sampler  # noqa: E402 (bench/sampler.py)


def profile_mode(model, prompts, params, slots: int, mode: str, device: str, top: int) -> list[str]:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from mtcore import profile as mprofile
    from mtcore.sampler import generate

    label, (mode, steps) = mode, bench_sampler._mode(mode)  # "graphs:8": graphs, 8 steps per host visit
    generate(model, prompts, params, slots=slots, decode_mode=mode, decode_steps=steps)  # warm-up: compiles, captures
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    mprofile.sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        out = generate(model, prompts, params, slots=slots, decode_mode=mode, decode_steps=steps)
        mprofile.sync(device)
        wall = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for r in out for c in r)
    lines = [f"### {label}: {tokens} tokens in {wall * 1e3:.1f} ms ({tokens / wall:.4g} tokens/s)"]
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    if kernels:
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
        lines.append(f"GPU busy {busy * 1e3:.1f} ms = {100 * busy / wall:.1f}% of the wall; {len(kernels)} kernels")
        by_name: dict[str, list[float]] = {}
        for e in kernels:
            by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
        lines += ["", "| kernel | calls | total ms | % of GPU busy |", "|---|---:|---:|---:|"]
        for name, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]:
            lines.append(f"| {name[:90].replace('|', '/')} | {len(times)} | {sum(times) / 1e3:.2f} | "
                         f"{100 * sum(times) / 1e6 / busy:.1f} |")
    phases = [e for e in prof.key_averages() if e.key.startswith("mtcore.")]  # the sampler's record_function
    lines += ["", "| phase (host) | calls | host ms | ms per call |", "|---|---:|---:|---:|"]
    lines += [f"| {e.key} | {e.count} | {e.cpu_time_total / 1e3:.1f} | {e.cpu_time_total / 1e3 / e.count:.2f} |"
              for e in sorted(phases, key=lambda e: -e.cpu_time_total)]
    lines += ["", "host ops by self CPU time:", "```",
              prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60),
              "```"]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3.2-1b-shaped", help="a decode_shapes name of bench/sampler.py")
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--modes", default=None, help="comma-separated, mode:K for K decode steps per host visit "
                                                      "(default eager,graphs on CUDA; eager else)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, on the CPU")
    args = parser.parse_args()
    from mtcore.device import precision
    from mtcore.sampler import SamplingParams

    device = "cpu" if args.dry_run else common.default_device()
    shapes = bench_sampler.decode_shapes(device, args.dry_run)
    name = args.shape if args.shape in shapes else next(iter(shapes))
    modes = args.modes.split(",") if args.modes else (["eager", "graphs"] if device == "cuda" else ["eager"])
    dtype = precision(device).dtype
    model = common.random_model(shapes[name], "policy", device).to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, shapes[name].vocab_size, (args.prompt_tokens,), generator=g).tolist()
               for _ in range(args.slots)]
    params = SamplingParams(n=1, temperature=0, max_new_tokens=args.new)
    print(common.header(f"decode profile: {name}", device, str(dtype).removeprefix("torch."),
                        f"{args.slots} slots, {args.prompt_tokens}-token prompts, {args.new} new tokens, greedy"))
    for mode in modes:
        print("\n".join(profile_mode(model, prompts, params, args.slots, mode, device, args.top)), flush=True)


if __name__ == "__main__":
    main()
