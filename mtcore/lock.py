"""One process per output: a lock file beside the directory a command writes (`<OUT>.lock`).

The lock is taken before the command reads or writes OUT, and held until it ends. It is made
whole, then hard-linked into place: a temp file holding {host, pid, start, since, command} is
written, and os.link puts it at the lock path, which fails when the lock exists. That is atomic on
local filesystems and on NFS, where flock is not reliable. Beside OUT, not in it, so it can be taken
before OUT exists and never changes what OUT holds.

A lock whose holder is gone is taken over, with a warning: on this host, its pid is no longer
running, or now runs another process (its start time, /proc/<pid>/stat field 22, differs). A lock
held on another host is refused: this process cannot see that host's processes, so the user is
told to remove the lock file if that job is gone. Where nothing can be written beside OUT (a
read-only filesystem, or no permission), the command goes on without a lock: it can write nothing
either, so it cannot harm a run another process is writing.
"""

import contextlib
import errno
import json
import logging
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

from mtcore.errors import MtcoreError

log = logging.getLogger(__name__)

# Nothing can be written beside OUT: go on without a lock (every write would fail the same way).
UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def lock_path(out) -> Path:
    """<OUT>.lock, beside OUT's real place ("." and symlinks resolved, so every spelling of one
    directory names one lock)."""
    out = Path(out).expanduser().resolve()
    return out.with_name(f"{out.name}.lock")


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None where
    /proc does not say. The command name (field 2) may hold spaces and parentheses: split after it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # fields 3 onwards
    return int(fields[22 - 3]) if len(fields) > 22 - 3 else None


def _running(pid: int, start: int | None) -> bool:
    """Whether `pid` still runs the process that took the lock on this host: it exists, is not a
    zombie (ended, not yet waited for), and started when the lock says it did."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2:].split()[0] == "Z":
            return False
    except (OSError, ValueError, IndexError):
        pass
    now = start_time(pid)
    return start is None or now is None or now == start


def _holder() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": start_time(pid),
            "since": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
            "command": " ".join(["mtcore", *sys.argv[1:]])[:500]}


def _read(path: Path) -> tuple[dict | None, int | None]:
    """(the holder a lock file names, or None when it is unreadable or not mtcore's; its inode), or
    (None, None) when there is no lock file."""
    try:
        with open(path, "rb") as f:
            ino = os.fstat(f.fileno()).st_ino
            raw = f.read(4096)
    except FileNotFoundError:
        return None, None
    try:
        holder = json.loads(raw)
        ok = isinstance(holder, dict) and isinstance(holder.get("host"), str) and type(holder.get("pid")) is int
        return (holder if ok else None), ino
    except (ValueError, UnicodeDecodeError):
        return None, ino


def _out(path: Path) -> Path:
    """The output a lock file guards: its path less ".lock"."""
    return path.with_name(path.name.removesuffix(".lock"))


def _describe(holder: dict) -> str:
    return f"pid {holder['pid']} on {holder['host']} since {holder.get('since', '?')}"


def _refuse(path: Path, holder: dict | None) -> MtcoreError:
    if holder is None:
        return MtcoreError(f"{path}: a lock file mtcore cannot read says another process is writing "
                           f"{_out(path)}; if no mtcore job is running there, remove {path}")
    here = holder["host"] == socket.gethostname()
    todo = ("wait for it to end, or stop it, then rerun" if here else
            f"if that job is gone, remove {path}, then rerun")
    return MtcoreError(f"{_out(path)}: in use by another mtcore process ({_describe(holder)}: "
                       f"{holder.get('command', '?')}; lock file {path}); {todo}")


def _stale(holder: dict | None) -> bool:
    return (holder is not None and holder["host"] == socket.gethostname()
            and not _running(holder["pid"], holder.get("start")))


def _take_over(path: Path, ino: int) -> bool:
    """Remove the stale lock whose inode is `ino`; False when the lock file changed meanwhile (another
    process took it over first). The lock is renamed away before it is checked, so of two processes
    that found it stale only one removes it; a fresh lock renamed by mistake is put back."""
    aside = path.with_name(f".{path.name}.stale-{socket.gethostname()}-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if os.stat(aside).st_ino == ino:
        os.unlink(aside)
        return True
    with contextlib.suppress(OSError):
        os.link(aside, path)
    with contextlib.suppress(OSError):
        os.unlink(aside)
    return False


def _make_parent(path: Path) -> None:
    """The directory that holds the lock (and OUT): made when missing. OSError when it cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # the path, or one of its parents, is a file
        ancestor = next(p for p in (path.parent, *path.parent.parents) if p.exists())
        raise MtcoreError(f"{_out(path)}: cannot be created ({ancestor} is not a directory)") from None


def _create(path: Path, text: str) -> bool:
    """Hard-link a whole temp file to `path`: False when `path` exists. OSError for anything else."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def acquire(path: Path) -> str | None:
    """Take the lock file `path`: the text written there, to release it with; None where nothing can
    be written there (no lock needed). A MtcoreError naming the holder when another process has it."""
    text = json.dumps(_holder()) + "\n"
    for _ in range(5):  # another process may take or release it between our steps
        try:
            _make_parent(path)
            if _create(path, text):
                return text
        except OSError as e:
            if e.errno in UNWRITABLE:
                log.debug("%s: not locked (%s): nothing can be written there", path, e.strerror)
                return None
            raise MtcoreError(f"{path}: cannot create the lock file ({e.strerror or e})") from None
        holder, ino = _read(path)
        if ino is None:
            continue  # released meanwhile
        if not _stale(holder):
            raise _refuse(path, holder)
        if _take_over(path, ino):
            log.warning("%s: took over the lock of %s, which no longer runs", path, _describe(holder))
    raise MtcoreError(f"{path}: other processes keep taking this lock; check that no other mtcore job "
                      f"writes {_out(path)}")


def release(path: Path, text: str | None) -> None:
    """Remove the lock file if it is still ours (its content is what we wrote). Never raises."""
    if text is None:
        return
    try:
        if path.read_text() == text:
            path.unlink()
    except OSError as e:
        log.warning("%s: cannot remove the lock file (%s); remove it by hand", path, e.strerror or e)
