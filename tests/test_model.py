"""mtcore's hand-written Llama against transformers' LlamaForCausalLM / LlamaForSequenceClassification."""

import pytest
import torch

from conftest import LLAMA3_SCALING, make_hf_model, save_hf
from mtcore import load_model
from mtcore.model import Llama, ModelArgs, packed_positions, rope_inv_freq

CONFIGS = {
    "gqa": dict(),
    "gqa-llama3-rope": dict(rope_scaling=LLAMA3_SCALING),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa-tied-llama3-rope": dict(num_key_value_heads=1, tie_word_embeddings=True, rope_scaling=LLAMA3_SCALING),
    "odd-head-dim": dict(hidden_size=36, num_attention_heads=6, num_key_value_heads=3, head_dim=10,
                         intermediate_size=47, vocab_size=101, pad_token_id=100),
    "biases-theta": dict(attention_bias=True, mlp_bias=True, rope_theta=500000.0, rms_norm_eps=1e-6),
}


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    hf = make_hf_model("policy", seed=1, **CONFIGS[name])
    ours = load_model(save_hf(hf, tmp_path / "m"), kind="policy")
    torch.manual_seed(2)
    tokens = torch.randint(0, hf.config.vocab_size, (3, 40))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours.logits(tokens)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert max_err(got, expected) <= 1e-4, f"max abs diff {max_err(got, expected):.3g}"


def test_llama3_rope_scaling_changes_logits(tmp_path):
    """The scaled config must not be a no-op at these lengths, or the test above proves nothing."""
    hf = make_hf_model("policy", seed=1, rope_scaling=LLAMA3_SCALING)
    scaled = load_model(save_hf(hf, tmp_path / "m"))
    plain = load_model(tmp_path / "m")
    plain.args.rope_scaling = None
    plain.model._inv_freq.clear()
    tokens = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # 10x the 1e-4 tolerance of the match test: ignoring the scaling would fail it.
        assert max_err(scaled.logits(tokens), plain.logits(tokens)) > 1e-3
    # And every band is exercised: kept (high frequency), interpolated, and divided by `factor`.
    ratio = rope_inv_freq(scaled.args) / rope_inv_freq(plain.args)
    assert (ratio == 1).any() and (ratio == 1 / 8).any() and ((ratio < 1) & (ratio > 1 / 8)).any()


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_logits_match_transformers(tmp_path, side):
    hf = make_hf_model("policy", seed=3, rope_scaling=LLAMA3_SCALING)
    ours = load_model(save_hf(hf, tmp_path / "m"))
    lens = [30, 7, 1, 19]
    T = max(lens)
    tokens = torch.randint(0, 96, (len(lens), T), generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for b, n in enumerate(lens):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, T - n:] = 1
    with torch.no_grad():
        expected = hf(tokens, attention_mask=mask).logits
        got = ours.logits(tokens, attention_mask=mask)
    real = mask.bool()
    assert torch.isfinite(got).all()
    assert max_err(got[real], expected[real]) <= 1e-4


@pytest.mark.parametrize("name", ["gqa", "mqa-tied-llama3-rope", "odd-head-dim"])
def test_rewards_match_sequence_classification(tmp_path, name):
    hf = make_hf_model("reward", seed=5, **CONFIGS[name])
    ours = load_model(save_hf(hf, tmp_path / "rm"), kind="reward")
    pad = hf.config.pad_token_id
    lens = [12, 3, 25, 1, 25]
    T = max(lens)
    gen = torch.Generator().manual_seed(6)
    tokens = torch.full((len(lens), T), pad)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for b, n in enumerate(lens):
        tokens[b, :n] = torch.randint(0, pad, (n,), generator=gen)  # real tokens never equal pad
        mask[b, :n] = 1
    with torch.no_grad():
        expected = hf(tokens, attention_mask=mask).logits.squeeze(-1)
        got = ours.rewards(tokens, mask)
    assert got.shape == (len(lens),) and got.dtype == torch.float32
    assert max_err(got, expected) <= 1e-4, f"max abs diff {max_err(got, expected):.3g}"
    # The reward is read at each row's last real token: a row alone gives the same number.
    with torch.no_grad():
        alone = ours.rewards(tokens[1:2, :lens[1]])
    assert max_err(alone, got[1:2]) <= 1e-5


@pytest.mark.parametrize("lens", [[5, 1, 17, 9], [8, 8], [1], [12, 3, 10, 11, 2, 3, 16]])
def test_packed_equals_per_sequence(lens):
    args = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48,
                     rope_theta=10000.0, rope_scaling=dict(LLAMA3_SCALING))
    model = Llama(args).init_weights(seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 64, (n,), generator=gen) for n in lens]
    cu_seqlens = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(seqs), cu_seqlens=cu_seqlens, max_seqlen=max(lens))  # [N, dim]
        for i, seq in enumerate(seqs):
            alone = model(seq[None])[0]  # [n, dim]
            part = packed[cu_seqlens[i]:cu_seqlens[i + 1]]
            assert max_err(part, alone) <= 1e-5, f"sequence {i}: {max_err(part, alone):.3g}"


def test_packed_attention_never_crosses_sequences():
    """Changing one sequence's tokens leaves every other packed sequence's hidden states unchanged."""
    args = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=48)
    model = Llama(args).init_weights(seed=0).eval()
    tokens = torch.randint(0, 64, (20,), generator=torch.Generator().manual_seed(2))
    cu_seqlens = torch.tensor([0, 6, 13, 20], dtype=torch.int32)
    changed = tokens.clone()
    changed[6:13] = (changed[6:13] + 1) % 64
    with torch.no_grad():
        a = model(tokens, cu_seqlens=cu_seqlens)
        b = model(changed, cu_seqlens=cu_seqlens)
    assert torch.equal(a[:6], b[:6]) and torch.equal(a[13:], b[13:])
    assert not torch.allclose(a[6:13], b[6:13])


def test_length_buckets():
    """The SDPA fallback groups sequences by row_length, longest first, each padded to that length (so a
    sequence's numbers do not depend on the others); every real token is in exactly one bucket, and
    `restore` puts them back in packed order."""
    from mtcore.model import _length_buckets, row_length

    lens = [10, 9, 8, 70, 3, 20, 16, 90]
    cu = torch.tensor([0] + lens).cumsum(0)
    buckets, restore = _length_buckets(cu.tolist(), "cpu")
    assert [valid.sum(1).tolist() for _, valid in buckets] == [[90], [70], [20], [10, 9, 8, 3, 16]]
    assert [valid.shape[1] for _, valid in buckets] == [96, 80, 32, 16] == [row_length(n) for n in (90, 70, 20, 3)]
    real = torch.cat([index[valid] for index, valid in buckets])
    assert torch.equal(real[restore], torch.arange(sum(lens)))
    for index, valid in buckets:  # each row: one sequence's tokens in order, then padding
        for row, ok in zip(index, valid):
            n = int(ok.sum())
            assert ok[:n].all() and torch.equal(row[:n], row[0] + torch.arange(n))


def test_packed_positions():
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    assert packed_positions(cu).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


def test_packed_gradients_match_per_sequence():
    """Backward through the packed layout gives the per-sequence parameter gradients."""
    args = ModelArgs(vocab_size=50, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=40)
    lens = [4, 9, 2]
    seqs = [torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(n)) for n in lens]
    cu_seqlens = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    packed_model = Llama(args).init_weights(seed=3)
    packed_model(torch.cat(seqs), cu_seqlens=cu_seqlens).pow(2).sum().backward()
    ref_model = Llama(args).init_weights(seed=3)
    sum(ref_model(s[None]).pow(2).sum() for s in seqs).backward()
    for (name, p), q in zip(packed_model.named_parameters(), ref_model.parameters()):
        if name == "lm_head.weight":  # forward returns hidden states: the head is the caller's
            assert p.grad is None and q.grad is None
            continue
        assert max_err(p.grad, q.grad) <= 1e-4 * max(1.0, q.grad.abs().max().item()), name


class FakeFlashAttn:
    """Stands in for flash-attn on CPU with flash-attn's calling convention and an independent float64
    attention, so the wiring (layouts, cu_seqlens dtype, GQA head counts, causal flag) is checked here."""

    calls = []

    @staticmethod
    def _attend(q, k, v):  # [T, Hq, D], [T, Hkv, D] -> [T, Hq, D], causal
        T, Hq, D = q.shape
        rep = Hq // k.shape[1]
        k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
        scores = torch.einsum("thd,shd->hts", q.double(), k) / D ** 0.5
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        return torch.einsum("hts,shd->thd", scores.softmax(-1), v).to(q.dtype)

    @classmethod
    def flash_attn_varlen_func(cls, q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None,
                               causal=False):
        assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k and causal
        assert q.dim() == 3 and k.shape[1] <= q.shape[1]
        cls.calls.append("varlen")
        cu = cu_q.tolist()
        return torch.cat([cls._attend(q[a:b], k[a:b], v[a:b]) for a, b in zip(cu[:-1], cu[1:])])

    @classmethod
    def flash_attn_func(cls, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        assert causal and q.dim() == 4
        cls.calls.append("dense")
        return torch.stack([cls._attend(q[b], k[b], v[b]) for b in range(q.shape[0])])


def test_flash_attn_wiring(monkeypatch):
    import mtcore.model as m

    args = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48)
    model = Llama(args).init_weights(seed=0).eval()
    lens = [5, 1, 11]
    tokens = torch.randint(0, 64, (sum(lens),), generator=torch.Generator().manual_seed(0))
    cu_seqlens = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    batch = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sdpa_packed = model(tokens, cu_seqlens=cu_seqlens)
        sdpa_batch = model(batch)
        monkeypatch.setattr(m, "flash_attn_usable", lambda x: True)
        monkeypatch.setattr(m, "_flash_attn", lambda: FakeFlashAttn)
        FakeFlashAttn.calls.clear()
        flash_packed = model(tokens, cu_seqlens=cu_seqlens)
        flash_batch = model(batch)
    assert FakeFlashAttn.calls == ["varlen"] * 2 + ["dense"] * 2
    assert max_err(flash_packed, sdpa_packed) <= 1e-5 and max_err(flash_batch, sdpa_batch) <= 1e-5


def test_rewards_without_mask_skip_pad_tokens(tmp_path):
    """No mask: like transformers, the reward is read at the last token that is not pad_token_id."""
    hf = make_hf_model("reward", seed=7)
    ours = load_model(save_hf(hf, tmp_path / "rm"), kind="reward")
    pad = hf.config.pad_token_id
    tokens = torch.randint(0, pad, (3, 10), generator=torch.Generator().manual_seed(8))
    tokens[0, 6:] = pad
    tokens[2, 1:] = pad
    with torch.no_grad():
        expected = hf(tokens).logits.squeeze(-1)
        got = ours.rewards(tokens)
    assert max_err(got, expected) <= 1e-4, f"max abs diff {max_err(got, expected):.3g}"


def test_packed_rewards_equal_batch_rewards(tmp_path):
    hf = make_hf_model("reward", seed=9)
    ours = load_model(save_hf(hf, tmp_path / "rm"), kind="reward")
    lens = [4, 11, 1]
    seqs = [torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(n)) for n in lens]
    cu_seqlens = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    with torch.no_grad():
        packed = ours.packed_rewards(ours(torch.cat(seqs), cu_seqlens=cu_seqlens), cu_seqlens)
        alone = torch.cat([ours.rewards(s[None]) for s in seqs])
    assert max_err(packed, alone) <= 1e-5, f"max abs diff {max_err(packed, alone):.3g}"


def test_max_seqlen_shorter_than_a_sequence_is_refused():
    model = Llama(ModelArgs(vocab_size=16, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=16))
    with pytest.raises(ValueError, match="max_seqlen 4 is shorter"):
        model(torch.zeros(12, dtype=torch.long), cu_seqlens=torch.tensor([0, 5, 12], dtype=torch.int32),
              max_seqlen=4)


def _fake_varlen(calls, **expected):
    """A stand-in for torch.nn.attention.varlen.varlen_attn: flash-attn's packed convention with an
    independent float64 attention; records and checks the keywords mtcore passes."""
    def check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, kwargs):
        assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k
        assert query.dtype == key.dtype == value.dtype, (query.dtype, key.dtype, value.dtype)
        assert {k: kwargs[k] for k in expected} == expected, kwargs
        if not kwargs.get("enable_gqa"):
            assert key.shape[1] == query.shape[1]
        calls.append((query.dtype, kwargs))
        cu = cu_seq_q.tolist()
        return torch.cat([FakeFlashAttn._attend(query[a:b], key[a:b], value[a:b]) for a, b in zip(cu[:-1], cu[1:])])
    return check


def test_varlen_attn_signature_detection(monkeypatch):
    """torch 2.10's varlen_attn takes is_causal (no enable_gqa: K/V repeated to the query heads),
    later ones window_size=(-1, 0) and enable_gqa; one without either is not used."""
    import torch.nn.attention.varlen as tv

    import mtcore.model as m

    args = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48)
    model = Llama(args).init_weights(seed=0).eval()
    lens = [5, 1, 11, 7]
    tokens = torch.randint(0, 64, (sum(lens),), generator=torch.Generator().manual_seed(0))
    cu_seqlens = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    with torch.no_grad():
        sdpa = model(tokens, cu_seqlens=cu_seqlens)
    calls = []
    check_210 = _fake_varlen(calls, is_causal=True)
    check_213 = _fake_varlen(calls, window_size=(-1, 0), enable_gqa=True)

    def varlen_210(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None,
                   scale=None):
        return check_210(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, dict(is_causal=is_causal))

    def varlen_213(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                   window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        return check_213(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                         dict(window_size=window_size, enable_gqa=enable_gqa))

    def varlen_unknown(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, mask_mod=None):
        raise AssertionError("a varlen_attn without a causal switch must not be called")

    monkeypatch.setattr(m, "varlen_usable", lambda x: m._varlen_attn() is not None)
    try:
        for fake, n_calls in ((varlen_210, 2), (varlen_213, 2), (varlen_unknown, 0)):
            monkeypatch.setattr(tv, "varlen_attn", fake)
            m._varlen_attn.cache_clear()
            calls.clear()
            with torch.no_grad():
                got = model(tokens, cu_seqlens=cu_seqlens)
            assert len(calls) == n_calls, fake.__name__  # one call per layer
            assert max_err(got, sdpa) <= 1e-5, fake.__name__
    finally:
        m._varlen_attn.cache_clear()


@pytest.mark.parametrize("backend", ["varlen", "flash-attn"])
def test_attention_kernels_get_the_autocast_dtype(monkeypatch, backend):
    """Under autocast over fp32 weights, q and k leave RoPE in fp32 beside a bf16 v: flash-attn and
    varlen_attn (which autocast does not cast) must be chosen by the compute dtype and get q, k and v
    in it. The CPU stands in for CUDA here (the usability rule's device test is patched out)."""
    import torch.nn.attention.varlen as tv

    import mtcore.model as m

    args = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48)
    model = Llama(args).init_weights(seed=0).eval()
    lens = [5, 1, 11]
    tokens = torch.randint(0, 64, (sum(lens),), generator=torch.Generator().manual_seed(0))
    cu_seqlens = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    calls = []

    class DtypeCheckingFlashAttn(FakeFlashAttn):
        @classmethod
        def flash_attn_varlen_func(cls, q, k, v, *args, **kwargs):
            assert q.dtype == k.dtype == v.dtype == torch.bfloat16, (q.dtype, k.dtype, v.dtype)
            calls.append(q.dtype)
            return super().flash_attn_varlen_func(q, k, v, *args, **kwargs)

    def varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
        assert query.dtype == key.dtype == value.dtype == torch.bfloat16, (query.dtype, key.dtype, value.dtype)
        calls.append(query.dtype)
        return _fake_varlen([], window_size=(-1, 0))(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                                                      dict(window_size=window_size, enable_gqa=enable_gqa))

    monkeypatch.setattr(m, "_half_on_cuda", lambda x: m.compute_dtype(x) in (torch.float16, torch.bfloat16))
    monkeypatch.setattr(m, "_flash_attn", lambda: DtypeCheckingFlashAttn if backend == "flash-attn" else None)
    monkeypatch.setattr(tv, "varlen_attn", varlen)
    m._varlen_attn.cache_clear()
    try:
        with torch.no_grad():
            fp32 = model(tokens, cu_seqlens=cu_seqlens)  # fp32 without autocast: SDPA, neither kernel
            assert calls == []
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = model(tokens, cu_seqlens=cu_seqlens)
            assert calls == [torch.bfloat16] * args.n_layers
            monkeypatch.setattr(m, "_half_on_cuda", lambda x: False)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                sdpa = model(tokens, cu_seqlens=cu_seqlens)  # torch's own bf16 attention
    finally:
        m._varlen_attn.cache_clear()
    assert max_err(got, fp32) <= 2 * max_err(sdpa, fp32)


def _bias_model(seed=3):
    """A small policy with attention and MLP biases, GQA, odd sizes: every merged part is exercised."""
    args = ModelArgs(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, intermediate_size=83,
                     attention_bias=True, mlp_bias=True, rope_scaling=None)
    model = Llama(args).init_weights(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))  # non-trivial biases and norms
    return model


def test_merged_projections_give_the_same_forward_and_no_new_memory():
    """merge_projections: q/k/v and gate/up as one GEMM each. The parameters become views of the merged
    weights (same storage: no copy stays), the no-grad forward equals the unmerged one, a forward that
    needs gradients takes the separate projections (and gets their gradients)."""
    from mtcore.model import merge_projections
    model, reference = _bias_model(), _bias_model()
    tokens = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(0))
    merge_projections(model)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    merged = attn.qkv_proj.weight.untyped_storage().data_ptr()
    assert all(p.weight.untyped_storage().data_ptr() == merged for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert attn.k_proj.bias.untyped_storage().data_ptr() == attn.qkv_proj.bias.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_up_proj.weight.untyped_storage().data_ptr()
    assert {k: v.tolist() for k, v in model.state_dict().items()} == \
        {k: v.tolist() for k, v in reference.state_dict().items()}
    calls = []
    real = type(attn.qkv_proj).__call__
    type(attn.qkv_proj).__call__ = lambda self, x: calls.append(1) or real(self, x)
    try:
        with torch.no_grad():
            got = model.logits(tokens)
        assert len(calls) == 4  # two merged GEMMs in each of the 2 blocks
        assert max_err(got, reference.logits(tokens).detach()) < 1e-5
        calls.clear()
        model.logits(tokens).sum().backward()  # with gradients: the separate projections
        assert not calls
    finally:
        type(attn.qkv_proj).__call__ = real
    reference.logits(tokens).sum().backward()
    assert max_err(attn.k_proj.weight.grad, reference.model.layers[1].self_attn.k_proj.weight.grad) < 1e-5


def test_merged_projections_broken_are_dropped_not_used():
    """A conversion (.to) drops the merges, with the old copies they hold; a parameter replaced behind a
    merge's back (a bias here) is seen at the next forward, which drops that merge and takes the
    parameters; merging again restores the single GEMM."""
    from mtcore.model import merge_projections
    model = merge_projections(_bias_model())
    attn = model.model.layers[0].self_attn
    model.to(torch.float64)
    assert attn.qkv_proj is None and model.model.layers[1].mlp.gate_up_proj is None
    merge_projections(model)
    assert attn.qkv_proj.intact() and attn.qkv_proj.weight.dtype == torch.float64
    tokens = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    attn.k_proj.bias = torch.nn.Parameter(attn.k_proj.bias.detach() + 1)  # unseen by the merged bias
    assert not attn.qkv_proj.intact()
    with torch.no_grad():
        got = model.logits(tokens)
    assert attn.qkv_proj is None and model.model.layers[0].mlp.gate_up_proj is not None
    separate = _bias_model().to(torch.float64)
    with torch.no_grad():
        separate.model.layers[0].self_attn.k_proj.bias.add_(1)
        assert max_err(got, separate.logits(tokens)) < 1e-12


def test_projections_merged_in_inference_mode_still_train():
    """generate may be called under torch.inference_mode: the merged tensors are built outside it, so
    the parameters (their views) still take gradients afterwards."""
    from mtcore.model import merge_projections
    model = _bias_model()
    with torch.inference_mode():
        merge_projections(model)
        model.logits(torch.tensor([[1, 2, 3]]))
    model.logits(torch.tensor([[1, 2, 3]])).sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_checkpointed_blocks_save_one_input_each():
    """parallel.checkpoint_blocks keeps only each block's inputs for backward: one [B, T, dim] tensor a
    block (the stream is summed between blocks; a carried residual would be a second), plus what the
    embedding and the final norm save."""
    from mtcore.parallel import checkpoint_blocks
    args = ModelArgs(vocab_size=97, dim=48, n_layers=4, n_heads=6, n_kv_heads=2, intermediate_size=83, rope_scaling=None)
    model = Llama(args).init_weights(0)
    checkpoint_blocks(model)
    kept = set()

    def pack(t):
        if t.shape == (2, 9, 48):
            kept.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))).sum()
    assert len(kept) <= args.n_layers + 2, len(kept)
