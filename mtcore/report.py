"""Training metrics where users look: TensorBoard and Weights & Biases (`--report-to`).

Each DPO, RM or SFT training step's row (train.fit's metrics.jsonl row: loss, accuracy, lr,
grad_norm, tokens/s, ...) is logged under a prefix (`dpo`, `iter_1/dpo`), and `mtcore train` adds
each iteration's numbers from metrics.json under `iteration/`, at step t. One run name (--run-name)
for the whole command: TensorBoard's events go to the logging directory, one subdirectory a prefix
(<logging directory>/iter_1/dpo: each prefix counts its own steps), wandb's run (project "mtcore")
to <logging directory>/wandb, resumed by a rerun as the same run (its id comes from the run name and
the output directory). tensorboard and wandb are imported only when asked for. Under torchrun rank 0
alone reports.

No step is logged twice. A rerun resumes a training stage at the step after its last saved state, so
it may redo steps an earlier process logged before it was killed: TensorBoard's writer of the prefix
opens with that step as its purge_step (TensorBoard drops the earlier process's events from it on),
and wandb, whose steps only move forward, skips the steps its run has. An iteration's numbers are
logged once: a rerun or an extension (a larger --iters) skips the iterations logged before.
logged.json in the logging directory holds the last step logged of each prefix, written after the
events are flushed.
"""

import hashlib
import math
import time
from pathlib import Path

from mtcore.errors import MtcoreError
from mtcore.files import read_json, write_json

TARGETS = ("tensorboard", "wandb")
LOGGED = "logged.json"  # {prefix: the last step logged}, in the logging directory
EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb"}  # the pip extra of mtcore that installs each


def parse_targets(value: str) -> tuple[str, ...]:
    """--report-to's value: tensorboard, wandb, both comma-separated, or "" / none for neither."""
    names = tuple(dict.fromkeys(v.strip() for v in (value or "").split(",") if v.strip() and v.strip() != "none"))
    for name in names:
        if name not in TARGETS:
            raise MtcoreError(f"--report-to {value!r}: {name!r} is not one of {', '.join(TARGETS)} (or several, "
                              f"comma-separated, or none)")
    for name in names:
        try:
            _import(name)
        except ImportError as e:
            raise MtcoreError(f"--report-to {name}: {name} cannot be imported ({e}); install it with "
                              f"pip install 'mtcore[{EXTRA[name]}]'") from None
    return names


def _import(name: str):
    if name == "tensorboard":
        import tensorboard  # noqa: F401  (SummaryWriter needs it)
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    import wandb

    return wandb


def _after_earlier_files(directory: Path) -> None:
    """Wait, if need be, until a new event file in directory sorts after those there. TensorBoard reads
    a directory's files in name order, and a name is events.out.tfevents.<second>.<host>.<pid>.<counter>:
    a file opened in the same second as an earlier one may sort before it (pid and counter compare as
    text), and the earlier file's purge_step would then drop the new file's steps. Only a rerun within
    a second of the last (tests) waits, under a second; a file dated later than that (another host's
    clock) is not waited for."""
    seconds = [int(part) for f in directory.glob("events.out.tfevents.*") if (part := f.name.split(".")[3]).isdigit()]
    latest = max(seconds, default=0)
    while int(time.time()) == latest:
        time.sleep(0.05)


def _scalars(row: dict, prefix: str) -> dict[str, float]:
    """The finite numbers of a row, keyed prefix/name (nested dicts flattened: prefix/a/b)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update(_scalars(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}/{key}"] = float(value)
    return out


class Reporter:
    """The --report-to targets of one command, opened at the first log (so a refused command writes
    nothing). logging_dir: where they write (default: the `default_dir` that open is given)."""

    def __init__(self, targets: tuple[str, ...], run_name: str, logging_dir: str | None = None):
        self.targets, self.run_name, self.logging_dir = targets, run_name, logging_dir
        self.directory = None
        self.writers = {}  # prefix -> TensorBoard's SummaryWriter in <directory>/<prefix>, opened at its first step
        self.wandb_run = None
        self.prefixes = set()  # those wandb was told the step metric of
        self.logged = {}  # prefix -> the last step logged, by this process or an earlier one (LOGGED)

    def open(self, default_dir: Path) -> None:
        from mtcore import parallel

        if self.directory is not None or not self.targets or not parallel.is_main():
            return
        self.directory = Path(self.logging_dir) if self.logging_dir else Path(default_dir)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.logged = _read_logged(self.directory / LOGGED)
        if "wandb" in self.targets:
            wandb = _import("wandb")
            run_id = hashlib.sha256(f"{self.run_name}|{Path(default_dir).resolve()}".encode()).hexdigest()[:16]
            self.wandb_run = wandb.init(project="mtcore", name=self.run_name, dir=str(self.directory), id=run_id,
                                        resume="allow")

    def log(self, prefix: str, row: dict, step: int, again: bool = True) -> None:
        """row's numbers as prefix/<key> at `step` (each prefix counts its own steps). again: a step an
        earlier process logged may come again (a training step redone after a resume): TensorBoard
        purges from it, wandb skips it. False (an iteration's numbers): such a step is skipped."""
        if self.directory is None:
            return
        new = step > self.logged.get(prefix, 0)
        if not (new or again):
            return
        scalars = _scalars(row, prefix)
        if "tensorboard" in self.targets:
            writer = self._writer(prefix, step)
            for key, value in scalars.items():
                writer.add_scalar(key, value, global_step=step)
            writer.flush()  # before logged.json says so
        if self.wandb_run is not None and new:
            # wandb's own step only grows, and each stage restarts at 1: its step is a metric of its own
            if prefix not in self.prefixes:
                self.prefixes.add(prefix)
                self.wandb_run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
            self.wandb_run.log({**scalars, f"{prefix}/step": step})
        if new:
            self.logged[prefix] = step
            write_json(self.directory / LOGGED, self.logged)

    def _writer(self, prefix: str, step: int):
        """The prefix's SummaryWriter, opened at its first step in this process with that step as its
        purge_step: what an earlier process logged there from that step on is dropped by TensorBoard."""
        if prefix not in self.writers:
            _after_earlier_files(self.directory / prefix)
            self.writers[prefix] = _import("tensorboard")(log_dir=str(self.directory / prefix), purge_step=step)
        return self.writers[prefix]

    def step_logger(self, prefix: str):
        """A train.fit `report` function: each step's row under prefix."""
        return lambda row: self.log(prefix, row, row["step"])

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        self.writers, self.wandb_run = {}, None
        self.directory = None


def _read_logged(path: Path) -> dict[str, int]:
    """LOGGED's {prefix: last step}; none (a new directory, or one that is not mtcore's) is {}."""
    try:
        logged = read_json(path) if path.exists() else {}
    except MtcoreError:
        return {}
    ok = isinstance(logged, dict) and all(type(v) is int for v in logged.values())
    return logged if ok else {}


def reporter(report_to: str, run_name: str, logging_dir: str | None = None) -> Reporter | None:
    """A Reporter for --report-to (checked now: an unknown target or a missing package is an error
    before any work), or None for none."""
    targets = parse_targets(report_to)
    return Reporter(targets, run_name, logging_dir) if targets else None
