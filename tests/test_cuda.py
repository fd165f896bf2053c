"""mtcore on a CUDA GPU, each against an independent reference with flash-attention's rule: the error
against float64 is at most twice torch's (or transformers') own error in the same dtype.

Run them on their own, `pytest -m cuda`: Triton decides at import whether it interprets (the CPU
suite's TRITON_INTERPRET=1) or compiles, so in a session that also runs the CPU kernel tests the
kernels are interpreted, and the tests here that launch them skip with that reason. Without CUDA
every test here is skipped (conftest). None of this has run on a GPU yet.
"""

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

from conftest import LLAMA3_SCALING, make_hf_model, save_hf

pytestmark = pytest.mark.cuda

DEVICE = "cuda"
# Llama-3-8B's LM head: hidden 4096, vocabulary 128,256; N packed tokens of a micro-batch (8192 in the
# benchmark; 4096 here keeps the float64 reference's [N, V] logits and their gradients near 25 GB).
H, V, N = 4096, 128256, 4096


@pytest.fixture
def compiled_kernels():
    """Skip where the kernels were decorated for the interpreter (they would run on the host).
    MTCORE_TORCH_KERNELS=1, if set, is respected: the tests then check the torch paths on CUDA."""
    fl = importlib.import_module("mtcore.kernels.fused_logprobs")
    if type(fl._lse_update_kernel).__name__ == "InterpretedFunction":
        pytest.skip("Triton is interpreted in this session (TRITON_INTERPRET=1): run `pytest -m cuda` on its own")


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_within_twice(name, got, ref64, base):
    """got and base (torch's own computation in the same dtype) against the float64 reference."""
    e, b = max_err(got, ref64), max_err(base, ref64)
    assert e <= 2 * b + 1e-6, f"{name}: max err {e:.3g}, same-dtype torch reference {b:.3g}"


# ------------------------------------------------------------------------------------------------
# The three kernels at Llama-3-8B shapes
# ------------------------------------------------------------------------------------------------

def head_inputs(dtype, seed=0):
    """float64 tensors exactly representable in dtype: hidden [N, H], weight [V, H], labels [N] with
    every 8th token and a run of 300 unscored, the first and last vocabulary rows as labels, grad [N]."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen, device=DEVICE, dtype=torch.float64).to(dtype).double()
    weight = (torch.randn(V, H, generator=gen, device=DEVICE, dtype=torch.float64) / H ** 0.5 * 2).to(dtype).double()
    labels = torch.randint(0, V, (N,), generator=gen, device=DEVICE)
    labels[::8] = -100
    labels[1000:1300] = -100
    labels[1], labels[2] = 0, V - 1
    grad = torch.randn(N, generator=gen, device=DEVICE, dtype=torch.float64)
    return hidden, weight, labels, grad


def run_head(fn, hidden, weight, labels, grad, dtype):
    h = hidden.to(dtype).detach().requires_grad_()
    w = weight.to(dtype).detach().requires_grad_()
    out = fn(h, w, labels)
    (out.double() * grad).sum().backward()
    result = [t.detach() for t in (out, h.grad, w.grad)]
    del h, w, out
    torch.cuda.empty_cache()
    return result


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_logprobs_llama3_8b_head(compiled_kernels, dtype):
    from mtcore.kernels import fused_logprobs, fused_logprobs_ref

    hidden, weight, labels, grad = head_inputs(dtype)
    ref64 = run_head(fused_logprobs_ref, hidden, weight, labels, grad, torch.float64)
    base = run_head(fused_logprobs_ref, hidden, weight, labels, grad, dtype)
    got = run_head(fused_logprobs, hidden, weight, labels, grad, dtype)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    assert (got[0][labels == -100] == 0).all() and (got[1][labels == -100] == 0).all()
    for name, g, r, b in zip(("logps", "d hidden", "d weight"), got, ref64, base):
        assert_within_twice(name, g, r, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss(compiled_kernels, dtype, loss_type):
    from mtcore.kernels import dpo_loss, dpo_loss_ref

    B = N // 2 + 3  # the pairs of a micro-batch, not a multiple of the block
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    inputs = [(torch.randn(B, generator=gen, device=DEVICE, dtype=torch.float64) * 50 - 300).to(dtype).double()
              for _ in range(4)]
    kw = dict(beta=0.1, loss_type=loss_type, label_smoothing=0.1 if loss_type == "sigmoid" else 0.0)

    def run(fn, dt):
        xs = [x.to(dt).detach().requires_grad_(i < 2) for i, x in enumerate(inputs)]
        out = fn(*xs, **kw)
        out.loss.backward()
        return out, xs[0].grad, xs[1].grad

    (ref, *ref_grads), (base, *base_grads), (got, *got_grads) = (
        run(dpo_loss_ref, torch.float64), run(dpo_loss_ref, dtype), run(dpo_loss, dtype))
    assert got.loss.dtype == torch.float32 and got_grads[0].dtype == dtype
    assert_within_twice("loss", got.loss, ref.loss, base.loss)
    assert_within_twice("chosen rewards", got.chosen_rewards, ref.chosen_rewards, base.chosen_rewards)
    for name, g, r, b in zip(("d chosen", "d rejected"), got_grads, ref_grads, base_grads):
        assert_within_twice(name, g, r, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_margin", [False, True])
def test_bt_loss(compiled_kernels, dtype, with_margin):
    from mtcore.kernels import bt_loss, bt_loss_ref

    B = N // 2 + 3
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    chosen, rejected, margin = ((torch.randn(B, generator=gen, device=DEVICE, dtype=torch.float64) * 3).to(dtype)
                                .double() for _ in range(3))

    def run(fn, dt):
        c, r = chosen.to(dt).detach().requires_grad_(), rejected.to(dt).detach().requires_grad_()
        out = fn(c, r, margin=margin.to(dt) if with_margin else None, center_coef=0.01)
        out.loss.backward()
        return out, c.grad, r.grad

    (ref, *ref_grads), (base, *base_grads), (got, *got_grads) = (
        run(bt_loss_ref, torch.float64), run(bt_loss_ref, dtype), run(bt_loss, dtype))
    assert got.loss.dtype == torch.float32 and got_grads[0].dtype == dtype
    assert_within_twice("loss", got.loss, ref.loss, base.loss)
    for name, g, r, b in zip(("d chosen", "d rejected"), got_grads, ref_grads, base_grads):
        assert_within_twice(name, g, r, b)


# ------------------------------------------------------------------------------------------------
# The model and the trainers
# ------------------------------------------------------------------------------------------------

def hf_model(kind, seed=0, **overrides):
    """A transformers Llama on the GPU whose weights are exactly representable in bf16 (kept fp32),
    so the float64, bf16 and mtcore models all start from the same numbers."""
    cfg = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=3, num_attention_heads=8,
               num_key_value_heads=2, head_dim=32, vocab_size=1000, pad_token_id=999, rope_scaling=LLAMA3_SCALING,
               max_position_embeddings=512)
    cfg.update(overrides)
    model = make_hf_model(kind, seed=seed, **cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


def test_logits_match_transformers_in_bf16(tmp_path):
    from mtcore import load_model

    from transformers import LlamaForCausalLM

    hf = hf_model("policy", seed=1)
    path = save_hf(hf, tmp_path / "m")
    tokens = torch.randint(0, 999, (4, 200), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        ref64 = hf.to(DEVICE, torch.float64)(tokens).logits
        base = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).to(DEVICE)(tokens).logits
        ours = load_model(path, dtype=torch.bfloat16, device=DEVICE)
        got = ours.logits(tokens)
    assert got.dtype == torch.bfloat16 and got.shape == ref64.shape
    assert_within_twice("logits", got, ref64, base)


def random_pairs(n, seed, vocab=999):
    from mtcore.data import Example

    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(0, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    out = []
    for i in range(n):
        p = ids(20, 120)
        out.append(Example(((p + ids(10, 150), len(p)), (p + ids(10, 150), len(p))), line=i + 1,
                           margin=float(torch.rand(1, generator=g))))
    return out


def upcast(x):
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def hf_seq_logps(hf, ids, n_prompt):
    """Sum of the response tokens' log-probs from the full logits of one unpadded sequence (fp32
    log-softmax of bf16 logits under autocast, as TRL computes them)."""
    logits = upcast(hf(torch.tensor([ids], device=DEVICE)).logits[0])  # [L, V]
    target = torch.tensor(ids[1:], device=DEVICE)[:, None]
    return logits[:-1].log_softmax(-1).gather(1, target).squeeze(1)[n_prompt - 1:].sum()


def hf_reward(hf, ids):
    return upcast(hf(torch.tensor([ids], device=DEVICE)).logits[0, 0])


def grad_error(model, ref64):
    """L2 norm over all parameters of (gradient - float64 gradient), by parameter name."""
    ref = dict(ref64.named_parameters())
    return sum((p.grad.double() - ref[n].grad).pow(2).sum() for n, p in model.named_parameters()).sqrt().item()


def reference_step(kind, seed, per_sequence, loss_fn):
    """Transformers' model in float64 (the reference) and in fp32 under bf16 autocast (torch's own
    mixed-precision error): for each, (per-sequence values [P, 2], model with .grad), the gradient
    of loss_fn(values)."""
    out = []
    for dtype, autocast in ((torch.float64, False), (torch.float32, True)):
        hf = hf_model(kind, seed=seed).to(DEVICE, dtype)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            values = per_sequence(hf)
        loss_fn(values).backward()
        out.append((values.detach(), hf))
    return out


def ours_step(model, pairs, objective, per_sequence):
    """One global batch through the trainer (gradients in model's .grad), and the per-sequence values
    [P, 2] of one packed forward under the trainer's autocast."""
    from mtcore.data import make_batch
    from mtcore.train import TrainConfig, accumulate_gradients

    accumulate_gradients(model, pairs, list(range(len(pairs))), objective,
                         TrainConfig(batch_size=len(pairs), micro_batch_tokens=600))
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        return per_sequence(model, make_batch(pairs, list(range(len(pairs)))).to(DEVICE)).view(-1, 2)


def check_step(name, ours_values, model, reference):
    (values64, hf64), (values_base, hf_base) = reference
    assert_within_twice(f"{name} per sequence", ours_values, values64, values_base)
    e, b = grad_error(model, hf64), grad_error(hf_base, hf64)
    assert e <= 2 * b, f"gradients: L2 err {e:.3g}, transformers under autocast {b:.3g}"


def test_dpo_step_matches_float64(tmp_path, compiled_kernels):
    from mtcore import load_model
    from mtcore.train import DPO, response_logps

    pairs, beta = random_pairs(6, seed=3), 0.1
    ref_hf = hf_model("policy", seed=5).to(DEVICE, torch.float64)
    with torch.no_grad():
        ref = torch.stack([torch.stack([hf_seq_logps(ref_hf, ids, n) for ids, n in ex.seqs]) for ex in pairs])  # [P, 2]

    def dpo(pol):
        m = (pol[:, 0] - ref[:, 0].to(pol.dtype)) - (pol[:, 1] - ref[:, 1].to(pol.dtype))
        return -F.logsigmoid(beta * m).mean()

    reference = reference_step("policy", 4, lambda hf: torch.stack(
        [torch.stack([hf_seq_logps(hf, ids, n) for ids, n in ex.seqs]) for ex in pairs]), dpo)
    model = load_model(save_hf(hf_model("policy", seed=4), tmp_path / "p"), dtype=torch.float32, device=DEVICE)
    counts = torch.tensor([[len(ids) - n for ids, n in ex.seqs] for ex in pairs])
    got = ours_step(model, pairs, DPO(ref.float().cpu(), counts, beta=beta),
                    lambda m, batch: response_logps(m, batch)[0])
    check_step("log-prob sums", got, model, reference)


def test_bt_step_matches_float64(tmp_path, compiled_kernels):
    from mtcore import load_model
    from mtcore.train import BradleyTerry, sequence_rewards

    pairs, center = random_pairs(6, seed=6), 0.01
    margin = torch.tensor([ex.margin for ex in pairs], device=DEVICE, dtype=torch.float64)

    def bt(r):
        return -F.logsigmoid(r[:, 0] - r[:, 1] - margin.to(r.dtype)).mean() + center * (r.sum(1) ** 2).mean()

    reference = reference_step("reward", 7, lambda hf: torch.stack(
        [torch.stack([hf_reward(hf, ids) for ids, _ in ex.seqs]) for ex in pairs]), bt)
    model = load_model(save_hf(hf_model("reward", seed=7), tmp_path / "rm"), kind="reward", dtype=torch.float32,
                       device=DEVICE)
    got = ours_step(model, pairs, BradleyTerry(center), sequence_rewards)
    assert got.dtype == torch.float32
    check_step("rewards", got, model, reference)


@pytest.mark.parametrize("lens", [[5, 1, 170, 90, 33], [256, 256], [1]])
def test_packed_equals_per_sequence(lens):
    """Packed sequences (varlen attention where torch has it) against each sequence alone: both in
    bf16 against the float64 model, the packed error at most twice the per-sequence one."""
    from mtcore.model import Llama, ModelArgs

    args = ModelArgs(vocab_size=1000, dim=256, n_layers=3, n_heads=8, n_kv_heads=2, intermediate_size=688,
                     rope_theta=10000.0, rope_scaling=dict(LLAMA3_SCALING), max_position_embeddings=512)
    model = Llama(args).init_weights(seed=0).to(DEVICE, torch.bfloat16).eval()
    model64 = copy.deepcopy(model).double()  # the same (bf16-representable) weights
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 1000, (n,), generator=gen).to(DEVICE) for n in lens]
    cu_seqlens = torch.tensor([0] + lens).cumsum(0).to(torch.int32).to(DEVICE)
    with torch.no_grad():
        packed = model(torch.cat(seqs), cu_seqlens=cu_seqlens, max_seqlen=max(lens))  # [N, dim]
        for i, seq in enumerate(seqs):
            ref64 = model64(seq[None])[0]  # [n, dim]
            alone = model(seq[None])[0]
            part = packed[cu_seqlens[i]:cu_seqlens[i + 1]]
            assert_within_twice(f"sequence {i}", part, ref64, alone)


def test_greedy_generate_equals_transformers(tmp_path):
    from mtcore import load_model
    from mtcore.sampler import SamplingParams, generate

    hf = make_hf_model("policy", seed=11, rope_scaling=LLAMA3_SCALING, num_hidden_layers=3)
    ours = load_model(save_hf(hf, tmp_path / "policy"), dtype=torch.float32, device=DEVICE)
    hf = hf.to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 96, (n,), generator=gen).tolist() for n in (1, 7, 23, 15, 2, 30, 11)]
    params = SamplingParams(n=1, temperature=0, max_new_tokens=24, stop_ids=(2,))
    got = generate(ours, prompts, params, slots=3)
    for i, prompt in enumerate(prompts):
        out = hf.generate(torch.tensor([prompt], device=DEVICE), do_sample=False, max_new_tokens=24, eos_token_id=2,
                          pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=DEVICE))
        expected = out[0, len(prompt):].tolist()
        assert got[i][0].token_ids == expected, f"prompt {i}: {got[i][0].token_ids} != {expected}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_kernel_on_gpu(compiled_kernels, dtype):
    """The compiled split-K kernel at Llama-3-8B's heads (32 query, 8 KV, 128 wide), ragged lengths up to
    a 2048-token cache, rows reading permuted slots, against float64 and SDPA in the same dtype."""
    from mtcore.kernels.decode_attention import decode_attention, decode_attention_ref

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for R, S in ((1, 1), (16, 20), (64, 64)):
        q = torch.randn(R, 32, 128, device=DEVICE, generator=gen).to(dtype)
        k_cache, v_cache = (torch.randn(S, 2048, 8, 128, device=DEVICE, generator=gen).to(dtype) for _ in range(2))
        slots = torch.randperm(S, device=DEVICE, generator=gen)[:R]
        lens = torch.randint(1, 2049, (R,), device=DEVICE, generator=gen)
        out = decode_attention(q, k_cache, v_cache, slots, lens)
        ref64 = decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), slots, lens)
        base = decode_attention_ref(q, k_cache, v_cache, slots, lens)  # torch's SDPA in the same dtype
        assert out.dtype == dtype
        assert_within_twice(f"R={R}", out, ref64, base)


# The decode step's element-wise kernels at Llama-3-8B's decode shapes: 64 rows, dim 4096, intermediate
# 14336, 32 query and 8 KV heads of 128, in bf16; inputs laid out as the merged GEMMs give them.
ROWS, DIM, INTERMEDIATE, HQ, HKV, HEAD_DIM = 64, 4096, 14336, 32, 8, 128


def test_add_rms_norm_kernel_on_gpu(compiled_kernels):
    from mtcore.kernels.add_rms_norm import add_rms_norm, add_rms_norm_ref

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x, residual = ((3 * torch.randn(ROWS, DIM, device=DEVICE, generator=gen)).to(torch.bfloat16) for _ in range(2))
    weight = (1 + 0.5 * torch.randn(DIM, device=DEVICE, generator=gen)).to(torch.bfloat16)
    hidden, normed = add_rms_norm(x, residual, weight, 1e-5)
    _, ref_normed = add_rms_norm_ref(x.double(), residual.double(), weight.double(), 1e-5)
    base_hidden, base_normed = add_rms_norm_ref(x, residual, weight, 1e-5)  # torch in bf16
    assert hidden.dtype == normed.dtype == torch.bfloat16
    assert torch.equal(hidden, base_hidden)  # the sum rounded to bf16 as torch rounds it
    assert_within_twice("normed", normed, ref_normed, base_normed)


def test_rope_cache_kernel_on_gpu(compiled_kernels):
    """q, k, v column views of one qkv GEMM output; rows write permuted slots of a 1024-long cache at random
    columns: v exactly, k roped, and nothing else in either cache changes."""
    from mtcore.kernels.rope_cache import rope_cache, rope_cache_ref

    S, L, dtype = 80, 1024, torch.bfloat16
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    qkv = torch.randn(ROWS, (HQ + 2 * HKV) * HEAD_DIM, device=DEVICE, generator=gen).to(dtype)
    q, k, v = (part.view(ROWS, -1, HEAD_DIM) for part in qkv.split([HQ * HEAD_DIM, HKV * HEAD_DIM, HKV * HEAD_DIM], 1))
    positions = torch.randint(0, 8192, (ROWS,), device=DEVICE, generator=gen)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device=DEVICE, dtype=torch.float64) / HEAD_DIM)
    freqs = positions.double()[:, None] * inv_freq  # [R, D / 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [R, D]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    k_cache, v_cache = (torch.randn(S, L, HKV, HEAD_DIM, device=DEVICE, generator=gen).to(dtype) for _ in range(2))
    slots = torch.randperm(S, device=DEVICE, generator=gen)[:ROWS]
    pos = torch.randint(0, L, (ROWS,), device=DEVICE, generator=gen)
    got, base, ref = ([c.to(dt, copy=True) for c in (k_cache, v_cache)] for dt in (dtype, dtype, torch.float64))
    out = rope_cache(q, k, v, cos, sin, *got, slots, pos)
    base_out = rope_cache_ref(q, k, v, cos, sin, *base, slots, pos)  # torch in bf16
    ref_out = rope_cache_ref(q.double(), k.double(), v.double(), cos.double(), sin.double(), *ref, slots, pos)
    assert out.dtype == dtype and out.shape == (ROWS, HQ, HEAD_DIM)
    assert_within_twice("q", out, ref_out, base_out)
    written = torch.zeros(S, L, dtype=torch.bool, device=DEVICE)
    written[slots, pos] = True
    assert torch.equal(got[1], base[1]) and torch.equal(got[1][slots, pos], v)  # v written exactly, only there
    assert torch.equal(got[0][~written], k_cache[~written])  # k only at (slots, pos)
    assert_within_twice("k in the cache", got[0][written], ref[0][written], base[0][written])
    nearest = (got[0][written] == ref[0][written].to(dtype)).double().mean().item()
    assert nearest >= 0.99, f"only {nearest:.1%} of the cached k are the float64 rope rounded once"


def test_silu_mul_kernel_on_gpu(compiled_kernels):
    from mtcore.kernels.silu_mul import silu_mul, silu_mul_ref

    gen = torch.Generator(device=DEVICE).manual_seed(2)
    gate_up = (2 * torch.randn(ROWS, 2 * INTERMEDIATE, device=DEVICE, generator=gen)).to(torch.bfloat16)
    gate, up = gate_up[:, :INTERMEDIATE], gate_up[:, INTERMEDIATE:]  # the halves of one [R, 2I] GEMM output
    out = silu_mul(gate, up)
    assert out.dtype == torch.bfloat16 and out.shape == (ROWS, INTERMEDIATE) and out.is_contiguous()
    assert_within_twice("silu(gate) * up", out, silu_mul_ref(gate.double(), up.double()), silu_mul_ref(gate, up))


def test_decode_modes_equal_and_no_host_sync_in_a_step(compiled_kernels):
    """Greedy: eager, compile, CUDA graphs (eager and graphs with the fused kernels: add_rms_norm,
    rope_cache, silu_mul) and compile-graphs give the same tokens as transformers; a decode step (eager
    and graphs) runs under torch.cuda.set_sync_debug_mode("error"), so it never syncs."""
    from mtcore import load_model
    from mtcore.draws import Draws
    from mtcore.sampler import KVCache, SamplingParams, SlotBatch, eager_decoder, generate, prefill, sample, static_decoder

    hf = make_hf_model("policy", seed=13, rope_scaling=LLAMA3_SCALING, num_hidden_layers=3, head_dim=64)
    ours = load_model(save_hf(hf, _tmp_dir()), dtype=torch.float32, device=DEVICE)
    hf = hf.to(DEVICE)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 96, (n,), generator=gen).tolist() for n in (1, 7, 23, 15, 2, 30, 11)]
    params = SamplingParams(n=2, temperature=0, max_new_tokens=16, stop_ids=(2,))
    expected = []
    for prompt in prompts:
        out = hf.generate(torch.tensor([prompt], device=DEVICE), do_sample=False, max_new_tokens=16, eos_token_id=2,
                          pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=DEVICE))
        expected.append(out[0, len(prompt):].tolist())
    for mode in ("eager", "compile", "graphs", "compile-graphs"):
        got = generate(ours, prompts, params, slots=5, decode_mode=mode)
        assert [[c.token_ids for c in r] for r in got] == [[e, e] for e in expected], mode
    for make in (eager_decoder, lambda m, c: static_decoder(m, c, "graphs")):
        cache = KVCache(ours, 3, 64)
        batch = SlotBatch.empty(3, torch.device(DEVICE))
        prefill(ours, cache, [prompts[1]], [[0, 1, 2]])
        batch.request, batch.prompt_len, batch.tokens = [0, 1, 2], [7] * 3, [[5], [6], [7]]
        step = make(ours, cache)
        step(batch)  # warm-up: the graph is captured, the kernels compiled
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:  # the step, and the device side of accepting its tokens: sampling and the write of `last`
            slot_ids, logits = step(batch)
            keys = torch.tensor([[11, 1], [12, 1], [13, 1]]).pin_memory().to(DEVICE, non_blocking=True)
            tokens = sample(logits, SamplingParams(temperature=0.8, top_p=0.9, top_k=20), Draws(keys))
            batch.last[torch.tensor(slot_ids).pin_memory().to(DEVICE, non_blocking=True)] = tokens
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_decode_blocks_on_the_gpu_equal_one_step_and_never_sync(compiled_kernels):
    """K decode steps per host visit (mtcore/decode_blocks.py): in eager, compile, graphs (the whole
    block captured) and compile-graphs, the static modes pipelined (the host one block behind), greedy
    and sampled (top-p, n = 2, stops inside blocks) tokens equal K = 1's, and so do automatic K's; a
    block's device side (K forwards with the fused kernels and samplings, the stop checks) runs under
    set_sync_debug_mode("error")."""
    from mtcore import load_model
    from mtcore.decode_blocks import SlotState, run_block
    from mtcore.sampler import (KVCache, SamplingParams, SlotBatch, _Job, decode_attention_for, decode_step, generate,
                                load_block_state, prefill)

    hf = make_hf_model("policy", seed=13, rope_scaling=LLAMA3_SCALING, num_hidden_layers=3, head_dim=64)
    ours = load_model(save_hf(hf, _tmp_dir()), dtype=torch.float32, device=DEVICE)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 96, (n,), generator=gen).tolist() for n in (1, 7, 23, 15, 2, 30, 11, 4, 9)]
    for params in (SamplingParams(n=2, temperature=0, max_new_tokens=16, stop_ids=(2,)),
                   SamplingParams(n=2, temperature=0.8, top_p=0.9, max_new_tokens=16, seed=5,
                                  stop_ids=(2, 17, 40, 61))):
        one = generate(ours, prompts, params, slots=5, decode_mode="eager")
        for mode in ("eager", "compile", "graphs", "compile-graphs"):
            for steps in (3, 8, 0):
                got = generate(ours, prompts, params, slots=5, decode_mode=mode, decode_steps=steps)
                assert [[c.token_ids for c in r] for r in got] == [[c.token_ids for c in r] for r in one], \
                    (mode, steps, params.temperature)
    params = SamplingParams(n=1, temperature=0.8, top_p=0.9, max_new_tokens=16, seed=5)
    cache = KVCache(ours, 3, 64)
    job = _Job([prompts[1]], [(0, 0)] * 3, params, 64, [[None]], [0], set())
    batch = SlotBatch.empty(3, torch.device(DEVICE))
    prefill(ours, cache, [prompts[1]], [[0, 1, 2]])
    batch.request, batch.prompt_len, batch.tokens = [0, 1, 2], [7] * 3, [[5], [6], [7]]
    batch.word = [11, 12, 13]
    state = SlotState(3, torch.device(DEVICE))
    slots, stops = torch.arange(3, device=DEVICE), torch.tensor([2], device=DEVICE)

    def step(tokens, pos, k):
        return decode_step(ours, cache, tokens, slots, pos, 64, decode_attention_for(torch.device(DEVICE)), "fused")
    load_block_state(state, batch, job, [0, 1, 2])
    run_block(step, state, batch.last, 4, params, stops)  # warm-up: the kernels compiled
    load_block_state(state, batch, job, [0, 1, 2])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_block(step, state, batch.last, 4, params, stops)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _tmp_dir():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="mtcore_cuda_"))
