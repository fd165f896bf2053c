"""A cluster job under torchrun, 2 CPU ranks (gloo): signals to the launcher, a launcher that dies, a
rank killed with --max-restarts 1, and the Slurm job script of docs/scale-out.md. The world's sampling
stage is one shard of 4,000 prompts (2 x --shard-prompts 4000 > 4,010 - 10), which takes longer than
the bound: a stop must come from inside the shard. Each run is compared with an uninterrupted one
(metrics.json without timing fields, and the files byte for byte). Every wait has a timeout, and the
launcher and its ranks are killed at the end of each test, so a hang fails the test."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import tiny_world
from test_preempt import RUN_TIMING, without_timing

pytestmark = [pytest.mark.usefixtures("torch_cpu_path"), pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
N_PROMPTS = 4010  # 4 selection + 6 RM + 4,000 sampled, in one shard
BOUND_S = 10.0  # signal -> the stop line; measured 2-3 s on a loaded 2-core CPU (docs/scale-out.md)
RUN_S = 300  # one whole run on 2 ranks: about 60 s here
HANDLE = "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
OUTPUTS = ("samples.jsonl", "scored.jsonl", "pairs.jsonl", "pseudo_pairs.jsonl", "policy/model.safetensors",
           "reward/model.safetensors")
SAMPLING = re.compile(r"iteration 1 sample: [1-9][\d,]*/8,?000 responses")  # generation is under way


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory.mktemp("world"), n_prompts=N_PROMPTS)


def train_args(world, out) -> list[str]:
    policy, reward, prompts = world
    return ["train", "--policy", str(policy), "--reward", str(reward), "--prompts", str(prompts), "--iters", "1",
            "--out", str(out), "--samples", "2", "--max-new-tokens", "6", "--beta", "0.5", "--dpo-lr", "1e-3",
            "--dpo-batch-size", "512", "--save-every", "4", "--selection-size", "4", "--rm-split-size", "6",
            "--rm-lr", "1e-3", "--rm-batch-size", "512", "--tau", "0", "--max-length", "64",
            "--micro-batch-tokens", "4096", "--policy-split-size", "0", "--shard-prompts", "4000",
            "--save-state-every", "0", "--kv-cache-gb", "0.0005", "--log-every", "0.5",  # ~50 slots: many steps
            "--batch-invariant"]  # a shard cut short is finished beside other requests: the same bits only so


def job_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "SLURM_"))}
    return {**env, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun_cmd(*options) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *options,
            "-m", "mtcore"]


class Job:
    """A launcher, its output read line by line (with the time each came), and its ranks, found as the
    processes whose environment names TORCHELASTIC_RUN_ID and whose parent is the launcher."""

    def __init__(self, cmd, env=None):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env or job_env(), cwd=ROOT)
        self.lines: list[tuple[float, str]] = []
        self.seen_ranks: dict[int, int] = {}  # pid -> RANK, of every rank seen
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def failure(self) -> str:
        """The lines that say why it failed (mtcore's errors, each rank's exception), then the tail."""
        text = self.output()
        why = [line for line in text.splitlines() if re.search(r"^error:|Error:|Exception:|^\[rank\d\]:   File \"/work/main/mtcore|^\[rank\d\]:     ", line)]
        return "\n".join(why[:80]) + "\n...\n" + text[-3000:]

    def wait_for(self, pattern, timeout: float) -> float:
        """The time the first line matching `pattern` (a regex) came; fails after `timeout` s."""
        pattern, end = re.compile(pattern), time.monotonic() + timeout
        while time.monotonic() < end:
            for t, line in list(self.lines):
                if pattern.search(line):
                    return t
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.05)
        pytest.fail(f"no line matching {pattern.pattern!r} within {timeout} s:\n{self.output()[-5000:]}")

    def ranks(self) -> dict[int, int]:
        """{pid: RANK} of the ranks running now, anywhere under the launcher (or the job script)."""
        found = {}
        for pid in _descendants(self.proc.pid):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
            if rank is not None and any(e.startswith(b"TORCHELASTIC_RUN_ID=") for e in env):
                found[pid] = rank
        self.seen_ranks.update(found)
        return found

    def signal_in_sampling(self, sig, to_ranks: bool = False) -> tuple[dict[int, int], float]:
        """Once both ranks sample: sig to the launcher (and to every rank too, as scancel does). Returns
        the ranks ({pid: RANK}) and when it was sent."""
        self.wait_for(SAMPLING, RUN_S)
        ranks = self.ranks()
        assert sorted(ranks.values()) == [0, 1]
        sent = time.monotonic()
        os.kill(self.proc.pid, sig)
        for pid in ranks if to_ranks else ():
            os.kill(pid, sig)
        return ranks, sent

    def finish(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after {timeout} s:\n{self.output()[-5000:]}")

    def kill(self):
        """The launcher, what it started, and every rank seen, at once (the test is over, or failed)."""
        self.ranks()
        for pid in [self.proc.pid, *_descendants(self.proc.pid), *self.seen_ranks]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)


def _descendants(root: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def run_job(cmd, timeout=RUN_S) -> Job:
    job = Job(cmd)
    try:
        assert job.finish(timeout) == 0, job.failure()
        job.reader.join(10)
    finally:
        job.kill()
    return job




def assert_same_run(a: Path, b: Path):
    assert without_timing(json.loads((a / "metrics.json").read_text()), RUN_TIMING) == \
        without_timing(json.loads((b / "metrics.json").read_text()), RUN_TIMING)
    for name in OUTPUTS:
        assert (a / "iter_1" / name).read_bytes() == (b / "iter_1" / name).read_bytes(), name
    assert not Path(f"{b}.lock").exists() and not Path(f"{b}.stopped").exists()


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    run_job(torchrun_cmd() + train_args(world, out))
    return out


def assert_stopped_in_the_shard(job: Job, out: Path, signame: str, sent: float):
    """One stop line, rank 0's, within the bound, inside the 4,000-prompt shard: some of its prompts saved."""
    stopped = job.wait_for(r"^stopped by ", BOUND_S + 5)
    print(f"{signame}: the stop line {stopped - sent:.2f} s after the signal")
    assert stopped - sent < BOUND_S
    job.reader.join(30)
    text = job.output()
    lines = [line for line in text.splitlines() if line.startswith("stopped by ")]
    assert len(lines) == 1, text[-3000:]
    assert text.count(f"{signame} received: stopping") == 1, text[-3000:]
    saved = int(re.search(r"with (\d+) of 4000 items of responses saved", lines[0]).group(1))
    assert 0 < saved < 4000, lines[0]  # the shard was cut short, its finished prompts kept
    shards = list((out / "iter_1" / "sample.shards" / "responses").glob("*.json"))
    assert sum(len(json.loads(f.read_text())["indices"]) for f in shards) == saved
    marker = json.loads(Path(f"{out}.stopped").read_text())
    assert marker["signal"] == signame and marker["message"] == lines[0]


def test_sigterm_to_the_launcher_and_its_ranks_stops_within_the_bound_and_the_rerun_is_equal(world, uninterrupted,
                                                                                             tmp_path):
    """As scancel does: SIGTERM to the launcher, which forwards it, and to every rank directly (each rank
    gets it twice, and takes the second as the same stop)."""
    out = tmp_path / "run"
    job = Job(torchrun_cmd(HANDLE) + train_args(world, out))
    try:
        ranks, sent = job.signal_in_sampling(signal.SIGTERM, to_ranks=True)
        assert_stopped_in_the_shard(job, out, "SIGTERM", sent)
        assert job.finish(60) == 1  # torchrun's own status after a signal (its SignalException)
        assert not any(alive(pid) for pid in ranks)
    finally:
        job.kill()
    run_job(torchrun_cmd() + train_args(world, out))
    assert_same_run(uninterrupted, out)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGUSR1 unhandled"])
def test_no_rank_outlives_its_launcher(world, tmp_path, how):
    """The launcher killed outright, or by a SIGUSR1 it was not told to handle (it dies of it, exit 138):
    every rank gets SIGTERM from the kernel (PR_SET_PDEATHSIG), stops at its next safe point, marks
    the run stopped, and exits within the bound."""
    out = tmp_path / "run"
    job = Job(torchrun_cmd() + train_args(world, out))
    try:
        job.wait_for(SAMPLING, RUN_S)
        ranks = job.ranks()
        assert sorted(ranks.values()) == [0, 1]
        sent = time.monotonic()
        os.kill(job.proc.pid, signal.SIGKILL if how == "SIGKILL" else signal.SIGUSR1)
        assert job.finish(30) == (-signal.SIGKILL if how == "SIGKILL" else -signal.SIGUSR1)
        while any(alive(pid) for pid in ranks) and time.monotonic() - sent < BOUND_S + 20:
            time.sleep(0.1)
        left = [pid for pid in ranks if alive(pid)]
        print(f"{how}: ranks gone {time.monotonic() - sent:.2f} s after the launcher's death")
        assert not left, f"ranks {left} outlived the launcher"
        assert json.loads(Path(f"{out}.stopped").read_text())["signal"] == "SIGTERM"
    finally:
        job.kill()


@pytest.mark.parametrize("rank,stage", [(0, "dpo"), (1, "sample")])
def test_a_rank_killed_under_max_restarts_restarts_and_the_run_ends_equal(world, uninterrupted, tmp_path, rank,
                                                                          stage):
    """kill -9 of one rank; torchrun (--standalone, --max-restarts 1) restarts both, and the run resumes
    and ends as the uninterrupted one. Rank 0's lock is taken over by its successor."""
    out = tmp_path / "run"
    job = Job(torchrun_cmd("--max-restarts", "1") + train_args(world, out))
    try:
        job.wait_for(SAMPLING if stage == "sample" else r"iteration 1: dpo", RUN_S)
        victim = next(pid for pid, r in job.ranks().items() if r == rank)
        os.kill(victim, signal.SIGKILL)
        assert job.finish(RUN_S) == 0, job.failure()
        job.reader.join(10)
    finally:
        job.kill()
    text = job.output()
    assert "done: 1 iterations" in text and "connectFullMesh failed" not in text
    if rank == 0:
        assert "took over the lock of pid" in text
    assert_same_run(uninterrupted, out)


def test_the_slurm_job_script_requeues_at_the_time_limit_and_the_requeued_job_finishes(world, uninterrupted,
                                                                                       tmp_path):
    """docs/slurm/mtcore-train.sbatch, run by bash as Slurm would (NPROC=2 on the CPU), a stand-in
    scontrol on PATH: USR1 to the script (--signal=B:USR1@300) stops the run within the bound, and the
    script requeues the job and exits 0; run again, it resumes and finishes, with no requeue."""
    out = tmp_path / "run"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    (bin_dir / "torchrun").write_text(f"#!/bin/sh\nexec {sys.executable} -m torch.distributed.run \"$@\"\n")
    (bin_dir / "torchrun").chmod(0o755)
    env = {**job_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "NPROC": "2", "SLURM_JOB_ID": "4242"}
    script = ["bash", str(ROOT / "docs" / "slurm" / "mtcore-train.sbatch"), *train_args(world, out)[1:]]
    job = Job(script, env)
    try:
        ranks, sent = job.signal_in_sampling(signal.SIGUSR1)
        assert_stopped_in_the_shard(job, out, "SIGUSR1", sent)
        assert job.finish(60) == 0
        assert not any(alive(pid) for pid in ranks)
    finally:
        job.kill()
    assert calls.read_text() == "requeue 4242\n"
    job = Job(script, env)
    try:
        assert job.finish(RUN_S) == 0, job.failure()
    finally:
        job.kill()
    assert calls.read_text() == "requeue 4242\n"  # not again
    assert_same_run(uninterrupted, out)
