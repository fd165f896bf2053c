"""Rewards are read where transformers' LlamaForSequenceClassification reads them: at each sequence's last
token that is not the RM's pad id. With pad = <|eot_id|> (recipes that set pad_token = eos_token on
Llama-3-Instruct) that is the token before the closing <|eot_id|>; with a pad token of its own, the last
token. Checked against transformers for training batches (packed and padded) and for `mtcore score`."""

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import make_hf_model
from mtcore import load_model
from mtcore.data import Example, make_batch
from mtcore.train import reward_index, sequence_rewards


pytestmark = pytest.mark.usefixtures("torch_cpu_path")

EOT, FINETUNE_PAD, BEGIN = 128009, 128004, 128000


def hf_reward(model, ids: list[int]) -> float:
    """transformers' own reward of one unpadded sequence (its rule: the last token that is not the pad id)."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, 0].item()


def hf_reward_at_last_token(model, ids: list[int]) -> float:
    """The reward at the sequence's final token (what mtcore read before), from transformers' hidden states."""
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0, -1]
        return model.score(hidden).item()


@pytest.mark.parametrize("padded", [False, True])
def test_training_batches_read_rewards_where_transformers_does(tmp_path, padded):
    """Pairs whose sequences end in the pad id (pad = eot, 5), one with two trailing pads, one that
    holds the pad id mid-sequence too, one cut before its eot: sequence_rewards equals transformers'."""
    pad = 5
    hf = make_hf_model("reward", seed=3, pad_token_id=pad)
    hf.save_pretrained(str(tmp_path / "rm"))
    ours = load_model(tmp_path / "rm", kind="reward", dtype=torch.float32)
    seqs = [[1, 7, 9, 11, pad], [1, 7, 9, 13, 17, 19, pad], [1, 8, pad, 12, 14, pad, pad], [1, 8, 3, 21],
            [1, 30, 31, pad], [1, 30, 40, 41, 42, 43, 44, 45, 46, pad]]
    examples = [Example(((seqs[k], 2), (seqs[k + 1], 2))) for k in (0, 2, 4)]
    batch = make_batch(examples, [0, 1, 2], padded=padded)
    with torch.no_grad():
        got = sequence_rewards(ours, batch)
    expected = torch.tensor([hf_reward(hf, s) for s in seqs])
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-5, (got, expected)
    # the index itself: the last non-pad token of each sequence, in the batch's flat order
    flat = batch.tokens.flatten()
    starts = batch.seq_bounds[:-1].tolist()
    assert [flat[i].item() for i in reward_index(batch, pad).tolist()] == [11, 19, 14, 21, 31, 46]
    assert [i - s for i, s in zip(reward_index(batch, pad).tolist(), starts)] == [3, 5, 4, 3, 2, 8]
    # and the old rule (the last token) differs here, so this test can fail
    last = torch.tensor([hf_reward_at_last_token(hf, s) for s in seqs])
    assert (last - expected).abs().max() > 1e-3


def test_no_pad_id_reads_the_last_token(tmp_path):
    hf = make_hf_model("reward", seed=4, pad_token_id=None)
    hf.save_pretrained(str(tmp_path / "rm"))
    ours = load_model(tmp_path / "rm", kind="reward", dtype=torch.float32)
    seqs = [[1, 7, 9, 2], [1, 8, 2, 2]]
    batch = make_batch([Example(((seqs[0], 2), (seqs[1], 2)))], [0])
    assert reward_index(batch, None).tolist() == [3, 7]
    with torch.no_grad():
        got = sequence_rewards(ours, batch)
    expected = torch.tensor([hf_reward(hf, s) for s in seqs])  # batch of one: transformers reads the last token
    assert (got - expected).abs().max() <= 1e-5


def _llama3_rm(path, tokenizer_dir, pad_token_id, seed):
    """A tiny random LlamaForSequenceClassification on the real Llama-3 vocabulary, saved with the real
    tokenizer (Llama-3-Instruct's chat template added, as Llama-3-8B-Instruct ships it)."""
    from transformers import AutoTokenizer

    from mtcore.data import LLAMA3_CHAT_TEMPLATE

    model = make_hf_model("reward", seed=seed, vocab_size=128256, bos_token_id=BEGIN, eos_token_id=EOT,
                          pad_token_id=pad_token_id)
    model.save_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    tok.save_pretrained(str(path))
    return model, tok


ROWS = [{"prompt": "What is 2+2?", "responses": ["4, of course.", "Five .", ""]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
         "responses": ["Blue", "I would say: green , or red!"]}]


@pytest.mark.parametrize("pad_token_id", [EOT, FINETUNE_PAD])
def test_mtcore_score_equals_transformers(tmp_path, llama3_tokenizer_path, pad_token_id):
    """`mtcore score` against transformers on the full chat text (the conversation rendered by the chat
    template with the assistant's turn, tokenized by transformers): equal to 1e-4, for pad = <|eot_id|>
    and for a pad token of its own."""
    from mtcore.cli import main

    hf, tok = _llama3_rm(tmp_path / "rm", llama3_tokenizer_path, pad_token_id, seed=7)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    result = CliRunner().invoke(main, ["score", "--reward", str(tmp_path / "rm"), "--prompts-with-responses",
                                       str(data), "--out", str(tmp_path / "out.jsonl")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    got = [json.loads(line)["rewards"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    at_last = []
    for row, rewards in zip(ROWS, got):
        messages = [{"role": "user", "content": row["prompt"]}] if "prompt" in row else row["messages"]
        for response, reward in zip(row["responses"], rewards):
            text = tok.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids[0] == BEGIN and ids[-1] == EOT
            expected = hf_reward(hf, ids)
            assert abs(reward - expected) <= 1e-4, (response, reward, expected)
            at_last.append(abs(hf_reward_at_last_token(hf, ids) - expected))
    # with pad = <|eot_id|> transformers reads before the final eot, so the old rule would fail here
    assert (max(at_last) > 1e-3) == (pad_token_id == EOT)


@pytest.mark.parametrize("padded", [False, True])
def test_the_toy_worlds_rewards_do_not_move(padded):
    """The toy world's pad id is a token of its own, which encoded text never contains: every sequence's
    reward is read at its last token, exactly as before (the same index, hence the same bits)."""
    from mtcore import toy
    from mtcore.data import encode_pair, load_tokenizer
    from test_loop import read_jsonl

    tok = load_tokenizer(toy.asset("reward"))
    rows = read_jsonl(toy.asset("heldout_pairs.jsonl"))
    examples = [encode_pair(tok, r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    model = load_model(toy.asset("reward"), kind="reward", dtype=torch.float32)
    assert model.args.pad_token_id == tok.pad_token_id and tok.pad_token_id != tok.convert_tokens_to_ids("<|eot_id|>")
    for start in range(0, len(examples), 64):
        batch = make_batch(examples, list(range(start, min(start + 64, len(examples)))), padded=padded)
        assert torch.equal(reward_index(batch, model.args.pad_token_id), batch.last_index)
