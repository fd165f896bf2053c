"""`mtcore train --policy --reward --prompts` end to end on tiny random checkpoints shaped like the real run's:
the real Llama-3 tokenizer (vocabulary 128,256, Llama-3-Instruct's chat template), llama3 RoPE scaling, a bf16
policy, an RM of LlamaForSequenceClassification form whose pad id is <|eot_id|>, and an --rm-eval file."""

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from conftest import LLAMA3_SCALING, make_hf_model
from test_loop import TINY


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_cpu_path")]

BEGIN, EOT = 128000, 128009
MOVED = 1e-3  # what "the loss moved" means: a change the summary's 4 decimals and the plot show


def _checkpoints(root, tokenizer_dir, names=("policy", "reward"), n_prompts=24, context=128):
    from transformers import AutoTokenizer

    from mtcore import toy
    from mtcore.data import LLAMA3_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    shape = dict(vocab_size=128256, bos_token_id=BEGIN, eos_token_id=EOT, rope_scaling=LLAMA3_SCALING,
                 rope_theta=500000.0, max_position_embeddings=context)
    policy = make_hf_model("policy", seed=0, pad_token_id=None, **shape).to(torch.bfloat16)
    reward = make_hf_model("reward", seed=1, pad_token_id=EOT, **shape)  # pad_token = eos_token, as recipes do
    for name, model in zip(names, (policy, reward)):
        model.save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in toy.make_prompts(n_prompts, seed=5)))
    pairs = root / "rm_eval.jsonl"
    rows = [{"prompt": "sort 3 1 2", "chosen": "1 2 3", "rejected": "3 2 1", "subset": "alpacaeval-easy"},
            {"prompt": "sort 9 8", "chosen": "8 9", "rejected": "9", "subset": "mt-bench-hard"},
            {"prompt": "sort 5 5 1", "chosen": "1 5 5", "rejected": "5 1", "subset": "donotanswer"},
            {"prompt": "sort 4 2", "chosen": "2 4", "rejected": "4 2", "subset": "hep-go"}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / names[0], root / names[1], prompts, pairs


def test_real_shaped_two_iterations(tmp_path, llama3_tokenizer_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from mtcore.cli import main

    policy, reward, prompts, pairs = _checkpoints(tmp_path, llama3_tokenizer_path)
    args = ["train", "--policy", policy, "--reward", reward, "--prompts", prompts, "--iters", 2, "--rm-eval", pairs,
            "--out", tmp_path / "run"]
    for k, v in {**TINY, "tau": 0.0, "save_every": 1}.items():
        args += [f"--{k.replace('_', '-')}", v]
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "── iteration 2 ──" in result.output and "RM eval Chat" in result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [e["iteration"] for e in metrics["iterations"]] == [1, 2] and metrics["stopped_at"] is None
    assert set(metrics["initial_rmeval"]["sections"]) == {"Chat", "Chat Hard", "Safety", "Reasoning"}
    for entry in metrics["iterations"]:
        d = tmp_path / "run" / f"iter_{entry['iteration']}"
        sel = entry["select"]
        assert len(sel["win_rates"]) >= 2  # several candidates were judged ...
        assert [p.name for p in (d / "candidates").iterdir()] == [f"step_{sel['best_step']}"]  # ... one is kept
        rm_eval = entry["rmeval"]
        assert rm_eval["pairs"] == 4 and 0.0 <= rm_eval["average"] <= 1.0
        # the policy is kept as the source policy is (bf16), the RM as the base RM is (fp32); both load
        with safe_open(str(d / "policy" / "model.safetensors"), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        hf_policy = AutoModelForCausalLM.from_pretrained(str(d / "policy"))
        assert hf_policy.dtype == torch.bfloat16 and hf_policy.config.vocab_size == 128256
        hf_reward = AutoModelForSequenceClassification.from_pretrained(str(d / "reward"))
        assert hf_reward.dtype == torch.float32 and hf_reward.config.pad_token_id == EOT
        with torch.no_grad():
            assert torch.isfinite(hf_reward(torch.tensor([[BEGIN, 16, 17, EOT]])).logits).all()


def test_the_readmes_own_model_command_completes_two_iterations(tmp_path, llama3_tokenizer_path, monkeypatch):
    """The README's "your own model" command, verbatim, on tiny Llama-3-shaped models (the real tokenizer
    and chat template, an 8192-token context) and 100 prompts: 2 iterations, each passing selection."""
    import shlex

    from transformers import AutoModelForCausalLM

    from mtcore.cli import main

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    command = [line for line in readme.splitlines() if line.startswith("mtcore train --config small")]
    assert len(command) == 1, command
    args = shlex.split(command[0])[1:]
    monkeypatch.chdir(tmp_path)
    _checkpoints(tmp_path, llama3_tokenizer_path, names=("my-policy", "my-reward"), n_prompts=100, context=8192)
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = tmp_path / args[args.index("--out") + 1]
    metrics = json.loads((run / "metrics.json").read_text())
    assert [e["iteration"] for e in metrics["iterations"]] == [1, 2] and metrics["stopped_at"] is None
    assert all(not e["select"]["stopped"] and len(e["select"]["win_rates"]) == 2 for e in metrics["iterations"])
    assert metrics["final_policy"] == "iter_2/policy"
    for t in (1, 2):  # the small config shows learning: the DPO loss leaves log 2 (0.6931) visibly
        losses = [json.loads(line)["loss"] for line in (run / f"iter_{t}" / "dpo_metrics.jsonl").read_text().splitlines()]
        assert len(losses) == 8 and abs(losses[0] - math.log(2)) < 1e-4, losses
        assert min(losses) < math.log(2) - MOVED, losses
    assert f"done: 2 iterations\n  final policy  {run.relative_to(tmp_path)}/iter_2/policy" in result.output
    assert AutoModelForCausalLM.from_pretrained(str(run / "iter_2" / "policy")).config.vocab_size == 128256
