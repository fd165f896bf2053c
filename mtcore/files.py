"""Files written whole or not at all, at the bottom of mtcore's imports (it imports no other module
of the package but errors).

A file is written to a temp file beside it and renamed over it; a directory is built beside its
place and swapped in. An interrupted write leaves the old content or the new, never a mix.
"""

import ctypes
import errno
import json
import os
import shutil
from pathlib import Path

from mtcore.errors import MtcoreError


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise MtcoreError(f"{path}: missing; a Hugging Face checkpoint directory needs it") from None
    except OSError as e:
        raise MtcoreError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise MtcoreError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise MtcoreError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def holds_text(path: Path, text: str) -> bool:
    """Whether the file `path` holds exactly `text` (UTF-8): its size is compared first, so a file
    of another size is not read."""
    data = text.encode("utf-8", "surrogatepass")
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def remove_quietly(path: Path) -> None:
    """Remove a temp file after a failed write; a failure here (a read-only or vanished disk) is not
    the error to report, and must not hide it."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def write_text_atomic(path, text: str) -> bool:
    """Write `text` to a temp file beside `path`, then rename it over `path`: never half a file. A
    file that already holds `text` is left alone (a rerun of a finished run writes nothing, so it
    also runs on a read-only mount). Returns whether it wrote."""
    path = Path(path)
    if holds_text(path, text):
        return False
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        remove_quietly(tmp)
        raise MtcoreError(f"{path}: cannot write ({e.strerror or e})") from None
    return True


def finite(obj):
    """obj with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> bool:
    """obj as JSON (sorted keys, NaN as null), atomically; unless the file holds it already. Returns
    whether it wrote."""
    return write_text_atomic(path, json.dumps(finite(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def check_free_space(where, need: int, what: str) -> None:
    """Refuse, before any work, what would write `need` bytes (an estimate: the stage's models and
    resumable state) where the filesystem that will hold `where` has less free space; the error gives
    both numbers."""
    where = Path(where).absolute()
    existing = next(p for p in (where, *where.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if need > free:
        raise MtcoreError(f"{where}: {what} needs about {_size(need)} on disk, and its filesystem has "
                          f"{_size(free)} free; free some space or write elsewhere, then rerun")


def default_file_mode() -> int:
    """0o666 less the process's umask: the mode open() gives a new file (os.umask can only be read
    by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing directories (Linux renameat2 RENAME_EXCHANGE). False where the
    system or filesystem lacks it; an OSError for any other failure."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, dst: Path) -> None:
    """Put the finished directory `tmp` in the place of `dst` (whatever dst held is removed): one
    atomic exchange where the system has it, else two renames; dst is never half a directory."""
    tmp, dst = Path(tmp), Path(dst)
    if dst.exists() and _exchange(tmp, dst):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old dst
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
