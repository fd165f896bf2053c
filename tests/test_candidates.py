"""Checkpoints for a real run: saved in the source checkpoint's dtype, readable by others (the umask's
permissions), and, after select, only the chosen candidate kept (unless --keep-candidates), with a kill
during or after select still resuming to the uninterrupted run's result."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from conftest import make_hf_model, tiny_world
from mtcore import load_model
from mtcore.checkpoint import save_model, stored_dtype
from test_loop import tiny_config


pytestmark = pytest.mark.usefixtures("torch_cpu_path")


def stored_dtypes(path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_saved_in_the_source_checkpoints_dtype(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = make_hf_model("policy", seed=2)
    hf.save_pretrained(str(tmp_path / "fp32"))
    hf.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    assert stored_dtype(tmp_path / "fp32") == torch.float32 and stored_dtype(tmp_path / "bf16") == torch.bfloat16
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())  # without a dtype key: the tensors'
    config.pop("torch_dtype", None), config.pop("dtype", None)
    (tmp_path / "bf16" / "config.json").write_text(json.dumps(config))
    assert stored_dtype(tmp_path / "bf16") == torch.bfloat16
    # trained in fp32 from the bf16 source, saved as bf16: the same bits back, and transformers reads bf16
    model = load_model(tmp_path / "bf16", dtype=torch.float32)
    save_model(model, tmp_path / "out", dtype=stored_dtype(tmp_path / "bf16"))
    assert stored_dtypes(tmp_path / "out") == {"BF16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert back.dtype == torch.bfloat16
    for name, p in hf.named_parameters():
        assert torch.equal(dict(back.named_parameters())[name], p), name
    save_model(model, tmp_path / "default")  # no dtype: the model's own
    assert stored_dtypes(tmp_path / "default") == {"F32"}


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_weights_files_get_the_umasks_permissions(tmp_path, umask):
    """safetensors writes 0600 whatever the umask; every file of a saved checkpoint, shards included,
    has the mode any new file gets (0o666 less the umask)."""
    model = load_model(tiny_world(tmp_path)[0])
    old = os.umask(umask)
    try:
        save_model(model, tmp_path / "one")
        save_model(model, tmp_path / "sharded", max_shard_bytes=20_000)
    finally:
        os.umask(old)
    weights = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(weights) > 2
    for f in [tmp_path / "one" / "model.safetensors", tmp_path / "one" / "config.json", *weights]:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, (f.name, oct(f.stat().st_mode))


def _select_outcome(run_dir):
    """What select decided and left: its result (without wall times), the candidates on disk, the policy's bytes."""
    d = run_dir / "iter_1"
    result = {k: v for k, v in json.loads((d / "select.json").read_text()).items() if k != "profile"}
    return (result, sorted(p.name for p in (d / "candidates").iterdir()),
            (d / "policy" / "model.safetensors").read_bytes())


class Killed(BaseException):
    """A kill, simulated in-process: nothing catches it on the way out."""


def test_a_kill_during_or_after_select_resumes_to_the_same_result(tmp_path, monkeypatch):
    from mtcore import mutual_taught
    from mtcore.loop import train
    from mtcore.rundir import Run

    policy, reward, prompts = tiny_world(tmp_path)
    cfg = tiny_config(policy, reward, prompts, iters=1, m_step=False, save_every=1)  # 4 DPO steps, 4 candidates
    train(Run(tmp_path / "whole", cfg), echo=lambda s: None)
    whole = _select_outcome(tmp_path / "whole")
    best = whole[0]["best_step"]
    assert len(whole[0]["win_rates"]) == 4 and whole[1] == [f"step_{best}"]  # the others were removed

    # killed in the middle of select (after a candidate was judged): rerun, keeping every candidate this
    # time (a runtime option), then once more without --keep-candidates: the others go then
    calls = []
    real_win_rate = mutual_taught.win_rate

    def dying_win_rate(*args):
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return real_win_rate(*args)

    with monkeypatch.context() as patch, pytest.raises(Killed):  # undoes only this patch (not torch_cpu_path's)
        patch.setattr(mutual_taught, "win_rate", dying_win_rate)
        train(Run(tmp_path / "in_select", cfg), echo=lambda s: None)
    state = json.loads((tmp_path / "in_select" / "state.json").read_text())
    assert "iter_1/dpo" in state["done"] and "iter_1/select" not in state["done"]
    train(Run(tmp_path / "in_select", tiny_config(policy, reward, prompts, iters=1, m_step=False, save_every=1,
                                                  keep_candidates=True)), echo=lambda s: None)
    kept = _select_outcome(tmp_path / "in_select")
    assert kept[0] == whole[0] and kept[1] == ["step_1", "step_2", "step_3", "step_4"] and kept[2] == whole[2]
    train(Run(tmp_path / "in_select", cfg), echo=lambda s: None)
    assert _select_outcome(tmp_path / "in_select") == whole

    # killed after select was recorded, part-way through removing the candidates
    removed = []
    real_rmtree = shutil.rmtree

    def dying_rmtree(path, *args, **kwargs):
        if os.path.basename(os.path.dirname(path)) == "candidates" and os.path.basename(path).startswith("step_"):
            if removed:
                raise Killed
            removed.append(path)
        return real_rmtree(path, *args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(Killed):
        patch.setattr(shutil, "rmtree", dying_rmtree)
        train(Run(tmp_path / "in_prune", cfg), echo=lambda s: None)
    assert "iter_1/select" in json.loads((tmp_path / "in_prune" / "state.json").read_text())["done"]
    assert len(list((tmp_path / "in_prune" / "iter_1" / "candidates").iterdir())) == 3  # one of three removed
    metrics = train(Run(tmp_path / "in_prune", cfg), echo=lambda s: None)
    assert _select_outcome(tmp_path / "in_prune") == whole
    assert metrics["final_policy"] == "iter_1/policy" and metrics["final_iteration"] == 1
