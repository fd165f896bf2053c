"""fused_logprobs on both CPU paths (Triton interpreter, torch) against float64 and same-dtype references."""

import importlib
import logging
from types import SimpleNamespace

import pytest
import torch

from mtcore.kernels.fused_logprobs import (CHUNKS, IGNORE_INDEX, fused_logprobs, fused_logprobs_ref,
                                           sequence_logps)
from mtcore.kernels.utils import HAS_TRITON, use_triton

fl = importlib.import_module("mtcore.kernels.fused_logprobs")  # the module (the package re-exports the function)


def make_inputs(N, H, V, dtype, seed=0, masked=()):
    """float64 tensors holding values exactly representable in `dtype`, so the float64 reference and
    the path under test see the same inputs and only arithmetic error is measured."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen, dtype=torch.float64).to(dtype).double()
    weight = (torch.randn(V, H, generator=gen, dtype=torch.float64) / H ** 0.5 * 2).to(dtype).double()
    labels = torch.randint(0, V, (N,), generator=gen)
    for sl in masked:
        labels[sl] = IGNORE_INDEX
    grad = torch.randn(N, generator=gen, dtype=torch.float64)
    return hidden, weight, labels, grad


def run(fn, hidden, weight, labels, grad, dtype):
    h = hidden.to(dtype).detach().requires_grad_()
    w = weight.to(dtype).detach().requires_grad_()
    out = fn(h, w, labels)
    (out.double() * grad).sum().backward()
    return out, h.grad, w.grad


def errors(got, ref):
    return [(g.double() - r.double()).abs().max().item() for g, r in zip(got, ref)]


SHAPES = {
    "round": (64, 32, 512),
    "odd": (47, 31, 123),
    "single-token": (1, 16, 1000),
    "v-not-multiple-of-block": (5, 47, 5003),
}
# (chunk_tokens, vocab_tile): the device default, and small tiles so several chunks and vocabulary
# tiles (with a ragged last one) are folded together.
TILES = {"default": (None, None), "small": (7, 97)}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(kernel_path, shape, tiles, dtype, seed):
    N, H, V = SHAPES[shape]
    hidden, weight, labels, grad = make_inputs(N, H, V, dtype, seed=seed, masked=[slice(1, 3)] if N > 3 else [])
    labels[0] = V - 1  # the last vocabulary row, in the last (ragged) tile
    if N > 3:
        labels[3] = 0
    chunk_tokens, vocab_tile = TILES[tiles]
    ref64 = run(fused_logprobs_ref, hidden, weight, labels, grad, torch.float64)
    got = run(lambda h, w, y: fused_logprobs(h, w, y, chunk_tokens, vocab_tile), hidden, weight, labels, grad, dtype)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    assert (got[0][labels == IGNORE_INDEX] == 0).all()
    err = errors(got, ref64)
    if dtype == torch.float32:
        scales = [max(1.0, r.abs().max().item()) for r in ref64]
        for name, e, s in zip(("logps", "d hidden", "d weight"), err, scales):
            assert e <= 1e-5 * s, f"{name}: max err {e:.3g} (scale {s:.3g})"
    else:
        base = errors(run(fused_logprobs_ref, hidden, weight, labels, grad, dtype), ref64)
        for name, e, b in zip(("logps", "d hidden", "d weight"), err, base):
            assert e <= 2 * b + 1e-6, f"{name}: max err {e:.3g}, same-dtype torch reference {b:.3g}"


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_as_it_runs_on_cuda(monkeypatch, tiles, dtype):
    """CUDA tensors under MTCORE_TORCH_KERNELS=1 take the torch passes on row-major tiles of the
    input dtype (bf16 logits tiles, upcast inside each pass), not the CPU's fp32 GEMMs: that path,
    run here on the CPU, against float64 with the same rules."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(fl, "_cpu_torch", lambda hidden, triton_path: False)
    N, H, V = SHAPES["v-not-multiple-of-block"]
    hidden, weight, labels, grad = make_inputs(N, H, V, dtype, seed=7, masked=[slice(1, 2)])
    ref64 = run(fused_logprobs_ref, hidden, weight, labels, grad, torch.float64)
    got = run(lambda h, w, y: fused_logprobs(h, w, y, *TILES[tiles]), hidden, weight, labels, grad, dtype)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    err = errors(got, ref64)
    if dtype == torch.float32:
        for name, e, r in zip(("logps", "d hidden", "d weight"), err, ref64):
            assert e <= 1e-5 * max(1.0, r.abs().max().item()), f"{name}: max err {e:.3g}"
    else:
        base = errors(run(fused_logprobs_ref, hidden, weight, labels, grad, dtype), ref64)
        for name, e, b in zip(("logps", "d hidden", "d weight"), err, base):
            assert e <= 2 * b + 1e-6, f"{name}: max err {e:.3g}, same-dtype torch reference {b:.3g}"


def test_torch_kernels_switch_sends_cuda_tensors_to_torch(monkeypatch):
    cuda_tensor = SimpleNamespace(is_cuda=True)  # dispatch reads only .is_cuda
    monkeypatch.setenv("MTCORE_TORCH_KERNELS", "1")
    assert not use_triton(cuda_tensor)
    monkeypatch.setenv("MTCORE_TORCH_KERNELS", "0")
    if HAS_TRITON:
        assert use_triton(cuda_tensor)


def test_out_dtype_fallback_is_checked_once_and_logged(monkeypatch, caplog):
    calls = []

    def mm_without_out_dtype(a, b, **kwargs):
        calls.append(kwargs)
        if "out_dtype" in kwargs:
            raise TypeError("mm() got an unexpected keyword argument 'out_dtype'")
        return a @ b

    monkeypatch.setattr(torch, "mm", mm_without_out_dtype)
    fl._mm_out_dtype_works.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=fl.__name__):
            results = [fl._mm_out_dtype_works(torch.device("cpu"), torch.bfloat16) for _ in range(3)]
    finally:
        fl._mm_out_dtype_works.cache_clear()
    assert results == [False] * 3 and len(calls) == 1
    warnings = [r for r in caplog.records if "out_dtype" in r.getMessage()]
    assert len(warnings) == 1 and "fall back" in warnings[0].getMessage()


def test_fully_masked(kernel_path):
    hidden, weight, labels, grad = make_inputs(9, 16, 300, torch.float32, masked=[slice(None)])
    logps, dh, dw = run(fused_logprobs, hidden, weight, labels, grad, torch.float32)
    assert torch.equal(logps, torch.zeros(9)) and torch.equal(dh, torch.zeros_like(dh))
    assert torch.equal(dw, torch.zeros_like(dw))


def test_masked_block_longer_than_a_chunk(kernel_path):
    """Unscored tokens are dropped before chunking: a masked run longer than a chunk costs nothing."""
    hidden, weight, labels, grad = make_inputs(40, 16, 300, torch.float32, masked=[slice(3, 30)])
    ref64 = run(fused_logprobs_ref, hidden, weight, labels, grad, torch.float64)
    got = run(lambda h, w, y: fused_logprobs(h, w, y, 4, 128), hidden, weight, labels, grad, torch.float32)
    assert max(errors(got, ref64)) <= 1e-5 * max(1.0, ref64[2].abs().max().item())


def test_never_more_than_one_tile_of_logits(kernel_path, monkeypatch):
    """Every GEMM that produces logits is at most [chunk_tokens, vocab_tile]; unscored rows never enter."""
    sizes = []
    real_mm = torch.mm

    def spy(a, b, **kwargs):
        out = real_mm(a, b, **kwargs)
        sizes.append(out.shape)
        return out

    monkeypatch.setattr(torch, "mm", spy)
    hidden, weight, labels, grad = make_inputs(30, 12, 1000, torch.float32, masked=[slice(0, 10)])
    run(lambda h, w, y: fused_logprobs(h, w, y, 8, 256), hidden, weight, labels, grad, torch.float32)
    logit_tiles = [s.numel() for s in sizes if 12 not in s]  # outputs that are not [*, H]
    assert logit_tiles and max(logit_tiles) <= 8 * 256
    # forward + backward recompute of the 20 scored tokens, V = 1000; the torch CPU path pads its last
    # chunk (4 tokens) to the chunk size here, 8, in both (CPU_ROW_MULTIPLE: batch invariance)
    rows = 24 if kernel_path == "torch" else 20
    assert sum(logit_tiles) == 2 * rows * 1000


def test_autocast_forward_and_backward_agree(kernel_path):
    """Under autocast both passes see the same bf16 logits: no worse than twice torch's own autocast error."""
    hidden, weight, labels, grad = make_inputs(16, 32, 3000, torch.float32, seed=3)
    ref64 = run(fused_logprobs_ref, hidden, weight, labels, grad, torch.float64)

    def under_autocast(fn):
        def wrapped(h, w, y):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(h, w, y)
        return wrapped

    base = errors(run(under_autocast(fused_logprobs_ref), hidden, weight, labels, grad, torch.float32), ref64)
    got = run(under_autocast(fused_logprobs), hidden, weight, labels, grad, torch.float32)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    for name, e, b in zip(("logps", "d hidden", "d weight"), errors(got, ref64), base):
        assert e <= 2 * b + 1e-6, f"{name}: max err {e:.3g}, torch autocast reference {b:.3g}"


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_one_gradient_only(kernel_path, which):
    hidden, weight, labels, grad = make_inputs(20, 16, 700, torch.float32, seed=4)
    h = hidden.float().requires_grad_(which == "hidden")
    w = weight.float().requires_grad_(which == "weight")
    (fused_logprobs(h, w, labels, 6, 256) * grad.float()).sum().backward()
    ref64 = run(fused_logprobs_ref, hidden, weight, labels, grad, torch.float64)
    got, ref = (h.grad, ref64[1]) if which == "hidden" else (w.grad, ref64[2])
    assert (h.grad is None) == (which == "weight") and (w.grad is None) == (which == "hidden")
    assert (got.double() - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_strided_inputs_and_int32_labels(kernel_path):
    hidden, weight, labels, grad = make_inputs(12, 24, 500, torch.float32, seed=5, masked=[slice(4, 6)])
    ref64 = run(fused_logprobs_ref, hidden, weight, labels, grad, torch.float64)
    h = hidden.float().T.contiguous().T.detach().requires_grad_()  # column-major [N, H]
    w = weight.float().T.contiguous().T.detach().requires_grad_()
    out = fused_logprobs(h, w, labels.to(torch.int32)[:, None].expand(12, 2)[:, 0], 5, 128)
    (out * grad.float()).sum().backward()
    for got, ref in zip((out, h.grad, w.grad), ref64):
        assert (got.double() - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_bad_labels():
    hidden, weight, labels, _ = make_inputs(4, 8, 50, torch.float32)
    labels[2] = 50
    with pytest.raises(ValueError, match=r"labels must be -100 or in \[0, 50\)"):
        fused_logprobs(hidden.float(), weight.float(), labels)
    with pytest.raises(ValueError, match="shape mismatch"):
        fused_logprobs(hidden.float(), weight.float()[:, :4], labels)
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        fused_logprobs(hidden, weight, labels.clamp(max=49))  # float64 is not a kernel dtype


def test_sequence_logps():
    logps = torch.tensor([0.0, -1.0, -2.0, 0.0, -3.0, -0.5], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([IGNORE_INDEX, 5, 6, IGNORE_INDEX, 7, 8])
    cu_seqlens = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    sums, counts = sequence_logps(logps, cu_seqlens, labels)
    assert sums.tolist() == [-3.0, 0.0, -3.5] and counts.tolist() == [2, 0, 2]
    sums.sum().backward()
    assert logps.grad.tolist() == [1.0] * 6
    for bad in ([1, 3, 6], [0, 3, 5], [0, 4, 3, 6]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            sequence_logps(logps, torch.tensor(bad, dtype=torch.int32), labels)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama3_vocabulary(kernel_path, dtype):
    """V = 128,256 with the device's default tiles (CPU: 16 vocabulary tiles, the last one ragged)."""
    V = 128256
    assert V % CHUNKS["cpu"][1]
    hidden, weight, labels, grad = make_inputs(6, 32, V, dtype, masked=[slice(2, 3)])
    labels[0], labels[1] = 0, V - 1  # the first and last vocabulary rows
    ref64 = run(fused_logprobs_ref, hidden, weight, labels, grad, torch.float64)
    got = run(fused_logprobs, hidden, weight, labels, grad, dtype)
    err = errors(got, ref64)
    if dtype == torch.float32:
        for e, r in zip(err, ref64):
            assert e <= 1e-5 * max(1.0, r.abs().max().item())
    else:
        base = errors(run(fused_logprobs_ref, hidden, weight, labels, grad, dtype), ref64)
        assert all(e <= 2 * b + 1e-6 for e, b in zip(err, base)), (err, base)
