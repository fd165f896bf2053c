"""--batch-invariant on the CPU: a response's reward (inference.Scorer) and a request's tokens and log-probs
(sampler.generate) are the same bits whichever other sequences share their micro-batch or decode step, so
a run's numbers do not follow --shard-prompts, the slot count, the ranks or a resume in between."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import output_bytes
from mtcore.config import LoopConfig
from mtcore.data import Example, make_batch
from mtcore.inference import Scorer
from mtcore.model import row_length
from mtcore.train import sequence_rewards
from test_preempt import RUN_TIMING, without_timing


@pytest.fixture(scope="module")
def reward_dir():
    """The toy world's base RM (its own tokenizer and chat template)."""
    from mtcore import toy

    return toy.ASSETS / "reward"


def responses(n_prompts: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    prompts = [" ".join(str(rng.randrange(10)) for _ in range(rng.randrange(2, 9))) for _ in range(n_prompts)]
    answers = [[" ".join(str(rng.randrange(10)) for _ in range(rng.randrange(1, 40))) for _ in range(5)]
               for _ in prompts]
    return [f"sort {p}" for p in prompts], answers


def test_row_length_rounds_up_by_less_than_a_quarter():
    lengths = [row_length(n) for n in range(1, 5000)]
    assert all(n <= t < n + 16 if n <= 64 else n <= t < 1.25 * n for n, t in zip(range(1, 5000), lengths))
    assert len(set(lengths)) <= 4 + 8 * 4  # 16..64, then four a power of two up to 8192
    assert row_length(64) == 64 and row_length(65) == 80 and row_length(129) == 160


def test_rewards_do_not_depend_on_the_other_sequences(reward_dir):
    """The same responses scored all at once, prompt by prompt, one by one, in another order, and split
    7 and 17 prompts: the same bits (==, not approx), by default (train.hidden_states). Without the
    padding to a multiple of 16 tokens, 11, 18 and 3 of these 120 rewards differed."""
    cfg = LoopConfig(micro_batch_tokens=512)
    prompts, texts = responses(24)
    scorer = Scorer(cfg, torch.device("cpu"), reward_dir)
    together = scorer(prompts, texts)
    alone = [scorer([p], [t])[0] for p, t in zip(prompts, texts)]
    one_by_one = [[scorer([p], [[x]])[0][0] for x in t] for p, t in zip(prompts, texts)]
    order = list(range(len(prompts)))
    random.Random(2).shuffle(order)
    shuffled = scorer([prompts[i] for i in order], [texts[i] for i in order])
    halves = scorer(prompts[:7], texts[:7]) + scorer(prompts[7:], texts[7:])
    assert together == alone == one_by_one == halves
    assert [together[i] for i in order] == shuffled
    assert len({r for row in together for r in row}) > 100  # distinct rewards: the model is not constant


def test_rewards_at_head_dim_64_do_not_depend_on_the_other_sequences():
    """A random reward model of head_dim 64 (the toy's is 32), 80 sequences of 17 to 32 tokens (one
    length bucket of the packed attention, so its batch grows with the others) and 40 of 33 to 200:
    packed under three budgets, alone, and split 13 and 107, the same rewards."""
    from mtcore.data import pack
    from mtcore.model import Llama, ModelArgs

    args = ModelArgs(vocab_size=2000, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=512,
                     max_position_embeddings=512, pad_token_id=0)
    model = Llama(args, "reward").init_weights(seed=0).eval()
    rng = random.Random(0)
    examples = [Example((([rng.randrange(3, 2000) for _ in range(rng.randrange(lo, hi))], 1),))
                for lo, hi in [(17, 33)] * 80 + [(33, 201)] * 40]

    @torch.no_grad()
    def rewards(index: list[int], budget: int) -> dict:
        out = {}
        for b in pack([examples[i].n_tokens for i in index], budget):
            held = [index[k] for k in b]
            out.update(zip(held, sequence_rewards(model, make_batch(examples, held)).tolist()))
        return out

    every = list(range(120))
    together = rewards(every, 4096)
    alone = {i: rewards([i], 4096)[i] for i in every}
    assert together == rewards(every, 1024) == rewards(every, 300) == alone == {**rewards(every[:13], 4096),
                                                                                 **rewards(every[13:], 4096)}
    assert len(set(together.values())) == 120


def test_attention_by_width_equals_the_reference():
    """attention_by_width against decode_attention_ref (SDPA with a length mask over every column), rows
    of mixed lengths reading other slots: equal to float rounding."""
    from mtcore.invariant import attention_by_width
    from mtcore.kernels.decode_attention import decode_attention_ref

    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = (torch.randn(6, 160, 2, 64, generator=gen) for _ in range(2))  # [S, L, Hkv, D]
    q = torch.randn(5, 4, 64, generator=gen)  # [R, Hq, D]
    slots, lens = torch.tensor([4, 0, 2, 5, 1]), torch.tensor([1, 17, 64, 65, 150])
    got = attention_by_width(q, k_cache, v_cache, slots, lens)
    torch.testing.assert_close(got, decode_attention_ref(q, k_cache, v_cache, slots, lens), rtol=1e-5, atol=1e-5)


def test_padded_packing_equals_one_sequence_alone_to_float_rounding(reward_dir):
    """The packed micro-batch with its padding sequence reads each sequence's reward as one forward of
    that sequence alone, unpadded (transformers-style [1, T] input), does."""
    from mtcore.checkpoint import load_model
    from mtcore.data import pack

    model = load_model(reward_dir, "reward", device=torch.device("cpu")).eval()
    rng = random.Random(3)
    examples = [Example((([rng.randrange(3, 60) for _ in range(rng.randrange(2, 90))], 1),)) for _ in range(20)]
    bins = pack([ex.n_tokens for ex in examples], 300)
    assert sum(make_batch(examples, b).n_tokens % 16 > 0 for b in bins) > 2  # most get a padding sequence
    with torch.no_grad():
        for b in bins:
            got = sequence_rewards(model, make_batch(examples, b))
            want = torch.cat([sequence_rewards(model, make_batch(examples, [i], padded=True)) for i in b])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_logps_do_not_depend_on_the_other_sequences(torch_cpu_path):
    """DPO's forward (train.response_logps, the fused log-probs' CPU path) on the toy policy: 60 pairs
    packed under budgets of 1024, 512 and 200 tokens, and split 20 and 40: each sequence's sum the same bits.
    (Without the padding of the fused log-probs' last chunk, 2 and 1 of the 60 pairs differed.) Training
    across rank counts then differs by the gradients' sums only (bench/ranks.py)."""
    from mtcore import toy
    from mtcore.checkpoint import load_model
    from mtcore.data import pack
    from mtcore.train import response_logps

    model = load_model(toy.ASSETS / "policy", "policy", device=torch.device("cpu")).eval()
    rng = random.Random(0)

    def sequence():
        n = rng.randrange(3, 20)
        return [rng.randrange(3, model.args.vocab_size) for _ in range(n + rng.randrange(1, 40))], n

    examples = [Example((sequence(), sequence())) for _ in range(60)]

    @torch.no_grad()
    def sums(index: list[int], budget: int) -> dict:
        out = {}
        for b in pack([examples[i].n_tokens for i in index], budget):
            held = [index[k] for k in b]
            logps, _ = response_logps(model, make_batch(examples, held))
            out.update({i: logps[2 * k:2 * k + 2].tolist() for k, i in enumerate(held)})
        return out

    every = list(range(60))
    together = sums(every, 1024)
    assert together == sums(every, 512) == sums(every, 200) == {**sums(every[:20], 1024), **sums(every[20:], 1024)}
    assert len({v for pair in together.values() for v in pair}) == 120


def test_samples_and_logprobs_do_not_depend_on_the_other_requests():
    """The toy policy samples 5 responses to each of 40 prompts: all at once, 7 prompts at a time, and
    through 9 slots. Tokens and every log-prob: the same bits (each request keeps its random stream)."""
    from mtcore import toy
    from mtcore.checkpoint import load_model
    from mtcore.data import encode_prompt, load_tokenizer
    from mtcore.sampler import SamplingParams, generate

    model = load_model(toy.ASSETS / "policy", "policy", device=torch.device("cpu")).eval()
    tok = load_tokenizer(toy.ASSETS / "policy")
    prompts = [encode_prompt(tok, p, "test") for p in toy.make_prompts(40, seed=1)]

    def params():
        return SamplingParams(n=5, temperature=0.8, top_p=0.95, max_new_tokens=24, seed=7, logprobs=True)

    def flat(results):
        return [(c.token_ids, c.logprobs) for r in results for c in r]

    together = flat(generate(model, prompts, params(), max_len=64, batch_invariant=True))
    by_seven = flat([r for k in range(0, 40, 7) for r in generate(model, prompts[k:k + 7], params(), max_len=64,
                                                                  prompt_keys=list(range(k, min(40, k + 7))),
                                                                  batch_invariant=True)])
    nine_slots = flat(generate(model, prompts, params(), max_len=64, slots=9, batch_invariant=True))
    assert together == by_seven == nine_slots
    assert len({tuple(t) for t, _ in together}) > 100  # it samples


def test_samples_do_not_depend_on_the_longest_prompt_beside_them():
    """A random Llama of head_dim 64 (two K/V heads of two query heads each), prompts of 5 to 150 tokens
    and no max_len: each call's slot length follows its own longest prompt. All at once, by fours, one
    at a time and through 5 slots: the same tokens and log-probs. Two ways it failed before, each caught
    here: every row's attention over the call's slot length (35 of 48 requests of a 34M model differed),
    and a width's rows in a batch of their own count."""
    from mtcore.model import Llama, ModelArgs
    from mtcore.sampler import SamplingParams, generate

    args = ModelArgs(vocab_size=2000, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=512,
                     rope_theta=500000.0, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                     pad_token_id=0)
    model = Llama(args, "policy").init_weights(seed=0).eval()
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 2000) for _ in range(rng.randrange(5, 151))] for _ in range(12)]
    params = SamplingParams(n=3, temperature=0.8, top_p=0.95, max_new_tokens=20, seed=5, logprobs=True,
                            stop_ids=tuple(range(3, 60)))  # ragged stops

    def calls(size: int, **kw):
        return [(c.token_ids, c.logprobs) for k in range(0, 12, size)
                for r in generate(model, prompts[k:k + size], params, prompt_keys=list(range(k, min(12, k + size))),
                                  batch_invariant=True, **kw) for c in r]

    together = calls(12)
    assert together == calls(4) == calls(1) == calls(12, slots=5)
    assert len({len(t) for t, _ in together}) > 3  # ragged: rows come and go


def test_batch_invariant_refuses_what_it_does_not_cover():
    """CUDA, the compile modes and blocks of decode steps are not batch-invariant: generate says so."""
    from mtcore.config import batch_invariant_fits
    from mtcore.errors import MtcoreError
    from mtcore.model import Llama, ModelArgs
    from mtcore.sampler import SamplingParams, generate

    with pytest.raises(MtcoreError, match="built for the CPU only, and this run's device is cuda:0"):
        batch_invariant_fits(torch.device("cuda:0"), "auto", 1)
    model = Llama(ModelArgs(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=64),
                  "policy").init_weights(seed=0).eval()
    for mode, steps, named in (("compile", 1, "--decode-mode compile$"), ("eager", 4, "out --decode-steps 4$"),
                               ("compile", 0, "--decode-mode compile and --decode-steps 0$")):
        with pytest.raises(MtcoreError, match=named):
            generate(model, [[3, 4]], SamplingParams(max_new_tokens=2), decode_mode=mode, decode_steps=steps,
                     batch_invariant=True)
    assert len(generate(model, [[3, 4]], SamplingParams(max_new_tokens=2), batch_invariant=True)[0]) == 1


def run_files(run: Path) -> dict:
    """Every JSONL and safetensors file of a run directory, by path (metrics rows without timing)."""
    files = {}
    for f in sorted(run.rglob("*")):
        if f.suffix == ".safetensors" or f.name in ("samples.jsonl", "scored.jsonl", "pairs.jsonl",
                                                    "pseudo_pairs.jsonl"):
            files[str(f.relative_to(run))] = output_bytes(f)
        elif f.name.endswith("_metrics.jsonl"):
            rows = f.read_text().splitlines()
            files[str(f.relative_to(run))] = [without_timing(json.loads(x), RUN_TIMING) for x in rows]
    return files


@pytest.mark.slow
def test_the_toy_run_at_two_shard_sizes_is_the_same_run(tmp_path):
    """`mtcore train --iters 2 --batch-invariant` of the toy world with --shard-prompts 256 and 40:
    metrics.json (without timing), every sample, score, pair and weight file byte for byte."""
    runs = {}
    for shard in (256, 40):
        out = tmp_path / f"shard{shard}"
        proc = subprocess.run([sys.executable, "-m", "mtcore", "train", "--iters", "2", "--out", str(out),
                               "--shard-prompts", str(shard), "--batch-invariant"], capture_output=True, text=True,
                              timeout=900, env={**os.environ, "TRITON_INTERPRET": "0"})  # compiled or torch kernels
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[shard] = out
    a, b = (run_files(runs[s]) for s in (256, 40))
    assert a.keys() == b.keys() and any(k.endswith("model.safetensors") for k in a)
    for name in a:
        assert a[name] == b[name], name
    ma, mb = (without_timing(json.loads((runs[s] / "metrics.json").read_text()), RUN_TIMING) for s in (256, 40))
    assert ma == mb


@pytest.mark.slow
def test_one_rank_and_two_sample_and_score_alike(tmp_path):
    """Iteration 1 of a tiny real-model run under torchrun, on 1 rank and on 2 (each with one thread, as
    torchrun sets), with --batch-invariant: the samples and their scores are the same bytes."""
    from conftest import tiny_world
    from test_loop import TINY
    from test_parallel import torchrun

    policy, reward, prompts = tiny_world(tmp_path / "world")
    files = {}
    for world in (1, 2):
        out = tmp_path / f"ranks{world}"
        args = ["train", "--policy", policy, "--reward", reward, "--prompts", prompts, "--iters", 1, "--out", out,
                "--batch-invariant", "--shard-prompts", 3]
        for k, v in TINY.items():
            args += [f"--{k.replace('_', '-')}", v]
        torchrun(*args, world=world, timeout=400)
        files[world] = {name: (out / "iter_1" / name).read_bytes() for name in ("samples.jsonl", "scored.jsonl")}
    assert files[1] == files[2]
    assert len(set(files[1]["samples.jsonl"].splitlines())) > 3
