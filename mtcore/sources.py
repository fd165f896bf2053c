"""Tables a user's data may come in besides JSONL: a Parquet file, and a Hugging Face dataset (a
`save_to_disk` directory, a directory of Parquet files such as `hf download --local-dir` leaves, or a
hub id already in the local cache, which is never downloaded).

Each is read whole into a list of plain dicts (one per row, in order); data.read_rows adds the row's
location and checks its text. pyarrow and datasets (`pip install mtcore[data]`) are imported only when
such a source is read, so `mtcore --help` and JSONL inputs never pay for them.
"""

import contextlib
from pathlib import Path

from mtcore.errors import MtcoreError

PARQUET_MAGIC = b"PAR1"
DATA_EXTRA = "install them with `pip install mtcore[data]` (datasets and pyarrow)"


def _is_parquet_file(path: Path) -> bool:
    if path.suffix.lower() in (".parquet", ".pq"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == PARQUET_MAGIC
    except OSError:
        return False


def looks_like_hub_id(source: str) -> bool:
    """"org/name": one slash, not a path spelled as one, no file extension of ours."""
    return (source.count("/") == 1 and not source.startswith((".", "/", "~"))
            and not source.lower().endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".pq")))


def kind_of(source) -> str:
    """"jsonl", "parquet", "disk" (a dataset directory) or "hub" (a hub id, to look up in the cache)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return "disk"
    if path.is_file():
        return "parquet" if _is_parquet_file(path) else "jsonl"
    return "hub" if looks_like_hub_id(str(source)) else "jsonl"  # a missing file: JSONL says "cannot read"


def _import(module: str, source):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MtcoreError(f"{source}: reading Parquet files and Hugging Face datasets needs {module}; "
                          f"{DATA_EXTRA}") from None


def _rows(table, name: str, columns: list[str]) -> list[dict]:
    """A pyarrow Table's rows as dicts. Text that is not UTF-8 (e.g. a lone surrogate's bytes, which
    some writers store in a string column unchecked) is an error naming its row and column."""
    try:
        return table.select(columns).to_pylist()
    except UnicodeDecodeError:
        pass
    for column in columns:
        values = table.column(column)
        for i in range(len(values)):
            try:
                values[i].as_py()
            except UnicodeDecodeError as e:
                raise MtcoreError(f'{name} row {i}: "{column}" holds bytes that are not UTF-8 text (byte '
                                  f'{e.start + 1}: {e.reason}; a lone surrogate\'s encoding, \\xed\\xa0\\x80 to '
                                  f'\\xed\\xbf\\xbf, is not text); fix or remove it') from None
    raise MtcoreError(f"{name}: holds text that is not UTF-8")


def _parquet(path: Path, split):
    pq = _import("pyarrow.parquet", path)
    if split:
        raise MtcoreError(f"{path}: a Parquet file has no splits; leave the split out")
    try:
        return pq.read_table(path), str(path)
    except OSError as e:
        raise MtcoreError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # pyarrow's ArrowInvalid: no magic bytes, a damaged footer
        raise MtcoreError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _pick(splits: dict, split, source, split_option: str):
    """The split asked for, or the only one there is."""
    names = ", ".join(splits)
    if split:
        if split not in splits:
            raise MtcoreError(f"{split_option} {split}: {source} has no such split; its splits are {names}")
        return splits[split], split
    if len(splits) != 1:
        raise MtcoreError(f"{source}: has the splits {names}; choose one with {split_option}")
    name, dataset = next(iter(splits.items()))
    return dataset, name


def _dataset_table(dataset):
    """The pyarrow Table of a datasets.Dataset, in its row order (an indices mapping applied)."""
    return dataset.with_format("arrow")[:]


def _from_disk(path: Path):
    """A save_to_disk directory (a Dataset or a DatasetDict), or a directory of Parquet files."""
    datasets = _import("datasets", path)
    datasets.disable_progress_bars()
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as e:
            raise MtcoreError(f"{path}: not a readable saved dataset ({_first_line(e)})") from None
        return loaded
    if not any(path.rglob("*.parquet")):
        raise MtcoreError(f"{path}: a directory, but neither a dataset saved with save_to_disk nor one holding "
                          f"Parquet files; give a JSONL or Parquet file, or a dataset directory")
    return _load_dataset(datasets, str(path), path)


@contextlib.contextmanager
def _offline(datasets):
    """datasets and huggingface_hub in offline mode for the duration (they read it at each call)."""
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _load_dataset(datasets, where: str, source):
    """datasets.load_dataset of a local directory, offline: it may prepare its Arrow cache, never fetch."""
    with _offline(datasets):
        try:
            return datasets.load_dataset(where)
        except Exception as e:
            raise MtcoreError(f"{source}: not a readable dataset ({_first_line(e)})") from None


def _from_hub_cache(name: str):
    """A hub id from the local cache only: the hub's file cache (`hf download`), else datasets' own
    prepared cache (an earlier `load_dataset`). Not there is an error; nothing is downloaded."""
    datasets = _import("datasets", name)
    datasets.disable_progress_bars()
    from huggingface_hub import constants, snapshot_download

    try:
        snapshot = snapshot_download(name, repo_type="dataset", local_files_only=True)
    except Exception:
        snapshot = None
    if snapshot is not None:
        return _load_dataset(datasets, snapshot, name)
    with _offline(datasets):
        try:
            return datasets.load_dataset(name)
        except Exception:
            raise MtcoreError(f"{name}: no such file, and no such dataset in the Hugging Face cache "
                              f"({constants.HF_HUB_CACHE} or {datasets.config.HF_DATASETS_CACHE}); mtcore never "
                              f"downloads data: run `hf download --repo-type dataset {name}` where the hub is "
                              f"reachable, or give a local file or directory") from None


def read_table(source, split, split_option: str, need: list[tuple[tuple[str, ...], str]]):
    """(name for errors, rows) of a Parquet file or a Hugging Face dataset (kind_of: not "jsonl").
    name is "SOURCE" for a Parquet file and "SOURCE[SPLIT]" for a dataset. need: for each required
    column, (names it may have, in order of preference; the option that names it): a table without
    any of them is one error naming the columns it has and the option."""
    kind = kind_of(source)
    if kind == "parquet":
        table, name = _parquet(Path(source).expanduser(), split)
    else:
        loaded = _from_disk(Path(source).expanduser()) if kind == "disk" \
            else _from_hub_cache(str(source))
        if hasattr(loaded, "keys"):  # a DatasetDict: choose its split
            loaded, split = _pick(dict(loaded), split, source, split_option)
        elif split:
            raise MtcoreError(f"{split_option} {split}: {source} is a single dataset, without splits; leave the "
                              f"split out")
        table, name = _dataset_table(loaded), f"{source}[{split}]" if split else str(source)
    have = table.column_names
    for names, option in need:
        if not any(n in have for n in names):
            raise MtcoreError(f"{name}: no column {' or '.join(repr(n) for n in names)} (its columns: "
                              f"{', '.join(have)}); name the column with {option}")
    return name, _rows(table, name, have)
