"""Preemption: SIGTERM (a scheduler's, before its SIGKILL) or SIGUSR1 (Slurm's early warning, with
`--signal=USR1@120`) asks a long command to stop at its next safe point, where everything done so far
is saved: a saved shard of a sampling or scoring stage (`mtcore train`), a micro-batch of DPO's
reference log-probs (those done kept beside their cache: `train`, `dpo`), or a training step followed
by a save of the resumable state (`train`, `dpo`, `rm`, `sft`). The command then prints one line saying
where it stopped, and exits 143 (128 + SIGTERM, as a process killed by it would). A second signal stops
it at once (the signal's default action); the directory is resumable either way, since every file is
written atomically. Rerunning the same command resumes.

Under torchrun the launcher gets the signal and forwards it to every rank (with `--signals-to-handle`
naming it: SIGUSR1 is not in torchrun's default list). Each rank only notes it (`stopping()`, local);
the long loops (a sampler's decode steps, a scorer's micro-batches) look at that note and return what
they finished, and the next safe point asks every rank (`requested()`, one all-reduce: the reference
pass asks before each micro-batch), so all stop there together. Rank 0 alone prints. A rank takes no second signal as "at once": Slurm's scancel signals
every process of the job and torchrun forwards the same signal, so each rank gets it twice; torchrun
SIGKILLs the ranks after its --shutdown-timeout (30 s by default) instead, and the safe point comes
sooner (docs/scale-out.md#preemption gives the bound).

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
        self.signal = _received or "a signal"
        super().__init__(f"stopped by {self.signal} {where}; rerun the same command to resume")


def _handle(signum, frame) -> None:
    global _received
    if _received is not None and "TORCHELASTIC_RUN_ID" in os.environ:
        return  # under torchrun a rank gets one stop twice (Slurm signals every process, torchrun forwards)
    if _received is not None:  # the second signal: its default action, now
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _received = signal.Signals(signum).name
    if os.environ.get("RANK", "0") == "0":  # torchrun signals every rank: one line, rank 0's
        sys.stderr.write(f"{_received} received: stopping at the next safe point (a saved shard, reference "
                         f"micro-batch or training step); send it again to stop at once\n")
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


def stopping() -> bool:
    """Whether this process received a stop signal: local, no collective, so a loop whose ranks run
    different numbers of steps may call it at every step (and then return what it has finished)."""
    return _received is not None


def requested() -> bool:
    """Whether any rank received a stop signal: every rank agrees (one all-reduce), so all of them stop
    at the same safe point and none is left waiting in a collective. A rank that was not signalled
    itself (a signal sent to one rank only) takes the signal's name from the others, for the line."""
    global _received
    number = parallel.all_max(signal.Signals[_received].value if _received else 0)
    if number and _received is None:
        _received = signal.Signals(number).name
    return bool(number)


def check(where: str) -> None:
    """At a safe point: raise Preempted(where) if a stop was requested."""
    if requested():
        raise Preempted(where)
