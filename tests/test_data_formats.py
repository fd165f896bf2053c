"""User data in the forms users have (mtcore/sources.py, data.read_rows): Parquet files, datasets saved
with save_to_disk, and hub ids in the local Hugging Face cache (the hub's file cache and datasets' own),
each read into the same rows as the JSONL of the same data; UltraFeedback's layout (responses as
message lists); `mtcore generate` and `mtcore dpo` on them. The bad cases live in test_bad_inputs.py."""

import glob
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import reference_caches, tiny_world
from mtcore import MtcoreError
from mtcore.data import Source, prompt_of, read_pairs, read_rows

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

pytestmark = pytest.mark.usefixtures("torch_cpu_path")

PROMPTS = [{"prompt": f"sort {i} 3 1", "id": i, "source": "toy"} for i in range(7)]
MESSAGES = [{"messages": [{"role": "system", "content": "Sort."}, {"role": "user", "content": f"{i} 2"}], "id": i}
            for i in range(5)]


def conversation(prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


PAIRS = [{"prompt": f"sort {i % 10} 3 1", "chosen": "1 3 x", "rejected": "3 1", "margin": float(i)} for i in range(6)]
ULTRA = [{"prompt": r["prompt"], "chosen": conversation(r["prompt"], r["chosen"]),
          "rejected": conversation(r["prompt"], r["rejected"]), "margin": r["margin"]} for r in PAIRS]


@pytest.fixture(autouse=True)
def hf_caches(tmp_path, monkeypatch):
    """The hub's file cache and datasets' cache in tmp_path: nothing read from or written to the user's."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    return tmp_path / "hf"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def bare(rows):
    return [{k: v for k, v in r.items() if k not in ("_line", "_where")} for r in rows]


def hub_snapshot(cache, repo: str, splits: dict) -> None:
    """A dataset as `hf download --repo-type dataset REPO` leaves it in the hub's file cache."""
    folder = cache / "hub" / f"datasets--{repo.replace('/', '--')}"
    commit = "0" * 40
    for split, rows in splits.items():
        (folder / "snapshots" / commit / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), folder / "snapshots" / commit / "data" / f"{split}-00000-of-00001.parquet")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def datasets_cache(cache, tmp_path, repo: str, rows: list[dict]) -> None:
    """A dataset as an earlier online `load_dataset(REPO)` leaves it in datasets' own cache
    (<cache>/<org>___<name>/<config>/<version>/<hash>/<name>-<split>.arrow), built offline from a
    local Parquet file by the same builder and moved to the hub id's place."""
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "src.parquet")
    datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "src.parquet")},
                          cache_dir=str(tmp_path / "build"))
    built = glob.glob(str(tmp_path / "build" / "parquet" / "*" / "*" / "*" / "dataset_info.json"))[0]
    org, name = repo.split("/")
    dst = cache / "datasets" / f"{org}___{name}" / "default" / "0.0.0" / "abc"
    shutil.copytree(str(glob.os.path.dirname(built)), dst)
    for f in dst.glob("parquet-*.arrow"):
        f.rename(dst / f.name.replace("parquet-", f"{name}-"))


@pytest.mark.parametrize("rows", [PROMPTS, MESSAGES], ids=["prompt", "messages"])
def test_parquet_and_saved_datasets_read_as_the_jsonl(tmp_path, rows):
    jsonl = read_rows(write_jsonl(tmp_path / "p.jsonl", rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2]),
                          "test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    for source in (tmp_path / "p.parquet", tmp_path / "saved", Source(str(tmp_path / "dict"), "test")):
        got = read_rows(source)
        assert bare(got) == bare(jsonl), source
        assert [prompt_of(r, r["_where"]) for r in got] == [prompt_of(r, r["_where"]) for r in jsonl]
    assert jsonl[2]["_where"] == f"{tmp_path / 'p.jsonl'}:3"
    assert read_rows(tmp_path / "p.parquet")[2]["_where"] == f"{tmp_path / 'p.parquet'} row 2"
    assert read_rows(Source(str(tmp_path / "dict"), "test"))[2]["_where"] == f"{tmp_path / 'dict'}[test] row 2"


def test_a_parquet_file_is_known_by_its_bytes_too(tmp_path):
    pq.write_table(pa.Table.from_pylist(PROMPTS), tmp_path / "p.data")
    assert bare(read_rows(tmp_path / "p.data")) == PROMPTS


def test_hub_ids_resolve_from_the_cache_only(tmp_path, hf_caches):
    hub_snapshot(hf_caches, "someone/prompts", {"train": PROMPTS[:3], "test": PROMPTS})
    assert bare(read_rows(Source("someone/prompts", "test"))) == PROMPTS
    with pytest.raises(MtcoreError, match="has the splits .*train.*; choose one with --prompts-split"):
        read_rows(Source("someone/prompts", None, "--prompts-split"))
    with pytest.raises(MtcoreError, match="--prompts-split dev: someone/prompts has no such split; its splits are"):
        read_rows(Source("someone/prompts", "dev", "--prompts-split"))
    datasets_cache(hf_caches, tmp_path, "someone/loaded", MESSAGES)
    assert bare(read_rows("someone/loaded")) == MESSAGES
    with pytest.raises(MtcoreError, match="no such dataset in the Hugging Face cache.*never downloads"):
        read_rows("someone/absent")


def test_a_directory_of_parquet_files_is_a_dataset(tmp_path):
    (tmp_path / "d" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(PROMPTS), tmp_path / "d" / "data" / "train-00000-of-00001.parquet")
    assert bare(read_rows(tmp_path / "d")) == PROMPTS


def test_ultrafeedback_layout_reads_as_string_pairs(tmp_path):
    from mtcore import toy
    from mtcore.data import load_tokenizer

    tok = load_tokenizer(toy.build_tokenizer(tmp_path / "tok"))
    strings = read_pairs(write_jsonl(tmp_path / "pairs.jsonl", PAIRS), tok)
    pq.write_table(pa.Table.from_pylist(ULTRA), tmp_path / "ultra.parquet")
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(ULTRA)}).save_to_disk(str(tmp_path / "ultra"))
    for source in (tmp_path / "ultra.parquet", Source(str(tmp_path / "ultra"), "train_prefs"),
                   write_jsonl(tmp_path / "ultra.jsonl", ULTRA)):
        got = read_pairs(source, tok)
        assert [(e.seqs, e.margin) for e in got] == [(e.seqs, e.margin) for e in strings], source
    renamed = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in ULTRA]
    pq.write_table(pa.Table.from_pylist(renamed), tmp_path / "renamed.parquet")
    got = read_pairs(Source(str(tmp_path / "renamed.parquet"), prompt="q", chosen="good", rejected="bad"), tok)
    assert [e.seqs for e in got] == [e.seqs for e in strings]
    other = [dict(ULTRA[0], chosen=conversation("another prompt", "1 3"))]
    pq.write_table(pa.Table.from_pylist(other), tmp_path / "other.parquet")
    with pytest.raises(MtcoreError, match='other.parquet row 0: "chosen" holds a conversation whose messages before '
                                          'its last differ from the prompt'):
        read_pairs(tmp_path / "other.parquet", tok)
    user_last = [dict(ULTRA[0], rejected=ULTRA[0]["rejected"][:1])]
    with pytest.raises(MtcoreError, match='"rejected" must end with an assistant message'):
        read_pairs(write_jsonl(tmp_path / "user_last.jsonl", user_last), tok)


def test_missing_columns_name_the_option(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"q": "sort 1 2", "chosen": "1 2", "rejected": "2 1"}]), tmp_path / "p.parquet")
    with pytest.raises(MtcoreError, match="no column 'prompt' or 'messages' .*columns: q, chosen, rejected.*--prompt-field"):
        read_rows(tmp_path / "p.parquet")
    with pytest.raises(MtcoreError, match="no column 'good' .*--chosen-field"):
        read_rows(Source(str(tmp_path / "p.parquet"), chosen="good", prompt="q"), ("prompt", "chosen"))


def test_generate_and_dpo_run_on_parquet_and_datasets(tmp_path):
    from mtcore.cli import main

    policy, _, prompts = tiny_world(tmp_path, n_prompts=4)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "prompts.parquet")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "prompts_ds"))
    outs = []
    for source, extra in ((prompts, []), (tmp_path / "prompts.parquet", []),
                          (tmp_path / "prompts_ds", ["--prompts-split", "test"])):
        out = tmp_path / f"g{len(outs)}.jsonl"
        result = CliRunner().invoke(main, ["generate", "--policy", str(policy), "--prompts", str(source), "--out",
                                           str(out), "--max-new-tokens", "3", *extra])
        assert result.exit_code == 0, result.output
        outs.append(out.read_text())
    assert outs[0] == outs[1] == outs[2]
    pq.write_table(pa.Table.from_pylist(ULTRA), tmp_path / "ultra.parquet")
    result = CliRunner().invoke(main, ["dpo", "--policy", str(policy), "--pairs", str(tmp_path / "ultra.parquet"),
                                       "--out", str(tmp_path / "dpo"), "--batch-size", "3",
                                       "--micro-batch-tokens", "256"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    assert summary["data"]["kept"] == len(ULTRA) and summary["pairs"] == str(tmp_path / "ultra.parquet")
    assert len(reference_caches()) == 1 and not list(tmp_path.glob("*.ref-*"))  # the cache, not beside the data


def test_the_reference_cache_lives_in_mtcores_cache_directory(tmp_path, monkeypatch):
    """--cache-dir, else MTCORE_CACHE, else XDG_CACHE_HOME/mtcore, else ~/.cache/mtcore; a --cache-dir
    that cannot be made is an error, the default one a warning (no cache)."""
    from mtcore.errors import MtcoreError
    from mtcore.commands import cache_root, reference_cache_dir

    assert reference_cache_dir(tmp_path / "mine") == tmp_path / "mine" / "ref_logps"
    assert (tmp_path / "mine" / "ref_logps").is_dir()
    assert cache_root() == Path(os.environ["MTCORE_CACHE"])
    monkeypatch.delenv("MTCORE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "mtcore"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "mtcore"
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(MtcoreError, match="--cache-dir .*a_file: cannot make"):
        reference_cache_dir(tmp_path / "a_file")
    monkeypatch.setenv("MTCORE_CACHE", str(tmp_path / "a_file"))
    assert reference_cache_dir() is None


def test_a_bom_and_gzip_read_as_the_plain_jsonl(tmp_path, monkeypatch):
    """A UTF-8 byte order mark (Windows editors write one) and a .jsonl.gz (read as datasets reads it:
    the same rows) give the rows of the plain file; a gzip cut short is one error."""
    import gzip

    text = "".join(json.dumps(r) + "\n" for r in PROMPTS)
    plain, bom, gz = tmp_path / "p.jsonl", tmp_path / "bom.jsonl", tmp_path / "p.jsonl.gz"
    plain.write_text(text)
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
    gz.write_bytes(gzip.compress(b"\xef\xbb\xbf" + text.encode()))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "_where"} for r in rows]  # noqa: E731
    want = strip(read_rows(plain))
    assert strip(read_rows(bom)) == want and strip(read_rows(gz)) == want
    assert read_rows(gz)[2]["_where"] == f"{gz}:3"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    theirs = datasets.load_dataset("json", data_files=str(tmp_path / "p.jsonl.gz"), split="train")
    assert [{k: r[k] for k in ("prompt", "id", "source")} for r in theirs] == PROMPTS
    (tmp_path / "cut.jsonl.gz").write_bytes(gz.read_bytes()[:-12])
    with pytest.raises(MtcoreError, match="cut.jsonl.gz: cannot read"):
        read_rows(tmp_path / "cut.jsonl.gz")


def test_dpo_help_says_where_the_reference_cache_is():
    from mtcore.cli import main

    text = " ".join(CliRunner().invoke(main, ["dpo", "--help"]).output.split())
    assert "beside PAIRS" not in text and "cached in --cache-dir" in text
    assert "Nothing is written beside the data." in text
