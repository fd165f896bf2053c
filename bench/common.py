"""What every benchmark shares: the header, one measurement per provider in its own process, the table.

Each provider runs in a fresh subprocess (the script re-invoked with --worker), so its peak memory
is its own: on CUDA torch.cuda.max_memory_allocated, on CPU the peak RSS (VmHWM, reset through
/proc/self/clear_refs before the measured call, with glibc set to return freed memory at once).
"peak MiB" is the peak during one call minus what was allocated before it (inputs included there,
so it is the op's extra memory). Every provider is called once to warm up (compilation,
autotuning, allocator), then timed `repeats` times (the table shows the median), then measured
for memory.
"""

import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mtcore import profile

REPO = Path(__file__).resolve().parents[1]


def commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=REPO).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def header(title: str, device: str, dtype: str, shapes: str) -> str:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return (f"# {title}\n"
            f"device: {device_name(device)} | torch {torch.__version__} | triton {triton_version} | "
            f"commit {commit()} | dtype {dtype} | {shapes}")


# ---- worker side ----

def _rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset) in MiB, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def _reset_peak(device: str) -> float:
    """Reset mtcore.profile's peak counter; return the memory in use now (MiB)."""
    profile.sync(device)
    profile.reset_peak_memory(device)
    return torch.cuda.memory_allocated() / 2**20 if device == "cuda" else _rss_mib()[0]


def _peak(device: str) -> float:
    profile.sync(device)
    return profile.peak_memory_mib(device)


def _timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def _release_freed_memory_at_once():
    """Make glibc hand freed memory back to the OS at once (and now), so that memory it kept from
    earlier calls cannot hide in the "before" RSS of the memory call. Slower allocation, so this is
    done only after the timed calls."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 65536)
    libc.mallopt(M_TRIM_THRESHOLD, 0)
    libc.malloc_trim(0)


def measure(fn, device: str, repeats: int) -> dict:
    """Warm up, then `repeats` timed calls, then one call for peak memory. fn frees what it allocates
    (gradients included) before returning, so each call starts from the same memory."""
    fn()
    times = [_timed(fn, device) for _ in range(repeats)]
    if device != "cuda":
        _release_freed_memory_at_once()
    before = _reset_peak(device)
    fn()
    peak = _peak(device) - before
    return {"ms": statistics.median(times), "peak_mib": peak}


def worker_main(build, argv):
    """Run one provider and print its measurement as a JSON line. build(args) -> (fn, device)."""
    args = json.loads(argv[argv.index("--worker") + 1])
    try:
        fn, device = build(args)
        result = measure(fn, device, args["repeats"])
    except Exception as e:  # a provider that cannot run here gets a row saying why
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]}
    print(json.dumps(result))


# ---- parent side ----

def run_provider(script: str, args: dict) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(args)], capture_output=True, text=True,
                          env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["crashed"])[-1][:160]}
    return json.loads(lines[-1])


def run_rounds(script: str, jobs: list[dict], rounds: int) -> list[dict]:
    """Run every job `rounds` times, interleaved (A B C A B C), so that drift in the machine's speed
    falls on every provider alike. Per job: the median of its rounds' times, the largest peak."""
    results = [[] for _ in jobs]
    for _ in range(rounds):
        for job, out in zip(jobs, results):
            out.append(run_provider(script, job))
            print(f"  {job['provider']} {job.get('mode', '')}: {out[-1]}", file=sys.stderr, flush=True)
    merged = []
    for out in results:
        ok = [r for r in out if "error" not in r]
        if not ok:
            merged.append(out[0])
            continue
        merged.append({"ms": statistics.median(r["ms"] for r in ok), "peak_mib": max(r["peak_mib"] for r in ok)})
    return merged


def table(rows: list[dict], baseline: str = "naive", rate_unit: str = "TFLOP/s", rate_scale: float = 1e12) -> str:
    """rows: {provider, mode, ms, peak_mib, work, (error)}; work is FLOPs (or bytes) for the rate column."""
    lines = [f"| provider | mode | ms | peak MiB | {rate_unit} | time vs {baseline} | memory vs {baseline} |",
             "|---|---|---:|---:|---:|---:|---:|"]
    base = {r["mode"]: r for r in rows if r["provider"] == baseline and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['provider']} | {r['mode']} | — | — | — | — | not run: {r['error']} |")
            continue
        b = base.get(r["mode"])
        rate = r["work"] / (r["ms"] * 1e-3) / rate_scale
        t_ratio = f"{r['ms'] / b['ms']:.2f}x" if b else "—"
        m_ratio = f"{r['peak_mib'] / b['peak_mib']:.3f}x" if b and b["peak_mib"] > 0 else "—"
        lines.append(f"| {r['provider']} | {r['mode']} | {r['ms']:.1f} | {r['peak_mib']:.0f} | {rate:.3f} | "
                     f"{t_ratio} | {m_ratio} |")
    return "\n".join(lines)


def sig(x: float) -> float:
    """Three significant digits (tiny CPU figures and large GPU ones alike)."""
    return float(f"{x:.3g}")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def matmul_peak_tflops(device: str, dtype=torch.bfloat16, n: int = 8192) -> float | None:
    """This device's measured dense matmul rate (TFLOP/s), the yardstick for "% of peak" on GPU."""
    if device != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * 10 / (time.perf_counter() - start) / 1e12


def arg_parser(doc: str, providers: list[str], repeats: int = 3):
    """The options every benchmark takes: --providers, --repeats, --rounds, --device."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", default=",".join(providers))
    parser.add_argument("--repeats", type=int, default=repeats, help="timed calls per worker")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all providers")
    parser.add_argument("--device", default=default_device())
    return parser


def random_model(args, kind: str, device: str):
    """A Llama of random weights built on the device (meta, then in place): fp32 master weights."""
    from mtcore.model import Llama, RMSNorm

    with torch.device("meta"):
        model = Llama(args, kind)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, args.initializer_range, generator=gen)
    model.tie_weights()
    return model
