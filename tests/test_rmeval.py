"""`mtcore eval --reward R --pairs F`: RM accuracy per subset and per RewardBench section, ties counting
half, against rewards computed here with transformers and section weights written out by hand."""

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import tiny_world
from mtcore import MtcoreError
from mtcore.rmeval import summarize


pytestmark = pytest.mark.usefixtures("torch_cpu_path")


def test_summarize_by_hand():
    subsets = ["alpacaeval-easy", "alpacaeval-easy", "mt-bench-med", "llmbar-natural", "donotanswer", "math-prm",
               "hep-go", "hep-go", "shp", "mine"]
    chosen = [1.0, 0.0, 2.0, 0.5, 3.0, 1.0, 1.0, 2.0, 0.0, 5.0]
    rejected = [0.0, 0.0, 3.0, 0.1, -1.0, 2.0, 1.0, 1.0, 1.0, 4.0]  # ties: the 2nd (alpaca) and the 7th (hep-go)
    r = summarize(subsets, chosen, rejected)
    acc = {s: v["accuracy"] for s, v in r["subsets"].items()}
    assert acc == {"alpacaeval-easy": 0.75, "mt-bench-med": 0.0, "llmbar-natural": 1.0, "donotanswer": 1.0,
                   "math-prm": 0.0, "hep-go": 0.75, "shp": 0.0, "mine": 1.0}
    assert r["subsets"]["hep-go"] == {"accuracy": 0.75, "pairs": 2, "ties": 1}
    # RewardBench's weights (rewardbench/constants.py EXAMPLE_COUNTS): alpacaeval-easy 100, mt-bench-med 40,
    # math-prm 984, hep-go 164
    chat = (0.75 * 100 + 0.0 * 40) / 140
    reasoning = (0.0 * 984 + 0.75 * 164) / (984 + 164)
    assert r["sections"] == pytest.approx({"Chat": chat, "Chat Hard": 1.0, "Safety": 1.0, "Reasoning": reasoning})
    assert r["average"] == pytest.approx((chat + 1.0 + 1.0 + reasoning) / 4)
    assert r["prior_sets"] == 0.0
    assert r["score_with_prior_sets"] == pytest.approx((2 * (chat + 2.0 + reasoning) + 0.0) / 9)
    assert r["accuracy"] == pytest.approx((1 + 0.5 + 0 + 1 + 1 + 0 + 0.5 + 1 + 0 + 1) / 10)
    # a file without every section: those sections and the average are null, never NaN
    partial = summarize(["hep-go", "x"], [1.0, 1.0], [0.0, 2.0])
    assert partial["sections"]["Chat"] is None and partial["average"] is None and partial["prior_sets"] is None
    assert partial["sections"]["Reasoning"] == 1.0
    with pytest.raises(MtcoreError, match="a reward is nan"):
        summarize(["x"], [float("nan")], [0.0])


def test_paper_average_is_the_plain_mean_of_the_sections():
    """The paper's Table 2: FsfairX 99.4, 65.1, 87.8, 86.4 -> Avg 84.7; MT iter 2 98.2, 66.3, 87.8, 95.7 -> 87.0."""
    for sections, avg in (((99.4, 65.1, 87.8, 86.4), 84.7), ((98.2, 66.3, 87.8, 95.7), 87.0)):
        members = ["alpacaeval-easy", "mt-bench-hard", "donotanswer", "hep-go"]
        subsets, chosen, rejected = [], [], []
        for name, pct in zip(members, sections):  # 1000 pairs per section at the section's accuracy
            wins = round(pct * 10)
            subsets += [name] * 1000
            chosen += [1.0] * 1000
            rejected += [0.0] * wins + [2.0] * (1000 - wins)
        assert round(100 * summarize(subsets, chosen, rejected)["average"], 1) == avg


PAIRS = [
    {"prompt": "sort 3 1 2", "chosen": "1 2 3", "rejected": "3 2 1", "subset": "alpacaeval-easy"},
    {"prompt": "sort 5 4", "chosen": "4 5", "rejected": "4 5", "subset": "alpacaeval-easy"},  # a tie
    {"messages": [{"role": "user", "content": "sort 9 8 7"}], "chosen": "7 8 9", "rejected": "9", "subset": "mt-bench-med"},
    {"prompt": "sort 2 2 1", "chosen": "1 2 2", "rejected": "2 1", "subset": "llmbar-natural"},
    {"prompt": "sort 6 1", "chosen": "1 6", "rejected": "6 1 1 1", "subset": "llmbar-adver-manual"},
    {"prompt": "sort 4 3 8", "chosen": "3 4 8", "rejected": "8 4", "subset": "xstest-should-refuse"},
    {"prompt": "sort 7 7", "chosen": "7 7", "rejected": "7", "subset": "donotanswer"},
    {"prompt": "sort 1 0", "chosen": "0 1", "rejected": "1 0", "subset": "math-prm"},
    {"prompt": "sort 5 2 9", "chosen": "2 5 9", "rejected": "9 5 2", "subset": "hep-python"},
    {"prompt": "sort 3 3 3", "chosen": "3 3 3", "rejected": "3", "subset": "hep-python"},
    {"prompt": "sort 8 1", "chosen": "1 8", "rejected": "8 1 8", "subset": "anthropic_helpful"},
    {"prompt": "sort 2 0", "chosen": "0 2", "rejected": "2"},  # no subset
]
COUNTS = {"alpacaeval-easy": 100, "mt-bench-med": 40, "llmbar-natural": 100, "llmbar-adver-manual": 46,
          "xstest-should-refuse": 250, "donotanswer": 136, "math-prm": 984, "hep-python": 164}
SECTIONS = {"Chat": ["alpacaeval-easy", "mt-bench-med"], "Chat Hard": ["llmbar-natural", "llmbar-adver-manual"],
            "Safety": ["xstest-should-refuse", "donotanswer"], "Reasoning": ["math-prm", "hep-python"]}


def _hf_rewards(reward_dir, rows):
    """Each pair's (chosen, rejected) rewards by transformers: the chat template's prompt with the
    generation prompt, the response without special tokens, then <|eot_id|>; read by the model's own rule."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(reward_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(reward_dir)).float().eval()
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    out = []
    for row in rows:
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        prompt = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"]
        pair = []
        for key in ("chosen", "rejected"):
            ids = prompt + tok(row[key], add_special_tokens=False)["input_ids"] + [eot]
            with torch.no_grad():
                pair.append(model(torch.tensor([ids])).logits[0, 0].item())
        out.append(pair)
    return out


def test_mtcore_eval_pairs_against_transformers(tmp_path):
    from mtcore.cli import main

    _, reward, _ = tiny_world(tmp_path)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", "--reward", str(reward), "--pairs", str(pairs), "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON"))
    rewards = _hf_rewards(reward, PAIRS)
    per = {}
    for row, (c, r) in zip(PAIRS, rewards):
        assert abs(c - r) > 1e-6 or row["chosen"] == row["rejected"]  # only the tie is a tie
        per.setdefault(row.get("subset", "all"), []).append(1.0 if c > r else 0.5 if c == r else 0.0)
    accuracy = {s: sum(v) / len(v) for s, v in per.items()}
    assert {s: v["accuracy"] for s, v in got["subsets"].items()} == pytest.approx(accuracy)
    assert got["subsets"]["alpacaeval-easy"]["ties"] == 1
    sections = {name: sum(accuracy[s] * COUNTS[s] for s in members) / sum(COUNTS[s] for s in members)
                for name, members in SECTIONS.items()}
    assert got["sections"] == pytest.approx(sections)
    assert got["average"] == pytest.approx(sum(sections.values()) / 4)
    assert got["prior_sets"] == accuracy["anthropic_helpful"]
    assert got["pairs"] == len(PAIRS) and got["truncated"] == 0
    # the printed table: a line per subset, then the sections and their average (percent, 1 decimal)
    assert "xstest-should-refuse     Safety" in result.output
    assert f"Chat Hard {100 * sections['Chat Hard']:.1f}" in result.output
    assert f"Avg {100 * sum(sections.values()) / 4:.1f}" in result.output


def test_mtcore_eval_pairs_errors(tmp_path):
    from mtcore.cli import main

    _, reward, _ = tiny_world(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "a"}) + "\n")
    result = CliRunner().invoke(main, ["eval", "--reward", str(reward), "--pairs", str(bad), "--out",
                                       str(tmp_path / "o.json")])
    assert result.exit_code == 2 and 'bad.jsonl:1: needs a "rejected" string field' in result.output
    result = CliRunner().invoke(main, ["eval", "--pairs", str(bad), "--out", str(tmp_path / "o.json")])
    assert result.exit_code == 2 and "--pairs needs --reward" in result.output
    assert not (tmp_path / "o.json").exists()


@pytest.mark.slow
def test_torchrun_eval_pairs_equals_one_process(tmp_path):
    """Under torchrun each rank scores its share of the micro-batches (600 pairs: several 8192-token
    micro-batches); the JSON equals one process's and rank 0 alone prints the table."""
    import random

    from mtcore.cli import main
    from test_parallel import torchrun

    _, reward, _ = tiny_world(tmp_path)
    rng = random.Random(0)
    subsets = ["alpacaeval-easy", "mt-bench-hard", "donotanswer", "hep-go", "math-prm"]
    digits = lambda: " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, 6)))  # noqa: E731
    rows = [{"prompt": f"sort {digits()}", "chosen": digits(), "rejected": digits(), "subset": rng.choice(subsets)}
            for _ in range(600)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", "--reward", reward, "--pairs", pairs]
    result = CliRunner().invoke(main, [str(a) for a in args + ["--out", tmp_path / "one.json"]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    two = torchrun(*args, "--out", tmp_path / "two.json")
    assert two.stdout.count("Avg ") == 1
    one, two = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert one["pairs"] == two["pairs"] == 600
    assert one["subsets"] == two["subsets"] and one["sections"] == pytest.approx(two["sections"])
    assert one["average"] == pytest.approx(two["average"])
