"""The chat format and sequence rule, on the real Llama-3 tokenizer (skipped where it is not installed)."""

import json

import pytest

from mtcore import MtcoreError
from mtcore.data import encode_prompt, encode_response, encode_sequence, load_tokenizer, stop_ids

BEGIN, START_HEADER, END_HEADER, EOT, END_OF_TEXT = 128000, 128006, 128007, 128009, 128001


def test_sequence_rule(llama3_tokenizer_path):
    tok = load_tokenizer(llama3_tokenizer_path, chat_template="llama3")
    ids, n_prompt = encode_sequence(tok, "What is 2+2?", "4, of course.")
    prompt, response = ids[:n_prompt], ids[n_prompt:]
    assert prompt[0] == BEGIN and prompt.count(BEGIN) == 1  # the template's bos only, never doubled
    assert prompt[-4:] == [START_HEADER] + tok.encode("assistant", add_special_tokens=False) + [END_HEADER] + \
        tok.encode("\n\n", add_special_tokens=False)
    assert response == tok.encode("4, of course.", add_special_tokens=False) + [EOT]
    assert tok.decode(response) == "4, of course.<|eot_id|>"
    assert tok.decode(prompt) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?"
                                  "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_messages_prompt_equals_string_prompt(llama3_tokenizer_path):
    tok = load_tokenizer(llama3_tokenizer_path, chat_template="llama3")
    assert encode_prompt(tok, "hi") == encode_prompt(tok, [{"role": "user", "content": "hi"}])
    multi = encode_prompt(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert multi.count(EOT) == 2 and multi[0] == BEGIN


def test_special_tokens_in_response_text_are_not_special(llama3_tokenizer_path):
    """A response that spells '<|eot_id|>' must not end early: text is encoded without special tokens."""
    tok = load_tokenizer(llama3_tokenizer_path, chat_template="llama3")
    ids = encode_response(tok, "a <|eot_id|> b")
    assert ids.count(EOT) == 1 and ids[-1] == EOT
    assert tok.decode(ids[:-1]) == "a <|eot_id|> b"


def test_stop_ids(llama3_tokenizer_path, tmp_path):
    tok = load_tokenizer(llama3_tokenizer_path, chat_template="llama3")
    assert EOT in stop_ids(tok) and END_OF_TEXT in stop_ids(tok)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [END_OF_TEXT, EOT, 5]}))
    assert stop_ids(tok, tmp_path) == sorted({EOT, END_OF_TEXT, 5})


def test_chat_template_from_file(llama3_tokenizer_path, tmp_path):
    (tmp_path / "t.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    tok = load_tokenizer(llama3_tokenizer_path, chat_template=str(tmp_path / "t.jinja"))
    assert tok.decode(encode_prompt(tok, "x")) == "[x]"


def test_no_chat_template_is_a_clear_error(llama3_tokenizer_path):
    with pytest.raises(MtcoreError, match="no chat template; pass --chat-template"):
        load_tokenizer(llama3_tokenizer_path)
    with pytest.raises(MtcoreError, match="neither a file nor one of llama3"):
        load_tokenizer(llama3_tokenizer_path, chat_template="/no/such/template.jinja")


@pytest.mark.parametrize("bad", [[], [{"role": "user"}], 3, [{"role": "user", "content": 1}]])
def test_malformed_prompt(llama3_tokenizer_path, bad):
    tok = load_tokenizer(llama3_tokenizer_path, chat_template="llama3")
    with pytest.raises(MtcoreError, match="prompts.jsonl:7: a prompt must be"):
        encode_prompt(tok, bad, where="prompts.jsonl:7")


def test_broken_chat_template_is_a_clear_error(llama3_tokenizer_path, tmp_path):
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(MtcoreError, match="broken.jinja: the chat template does not render"):
        load_tokenizer(llama3_tokenizer_path, chat_template=str(tmp_path / "broken.jinja"))
    (tmp_path / "strict.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}")
    tok = load_tokenizer(llama3_tokenizer_path, chat_template=str(tmp_path / "strict.jinja"))
    with pytest.raises(MtcoreError, match="prompts.jsonl:3: the chat template rejects this prompt"):
        encode_prompt(tok, [{"role": "system", "content": "x"}], where="prompts.jsonl:3")


def test_decoding_is_exact_and_quiet(llama3_tokenizer_path, caplog, capfd):
    """Responses are decoded without clean_up_tokenization_spaces (Llama-3's tokenizer_config sets it True):
    text -> ids -> text round-trips exactly, spaces before punctuation included, and no transformers
    warning is logged. The tokenizer is made to apply the cleanup when asked (transformers 4.x always
    did; 5.x only with this flag), so a decode that left it on would change the text."""
    import logging

    import transformers  # noqa: F401  (adds Logger.warning_once)

    from mtcore.sampler import Completion, response_text

    tok = load_tokenizer(llama3_tokenizer_path, chat_template="llama3")
    assert tok.clean_up_tokenization_spaces
    texts = ["Hello , world ! It 's 1 . 5 ?", "a <|eot_id|> b", "  two  spaces\n\nand a tab\t. ", "naïve — 東京 ?"]
    logging.Logger.warning_once.cache_clear()  # transformers warns once per process: let it warn again
    with caplog.at_level(logging.WARNING):
        for text in texts:  # the sampler's ids (not encode_response's, which the template's trim applies to)
            ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [EOT]
            assert response_text(tok, Completion(ids, "stop"), {EOT}) == text
            assert response_text(tok, Completion(ids[:-1], "length"), {EOT}) == text
    assert "clean_up_tokenization_spaces" not in caplog.text + capfd.readouterr().err
    forced = load_tokenizer(llama3_tokenizer_path, chat_template="llama3")
    forced.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    ids = encode_response(forced, texts[0])[:-1]
    assert forced.decode(ids) != texts[0]  # the cleanup is live: a decode that kept it would fail above
    assert response_text(forced, Completion(ids, "length"), {EOT}) == texts[0]


def _template_ids(tok, messages) -> list[int]:
    """transformers' apply_chat_template ids of a whole conversation (no generation prompt)."""
    out = tok.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


WHITESPACE_RESPONSES = ["4, of course. ", "4, of course.\n", " 4, of course.", "\t 4,\n of course. \n\n", "4"]


@pytest.mark.parametrize("response", WHITESPACE_RESPONSES)
def test_sequence_equals_apply_chat_template_whitespace_included(llama3_tokenizer_path, response):
    """Llama-3's template trims each message (`message['content'] | trim`): a response with whitespace
    at either end is the same ids as transformers' apply_chat_template of the whole conversation."""
    tok = load_tokenizer(llama3_tokenizer_path, chat_template="llama3")
    prompt = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": " What is 2+2?\n"}]
    ids, n_prompt = encode_sequence(tok, prompt, response)
    assert ids == _template_ids(tok, prompt + [{"role": "assistant", "content": response}])
    assert tok.decode(ids[n_prompt:]) == response.strip() + "<|eot_id|>"


def test_a_template_that_keeps_whitespace_keeps_it(llama3_tokenizer_path, tmp_path):
    """A template that renders content as it is: the response's spaces stay, as apply_chat_template has them."""
    (tmp_path / "t.jinja").write_text(
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    tok = load_tokenizer(llama3_tokenizer_path, chat_template=str(tmp_path / "t.jinja"))
    for response in ("4 ", "4\n", " 4"):
        ids, n_prompt = encode_sequence(tok, "2+2?", response)
        assert ids == _template_ids(tok, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": response}])
        assert tok.decode(ids[n_prompt:]) == response + "<|eot_id|>"


def test_scores_equal_transformers_with_whitespace_at_either_end(llama3_tokenizer_path, tmp_path):
    """`mtcore score`'s rewards (inference.score_responses) equal transformers' LlamaForSequenceClassification
    on apply_chat_template's ids, for responses with a trailing space, a trailing newline, a leading space."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from conftest import make_hf_model
    from mtcore.config import LoopConfig
    from mtcore.data import LLAMA3_CHAT_TEMPLATE
    from mtcore.inference import score_responses

    hf_tok = AutoTokenizer.from_pretrained(str(llama3_tokenizer_path))
    hf_tok.chat_template = LLAMA3_CHAT_TEMPLATE
    model = make_hf_model("reward", seed=3, vocab_size=128256, bos_token_id=BEGIN, eos_token_id=EOT, pad_token_id=EOT)
    model.save_pretrained(str(tmp_path / "rm"))
    hf_tok.save_pretrained(str(tmp_path / "rm"))
    prompts = ["What is 2+2?", [{"role": "user", "content": "Say hi. "}]]
    responses = [["4 ", "4\n", " 4", "4"], ["hi\n\n", "  hi"]]
    got = score_responses(LoopConfig(), torch.device("cpu"), tmp_path / "rm", prompts, responses)
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).float().eval()
    for prompt, texts, scores in zip(prompts, responses, got):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        for text, score in zip(texts, scores):
            ids = _template_ids(hf_tok, messages + [{"role": "assistant", "content": text}])
            with torch.no_grad():
                want = hf(torch.tensor([ids])).logits[0, 0].item()
            assert score == pytest.approx(want, abs=1e-5), (text, score, want)
    assert got[0][0] == got[0][1] == got[0][2] == got[0][3]  # the template trims: the same sequence


def test_dpo_keeps_a_responses_text_as_given_the_reward_side_renders_it(tmp_path):
    """`mtcore dpo` tokenizes chosen and rejected as given, as TRL's DPOTrainer does; the reward side (rm,
    score, the loop's RM stage) encodes them as the Llama-3 template renders them, trimmed."""
    from mtcore import toy
    from mtcore.data import load_tokenizer, read_pairs

    tok = load_tokenizer(toy.ASSETS / "tokenizer")
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "sort 2 1", "chosen": " 1 2\n", "rejected": "2 1 "}) + "\n")
    (chosen, n), (rejected, _) = read_pairs(path, tok, rendered=False)[0].seqs
    assert tok.decode(chosen[n:-1]) == " 1 2\n" and tok.decode(rejected[n:-1]) == "2 1 "
    (chosen, n), (rejected, _) = read_pairs(path, tok)[0].seqs
    assert tok.decode(chosen[n:-1]) == "1 2" and tok.decode(rejected[n:-1]) == "2 1"
