"""bench/gpu_check.py --dry-run: every section of the GPU check, at tiny shapes on the CPU, passes and
writes its results files (to the directory given, never into bench/results)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
ALL = ["environment", "pytest", "kernels", "decode", "train", "toy"]


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


def test_dry_run_sections(tmp_path):
    """Every section but the toy run (slow on a shared CPU; the slow test below runs it)."""
    records = dry_run(tmp_path, [s for s in ALL if s != "toy"])
    kernels = records["kernels"]["rows"]
    assert {(r["op"].split(" ")[0], r["provider"]) for r in kernels} == {
        (op, p) for op in ("fused", "DPO") for p in ("naive", "mtcore")}
    assert all(r["ms"] > 0 and r["peak MiB"] >= 0 for r in kernels)
    assert len(records["train"]["rows"]) == 4 and all(r["tokens/s"] > 0 for r in records["train"]["rows"])
    decode = records["decode"]["rows"]
    assert [r["slots"] for r in decode] == [1, 2, 4] * 2 + [6]  # two shapes, then blocks alone at 6 slots
    assert all(r["mtcore eager tokens/s"] > 0 and 0 < r["mtcore eager % of floor"] for r in decode[:6])
    assert all(r["tokens equal to transformers %"] == 100 for r in decode[:6])  # fp32, greedy, 4 tokens
    assert all(r["eager:3 same as eager"] for r in decode[:6])  # 3 steps per host visit: the same tokens
    assert decode[6]["mtcore eager:3 tokens/s"] > 0 and "transformers tokens/s" not in decode[6]
    assert "skipped" in records["pytest"]["rows"][0]["summary"]  # no CUDA here: the cuda tests skip


@pytest.mark.slow
def test_dry_run_every_section_then_only_one(tmp_path):
    first = dry_run(tmp_path, ALL)
    assert sorted(first) == sorted(ALL) and first["toy"]["rows"][0]["iterations"] == 1
    again = dry_run(tmp_path, ["environment"])  # --only: the other sections' results are kept
    assert sorted(again) == sorted(ALL) and again["toy"] == first["toy"]
    assert again["environment"]["time"] >= first["environment"]["time"]
