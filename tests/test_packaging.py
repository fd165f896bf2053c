"""Packaging: kernels/ installs as mtcore.kernels only, in editable and regular installs, and never
shadows Hugging Face's top-level `kernels` (which transformers 5.25 depends on and imports), not even
from a clone's root on sys.path."""

import json
import os
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest

import mtcore

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json, sys
import mtcore, mtcore.kernels
spec = importlib.util.find_spec("kernels")
import torch, transformers
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1)
model = LlamaForCausalLM(cfg)
out = model(torch.tensor([[1, 2, 3]])).logits
print(json.dumps({"mtcore": mtcore.__file__, "kernels": mtcore.kernels.__file__,
                  "top_level_kernels": spec.origin if spec else None,
                  "logits_shape": list(out.shape)}))
"""


def probe(env=None, cwd=None):
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_no_shadow(found):
    assert found["logits_shape"] == [1, 3, 32]
    origin = found["top_level_kernels"]
    # Hugging Face's package may live under REPO (CI's venv is the clone's .venv), never in kernels/
    assert origin is None or not Path(origin).resolve().is_relative_to(REPO / "kernels"), origin


def test_installed_mtcore_keeps_transformers_working(tmp_path):
    found = probe(cwd=tmp_path)
    assert Path(found["kernels"]).parent.name in ("kernels",)  # editable: the repo's kernels/
    assert_no_shadow(found)


def test_editable_install_maps_kernels_folder(tmp_path):
    direct = distribution("mtcore").read_text("direct_url.json")
    if not direct or not json.loads(direct).get("dir_info", {}).get("editable"):
        pytest.skip("mtcore is not installed in editable mode here")
    found = probe(cwd=tmp_path)
    assert Path(found["kernels"]).resolve() == REPO / "kernels" / "__init__.py"
    assert Path(found["mtcore"]).resolve() == REPO / "mtcore" / "__init__.py"


def test_regular_install(tmp_path):
    target = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                             "--no-index", "--quiet", "--target", str(target), str(REPO)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (target / "mtcore" / "kernels" / "__init__.py").exists()
    assert not (target / "kernels").exists()
    env = dict(os.environ, PYTHONPATH=str(target))
    found = probe(env=env, cwd=tmp_path)
    assert Path(found["kernels"]).resolve() == (target / "mtcore" / "kernels" / "__init__.py").resolve()
    assert_no_shadow(found)


def test_console_script_lists_commands():
    """The installed `mtcore` script, found beside the interpreter (its venv's bin need not be on PATH)."""
    script = Path(sys.executable).parent / "mtcore"
    assert script.is_file(), f"{script}: no console script beside the interpreter; pip install -e ."
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "convert" in result.stdout and "info" in result.stdout
    assert mtcore.__version__


def test_a_clones_root_hands_the_name_kernels_to_hugging_faces_package(tmp_path):
    """`python -m mtcore` in a clone puts the clone's root first on sys.path, where kernels/ (installed as
    mtcore.kernels) would shadow Hugging Face's `kernels`, which transformers 5.25 depends on and imports
    while loading a checkpoint: `from kernels import CUDAProperties` failed, and with it every tokenizer.
    A stand-in package after the root gets the name; with none, the import fails as a missing package."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("CUDAProperties = 'stand-in'\n")
    (tmp_path / "clone").symlink_to(REPO)  # the clone reached by a link too: still the same folder
    code = (f"import sys\nsys.path[:0] = [{str(REPO)!r}, {str(tmp_path / 'clone')!r}, {str(tmp_path)!r}]\n"
            "from kernels import CUDAProperties\nimport kernels\nprint(CUDAProperties, kernels.__file__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["stand-in", str(tmp_path / "kernels" / "__init__.py")]

    (tmp_path / "elsewhere").mkdir()
    code = f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport kernels\n"
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         cwd=tmp_path / "elsewhere")
    assert out.returncode != 0 and "ModuleNotFoundError: No module named 'kernels'" in out.stderr, out.stderr
