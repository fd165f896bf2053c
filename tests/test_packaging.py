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
    A stand-in package after the root gets the name."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("CUDAProperties = 'stand-in'\n")
    (tmp_path / "clone").symlink_to(REPO)  # the clone reached by a link too: still the same folder
    code = (f"import sys\nsys.path[:0] = [{str(REPO)!r}, {str(tmp_path / 'clone')!r}, {str(tmp_path)!r}]\n"
            "from kernels import CUDAProperties\nimport kernels\nprint(CUDAProperties, kernels.__file__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["stand-in", str(tmp_path / "kernels" / "__init__.py")]


# transformers 5.17's check for an optional package, `_is_package_available(name, return_version=True)`:
# found by find_spec, no distribution metadata, so imported for its version; no version and no __file__
# is a namespace package shadowing the name, read as not installed.
STAND_IN_CHECK = """
import importlib, importlib.metadata, importlib.util, json, sys
sys.path.insert(0, {root!r})
found = importlib.util.find_spec("kernels") is not None
try:
    version = importlib.metadata.version("kernels")
except importlib.metadata.PackageNotFoundError:
    module = importlib.import_module("kernels")
    version = getattr(module, "__version__", "N/A")
    found = found and not (version == "N/A" and getattr(module, "__file__", None) is None)
try:
    import kernels.bt_loss
    beneath = True
except ImportError:
    beneath = False
print(json.dumps({{"found": found, "beneath": beneath}}))
"""


def test_a_clones_root_reads_as_no_kernels_where_hugging_faces_is_absent(tmp_path):
    """With no Hugging Face `kernels` (the GPU image's transformers 5.17), the clone's kernels/ must read as
    no package at all: raising ModuleNotFoundError escaped transformers' lazy imports, and
    `from transformers import LlamaForCausalLM` failed from a clone's root. `-S`: no site-packages, so no
    real `kernels` either."""
    out = subprocess.run([sys.executable, "-S", "-c", STAND_IN_CHECK.format(root=str(REPO))], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == {"found": False, "beneath": False}


def hugging_faces_kernels_installed() -> bool:
    try:
        distribution("kernels")
        return True
    except Exception:  # PackageNotFoundError
        return False


CLONE_ROOT_TRANSFORMERS = """
import json, sys
sys.path.insert(0, {root!r})
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils.import_utils import is_kernels_available
LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1))
import kernels
print(json.dumps({{"available": is_kernels_available(), "file": getattr(kernels, "__file__", None)}}))
"""


def test_transformers_from_a_clones_root_with_the_installed_versions(tmp_path):
    """The real transformers of this venv, from the clone's root: CI runs this with the newest versions
    (Hugging Face's `kernels` installed) and with the GPU image's (transformers 5.17, none installed)."""
    out = subprocess.run([sys.executable, "-c", CLONE_ROOT_TRANSFORMERS.format(root=str(REPO))],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    if hugging_faces_kernels_installed():
        assert found["file"] and not Path(found["file"]).resolve().is_relative_to(REPO / "kernels"), found
    else:
        assert found == {"available": False, "file": None}


def test_toy_train_from_a_clones_root(tmp_path):
    """`python -m mtcore train --iters 1` from the clone's root: the toy world's tokenizer and models load
    through transformers there too, whichever `kernels` this venv has."""
    out = subprocess.run([sys.executable, "-m", "mtcore", "train", "--iters", "1", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["final_iteration"] in (0, 1)
    assert (tmp_path / "run" / metrics["final_policy"] / "config.json").is_file()
