"""Checkpoints: load from Hugging Face layouts, save so transformers loads the same model, clear errors."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import LLAMA3_SCALING, make_hf_model, save_hf
from mtcore import MtcoreError, load_model, save_model
from mtcore.checkpoint import INDEX_NAME


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


TOKENS = torch.randint(0, 96, (2, 23), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tied", [False, True])
def test_policy_save_loads_in_transformers(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    hf = make_hf_model("policy", seed=1, tie_word_embeddings=tied, rope_scaling=LLAMA3_SCALING)
    ours = load_model(save_hf(hf, tmp_path / "src"))
    with torch.no_grad():  # make the saved weights differ from the source, so a copy would not pass
        ours.model.norm.weight.mul_(1.5)
        ours.head_weight.mul_(0.5)
    save_model(ours, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert (tmp_path / "out" / "generation_config.json").exists()
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).float().eval()
    assert back.config.tie_word_embeddings == tied
    with torch.no_grad():
        assert max_err(back(TOKENS).logits, ours.logits(TOKENS)) <= 1e-4
        assert max_err(back(TOKENS).logits, hf(TOKENS).logits) > 1e-3


def test_reward_save_loads_in_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification

    hf = make_hf_model("reward", seed=2)
    ours = load_model(save_hf(hf, tmp_path / "src"), kind="reward")
    with torch.no_grad():
        ours.score.weight.mul_(-2.0)
    save_model(ours, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    back = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).float().eval()
    assert back.config.num_labels == 1
    with torch.no_grad():
        expected = back(TOKENS).logits.squeeze(-1)
        assert max_err(expected, ours.rewards(TOKENS)) <= 1e-4
        assert max_err(expected, hf(TOKENS).logits.squeeze(-1)) > 1e-3


def test_sharded_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = make_hf_model("policy", seed=3)
    ours = load_model(save_hf(hf, tmp_path / "src"))
    save_model(ours, tmp_path / "out", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "out" / s).exists() for s in shards)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    again = load_model(tmp_path / "out")
    for (name, p), q in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).float().eval()
    with torch.no_grad():
        assert max_err(back(TOKENS).logits, ours.logits(TOKENS)) <= 1e-4


def test_transformers_sharded_checkpoint_loads(tmp_path):
    hf = make_hf_model("policy", seed=4)
    hf.save_pretrained(str(tmp_path / "src"), max_shard_size="30KB")
    assert (tmp_path / "src" / INDEX_NAME).exists()
    ours = load_model(tmp_path / "src")
    with torch.no_grad():
        assert max_err(ours.logits(TOKENS), hf(TOKENS).logits) <= 1e-4


def test_dtype_and_meta_free_load(tmp_path):
    hf = make_hf_model("policy", seed=5, tie_word_embeddings=True)
    path = save_hf(hf, tmp_path / "src")
    model = load_model(path, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, hf.model.embed_tokens.weight.bfloat16())
    save_model(model, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_model(tmp_path / "bf16", dtype=torch.float32).model.norm.weight.dtype == torch.float32


def test_save_replaces_existing_directory(tmp_path):
    hf = make_hf_model("policy", seed=6)
    model = load_model(save_hf(hf, tmp_path / "src"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.safetensors").write_text("junk")
    save_model(model, tmp_path / "out")
    assert not (tmp_path / "out" / "stale.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp directories left


def test_tokenizer_files_travel_with_the_model(tmp_path, llama3_tokenizer_path):
    from transformers import AutoTokenizer

    from mtcore.data import load_tokenizer

    hf = make_hf_model("policy", seed=7)
    model = load_model(save_hf(hf, tmp_path / "src"))
    tokenizer = load_tokenizer(llama3_tokenizer_path, chat_template="llama3")
    save_model(model, tmp_path / "out", tokenizer=tokenizer)
    back = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert back.encode("Hello world") == tokenizer.encode("Hello world")
    # a class name transformers 4.x knows too (5.x writes "TokenizersBackend")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    assert back.chat_template == tokenizer.chat_template
    save_model(load_model(tmp_path / "out"), tmp_path / "copy")  # no tokenizer given: copied from the source
    assert AutoTokenizer.from_pretrained(str(tmp_path / "copy")).chat_template == tokenizer.chat_template


def test_copied_tokenizer_config_is_made_portable(tmp_path):
    """A source saved by transformers 5 names "TokenizersBackend" (4.x cannot load it); the copy that
    save_model makes (no tokenizer given, as `mtcore convert`) names PreTrainedTokenizerFast."""
    src = save_hf(make_hf_model("policy", seed=2), tmp_path / "src")
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend", "x": 1}))
    save_model(load_model(src), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == \
        {"tokenizer_class": "PreTrainedTokenizerFast", "x": 1}


# ---- bad input: one clear line, no traceback ----

def test_missing_directory(tmp_path):
    with pytest.raises(MtcoreError, match="no such checkpoint directory"):
        load_model(tmp_path / "nope")


def isolate_hub_cache(monkeypatch, cache):
    """Point huggingface_hub at an empty cache and offline mode (its constants are read at import)."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)


def test_hub_id_offline_and_not_cached(tmp_path, monkeypatch):
    isolate_hub_cache(monkeypatch, tmp_path / "hub")
    with pytest.raises(MtcoreError) as e:
        load_model("meta-llama/Meta-Llama-3-8B-Instruct")
    msg = str(e.value)
    assert "meta-llama/Meta-Llama-3-8B-Instruct" in msg and "hf download" in msg, msg
    assert "\n" not in msg


def test_hub_id_found_in_cache(tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache layout (models--org--name/snapshots/rev)."""
    isolate_hub_cache(monkeypatch, tmp_path / "hub")
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    save_hf(make_hf_model("policy", seed=8), repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    model = load_model("acme/tiny-llama")
    assert model.args.vocab_size == 97


def test_malformed_config(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama",\n "vocab_size": }')
    with pytest.raises(MtcoreError, match=r"config.json:2: not valid JSON"):
        load_model(tmp_path / "m")


def test_not_a_llama(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(MtcoreError, match="Llama checkpoints only"):
        load_model(tmp_path / "m")


def test_unsupported_rope(tmp_path):
    hf = make_hf_model("policy", seed=9)
    path = save_hf(hf, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MtcoreError, match="rope_type 'yarn' is not supported"):
        load_model(path)


def test_no_weights_and_pickle_weights(tmp_path):
    hf = make_hf_model("policy", seed=10)
    path = save_hf(hf, tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(MtcoreError, match="no \\*.safetensors weights"):
        load_model(path)
    (path / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(MtcoreError, match="safetensors only"):
        load_model(path)


def test_corrupt_safetensors(tmp_path):
    path = save_hf(make_hf_model("policy", seed=11), tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MtcoreError, match="not a readable safetensors file"):
        load_model(path)


def test_wrong_kind(tmp_path):
    policy = save_hf(make_hf_model("policy", seed=12), tmp_path / "p")
    reward = save_hf(make_hf_model("reward", seed=12), tmp_path / "r")
    with pytest.raises(MtcoreError, match="looks like a policy"):
        load_model(policy, kind="reward")
    with pytest.raises(MtcoreError, match="looks like a reward model"):
        load_model(reward, kind="policy")


def test_shape_mismatch(tmp_path):
    path = save_hf(make_hf_model("policy", seed=13), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MtcoreError, match="config.json implies"):
        load_model(path)


def test_cli_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mtcore", "info", str(tmp_path / "missing")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "no such checkpoint directory" in result.stderr


def test_cli_info_and_convert(tmp_path):
    from click.testing import CliRunner

    from mtcore.cli import main

    save_hf(make_hf_model("reward", seed=14), tmp_path / "rm")
    runner = CliRunner()
    result = runner.invoke(main, ["info", str(tmp_path / "rm")])
    assert result.exit_code == 0, result.output
    assert "Llama reward" in result.output and "2 layers" in result.output, result.output
    n_params = sum(p.numel() for p in make_hf_model("reward", seed=14).parameters())
    assert f"{n_params / 1e6:.2f}M parameters (F32)" in result.output
    result = runner.invoke(main, ["convert", str(tmp_path / "rm"), str(tmp_path / "rm16"), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    from safetensors import safe_open

    with safe_open(str(tmp_path / "rm16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "rm16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = load_model(tmp_path / "rm16", kind="reward")
    assert model.score.weight.dtype == torch.float32  # fp32 on CPU unless asked otherwise


GOOD_CONFIG = {"model_type": "llama", "vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 1,
               "num_attention_heads": 4, "intermediate_size": 8}


@pytest.mark.parametrize("bad, message", [
    ([1, 2], "must hold a JSON object"),
    (GOOD_CONFIG | {"vocab_size": "97"}, "vocab_size must be a positive int"),
    (GOOD_CONFIG | {"rope_parameters": 5}, "must be an object"),
    (GOOD_CONFIG | {"num_attention_heads": 0}, "num_attention_heads must be a positive int"),
    (GOOD_CONFIG | {"tie_word_embeddings": "yes"}, "tie_word_embeddings must be a bool"),
    ({k: v for k, v in GOOD_CONFIG.items() if k != "hidden_size"}, "missing key 'hidden_size'"),
])
def test_malformed_config_values(tmp_path, bad, message):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(MtcoreError, match=message):
        load_model(tmp_path / "m")


def test_weights_the_config_does_not_use(tmp_path):
    from transformers import LlamaForSequenceClassification

    three = save_hf(make_hf_model("policy", seed=15, num_hidden_layers=3), tmp_path / "three")
    cfg = json.loads((three / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (three / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MtcoreError, match="checkpoint has model.layers.2"):
        load_model(three)
    torch.manual_seed(0)
    from conftest import tiny_config

    config = tiny_config(tie_word_embeddings=True)
    config.num_labels = 1
    tied_rm = save_hf(LlamaForSequenceClassification(config), tmp_path / "tied_rm")
    with pytest.raises(MtcoreError, match="score.weight.*load it with kind='reward'"):
        load_model(tied_rm, kind="policy")


def test_index_names_a_tensor_its_shard_lacks(tmp_path):
    path = save_hf(make_hf_model("policy", seed=16), tmp_path / "m")
    save_model(load_model(path), tmp_path / "sharded", max_shard_bytes=20_000)
    index_file = tmp_path / "sharded" / INDEX_NAME
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]
    index_file.write_text(json.dumps(index))
    with pytest.raises(MtcoreError, match=f"lacks {name}"):
        load_model(tmp_path / "sharded")
    index_file.write_text('{"weight_map": [1]}')
    with pytest.raises(MtcoreError, match="no weight_map object"):
        load_model(tmp_path / "sharded")


def test_save_to_an_unwritable_place(tmp_path):
    model = load_model(save_hf(make_hf_model("policy", seed=17), tmp_path / "m"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(MtcoreError, match="exists and is not a directory"):
        save_model(model, tmp_path / "file")
    with pytest.raises(MtcoreError, match="cannot write"):
        save_model(model, tmp_path / "file" / "sub")
    assert (tmp_path / "file").read_text() == "x"


def test_tests_without_the_cuda_mark_are_pinned_to_the_cpu(monkeypatch):
    """conftest sets MTCORE_DEVICE=cpu for every test not marked cuda; the default device honours it
    (so a GPU machine runs the CPU suite on the CPU), and an explicit device still wins."""
    import os

    from mtcore.device import default_device

    assert os.environ["MTCORE_DEVICE"] == "cpu" and default_device() == torch.device("cpu")
    monkeypatch.setenv("MTCORE_DEVICE", "meta")
    assert default_device("cpu") == torch.device("cpu")


def test_merged_projections_save_byte_identical_safetensors(tmp_path):
    """A model whose projections were merged for sampling (its parameters views of the merged weights)
    saves the same bytes as before merging, and reloads to them."""
    from mtcore.model import merge_projections
    src = save_hf(make_hf_model("policy", seed=5, rope_scaling=LLAMA3_SCALING), tmp_path / "src")
    save_model(load_model(src), tmp_path / "plain")
    save_model(merge_projections(load_model(src)), tmp_path / "merged")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "merged" / name).read_bytes()
    save_model(merge_projections(load_model(tmp_path / "merged")), tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "plain" / "model.safetensors").read_bytes()
