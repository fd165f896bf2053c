"""The decode step's element-wise kernels (kernels/add_rms_norm.py, rope_cache.py, silu_mul.py): the Triton
kernels (interpreted here) and the torch paths (conftest's kernel_path runs each test on both) against
float64 references: fp32 within 1e-5 of the reference's scale, bf16 and fp16 no worse than twice torch's
own error in the same dtype. Round, odd and strided shapes (views of the merged GEMM outputs), a single
row, no residual; the rotary kernel's cache write lands at exactly (slot, pos) and nowhere else."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mtcore.kernels.add_rms_norm as arn
import mtcore.kernels.rope_cache as rc
import mtcore.kernels.silu_mul as sm

HALF = [torch.bfloat16, torch.float16]
DTYPES = [torch.float32, *HALF]
EPS = 1e-5
BENCH = Path(__file__).resolve().parents[1] / "bench" / "decode_kernels.py"


def errors(got, ref64) -> tuple[float, float]:
    diff = (got.double() - ref64).abs()
    return diff.max().item(), diff.mean().item()


def assert_accurate(name, got, ref64, base, rounded_once=False):
    """fp32: within 1e-5 of the reference's scale. 16-bit: max error at most twice base's (torch in the same
    dtype), both against the float64 reference; rounded_once (fp32 maths, one rounding on store): nearly
    every value is the reference's, rounded to nearest (the rest sit at a tie, within fp32 error)."""
    (err, mean), (base_err, base_mean) = errors(got, ref64), errors(base, ref64)
    if got.dtype == torch.float32:
        assert err <= 1e-5 * ref64.abs().max().item(), f"{name}: max/mean error {err:.3g}/{mean:.3g}"
        return
    assert err <= 2 * base_err, (f"{name}: max/mean error {err:.3g}/{mean:.3g}, torch's in {got.dtype} "
                                 f"{base_err:.3g}/{base_mean:.3g}")
    if rounded_once:
        nearest = (got == ref64.to(got.dtype)).double().mean().item()
        assert nearest >= 0.99, f"{name}: only {nearest:.1%} of the values are the reference rounded to nearest"


def column_view(gen, lead, width, total, start, dtype):
    """Columns start .. start + width of a random [*lead, total] tensor: rows strided by total, as the
    outputs of a merged GEMM are."""
    return torch.randn(*lead, total, generator=gen).to(dtype)[..., start:start + width]


def double(*tensors):
    return [None if t is None else t.double() for t in tensors]


# ------------------------------------------------------------------------------------------------
# add_rms_norm
# ------------------------------------------------------------------------------------------------

# (leading shape, dim, residual): "contiguous", "strided" (x and residual views of wider rows), or None
NORM_CASES = [((4,), 128, "contiguous"), ((3,), 123, "strided"), ((1,), 47, "contiguous"), ((2, 3), 64, None),
              ((3,), 123, None)]


def norm_inputs(lead, dim, residual, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    if residual == "strided":
        x, res = column_view(gen, lead, dim, 2 * dim, 5, dtype), column_view(gen, lead, dim, dim + 3, 3, dtype)
    else:
        x = (3 * torch.randn(*lead, dim, generator=gen)).to(dtype)
        res = None if residual is None else torch.randn(*lead, dim, generator=gen).to(dtype)
    weight = (1 + 0.5 * torch.randn(dim, generator=gen)).to(dtype)
    return x, res, weight


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", NORM_CASES, ids=str)
def test_add_rms_norm_against_float64(kernel_path, case, dtype):
    x, res, weight = norm_inputs(*case, dtype, seed=1)
    hidden, normed = arn.add_rms_norm(x, res, weight, EPS)
    ref_hidden, ref_normed = arn.add_rms_norm_ref(*double(x, res, weight), EPS)
    base_hidden, base_normed = arn.add_rms_norm_ref(x, res, weight, EPS)
    assert hidden.dtype == normed.dtype == dtype and hidden.shape == normed.shape == x.shape
    if res is None:
        assert hidden is x  # not written
    else:  # the sum is rounded to x's dtype, as torch rounds it
        assert torch.equal(hidden, x + res)
    assert_accurate("normed", normed, ref_normed, base_normed)
    if dtype != torch.float32:  # the normalised value is rounded before the weight multiplies it, as torch does
        same = (normed == base_normed).double().mean().item()
        assert same >= 0.99, f"only {same:.1%} of the outputs equal torch's in {dtype}"


def test_add_rms_norm_inputs_the_kernel_does_not_serve_take_the_torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(2)
    x, res = (torch.randn(2, 40, generator=gen).to(torch.bfloat16) for _ in range(2))
    weight = torch.randn(40, generator=gen)  # fp32 beside bf16 activations: the product is fp32
    assert not arn.kernel_serves(x, weight)
    hidden, normed = arn.add_rms_norm(x, res, weight, EPS)
    ref_hidden, ref_normed = arn.add_rms_norm_ref(x, res, weight, EPS)
    assert normed.dtype == torch.float32 and torch.equal(hidden, ref_hidden) and torch.equal(normed, ref_normed)
    wide = torch.randn(1, arn.MAX_DIM + 1, generator=gen)
    assert not arn.kernel_serves(wide, wide[0])


def test_add_rms_norm_bad_inputs():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight \\[dim\\]"):
        arn.add_rms_norm(x, None, torch.ones(7), EPS)
    with pytest.raises(ValueError, match="residual must have x's shape and dtype"):
        arn.add_rms_norm(x, x.double(), torch.ones(8), EPS)


# ------------------------------------------------------------------------------------------------
# rope_cache
# ------------------------------------------------------------------------------------------------

# (R, Hq, Hkv, D, S, L, slots, merged: q/k/v column views of one GEMM output, else each a view of heads
# padded to D + 8, pad: the caches are views of stores with pad (k) and 2 pad (v) more columns on each side
# of the L used). The v store is head-major, [S, Hkv, L', D]: every cache stride differs from k's.
ROPE_CASES = [(4, 8, 2, 64, 6, 8, [4, 0, 5, 2], True, 0), (3, 4, 1, 128, 5, 5, [3, 0, 4], True, 3),
              (2, 8, 2, 128, 3, 4, [2, 0], False, 0), (1, 4, 4, 64, 3, 4, [1], False, 0)]


def rope_inputs(R, Hq, Hkv, D, S, L, slots, merged, pad, dtype, seed):
    """q, k, v, cos, sin, the caches' stores [S, L + 2 pad, Hkv, D] and [S, Hkv, L + 4 pad, D], slots, pos."""
    gen = torch.Generator().manual_seed(seed)
    if merged:  # column views of one [R, (Hq + 2 Hkv) D] GEMM output
        qkv = torch.randn(R, (Hq + 2 * Hkv) * D, generator=gen).to(dtype)
        q, k, v = (part.view(R, -1, D) for part in qkv.split([Hq * D, Hkv * D, Hkv * D], dim=1))
    else:
        q, k, v = (torch.randn(R, h, D + 8, generator=gen).to(dtype)[..., :D] for h in (Hq, Hkv, Hkv))
    positions = torch.randint(0, 8192, (R,), generator=gen)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    freqs = positions.double()[:, None] * inv_freq  # [R, D / 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [R, D]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    stores = [torch.randn(S, L + 2 * pad, Hkv, D, generator=gen).to(dtype),
              torch.randn(S, Hkv, L + 4 * pad, D, generator=gen).to(dtype)]
    pos = torch.randint(0, L, (R,), generator=gen)
    return q, k, v, cos, sin, stores, torch.tensor(slots), pos


def run_rope(fn, q, k, v, cos, sin, stores, slots, pos, L, pad, dtype=None):
    """fn on copies of the stores (cast to dtype): (q_rot, k store, v store)."""
    k_store, v_store = (s.clone() if dtype is None else s.to(dtype) for s in stores)
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    out = fn(cast(q), cast(k), cast(v), cast(cos), cast(sin), k_store[:, pad:pad + L],
             v_store.transpose(1, 2)[:, 2 * pad:2 * pad + L], slots, pos)
    return out, k_store, v_store.transpose(1, 2)  # [S, L + 4 pad, Hkv, D]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ROPE_CASES, ids=str)
def test_rope_cache_against_float64(kernel_path, case, dtype):
    R, Hq, Hkv, D, S, L, slots, merged, pad = case
    q, k, v, cos, sin, stores, slots, pos = rope_inputs(*case, dtype, seed=3)
    out, k_store, v_store = run_rope(rc.rope_cache, q, k, v, cos, sin, stores, slots, pos, L, pad)
    ref, k_ref, v_ref = run_rope(rc.rope_cache_ref, q, k, v, cos, sin, stores, slots, pos, L, pad, torch.float64)
    base, k_base, v_base = run_rope(rc.rope_cache_ref, q, k, v, cos, sin, stores, slots, pos, L, pad)
    assert out.dtype == dtype and out.shape == (R, Hq, D) and out.is_contiguous()
    assert_accurate("q", out, ref, base, rounded_once=kernel_path == "triton")
    assert torch.equal(v_store, v_base) and torch.equal(v_store[slots, pos + 2 * pad], v)  # v copied, bit for bit
    written = torch.zeros(S, L + 2 * pad, dtype=torch.bool)  # [S, k store columns]
    written[slots, pos + pad] = True
    assert written.sum() == R  # distinct slots
    assert torch.equal(k_store[~written], stores[0][~written])  # nothing else in the store changed
    assert_accurate("k in the cache", k_store[written], k_ref[written], k_base[written],
                    rounded_once=kernel_path == "triton")


def test_rope_cache_head_dims_the_kernel_does_not_serve_take_the_torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v, cos, sin, stores, slots, pos = rope_inputs(2, 4, 2, 48, 3, 4, [2, 0], True, 0, torch.float32, seed=4)
    assert not rc.kernel_serves(q)
    out, k_store, v_store = run_rope(rc.rope_cache, q, k, v, cos, sin, stores, slots, pos, 4, 0)
    ref, k_ref, v_ref = run_rope(rc.rope_cache_ref, q, k, v, cos, sin, stores, slots, pos, 4, 0)
    assert torch.equal(out, ref) and torch.equal(k_store, k_ref) and torch.equal(v_store, v_ref)


def test_rope_cache_bad_inputs():
    q, k, v, cos, sin, stores, slots, pos = rope_inputs(2, 4, 2, 64, 3, 4, [2, 0], True, 0, torch.float32, seed=5)
    k_cache, v_cache = stores[0], stores[1].transpose(1, 2)  # [S, L, Hkv, D]
    with pytest.raises(ValueError, match="shapes do not agree"):
        rc.rope_cache(q, k, v, cos, sin, k_cache[..., :32], v_cache[..., :32], slots, pos)
    with pytest.raises(ValueError, match="one floating dtype"):
        rc.rope_cache(q, k, v, cos, sin, k_cache.half(), v_cache.half(), slots, pos)


# ------------------------------------------------------------------------------------------------
# silu_mul
# ------------------------------------------------------------------------------------------------

# (M, I, layout): "contiguous"; "merged" (gate and up the halves of one [M, 2I] output); "mixed" (gate a
# half of [M, 2I], up contiguous: unequal row strides). 2100 columns: three blocks, the last ragged.
SILU_CASES = [(4, 128, "contiguous"), (3, 123, "mixed"), (1, 47, "merged"), (2, 2100, "merged")]


def silu_inputs(M, I, layout, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        return [(2 * torch.randn(M, I, generator=gen)).to(dtype) for _ in range(2)]
    gate_up = (2 * torch.randn(M, 2 * I, generator=gen)).to(dtype)
    gate, up = gate_up[:, :I], gate_up[:, I:]
    return gate, (up if layout == "merged" else up.contiguous())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SILU_CASES, ids=str)
def test_silu_mul_against_float64(kernel_path, case, dtype):
    gate, up = silu_inputs(*case, dtype, seed=6)
    out = sm.silu_mul(gate, up)
    assert out.dtype == dtype and out.shape == gate.shape and out.is_contiguous()
    assert_accurate("silu(gate) * up", out, sm.silu_mul_ref(gate.double(), up.double()), sm.silu_mul_ref(gate, up),
                    rounded_once=kernel_path == "triton")


def test_silu_mul_bad_inputs():
    gate = torch.randn(3, 8)
    with pytest.raises(ValueError, match="of one shape"):
        sm.silu_mul(gate, torch.randn(3, 9))
    with pytest.raises(ValueError, match="one floating dtype"):
        sm.silu_mul(gate.int(), gate.int())


# ------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------

def test_the_benchmark_dry_run_has_a_row_per_op_and_provider():
    """`python bench/decode_kernels.py --dry-run`: tiny shapes on the CPU, the kernels interpreted; each op
    has a torch row and a triton row with a time, and the copy bandwidth in the header."""
    out = subprocess.run([sys.executable, str(BENCH), "--dry-run"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any("copy bandwidth" in line for line in lines), out.stdout
    for op in ("add_rms_norm", "rope_cache", "silu_mul"):
        rows = [line.split("|") for line in lines if line.startswith(f"| {op} |")]
        assert {row[3].strip() for row in rows} == {"torch", "triton"}, out.stdout
        assert all(float(row[4]) > 0 for row in rows), out.stdout
