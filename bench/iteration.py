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

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO)]  # mtcore from the clone, installed or not
from common import default_device, header  # noqa: E402


def run_iteration(out: Path, train_args: list[str], timeout: float | None = None) -> float:
    """`mtcore train --iters 1` into out; its wall seconds. A failure raises with the command's last line."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mtcore", "train", "--iters", "1", "--out", str(out),
                           *[a for a in train_args if a != "--"]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(
                              filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"mtcore train exited {proc.returncode}: "
                           f"{(proc.stderr.strip().splitlines() or ['no output'])[-1][:300]}")
    return time.perf_counter() - start


def stage_rows(out: Path) -> tuple[list[dict], str]:
    """One row per stage of iteration 1 (the loop's order), and the MFU peak's source."""
    from mtcore.mutual_taught import E_STEP, M_STEP

    entry = json.loads((out / "metrics.json").read_text())["iterations"][0]
    order = [*E_STEP, *M_STEP, "eval"]  # the loop's (metrics.json sorts its keys)
    stages = {k: entry[k]["profile"] for k in order if k in entry}
    total = sum(p["seconds"] for p in stages.values())
    rows = [{"stage": name, "seconds": round(p["seconds"], 2), "share %": round(100 * p["seconds"] / total),
             "tokens": p["tokens"], "tokens/s": round(p["tokens_per_s"]),
             "MFU %": round(100 * p["mfu"], 1) if p["mfu"] else None, "peak MiB": round(p["peak_memory_mib"])}
            for name, p in stages.items()]
    rows.append({"stage": "all stages", "seconds": round(total, 2), "share %": 100})
    return rows, entry["sample"]["profile"]["peak_flops_source"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="Run directory (default: a fresh temporary one).")
    args, train_args = parser.parse_known_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="mtcore-iteration-")) / "run"
    wall = run_iteration(out, train_args)
    rows, peak_source = stage_rows(out)
    device = next((a.split("=", 1)[1] if "=" in a else train_args[i + 1]
                   for i, a in enumerate(train_args) if a.startswith("--device")), default_device())
    world = "toy world" if "--policy" not in train_args else next(
        train_args[i + 1] for i, a in enumerate(train_args) if a == "--policy")
    print(header("one Mutual-Taught iteration, per stage", device, "fp32" if device == "cpu" else "bf16",
                 f"{world}; MFU peak: {peak_source}"))
    print("| stage | seconds | share | tokens | tokens/s | MFU | peak MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows[:-1]:
        mfu = f"{r['MFU %']:.1f}%" if r["MFU %"] else "—"
        print(f"| {r['stage']} | {r['seconds']:.2f} | {r['share %']}% | {r['tokens']:,} | {r['tokens/s']:,} | {mfu} | "
              f"{r['peak MiB']:,} |")
    print(f"| all stages | {rows[-1]['seconds']:.2f} | 100% | | | | |")
    print(f"whole command (start-up, initial evaluation, model loads and saves included): {wall:.1f} s")


if __name__ == "__main__":
    main()
