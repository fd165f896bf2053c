"""Preemption: SIGTERM (a scheduler's, before its SIGKILL) or SIGUSR1 (Slurm's early warning, with
`--signal=USR1@120`) asks a long command to stop at its next safe point, where everything done so far
is saved: a saved shard of a sampling or scoring stage (`mtcore train`), or a training step followed by
a save of the resumable state (`train`, `dpo`, `rm`, `sft`). The command then prints one line saying
where it stopped, and exits 143 (128 + SIGTERM, as a process killed by it would). A second signal stops
it at once (the signal's default action); the directory is resumable either way, since every file is
written atomically. Rerunning the same command resumes.

The commands that have safe points call `install()`; the others keep the default action (they write
their output atomically at the end, so a kill loses nothing written before).
"""

import os
import signal
import sys

from mtcore import parallel

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_STATUS = 143

_received: str | None = None


class Preempted(Exception):
    """Raised at a safe point after a stop signal; the message says where the command stopped."""

    def __init__(self, where: str):
        super().__init__(f"stopped by {_received or 'a signal'} {where}; rerun the same command to resume")


def _handle(signum, frame) -> None:
    global _received
    if _received is not None:  # the second signal: its default action, now
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _received = signal.Signals(signum).name
    sys.stderr.write(f"{_received} received: stopping at the next safe point (a saved shard or training step); "
                     f"send it again to stop at once\n")
    sys.stderr.flush()


def install() -> None:
    """Stop at safe points on SIGTERM or SIGUSR1 (main thread only, as Python requires)."""
    global _received
    _received = None
    for s in SIGNALS:
        signal.signal(s, _handle)


def uninstall() -> None:
    global _received
    _received = None
    for s in SIGNALS:
        signal.signal(s, signal.SIG_DFL)


def requested() -> bool:
    """Whether any rank received a stop signal: every rank agrees (one all-reduce), so all of them stop
    at the same safe point and none is left waiting in a collective."""
    return bool(parallel.all_reduce_sum([float(_received is not None)])[0])


def check(where: str) -> None:
    """At a safe point: raise Preempted(where) if a stop was requested."""
    if requested():
        raise Preempted(where)
