"""One process per output (mtcore/lock.py): a second process on the same directory is refused with
the holder named, and the first goes on unharmed; a lock left by a dead process on this host is taken
over; a lock held on another host is refused. The holders here are real processes."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import tiny_world
from mtcore import lock
from mtcore.cli import main
from mtcore.errors import MtcoreError

pytestmark = pytest.mark.usefixtures("torch_cpu_path")

# A process that takes the lock of argv[1] and holds it until killed.
HOLDER = ("import sys, time\nfrom pathlib import Path\nfrom mtcore import lock\n"
          "lock.acquire(lock.lock_path(sys.argv[1]))\nprint('held', flush=True)\ntime.sleep(600)\n")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env["TRITON_INTERPRET"] = "0"
    return env


@pytest.fixture
def holder(tmp_path):
    """Start a process holding the lock of a directory; yields (Popen, the directory)."""
    procs = []

    def start(out: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=_env(), stdout=subprocess.PIPE,
                                text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.stderr
    return errors[0]


def test_train_on_a_held_run_directory_is_refused_before_it_reads_or_writes(tmp_path, holder):
    out = tmp_path / "run"
    proc = holder(out)
    error = _one_error_line(CliRunner().invoke(main, ["train", "--iters", "1", "--out", str(out)]))
    assert f"pid {proc.pid} on {socket.gethostname()}" in error and str(out) + ".lock" in error, error
    assert "wait for it to end, or stop it" in error
    assert not out.exists()  # nothing read or written: the holder had not made it yet
    holder_text = (tmp_path / "run.lock").read_text()
    assert json.loads(holder_text)["pid"] == proc.pid  # the refused process left the lock alone


@pytest.mark.parametrize("command", ["dpo", "rm", "sft", "convert", "build-toy"])
def test_every_directory_command_takes_the_lock(tmp_path, holder, command):
    """Each command that writes a directory is refused on a held OUT before it reads its inputs (the
    inputs here do not exist: the lock is the first thing checked)."""
    out = tmp_path / "o"
    proc = holder(out)
    nope = str(tmp_path / "nope")
    args = {"dpo": ["dpo", "--policy", nope, "--pairs", nope, "--out", str(out)],
            "rm": ["rm", "--reward", nope, "--pairs", nope, "--out", str(out)],
            "sft": ["sft", "--policy", nope, "--data", nope, "--out", str(out)],
            "convert": ["convert", nope, str(out)],
            "build-toy": ["build-toy", "--out", str(out)]}[command]
    error = _one_error_line(CliRunner().invoke(main, args))
    assert f"pid {proc.pid}" in error and "in use by another mtcore process" in error, error
    assert not out.exists() and not (tmp_path / "o.partial").exists()


def test_the_first_process_completes_while_a_second_is_refused(tmp_path):
    """Two real `mtcore dpo` on one --out: the second is refused naming the first (its pid), the first
    finishes with exit 0 and its whole output, and releases the lock."""
    policy, _, _ = tiny_world(tmp_path / "w")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"sort {i % 10} 3 1", "chosen": "1 3 " * (1 + i % 4),
                                         "rejected": "3 1"}) + "\n" for i in range(64)))
    out = tmp_path / "o"
    args = ["dpo", "--policy", str(policy), "--pairs", str(pairs), "--out", str(out), "--batch-size", "2",
            "--micro-batch-tokens", "256"]
    first = subprocess.Popen([sys.executable, "-m", "mtcore", *args], env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + 300
        while not (tmp_path / "o.partial").exists() and first.poll() is None and time.time() < end:
            time.sleep(0.01)
        assert first.poll() is None, first.communicate()[1][-2000:]
        error = _one_error_line(CliRunner().invoke(main, args))
        assert f"pid {first.pid} on {socket.gethostname()}" in error and "mtcore dpo" in error, error
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 32 and (out / "model.safetensors").is_file()
    assert not (tmp_path / "o.lock").exists() and not (tmp_path / "o.partial").exists()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, holder, caplog):
    out = tmp_path / "run"
    proc = holder(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()  # its pid is gone now (a zombie, not yet waited for, counts as gone too)
    path = lock.lock_path(out)
    assert json.loads(path.read_text())["pid"] == proc.pid  # the killed process could not release it
    with caplog.at_level(logging.WARNING, logger="mtcore.lock"):
        text = lock.acquire(path)
    assert json.loads(path.read_text())["pid"] == os.getpid() and path.read_text() == text
    assert f"took over the lock of pid {proc.pid}" in caplog.text
    lock.release(path, text)
    assert not path.exists()


def test_a_reused_pid_is_a_dead_holder(tmp_path, caplog):
    """The lock's pid runs, but started at another time than the lock says: another process now has
    that pid, and the lock is taken over. The same pid and start time: held."""
    path = tmp_path / "run.lock"
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": "2026-01-01T00:00:00+00:00", "command": "x"}
    assert lock.start_time(os.getpid()) is not None, "this test needs /proc"
    path.write_text(json.dumps({**me, "start": lock.start_time(os.getpid())}))
    with pytest.raises(MtcoreError, match=f"pid {os.getpid()} on {socket.gethostname()} since 2026-01-01"):
        lock.acquire(path)
    path.write_text(json.dumps({**me, "start": lock.start_time(os.getpid()) - 1}))
    with caplog.at_level(logging.WARNING, logger="mtcore.lock"):
        text = lock.acquire(path)
    assert "took over" in caplog.text and path.read_text() == text


def test_a_lock_held_on_another_host_is_refused(tmp_path):
    path = tmp_path / "run.lock"
    other = {"host": "node-17.cluster", "pid": 1, "start": 5, "since": "2026-03-01T10:00:00+00:00",
             "command": "mtcore train --out run"}
    path.write_text(json.dumps(other))
    before = path.read_bytes()
    with pytest.raises(MtcoreError) as e:
        lock.acquire(path)
    message = str(e.value)
    assert "pid 1 on node-17.cluster since 2026-03-01T10:00:00+00:00" in message, message
    assert f"if that job is gone, remove {path}" in message and "mtcore train --out run" in message
    assert path.read_bytes() == before


def test_an_unreadable_lock_file_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text("")
    with pytest.raises(MtcoreError, match=f"remove {path}"):
        lock.acquire(path)


def test_release_removes_only_our_own_lock(tmp_path):
    path = tmp_path / "run.lock"
    text = lock.acquire(path)
    path.write_text(text.replace(str(os.getpid()), "12345"))  # another process's lock took its place
    lock.release(path, text)
    assert path.exists()
    lock.release(path, None)  # no lock was taken (nothing could be written): nothing to do
    assert path.exists()


def test_a_take_over_that_finds_a_fresh_lock_puts_it_back(tmp_path):
    """Two processes found the same stale lock; the first replaced it by its own. The second's rename
    then moves a lock with another inode: it is put back, and the second is told it lost."""
    path = tmp_path / "run.lock"
    path.write_text("fresh")
    assert not lock._take_over(path, ino=path.stat().st_ino + 1)
    assert path.read_text() == "fresh" and [p.name for p in tmp_path.iterdir()] == ["run.lock"]
    assert lock._take_over(path, ino=path.stat().st_ino) and not path.exists()


def test_one_lock_for_every_spelling_of_a_directory(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path / "real")
    assert lock.lock_path(".") == lock.lock_path(tmp_path / "link") == tmp_path / "real.lock"


def test_an_output_under_a_file_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(MtcoreError, match="a_file is not a directory"):
        lock.acquire(lock.lock_path(tmp_path / "a_file" / "sub" / "o"))


def test_under_torchrun_rank_0_holds_the_lock_and_every_rank_stops_when_it_is_refused(tmp_path, monkeypatch):
    """The other ranks take no lock; when rank 0 is refused (the all-reduce says so), they stop too."""
    from mtcore import outputs, parallel

    out = tmp_path / "run"
    monkeypatch.setattr(parallel, "is_main", lambda: False)
    monkeypatch.setattr(parallel, "all_max", lambda value: 0)  # rank 0 took it
    with outputs.one_writer(out):
        assert not lock.lock_path(out).exists()
    monkeypatch.setattr(parallel, "all_max", lambda value: 1)  # rank 0 was refused
    with pytest.raises(MtcoreError, match="in use by another process"):
        with outputs.one_writer(out):
            pytest.fail("a rank went on while rank 0 was refused")


def test_an_error_in_the_all_reduce_releases_the_lock(tmp_path, monkeypatch):
    """Rank 0 took the lock, then the all-reduce that tells the ranks failed (a peer was killed): the lock
    file is gone with the error, so a restarted rank 0 finds no lock of its predecessor's."""
    from mtcore import outputs, parallel

    out = tmp_path / "run"

    def peer_died(value):
        assert lock.lock_path(out).exists()  # rank 0 holds it here
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(parallel, "all_max", peer_died)
    with pytest.raises(RuntimeError, match="closed by peer"):
        with outputs.one_writer(out):
            pytest.fail("the block ran after the all-reduce failed")
    assert not lock.lock_path(out).exists()
