"""Decode attention (kernels/decode_attention.py): the Triton kernel (interpreted here) and the torch path
against a float64 reference and against SDPA run slot by slot, on ragged lengths, split-K and GQA."""

import pytest
import torch
import torch.nn.functional as F

import mtcore.kernels.decode_attention as da
from conftest import OLD_INTERPRETER


def sdpa64(q, k_cache, v_cache, slots, lens):
    """Independent reference: SDPA per row over its slot's first lens keys, in float64."""
    outs = []
    for r in range(q.shape[0]):
        n, s = int(lens[r]), int(slots[r])
        keys, values = (t[s, :n].double().transpose(0, 1) for t in (k_cache, v_cache))  # [Hkv, n, D]
        outs.append(F.scaled_dot_product_attention(q[r].double()[:, None], keys, values, enable_gqa=True)[:, 0])
    return torch.stack(outs)  # [R, Hq, D]


def inputs(R, S, L, Hq, Hkv, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(R, Hq, D, generator=gen).to(dtype)
    k_cache, v_cache = (torch.randn(S, L, Hkv, D, generator=gen).to(dtype) for _ in range(2))
    slots = torch.randperm(S, generator=gen)[:R]
    lens = torch.randint(1, L + 1, (R,), generator=gen)
    lens[0], lens[-1] = 1, L  # a single key, and a full slot
    return q, k_cache, v_cache, slots, lens


# (rows, slots, L, Hq, Hkv, D, SMs the launch assumes): GQA 4 and 8, MHA, a group of 16, odd lengths,
# one split, several, and the most (16)
SHAPES = [(3, 5, 47, 8, 2, 64, 132), (2, 2, 300, 32, 8, 128, 132), (4, 4, 1300, 4, 1, 128, 2),
          (1, 3, 130, 16, 16, 64, 132), (1, 1, 1000, 16, 1, 64, 132), (5, 7, 9, 12, 3, 64, 1)]


@pytest.mark.parametrize("path", [pytest.param("triton", marks=OLD_INTERPRETER), "torch"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_equals_float64(shape, path, monkeypatch):
    R, S, L, Hq, Hkv, D, sms = shape
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "triton" else "0")
    monkeypatch.setattr(da, "_sm_count", lambda device: sms)
    q, k_cache, v_cache, slots, lens = inputs(R, S, L, Hq, Hkv, D, torch.float32)
    assert da.kernel_serves(q, k_cache)
    out = da.decode_attention(q, k_cache, v_cache, slots, lens)
    ref64 = sdpa64(q, k_cache, v_cache, slots, lens)
    assert out.dtype == torch.float32 and out.shape == (R, Hq, D)
    err = (out.double() - ref64).abs().max().item()
    assert err < 1e-5, f"max abs error {err:.3g}"
    spec = da.decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), slots, lens)
    assert (spec - ref64).abs().max().item() < 1e-12  # the reference is itself SDPA's maths


def test_splits_are_exercised():
    """The shapes above run one split, several, and the most; splits cover the cache in whole tiles."""
    configs = {da.launch_config(R, Hkv, L, sms)[1] for R, _, L, _, Hkv, _, sms in SHAPES}
    assert 1 in configs and da.MAX_SPLITS in configs and len(configs) >= 3
    for rows, heads, L, sms in ((1, 8, 2048, 132), (64, 8, 2048, 132), (3, 2, 47, 132), (1, 1, 10**5, 132)):
        split_len, splits = da.launch_config(rows, heads, L, sms)
        assert split_len % da.BLOCK_N == 0 and (splits - 1) * split_len < L <= splits * split_len
        assert splits <= da.MAX_SPLITS and (splits == 1 or rows * heads * splits <= 2 * da.PROGRAMS_PER_SM * sms)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@OLD_INTERPRETER
def test_half_no_worse_than_twice_torch(dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(da, "_sm_count", lambda device: 132)
    q, k_cache, v_cache, slots, lens = inputs(4, 6, 200, 32, 8, 128, dtype, seed=1)
    out = da.decode_attention(q, k_cache, v_cache, slots, lens)
    ref64 = sdpa64(q, k_cache, v_cache, slots, lens)
    base = torch.stack([F.scaled_dot_product_attention(  # torch's own attention in the same dtype
        q[r][:, None], *(t[int(slots[r]), :int(lens[r])].transpose(0, 1) for t in (k_cache, v_cache)),
        enable_gqa=True)[:, 0] for r in range(4)])
    err, base_err = ((x.double() - ref64).abs().max().item() for x in (out, base))
    assert out.dtype == dtype and err <= 2 * base_err, f"error {err:.3g} vs torch's {base_err:.3g}"


def test_shapes_the_kernel_does_not_serve_take_the_torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k_cache, v_cache, slots, lens = inputs(2, 2, 20, 4, 2, 16, torch.float32)  # head_dim 16
    assert not da.kernel_serves(q, k_cache)
    out = da.decode_attention(q, k_cache, v_cache, slots, lens)
    assert (out.double() - sdpa64(q, k_cache, v_cache, slots, lens)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="shapes do not agree"):
        da.decode_attention(q, k_cache, v_cache, slots, lens[:1])
