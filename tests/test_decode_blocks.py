"""Decode in blocks of K steps per host visit (mtcore/decode_blocks.py): the tokens are those of the
plain step (K = 1, itself held to transformers' greedy decode in tests/test_sampler.py), with stops
falling inside blocks, refills between blocks, n > 1 samples per prompt, sampled and greedy, eager and
compiled."""

import pytest
import torch

from conftest import LLAMA3_SCALING, make_hf_model, save_hf
from mtcore import load_model
from mtcore.sampler import SamplingParams, generate
from test_sampler import EOS, hf_greedy, ragged_prompts


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = make_hf_model("policy", seed=11, rope_scaling=LLAMA3_SCALING, num_hidden_layers=3)
    return hf, load_model(save_hf(hf, tmp_path_factory.mktemp("policy")))


def ids(results):
    return [[(c.token_ids, c.finish_reason) for c in r] for r in results]


def frequent_stops(results, k: int = 3) -> tuple:
    """Stop ids that end several of these completions early, at different positions: tokens they hold."""
    firsts = [c.token_ids[i] for r in results for c in r for i in (2, 5) if len(c.token_ids) > i]
    return tuple(sorted(set(firsts))[:k])


@pytest.mark.parametrize("steps", [3, 8])
def test_greedy_blocks_equal_the_plain_step_and_transformers(models, steps):
    hf, ours = models
    prompts = ragged_prompts(7, seed=1)
    params = SamplingParams(n=2, temperature=0, max_new_tokens=13, stop_ids=(EOS,))
    plain = generate(ours, prompts, params, slots=3)
    assert ids(generate(ours, prompts, params, slots=3, decode_steps=steps)) == ids(plain)
    for i, prompt in enumerate(prompts[:3]):
        assert plain[i][0].token_ids == hf_greedy(hf, prompt, 13)


@pytest.mark.parametrize("steps", [1, 3, 8])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampled_blocks_stop_inside_blocks_and_refill_between_them(models, steps, top_p):
    """n = 3 samples of 9 prompts in 4 slots (refills between blocks), stop ids that end completions at
    assorted positions (inside blocks): every token, log-prob and finish reason as the plain step's."""
    _, ours = models
    prompts = ragged_prompts(9, seed=4)
    probe = generate(ours, prompts, SamplingParams(n=3, temperature=0.8, top_p=top_p, max_new_tokens=12, seed=7),
                     slots=4)
    params = SamplingParams(n=3, temperature=0.8, top_p=top_p, max_new_tokens=12, seed=7,
                            stop_ids=frequent_stops(probe), logprobs=True)
    plain = generate(ours, prompts, params, slots=4)
    lengths = {len(c.token_ids) for r in plain for c in r if c.finish_reason == "stop"}
    assert len(lengths) >= 3 and any(n % 8 and n % 3 for n in lengths), lengths  # stops inside blocks
    got = generate(ours, prompts, params, slots=4, decode_steps=steps)
    assert ids(got) == ids(plain)
    for r, q in zip(got, plain):
        for a, b in zip(r, q):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)


def test_compiled_blocks_equal_eager_ones(models):
    """compile: the static step (every slot, every column) in blocks of 3, sampling on the device."""
    _, ours = models
    prompts = ragged_prompts(5, seed=6)
    params = SamplingParams(n=2, temperature=0.8, top_p=1.0, max_new_tokens=9, seed=3, stop_ids=(EOS,))
    plain = generate(ours, prompts, params, slots=4)
    assert ids(generate(ours, prompts, params, slots=4, decode_steps=3, decode_mode="compile")) == ids(plain)


def test_a_block_never_writes_past_a_slots_length(models):
    """Slots a few tokens long (max_len), blocks longer than what is left: every completion ends at
    the slot's length, as the plain step's do."""
    _, ours = models
    prompts = ragged_prompts(4, seed=9, lengths=(5, 9))
    params = SamplingParams(n=1, temperature=0, max_new_tokens=50)
    plain = generate(ours, prompts, params, slots=2, max_len=12)
    got = generate(ours, prompts, params, slots=2, max_len=12, decode_steps=8)
    assert ids(got) == ids(plain) and {c.finish_reason for r in got for c in r} == {"length"}


def test_generate_command_with_decode_steps_writes_the_same_file(tmp_path):
    """`mtcore generate --decode-steps 4`: the output JSONL byte for byte as with one step per visit."""
    from click.testing import CliRunner

    from conftest import tiny_world
    from mtcore.cli import main

    policy, _, prompts = tiny_world(tmp_path)
    common = ["generate", "--policy", str(policy), "--prompts", str(prompts), "--samples", "2", "--temperature",
              "0.8", "--max-new-tokens", "7", "--slots", "5"]
    for name, extra in (("one.jsonl", []), ("four.jsonl", ["--decode-steps", "4"])):
        result = CliRunner().invoke(main, common + ["--out", str(tmp_path / name)] + extra)
        assert result.exit_code == 0, result.output
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "four.jsonl").read_bytes()


def test_the_decode_benchmark_dry_run_has_the_block_and_sampled_rows():
    """`python bench/sampler.py --decode --dry-run` on tiny shapes: the greedy rows with a blocked mode
    (the same tokens) and the sampled E-step rows, each with transformers beside it."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench" / "sampler.py"
    out = subprocess.run([sys.executable, str(bench), "--decode", "--dry-run", "--decode-slots", "1,4",
                          "--modes", "eager,eager:3,eager:auto", "--device", "cpu"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    greedy = [line for line in lines if line.startswith("| 8b-shaped (tiny) |")]
    assert len(greedy) == 3 and all(" | True | " in line for line in greedy[:2])  # 1 and 4 slots, then sampled
    assert any("sampled E-step shape" in line for line in lines)
    header = next(line for line in lines if line.startswith("| shape | slots | mean new tokens"))
    assert "mtcore eager:3 tokens/s" in header and "transformers tokens/s" in header
    assert "mtcore eager:auto tokens/s" in header


@pytest.mark.parametrize("steps", [3, 8])
def test_pipelined_blocks_read_one_block_late_and_equal_the_plain_step(models, monkeypatch, steps):
    """The static modes' blocks run with the host one block behind (sampler.pipelined): the state stays on
    the device, refills load only their slots' columns, a block's tokens are taken only for the requests
    its launch served. Run here without the compiler (torch.compile as the identity: the same static
    step, eagerly): n = 3 samples of 9 prompts in 4 slots, stops inside blocks, log-probs."""
    import mtcore.sampler as sampler
    monkeypatch.setattr(sampler.torch, "compile", lambda fn, **kwargs: fn)
    _, ours = models
    prompts = ragged_prompts(9, seed=4)
    probe = generate(ours, prompts, SamplingParams(n=3, temperature=0.8, max_new_tokens=12, seed=5), slots=4)
    params = SamplingParams(n=3, temperature=0.8, max_new_tokens=12, seed=5, stop_ids=frequent_stops(probe),
                            logprobs=True)
    plain = generate(ours, prompts, params, slots=4)
    assert {c.finish_reason for r in plain for c in r} == {"stop", "length"}
    got = generate(ours, prompts, params, slots=4, decode_steps=steps, decode_mode="compile")
    assert ids(got) == ids(plain)
    for r, q in zip(got, plain):
        for a, b in zip(r, q):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)
    greedy = SamplingParams(n=2, temperature=0, max_new_tokens=13, stop_ids=(EOS,))
    assert ids(generate(ours, prompts, greedy, slots=3, decode_steps=steps, decode_mode="compile")) == \
        ids(generate(ours, prompts, greedy, slots=3))


@pytest.mark.parametrize("device_ms, host_ms, max_new, expected", [
    (10.0, 0.05, 512, 1),   # the host is nothing beside the step: a visit every step
    (10.0, 3.3, 512, 4),    # Llama-3-8B on an H100: the GPU idled 25% of the wall -> host 1/3 of a step
    (3.5, 2.75, 512, 8),    # Llama-3.2-1B: idle 44%
    (1.0, 50.0, 512, 16),   # at most MAX_AUTO_STEPS
    (1.0, 50.0, 20, 2),     # a slot stopping inside a block wastes at most 1/16 of max_new_tokens
    (1.0, 50.0, 8, 1),
    (0.0, 1.0, 512, 1),     # nothing measured: the plain step
])
def test_automatic_steps_follow_the_measured_host_share(device_ms, host_ms, max_new, expected):
    from mtcore.decode_blocks import choose_steps
    assert choose_steps(device_ms / 1e3, host_ms / 1e3, max_new) == expected


def test_automatic_steps_measure_then_switch_to_blocks_with_the_same_tokens(models, monkeypatch, caplog):
    """--decode-steps 0: the first plain steps are timed, K is chosen and logged, and decoding goes on in
    blocks of K from where the plain steps left it. Here the timer reports a host that takes half a
    step (K = 8), and 64 new tokens cap K at 4: the tokens are the plain step's."""
    import logging

    import mtcore.decode_blocks as blocks
    _, ours = models
    prompts = ragged_prompts(7, seed=2)
    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=64, seed=3, stop_ids=(EOS,))
    plain = generate(ours, prompts, params, slots=3)
    measured = []
    real = blocks.StepTimer.measured
    monkeypatch.setattr(blocks.StepTimer, "measured", lambda self: measured.append(real(self)) or (2e-3, 1e-3))
    with caplog.at_level(logging.INFO, logger="mtcore.sampler"):
        got = generate(ours, prompts, params, slots=3, decode_steps=0)
    assert ids(got) == ids(plain)
    assert len(measured) == 1 and measured[0][0] > 0  # the real timer ran once, over real steps
    assert "decode steps per host visit: 4" in caplog.text


def test_step_timer_counts_the_decoders_preparation_as_host_time(monkeypatch):
    """A step: 3 ms of the decoder's own host preparation, 10 ms of forward (off CUDA, the launch's
    wall time), 2 ms of sampling and stop checks. The device's share is the forward alone: the
    preparation is host time that blocks remove, as the checks are. (A fake clock: nothing is timed.)"""
    import mtcore.decode_blocks as blocks
    clock = [0.0]
    monkeypatch.setattr(blocks.time, "perf_counter", lambda: clock[0])
    timer = blocks.StepTimer(torch.device("cpu"))
    while not timer.ready():
        timer.start()
        clock[0] += 3e-3
        timer.device_start()
        clock[0] += 10e-3
        timer.launched()
        clock[0] += 2e-3
        timer.stop()
    device_s, host_s = timer.measured()
    assert device_s == pytest.approx(10e-3) and host_s == pytest.approx(5e-3)
