"""Every Triton kernel, at every config its launcher can pick, compiles for Hopper (sm_90) and Ampere
(sm_80) here, without a GPU: triton.compile(ASTSource(...), target=GPUTarget(...)) builds PTX and cubin.
This catches what the interpreter lets through (types, shapes, ops that have no GPU lowering).

None of the kernels does a matmul in Triton (the GEMMs are cuBLAS; see kernels/fused_logprobs.py), so
there is no wgmma to look for; the fused passes are checked for shared memory and bf16 rounding."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
# the package re-exports functions under the modules' names: fetch the modules themselves
bt_loss, dpo_loss, fl = (importlib.import_module(f"mtcore.kernels.{m}") for m in ("bt_loss", "dpo_loss", "fused_logprobs"))

POWERS = [2 ** k for k in range(25)]
# Tile widths: powers of two up to 4 blocks of the largest (bigger tiles add only trip counts), and the
# CUDA tile and Llama-3's last one (V = 128256).
WIDTHS = [n for n in POWERS if n <= 4 * fl.MAX_BLOCK_V] + [fl.CHUNKS["cuda"][1], 128256 % fl.CHUNKS["cuda"][1]]
jobs = []
for block_v, n_blocks, num_warps in sorted({fl.launch_config(n) for n in WIDTHS}):
    for dt in ("fp32", "bf16", "fp16"):
        # stride_logits_col is 1 on CUDA (row-major tiles), which triton specialises to a constant
        common = {"logits_ptr": f"*{dt}", "stride_logits_row": "i32", "stride_logits_col": "constexpr",
                  "labels_ptr": "*i64"}
        jobs.append(("lse_update", fl._lse_update_kernel, {**common, "max_ptr": "*fp32", "sumexp_ptr": "*fp32",
                     "label_logit_ptr": "*fp32", "v_start": "i32", "n_cols": "i32", "BLOCK_V": "constexpr",
                     "N_BLOCKS": "constexpr"},
                     {"BLOCK_V": block_v, "N_BLOCKS": n_blocks, "stride_logits_col": 1}, num_warps, dt))
        jobs.append(("logit_grad", fl._logit_grad_kernel, {**common, "lse_ptr": "*fp32", "grad_ptr": "*fp32",
                     "v_start": "i32", "n_cols": "i32", "BLOCK_V": "constexpr", "N_BLOCKS": "constexpr",
                     "EMULATE_RNE": "constexpr"},
                     {"BLOCK_V": block_v, "N_BLOCKS": n_blocks, "stride_logits_col": 1, "EMULATE_RNE": False},
                     num_warps, dt))
for block in sorted({dpo_loss.launch_config(n) for n in POWERS}):
    for loss_type in range(len(dpo_loss.LOSS_TYPES)):
        sig = {n: "*fp32" for n in ("pc_ptr", "pr_ptr", "rc_ptr", "rr_ptr", "loss_ptr", "dldm_ptr",
                                     "chosen_rw_ptr", "rejected_rw_ptr")}
        sig |= {"n_pairs": "i32", "beta": "fp32", "label_smoothing": "fp32", "LOSS_TYPE": "constexpr",
                "BLOCK": "constexpr"}
        jobs.append(("dpo", dpo_loss._dpo_fwd_kernel, sig, {"LOSS_TYPE": loss_type, "BLOCK": block}, 4, "fp32"))
for block in sorted({bt_loss.launch_config(n) for n in POWERS}):
    for has_margin in (False, True):
        sig = {n: "*fp32" for n in ("chosen_ptr", "rejected_ptr", "margin_ptr", "loss_ptr", "grad_chosen_ptr",
                                     "grad_rejected_ptr")}
        sig |= {"n_pairs": "i32", "center_coef": "fp32", "HAS_MARGIN": "constexpr", "BLOCK": "constexpr"}
        jobs.append(("bt", bt_loss._bt_fwd_kernel, sig, {"HAS_MARGIN": has_margin, "BLOCK": block}, 4, "fp32"))
results = []
for arch in (90, 80):
    for name, fn, sig, constexprs, num_warps, dt in jobs:
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        ptx = k.asm["ptx"]
        results.append({"kernel": name, "arch": arch, "dtype": dt, "constexprs": constexprs, "num_warps": num_warps,
                        "shared": k.metadata.shared, "cubin_bytes": len(k.asm["cubin"]),
                        "target": f"sm_{arch}" in ptx, "bf16_rne": "cvt.rn.bf16.f32" in ptx,
                        "bf16_cvt_any": "bf16.f32" in ptx})
print(json.dumps(results))
"""

# Largest shared memory a block can opt into (CUDA programming guide, compute capabilities 9.0 and 8.0).
MAX_SHARED = {90: 227 * 1024, 80: 163 * 1024}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile real GPU kernels
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_config_compiles_for_sm90_and_sm80(compiled):
    kernels = {(r["kernel"], r["arch"]) for r in compiled}
    assert kernels == {(k, a) for k in ("lse_update", "logit_grad", "dpo", "bt") for a in (90, 80)}
    blocks = {r["constexprs"]["BLOCK_V"] for r in compiled if r["kernel"] == "lse_update"}
    assert blocks == {256, 512, 1024, 2048, 4096}
    for r in compiled:
        assert r["cubin_bytes"] > 0 and r["target"], r
        assert r["shared"] <= MAX_SHARED[r["arch"]], r


def test_bf16_gradient_store_rounds_to_nearest_even(compiled):
    """The interpreter truncates fp32 -> bf16 stores; the GPU kernel must round to nearest even."""
    bf16 = [r for r in compiled if r["kernel"] == "logit_grad" and r["dtype"] == "bf16"]
    assert bf16 and all(r["bf16_rne"] for r in bf16)
