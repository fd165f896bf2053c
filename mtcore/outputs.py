"""What a command writes, and how: no command removes what it did not write, and an interrupted
command leaves either the previous output or the new one, never a mix of the two.

- A command that writes a directory (`mtcore dpo|rm|sft|convert|build-toy`) works in OUT.partial,
  beside OUT, and swaps the finished directory in at the end: one renameat2(RENAME_EXCHANGE) on
  Linux, so OUT is at every moment the old directory or the new one (elsewhere, two renames). Its
  resumable state (OUT.partial/train_state) stays there until the command finishes.
- Each output directory carries a marker file, MARKER, naming the command that wrote it. An --out
  that holds anything else is refused unless --overwrite is given; an --out that holds one of the
  command's inputs, or the current directory, is refused always.
- One process per output: a command that writes a directory (`mtcore train`'s run directory
  too) holds its lock (mtcore/lock.py, `<OUT>.lock` beside it) from before it reads OUT until it
  ends; a second process on the same OUT is refused, naming the holder.
- A command stopped by a signal at a safe point (mtcore/preempt.py) leaves `<OUT>.stopped` beside
  OUT: the output is unfinished and the same command resumes it. A job script reads it (under
  torchrun the launcher's exit status cannot say so); the next command on OUT removes it.
- A command that writes one file (`mtcore generate|score|eval`) writes it atomically (write to a
  temp file, rename); an existing --out that is one of its inputs is refused always, and one that
  does not look like the command's own output is refused unless --overwrite.
"""

import contextlib
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from mtcore import lock, parallel, preempt
from mtcore.errors import MtcoreError
from mtcore.files import finite, remove_quietly, replace_dir, write_text_atomic

MARKER = ".mtcore-output"
# Outputs written before the marker existed: the file that identifies each command's output.
_LEGACY = {"dpo": ("summary.json", "dpo"), "rm": ("summary.json", "rm"), "sft": ("summary.json", "sft"),
           "build-toy": ("build.json", None)}
_ANOTHER = "choose another --out"
_OVERWRITE_HINT = f"{_ANOTHER}, or pass --overwrite to replace it"


@contextlib.contextmanager
def one_writer(out):
    """The lock of the output `out` (lock.acquire) while the block runs, released at its end, error or
    not. Under torchrun rank 0 holds it, and every rank stops when rank 0 is refused. The release covers
    the all-reduce too: a rank that died there (its peer killed) must not leave the lock behind.
    A stop signal (preempt.Preempted) leaves the marker stopped_path(out), which the next holder removes."""
    path, text, refused = lock.lock_path(out), None, None
    try:
        if parallel.is_main():
            try:
                text = lock.acquire(path)
            except MtcoreError as e:
                refused = e
        if parallel.all_max(int(refused is not None)):
            raise refused or MtcoreError(f"{out}: in use by another process (rank 0 says which)")
        if parallel.is_main():
            remove_quietly(stopped_path(out))
        yield path
    except preempt.Preempted as e:
        if parallel.is_main():
            _mark_stopped(out, e)
        raise
    finally:
        lock.release(path, text)


def stopped_path(out) -> Path:
    """<OUT>.stopped, beside the lock: the command writing OUT was stopped by a signal at a safe point,
    and the same command resumes it."""
    path = lock.lock_path(out)
    return path.with_name(f"{path.name.removesuffix('.lock')}.stopped")


def _mark_stopped(out, e: "preempt.Preempted") -> None:
    """The marker, {"signal", "message" (the stop line), "since"}; a disk that refuses it costs the
    marker only (the stop line is printed anyway)."""
    since = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
    with contextlib.suppress(OSError):
        write_text_atomic(stopped_path(out), json.dumps({"signal": e.signal, "message": str(e), "since": since}) + "\n")


def written_by(directory: Path, command: str) -> bool:
    """Whether `directory` is a previous output of `mtcore <command>` (its marker, or the file that
    identified that command's outputs before markers existed)."""
    marker = directory / MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text()).get("command") == command
        except (OSError, ValueError, AttributeError):
            return False
    name, value = _LEGACY.get(command, (None, None))
    if name is None or not (directory / name).is_file():
        return False
    if value is None:
        return True
    try:
        return json.loads((directory / name).read_text()).get("command") == value
    except (OSError, ValueError, AttributeError):
        return False


def write_marker(directory: Path, command: str) -> None:
    """The marker, whole or not at all: written beside the directory, then renamed into it. A kill
    mid-write had left a truncated marker in OUT.partial, which the next run then refused as another
    program's (an empty OUT.partial is accepted)."""
    tmp = directory.parent / f".{directory.name}{MARKER}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps({"command": command}) + "\n")
        os.replace(tmp, directory / MARKER)
    except OSError:
        remove_quietly(tmp)
        raise


def _holds(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def _check_inputs(out: Path, inputs) -> None:
    real_out = out.resolve()
    if _holds(real_out, Path.cwd().resolve()):
        raise MtcoreError(f"{out}: is the current directory or holds it; give the output a directory of its own")
    for given in inputs:
        if given and Path(given).expanduser().exists() and _holds(real_out, Path(given).expanduser().resolve()):
            raise MtcoreError(f"{out}: holds the input {given}; choose an --out that holds none of the inputs")


def check_out_dir(out, command: str, inputs=(), overwrite: bool = False) -> Path:
    """Refuse an --out directory this command may not replace, before any work: a file, one holding
    an input or the current directory, or (without --overwrite) one holding what it did not write."""
    out = Path(out).expanduser()
    if out.name in ("", "..", "."):  # "." and ".." have no name of their own: use what they stand for
        out = out.resolve()
    if not out.name:
        raise MtcoreError(f"{out}: give the output a directory of its own")
    if out.exists() and not out.is_dir():
        raise MtcoreError(f"{out}: exists and is not a directory; {_ANOTHER}")
    _check_inputs(out, inputs)
    if out.is_dir() and any(out.iterdir()) and not overwrite and not written_by(out, command):
        raise MtcoreError(f"{out}: holds files that `mtcore {command}` did not write; {_OVERWRITE_HINT}")
    partial = partial_dir(out)
    if partial.exists() and not (partial.is_dir() and (written_by(partial, command) or not any(partial.iterdir()))):
        raise MtcoreError(f"{partial}: exists and was not written by `mtcore {command}`; move it away or "
                          f"choose another --out")
    _check_parent(out)
    return out


def _check_parent(out: Path) -> None:
    """The directory that will hold `out` (and its .partial) exists or can be made, and is writable."""
    parent = out.absolute().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise MtcoreError(f"{out}: cannot be created ({existing} is not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MtcoreError(f"{out}: cannot be created ({existing} is not writable)")


def partial_dir(out: Path) -> Path:
    return out.with_name(f"{out.name}.partial")


def open_partial(out: Path, command: str, keep=("train_state",)) -> Path:
    """OUT.partial, made and marked; from an earlier interrupted run only `keep` (its resumable
    state) is kept."""
    partial = partial_dir(out)
    try:
        partial.mkdir(parents=True, exist_ok=True)
        for entry in partial.iterdir():
            if entry.name not in keep and entry.name != MARKER:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        write_marker(partial, command)
    except OSError as e:
        raise MtcoreError(f"{partial}: cannot write there ({e.strerror or e})") from None
    return partial


def commit_dir(finished: Path, out: Path, command: str) -> None:
    """Mark `finished` as this command's output and swap it in for `out`; then OUT.partial (with the
    old output, if the swap put it there) is removed."""
    try:
        write_marker(finished, command)
        replace_dir(finished, out)
    except OSError as e:
        raise MtcoreError(f"{out}: cannot write there ({e.strerror or e}); the previous output, if any, is "
                          f"unchanged") from None
    shutil.rmtree(partial_dir(out), ignore_errors=True)


def check_out_file(out, inputs=(), overwrite: bool = False, looks_like=None, jsonl: bool = True) -> Path:
    """Refuse an --out file before any work: a directory, one of the inputs, or (without --overwrite)
    an existing non-empty file whose content (JSONL: its first row) `looks_like` does not accept as
    this command's own."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise MtcoreError(f"{out}: is a directory; give a file path")
    for given in inputs:
        if given and Path(given).expanduser().exists() and out.exists() and out.resolve() == \
                Path(given).expanduser().resolve():
            raise MtcoreError(f"{out}: is also an input; write the output to another file")
    if out.exists() and not overwrite and looks_like is not None and out.stat().st_size:
        try:
            with open(out, encoding="utf-8") as f:
                ok = looks_like(json.loads(f.readline()) if jsonl else json.load(f))
        except (OSError, ValueError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise MtcoreError(f"{out}: exists and does not look like this command's output; {_OVERWRITE_HINT}")
    _check_parent(out)
    return out


def write_json_file(path, obj) -> None:
    """A command's JSON output, written atomically by rank 0; NaN (e.g. an accuracy over no pairs) is null."""
    if parallel.is_main():
        write_text_atomic(path, json.dumps(finite(obj), indent=2, allow_nan=False) + "\n")
