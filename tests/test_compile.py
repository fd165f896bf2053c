"""Every Triton kernel, at every config its launcher can pick, compiles for Hopper (sm_90) and Ampere
(sm_80) here, without a GPU: triton.compile(ASTSource(...), target=GPUTarget(...)) builds PTX and cubin.
This catches what the interpreter lets through (types, shapes, ops that have no GPU lowering).

The training kernels do no matmul in Triton (the GEMMs are cuBLAS; see kernels/fused_logprobs.py); decode
attention's two small dots per tile must lower to tensor-core MMA in bf16/fp16. Every config is checked
for shared memory, and the gradient store for bf16 rounding."""

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
bt_loss, dpo_loss, fl, da, arn, rc, sm = (importlib.import_module(f"mtcore.kernels.{m}") for m in (
    "bt_loss", "dpo_loss", "fused_logprobs", "decode_attention", "add_rms_norm", "rope_cache", "silu_mul"))

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
strides = ("stride_q_s", "stride_q_h", "stride_k_s", "stride_k_l", "stride_k_h", "stride_v_s", "stride_v_l", "stride_v_h",
           "stride_o_s", "stride_o_h", "stride_o_split", "stride_lse_s", "stride_lse_h")
for dt in ("fp32", "bf16", "fp16"):
    for block_d in da.HEAD_DIMS:
        sig = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "slots_ptr": "*i64", "lens_ptr": "*i32",
               "o_ptr": "*fp32", "lse_ptr": "*fp32", **{n: "i32" for n in strides}, "scale": "fp32", "group": "i32",
               "split_len": "i32"}
        constexprs = {"BLOCK_G": da.BLOCK_G, "BLOCK_D": block_d, "BLOCK_N": da.BLOCK_N,
                      "DOT_PRECISION": "ieee" if dt == "fp32" else "tf32", "UPCAST": False}
        sig |= {n: "constexpr" for n in constexprs}
        jobs.append(("decode_attn", da._decode_attn_kernel, sig, constexprs, 4, dt))
        sig = {"o_part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": f"*{dt}",
               **{n: "i32" for n in ("stride_p_s", "stride_p_h", "stride_p_split", "stride_lse_s", "stride_lse_h",
                                     "stride_out_s", "stride_out_h", "num_splits")},
               "BLOCK_SPLITS": "constexpr", "BLOCK_D": "constexpr"}
        jobs.append(("decode_combine", da._combine_kernel, sig, {"BLOCK_SPLITS": da.MAX_SPLITS, "BLOCK_D": block_d}, 4,
                     dt))
# The decode step's element-wise kernels: each dtype (x, weight and caches in one dtype), each
# (BLOCK, num_warps) the norm can pick for rows up to MAX_DIM, with and without a residual; both head dims.
for block, num_warps in sorted({arn.launch_config(n) for n in range(1, arn.MAX_DIM + 1)}):
    for dt in ("fp32", "bf16", "fp16"):
        for has_residual in (False, True):
            sig = {n: f"*{dt}" for n in ("x_ptr", "residual_ptr", "weight_ptr", "hidden_ptr", "out_ptr")}
            sig |= {n: "i32" for n in ("stride_x", "stride_residual", "stride_hidden", "stride_out", "dim")}
            sig |= {"eps": "fp32", "BLOCK": "constexpr", "HAS_RESIDUAL": "constexpr", "EMULATE_RNE": "constexpr"}
            jobs.append(("add_rms_norm", arn._add_rms_norm_fwd_kernel, sig,
                         {"BLOCK": block, "HAS_RESIDUAL": has_residual, "EMULATE_RNE": False}, num_warps, dt))
rope_strides = ("stride_q_r", "stride_q_h", "stride_k_r", "stride_k_h", "stride_v_r", "stride_v_h", "stride_cos_r",
                "stride_sin_r", "stride_kc_s", "stride_kc_l", "stride_kc_h", "stride_vc_s", "stride_vc_l",
                "stride_vc_h", "stride_out_r", "stride_out_h")
for dt in ("fp32", "bf16", "fp16"):
    for head_dim in rc.HEAD_DIMS:
        sig = {n: f"*{dt}" for n in ("q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "k_cache_ptr", "v_cache_ptr")}
        sig |= {"slots_ptr": "*i64", "pos_ptr": "*i64", "out_ptr": f"*{dt}", **{n: "i32" for n in rope_strides},
                "n_q_heads": "i32", "D": "constexpr", "EMULATE_RNE": "constexpr"}
        jobs.append(("rope_cache", rc._rope_cache_fwd_kernel, sig, {"D": head_dim, "EMULATE_RNE": False},
                     rc.NUM_WARPS, dt))
    sig = {"gate_ptr": f"*{dt}", "up_ptr": f"*{dt}", "out_ptr": f"*{dt}",
           **{n: "i32" for n in ("stride_gate", "stride_up", "stride_out", "n_cols")},
           "BLOCK": "constexpr", "EMULATE_RNE": "constexpr"}
    jobs.append(("silu_mul", sm._silu_mul_fwd_kernel, sig, {"BLOCK": sm.BLOCK, "EMULATE_RNE": False}, sm.NUM_WARPS,
                 dt))
results = []
for arch in (90, 80):
    for name, fn, sig, constexprs, num_warps, dt in jobs:
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        ptx = k.asm["ptx"]
        results.append({"kernel": name, "arch": arch, "dtype": dt, "constexprs": constexprs, "num_warps": num_warps,
                        "shared": k.metadata.shared, "cubin_bytes": len(k.asm["cubin"]),
                        "target": f"sm_{arch}" in ptx, "bf16_rne": "cvt.rn.bf16.f32" in ptx,
                        "bf16_cvt_any": "bf16.f32" in ptx, "mma": "mma" in ptx})
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
    assert kernels == {(k, a) for k in ("lse_update", "logit_grad", "dpo", "bt", "decode_attn", "decode_combine",
                                        "add_rms_norm", "rope_cache", "silu_mul") for a in (90, 80)}
    blocks = {r["constexprs"]["BLOCK_V"] for r in compiled if r["kernel"] == "lse_update"}
    assert blocks == {256, 512, 1024, 2048, 4096}
    for r in compiled:
        assert r["cubin_bytes"] > 0 and r["target"], r
        assert r["shared"] <= MAX_SHARED[r["arch"]], r


def test_bf16_gradient_store_rounds_to_nearest_even(compiled):
    """The interpreter truncates fp32 -> bf16 stores; the GPU kernel must round to nearest even."""
    bf16 = [r for r in compiled if r["kernel"] == "logit_grad" and r["dtype"] == "bf16"]
    assert bf16 and all(r["bf16_rne"] for r in bf16)


def test_decode_attention_dots_use_tensor_cores(compiled):
    """Every launchable decode config (3 dtypes x 2 head dims, on 2 archs) is there, and the 16-bit ones'
    dots lower to tensor-core MMA (mma on sm_80, mma or wgmma on sm_90)."""
    decode = [r for r in compiled if r["kernel"] == "decode_attn"]
    assert len(decode) == 2 * 3 * 2
    assert all(r["mma"] for r in decode if r["dtype"] != "fp32"), [r for r in decode if not r["mma"]]


def test_decode_elementwise_kernels_every_config_and_bf16_rounding(compiled):
    """The norm at each of its block sizes (128 .. 8192, 1 .. 16 warps), dtype and residual choice; rotary +
    cache write at head dims 64 and 128; SiLU-mul; on both archs. Their bf16 stores round to nearest even
    (the interpreter's EMULATE_RNE stands in for this; utils.round_to)."""
    count = {k: sum(r["kernel"] == k for r in compiled) for k in ("add_rms_norm", "rope_cache", "silu_mul")}
    assert count == {"add_rms_norm": 7 * 3 * 2 * 2, "rope_cache": 3 * 2 * 2, "silu_mul": 3 * 2}
    norm = {(r["constexprs"]["BLOCK"], r["num_warps"]) for r in compiled if r["kernel"] == "add_rms_norm"}
    assert norm == {(128, 1), (256, 1), (512, 1), (1024, 2), (2048, 4), (4096, 8), (8192, 16)}
    bf16 = [r for r in compiled if r["kernel"] in count and r["dtype"] == "bf16"]
    assert bf16 and all(r["bf16_rne"] for r in bf16), [r for r in bf16 if not r["bf16_rne"]]
