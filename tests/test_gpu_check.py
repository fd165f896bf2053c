"""bench/gpu_check.py --dry-run: every section of the GPU check, at tiny shapes on the CPU, passes and
writes its results files (to the directory given, never into bench/results)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
ALL = ["environment", "pytest", "kernels", "decode-8b-64", "decode-8b-210", "decode-1b-64", "train", "iteration",
       "toy"]


def dry_run(out: Path, only: list[str]) -> dict:
    before = sorted((REPO / "bench" / "results").iterdir())
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--only", ",".join(only)],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert sorted((REPO / "bench" / "results").iterdir()) == before  # nothing written there
    jsonl = list(out.glob("gpu_*.jsonl"))
    md = list(out.glob("gpu_*.md"))
    assert len(jsonl) == 1 and len(md) == 1, (proc.stdout, proc.stderr[-2000:])
    records = {r["section"]: r for r in map(json.loads, jsonl[0].read_text().splitlines())}  # the latest each
    failed = {name: records[name].get("error") for name in only if records[name]["status"] != "passed"}
    assert not failed and proc.returncode == 0, (failed, proc.stderr[-2000:])
    text = md[0].read_text()
    for name, r in records.items():
        assert r["device"] and r["versions"].startswith("torch ") and r["commit"]
        assert f"| {name} | passed |" in text
    return records


def test_dry_run_sections(tmp_path, llama3_tokenizer_path):
    """Every section but the toy run (slow on a shared CPU; the slow test below runs it). The iteration
    section needs the real Llama-3 tokenizer."""
    records = dry_run(tmp_path, [s for s in ALL if s != "toy"])
    kernels = records["kernels"]["rows"]
    assert {(r["op"].split(" ")[0], r["provider"]) for r in kernels} == {
        (op, p) for op in ("fused", "DPO") for p in ("naive", "mtcore")}
    assert all(r["ms"] > 0 and r["peak MiB"] >= 0 for r in kernels)
    assert len(records["train"]["rows"]) == 4 and all(r["tokens/s"] > 0 for r in records["train"]["rows"])
    decode = [records[name]["rows"] for name in ("decode-8b-64", "decode-8b-210", "decode-1b-64")]
    assert [(r["shape"], r["slots"]) for rows in decode for r in rows] == [
        ("8b-shaped (tiny)", 4), ("8b-shaped (tiny)", 6), ("1b-shaped (tiny)", 4)]
    for row in (rows[0] for rows in decode):
        for mode in ("eager", "eager:3", "eager:auto"):  # the dry run's stand-ins for graphs, graphs:8, auto
            assert row[f"mtcore {mode} tokens/s"] > 0 and row[f"mtcore {mode} % of floor"] > 0
        assert row["eager:3 same as eager"] and row["eager:auto same as eager"]  # blocks: the same tokens
    assert decode[0][0]["tokens equal to transformers %"] == 100  # fp32, greedy, 4 tokens
    assert "transformers tokens/s" not in decode[1][0] and "transformers tokens/s" not in decode[2][0]
    stages = {r["stage"]: r for r in records["iteration"]["rows"]}
    assert list(stages) == ["sample", "score", "pairs", "dpo", "select", "msample", "rm", "all stages"]
    assert all(stages[s]["tokens"] > 0 and stages[s]["seconds"] > 0 for s in ("sample", "score", "dpo", "rm"))
    assert "real Llama-3 tokenizer" in records["iteration"]["notes"][0]
    assert "skipped" in records["pytest"]["rows"][0]["summary"]  # no CUDA here: the cuda tests skip


@pytest.mark.slow
def test_dry_run_every_section_then_only_one(tmp_path):
    first = dry_run(tmp_path, ALL)
    assert sorted(first) == sorted(ALL) and first["toy"]["rows"][0]["iterations"] == 1
    again = dry_run(tmp_path, ["environment"])  # --only: the other sections' results are kept
    assert sorted(again) == sorted(ALL) and again["toy"] == first["toy"]
    assert again["environment"]["time"] >= first["environment"]["time"]


def test_a_section_cut_off_keeps_what_it_measured(tmp_path, monkeypatch):
    """A decode section past its limit: the modes measured before it are kept, with status timeout."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(gpu_check, "__file__", str(tmp_path / "stand_in.py"))
    (tmp_path / "stand_in.py").write_text(
        "import json, os, time\n"
        "from pathlib import Path\n"
        "Path(os.environ['GPU_CHECK_PARTIAL']).write_text(json.dumps({'rows': [{'mode': 'graphs', 'tokens/s': 1}]}))\n"
        "time.sleep(60)\n")
    record = gpu_check.spawn_section("decode-8b-64", "cpu", True, limit=3)
    assert record["status"] == "timeout" and record["rows"] == [{"mode": "graphs", "tokens/s": 1}]
