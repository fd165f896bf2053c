"""Progress where users look: the numbers of the bar and of the log lines (count, rate, time left,
tokens/s) on a fake clock, a bar on a terminal and timed log lines without one, and `mtcore train`
logging its sampling progress into a redirected stderr before the stage ends."""

import io
import logging

import pytest
from click.testing import CliRunner

from mtcore.cli import main
from mtcore.progress import Progress, duration


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_count_rate_time_left_and_tokens_on_a_fake_clock():
    clock = FakeClock()
    p = Progress(40, "dpo", "steps", clock=clock, tty=False, log_every=1e9)
    clock.now += 10
    p.update(5, tokens=1000, loss=0.61234, accuracy=0.75)
    assert p.done == 5 and p.rate() == pytest.approx(0.5) and p.time_left() == pytest.approx(70)
    assert p.tokens_per_s() == pytest.approx(100)
    assert p.line() == "dpo: 5/40 steps (12%), 0.5 steps/s, 1m10s left, 100 tokens/s, loss 0.6123, accuracy 0.75"
    clock.now += 70
    p.update(35)
    assert p.line(final=True) == "dpo: 40/40 steps in 1m20s, 0.5 steps/s, 12 tokens/s, loss 0.6123, accuracy 0.75"


def test_resumed_items_count_but_not_in_the_rate():
    clock = FakeClock()
    p = Progress(100, "sample", "prompts", initial=20, clock=clock, tty=False)
    p.resume(30)
    clock.now += 4
    p.update(8)
    assert p.done == 58 and p.rate() == pytest.approx(2.0) and p.time_left() == pytest.approx(21)
    p.update_to(60)
    assert p.done == 60
    assert duration(42) == "42s" and duration(185) == "3m05s" and duration(7620) == "2h07m"


def test_no_rate_before_the_first_item_and_the_time_left_bounded_by_the_tokens():
    """A sampler whose 64 requests run together: after 30 s no response is done (no "0 responses/s"),
    then one short one. Counting alone would say 63 x 30 s left; at most 64 x 20 tokens at the tokens/s
    so far is the bound: (1280 - 600) / 20 = 34 s."""
    clock = FakeClock()
    p = Progress(64, "sample", "responses", clock=clock, tty=False, item_tokens=20)
    clock.now += 30
    p.update(0, tokens=600)
    assert p.line() == "sample: 0/64 responses (0%), 34s left, 20 tokens/s"
    p.update(1)
    assert p.rate() == pytest.approx(1 / 30) and p.time_left() == pytest.approx(34)
    assert p.line() == "sample: 1/64 responses (2%), 0.0333 responses/s, 34s left, 20 tokens/s"
    q = Progress(64, "sample", "responses", clock=clock, tty=False)  # no token bound: the count's estimate
    clock.now += 30
    q.update(1)
    assert q.time_left() == pytest.approx(63 * 30)
    r = Progress(64, "sample", "responses", initial=32, clock=clock, tty=False, item_tokens=20)  # resumed: 32 left
    clock.now += 10
    r.update(0, tokens=200)
    assert r.time_left() == pytest.approx((32 * 20 - 200) / 20)


def test_sampling_progress_counts_finished_requests(tmp_path):
    """generate_responses counts each finished request (response) as it finishes, not prompts: with 4
    samples a prompt, the bar moves by one per response, and ends at prompts x samples."""
    from conftest import make_hf_model, save_hf
    from mtcore.checkpoint import load_model
    from mtcore.inference import generate_responses
    from mtcore.sampler import SamplingParams

    seen = []

    class Recorder(Progress):
        def update(self, n=1, tokens=0, **numbers):
            seen.append(n)
            super().update(n, tokens, **numbers)

    model = load_model(save_hf(make_hf_model("policy", seed=0), tmp_path / "policy")).eval()

    class Tok:
        def decode(self, ids, **kw):
            return " ".join(map(str, ids))

    bar = Recorder(3 * 4, "generate", "responses", tty=False, log_every=1e9)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=5, seed=0)
    out = generate_responses(model, Tok(), [[1, 5, 7], [1, 9], [1, 3, 3, 3]], params, slots=5, progress=bar)
    assert sum(map(len, out)) == 12
    assert bar.done == 12 and all(n == int(n) for n in seen) and max(seen) < 12


def test_without_a_terminal_a_line_every_log_every_seconds_and_one_at_the_end(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="mtcore.progress"):
        with Progress(10, "score", "sequences", clock=clock, tty=False, log_every=30) as p:
            for _ in range(10):
                clock.now += 10
                p.update(1)
    lines = [r.getMessage() for r in caplog.records if r.name == "mtcore.progress"]
    # at 30, 60 and 90 seconds, then the end line
    assert lines == ["score: 3/10 sequences (30%), 0.1 sequences/s, 1m10s left",
                     "score: 6/10 sequences (60%), 0.1 sequences/s, 40s left",
                     "score: 9/10 sequences (90%), 0.1 sequences/s, 10s left",
                     "score: 10/10 sequences in 1m40s, 0.1 sequences/s"]


def test_log_every_0_logs_every_item_not_every_token(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="mtcore.progress"):
        with Progress(3, "generate", "prompts", clock=clock, tty=False, log_every=0, leave=False) as p:
            for _ in range(3):
                clock.now += 1
                p.update(0, tokens=5)
                p.update(1, tokens=5)
    lines = [r.getMessage() for r in caplog.records if r.name == "mtcore.progress"]
    assert len(lines) == 3 and lines[-1] == "generate: 3/3 prompts (100%), 1 prompts/s, 0s left, 10 tokens/s"


def test_on_a_terminal_a_bar_redrawn_in_place(caplog):
    clock, stream = FakeClock(), io.StringIO()
    with caplog.at_level(logging.INFO, logger="mtcore.progress"):
        with Progress(4, "dpo", "steps", clock=clock, tty=True, stream=stream) as p:
            for _ in range(4):
                clock.now += 2
                p.update(1, loss=0.5)
    assert not [r for r in caplog.records if r.name == "mtcore.progress"]  # the bar, not log lines
    frames = stream.getvalue().split("\r")[1:]
    assert len(frames) == 5 and frames[-1].endswith("\n")
    assert frames[1].startswith("dpo |############------------| 2/4 steps (50%), 0.5 steps/s, 4s left, loss 0.5")
    assert frames[-1].startswith("dpo |########################| 4/4 steps in 8s, 0.5 steps/s, loss 0.5")


def test_other_ranks_show_nothing(monkeypatch, caplog):
    from mtcore import parallel

    monkeypatch.setattr(parallel, "is_main", lambda: False)
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="mtcore.progress"):
        with Progress(2, "x", tty=True, stream=stream, log_every=0) as p:
            p.update(2)
    assert stream.getvalue() == "" and not caplog.records


@pytest.mark.usefixtures("torch_cpu_path")
def test_train_logs_sampling_progress_before_the_stage_ends(tmp_path, caplog):
    """`mtcore train` with stderr redirected (not a terminal) and --log-every 0: the sample stage's
    progress lines (responses, tokens/s) come while it runs, before its end line and the next stage;
    none says "0 responses/s"."""
    from conftest import tiny_world

    policy, reward, prompts = tiny_world(tmp_path)
    args = ["train", "--policy", policy, "--reward", reward, "--prompts", prompts, "--iters", "1",
            "--selection-size", "4", "--rm-split-size", "4", "--policy-split-size", "16", "--samples", "2", "--max-new-tokens", "4",
            "--max-length", "64", "--micro-batch-tokens", "256", "--dpo-batch-size", "4", "--rm-batch-size", "4",
            "--save-every", "2", "--shard-prompts", "4", "--log-every", "0", "--out", tmp_path / "run"]
    with caplog.at_level(logging.INFO):
        result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output[-3000:]
    messages = [r.getMessage() for r in caplog.records]
    start, end = messages.index("iteration 1: sample"), messages.index("iteration 1: score")
    sample = [m for m in messages[start:end] if m.startswith("iteration 1 sample: ")]
    assert len(sample) >= 3, messages[start:end]
    *during, last = sample
    assert " in " in last and "32/32 responses" in last  # 16 prompts (24 less 4 + 4 held out) x 2 samples
    assert all("tokens/s" in m and "left" in m and " 0 responses/s" not in m for m in during)
    counts = [float(m.split(": ")[1].split("/")[0]) for m in during]
    assert counts == sorted(counts) and counts[-1] <= 32 and counts[0] >= 1
    for stage in ("score", "select"):
        assert any(m.startswith(f"iteration 1 {stage}: ") for m in messages), stage
    assert any(m.startswith("iter_1 dpo: ") and "loss" in m and "accuracy" in m for m in messages)
