"""Where one Mutual-Taught iteration's time goes: run one iteration, print the per-stage table.

    python bench/iteration.py [--out DIR] [-- any `mtcore train` options, e.g. --policy P --prompts F]

Without model options it runs the built-in toy world. Each row is one stage's record from the run
directory (iter_1/<stage>.json): wall seconds, tokens processed, tokens/s per device, MFU (against
the GPU's bf16 peak looked up by name, or on the CPU a measured fp32 matmul peak) and peak memory
(CUDA max_memory_allocated, or the peak RSS since the stage began).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_device, header  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="Run directory (default: a fresh temporary one).")
    args, train_args = parser.parse_known_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="mtcore-iteration-")) / "run"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mtcore", "train", "--iters", "1", "--out", str(out),
                    *[a for a in train_args if a != "--"]], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "TRITON_INTERPRET": "0"})
    wall = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    entry = metrics["iterations"][0]
    device = next((a.split("=", 1)[1] if "=" in a else train_args[i + 1]
                   for i, a in enumerate(train_args) if a.startswith("--device")), default_device())
    world = "toy world" if "--policy" not in train_args else next(
        train_args[i + 1] for i, a in enumerate(train_args) if a == "--policy")
    print(header("one Mutual-Taught iteration, per stage", device, "fp32" if device == "cpu" else "bf16",
                 f"{world}; MFU peak: {entry['sample']['profile']['peak_flops_source']}"))
    print("| stage | seconds | share | tokens | tokens/s | MFU | peak MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    from mtcore.mutual_taught import E_STEP, M_STEP

    order = [*E_STEP, *M_STEP, "eval"]  # the loop's (metrics.json sorts its keys)
    stages = {k: entry[k]["profile"] for k in order if k in entry}
    total = sum(p["seconds"] for p in stages.values())
    for name, p in stages.items():
        mfu = f"{100 * p['mfu']:.1f}%" if p["mfu"] else "—"
        print(f"| {name} | {p['seconds']:.2f} | {100 * p['seconds'] / total:.0f}% | {p['tokens']:,} | "
              f"{p['tokens_per_s']:,.0f} | {mfu} | {p['peak_memory_mib']:,.0f} |")
    print(f"| all stages | {total:.2f} | 100% | | | | |")
    print(f"whole command (start-up, initial evaluation, model loads and saves included): {wall:.1f} s")


if __name__ == "__main__":
    main()
