"""The toy world: the gold judge on hand-computed cases, demonstrations, prompt splits, the tokenizer."""

import json
import math
import random
import re

import pytest

from mtcore.data import encode_prompt, encode_response, encode_sequence, end_of_turn_id, load_tokenizer
from mtcore.toy import (SPECIAL_TOKENS, SPLIT_SIZES, build_tokenizer, demonstration, gold_score, make_prompts,
                        make_splits, parse_prompt, solve)

ANSWER_RE = re.compile(r"[0-9]( [0-9])*")  # digits separated by single spaces


# --- the gold judge ---

@pytest.mark.parametrize("response, expected", [
    ("1 2 3 4 5", 1.0),                        # perfect
    ("2 1 3 4 5", 3 / 5),                      # one adjacent swap
    ("1 2 3 5 4", 3 / 5),
    ("1 2 4 5", 2 / 5),                        # a dropped digit shifts every later position
    ("1 2 3 4", 4 / 5),                        # the last digit dropped
    ("1 2 2 3 4 5", 2 / 6),                    # a duplicated digit: shift and a longer answer
    ("1 2 3 4 5 5", 5 / 6),
    ("1 2 x 4 5", 4 / 5),                      # junk in one position
    ("1 2 33 4 5", 4 / 5),                     # two digits in one token
    ("1,2,3,4,5", 0.0),                        # one token, not a digit
    ("", 0.0),
    ("   \n", 0.0),
    ("1 2 3 4 5 and now that is sorted", 5 / 10),  # rambling past the answer
    ("  1\n2\t3 4  5 ", 1.0),                  # any whitespace separates
    ("5 4 3 2 1", 1 / 5),
])
def test_gold_score_hand_cases(response, expected):
    assert gold_score("sort 3 1 5 2 4", response) == pytest.approx(expected, abs=1e-12)


def test_gold_score_repeated_digits():
    assert solve("sort 7 0 7 0") == "0 0 7 7"
    assert gold_score("sort 7 0 7 0", "0 0 7 7") == 1.0
    assert gold_score("sort 7 0 7 0", "0 7 7") == pytest.approx(2 / 4)  # a dropped 0: "7 7" shifted by one
    assert gold_score("sort 7 0 7 0", "0 7 0 7") == pytest.approx(2 / 4)


@pytest.mark.parametrize("prompt", ["sort", "sort ", "sort 1 2 ", " sort 1 2", "sort 12 3", "sort 1  2",
                                    "Sort 1 2", "order 1 2", "sort a b", "sort 1,2", "sort\n1 2", "", "1 2 3"])
def test_invalid_prompt_raises(prompt):
    with pytest.raises(ValueError, match="not a toy prompt"):
        gold_score(prompt, "1 2")
    with pytest.raises(ValueError, match="not a toy prompt"):
        demonstration(prompt, random.Random(0))


def test_parse_and_solve():
    assert parse_prompt("sort 3 9 1 4") == ["3", "9", "1", "4"]
    assert solve("sort 3 9 1 4") == "1 3 4 9"
    assert solve("sort 9 8 7 6 5 4 3 2") == "2 3 4 5 6 7 8 9"


# --- prompts and demonstrations ---

def test_make_prompts():
    prompts = make_prompts(500, seed=3)
    assert prompts == make_prompts(500, seed=3)
    assert prompts != make_prompts(500, seed=4)
    assert len(set(prompts)) == 500
    lengths = [len(parse_prompt(p)) for p in prompts]
    assert min(lengths) == 4 and max(lengths) == 8
    assert {len(parse_prompt(p)) for p in make_prompts(50, seed=0, min_len=2, max_len=3)} == {2, 3}
    assert sorted(make_prompts(10, seed=0, min_len=1, max_len=1)) == [f"sort {d}" for d in range(10)]
    with pytest.raises(ValueError, match="cannot draw 11 new prompts"):
        make_prompts(11, seed=0, min_len=1, max_len=1)


@pytest.mark.parametrize("p_error", [0.0, 0.3, 0.5, 1.0])
def test_demonstration_error_rate(p_error):
    prompts = make_prompts(3000, seed=1)
    rng = random.Random(7)
    demos = [demonstration(p, rng, p_error) for p in prompts]
    assert all(ANSWER_RE.fullmatch(d) for d in demos), [d for d in demos if not ANSWER_RE.fullmatch(d)][:5]
    wrong = [gold_score(p, d) < 1.0 for p, d in zip(prompts, demos)]
    rate = sum(wrong) / len(wrong)
    assert abs(rate - p_error) < 0.03, f"error rate {rate:.3f} for p_error={p_error}"  # 3 std at p=0.5 is 0.027
    rng = random.Random(7)
    assert [demonstration(p, rng, p_error) for p in prompts] == demos  # seeded


def test_demonstration_errors_are_small_and_varied():
    """One or two swaps or duplications: never shorter, at most 2 longer, only the prompt's digits, both kinds seen."""
    prompts = make_prompts(2000, seed=2)
    rng = random.Random(0)
    shorter = longer = reordered = 0
    for prompt in prompts:
        demo = demonstration(prompt, rng, p_error=1.0).split()
        answer = solve(prompt).split()
        assert demo != answer and 0 <= len(demo) - len(answer) <= 2 and set(demo) <= set(answer), (prompt, demo)
        shorter += len(demo) < len(answer)
        longer += len(demo) > len(answer)
        reordered += len(demo) == len(answer) and sorted(demo) == answer
    assert shorter == 0 and min(longer, reordered) > 200, (shorter, longer, reordered)


@pytest.mark.parametrize("errors", ["duplicate", "swap"])
def test_demonstration_errors_of_one_kind(errors):
    """The committed world's demonstrations are wrong only by duplicated digits (longer, the right order);
    "swap" only by order (the right length and digits)."""
    prompts = make_prompts(500, seed=5)
    rng = random.Random(0)
    same = "sort 7 7 7 7"  # swaps cannot make it wrong: the demonstration is then the answer, not an endless redraw
    assert demonstration(same, rng, p_error=1.0, errors="swap") == solve(same)
    for prompt in prompts:
        demo = demonstration(prompt, rng, p_error=1.0, errors=errors).split()
        answer = solve(prompt).split()
        assert demo != answer or (errors == "swap" and len(set(answer)) == 1), prompt
        if errors == "duplicate":
            assert 1 <= len(demo) - len(answer) <= 2 and demo == sorted(demo) and set(demo) == set(answer), (prompt, demo)
        else:
            assert sorted(demo) == answer, (prompt, demo)


def test_demonstration_rejects_bad_arguments():
    with pytest.raises(ValueError, match="p_error"):
        demonstration("sort 1 2 3 4", random.Random(0), p_error=1.5)
    with pytest.raises(ValueError, match="errors"):
        demonstration("sort 1 2 3 4", random.Random(0), errors="drop")


# --- splits ---

def test_splits_sizes_disjoint_deterministic():
    splits = make_splits(seed=0, iters=3)
    expected = {name: size for name, size in SPLIT_SIZES.items() if name != "policy"}
    expected.update({f"policy_{k}": SPLIT_SIZES["policy"] for k in (1, 2, 3)})
    assert {name: len(prompts) for name, prompts in splits.items()} == expected
    all_prompts = [p for prompts in splits.values() for p in prompts]
    assert len(set(all_prompts)) == len(all_prompts)  # disjoint across splits and unique within each
    assert all(4 <= len(parse_prompt(p)) <= 8 for p in all_prompts)
    assert make_splits(seed=0, iters=3) == splits
    assert make_splits(seed=1, iters=3)["test"] != splits["test"]


def test_splits_prefix_across_iters():
    three, five = make_splits(seed=5, iters=3), make_splits(seed=5, iters=5)
    assert set(five) - set(three) == {"policy_4", "policy_5"}
    assert all(three[name] == five[name] for name in three)


def test_splits_take_the_worlds_prompt_lengths(tmp_path, monkeypatch):
    """A world's digit range reaches every split, and a run's splits read it from the asset set's build.json."""
    import json

    from mtcore import toy

    long = make_splits(seed=0, iters=2, sizes={"sft": 300}, digits=(6, 10))
    lengths = {len(parse_prompt(p)) for prompts in long.values() for p in prompts}
    assert lengths == set(range(6, 11))
    assert long["test"] != make_splits(seed=0, iters=2)["test"]
    # the committed set says 4 to 8; a set built before the range was a choice says nothing: 4 to 8
    assert toy.world_digits() == (4, 8)
    (tmp_path / "build.json").write_text(json.dumps({"world": {"base_rm": "offpolicy"}}))
    monkeypatch.setenv(toy.ASSETS_ENV, str(tmp_path))
    assert toy.world_digits() == (4, 8)
    (tmp_path / "build.json").write_text(json.dumps({"world": {"min_digits": 6, "max_digits": 10}}))
    assert toy.world_digits() == (6, 10)
    (tmp_path / "policy").mkdir(), (tmp_path / "reward").mkdir()
    from mtcore.config import resolve_config
    cfg = resolve_config({}, {"iters": 2})
    run_splits = toy.world().make_splits(cfg)
    assert run_splits["test"] == long["test"] and run_splits["policy_2"] == make_splits(
        0, 2, {"policy": cfg.policy_split_size, "rm": cfg.rm_split_size, "selection": cfg.selection_size},
        (6, 10))["policy_2"]


@pytest.mark.parametrize("digits, match", [((5, 4), "min_digits <= max_digits"), ((0, 8), "min_digits"),
                                           ((4, 13), "max_digits <= 12"), ((4, 4), "only 10000 distinct")])
def test_check_digits(digits, match):
    from mtcore.toy import build_assets, check_digits

    check_digits(4, 8), check_digits(4, 5), check_digits(12, 12)
    with pytest.raises(ValueError, match=match):
        check_digits(*digits)
    with pytest.raises(ValueError, match=match):
        build_assets("/nonexistent/never_written", min_digits=digits[0], max_digits=digits[1])


def test_splits_size_overrides():
    base = make_splits(seed=0, iters=2)
    small = make_splits(seed=0, iters=2, sizes={"sft": 100, "policy": 8})
    assert len(small["sft"]) == 100 and len(small["policy_1"]) == len(small["policy_2"]) == 8
    assert small["sft"] == base["sft"][:100]  # each split draws from its own stream
    for name in ("test", "heldout_rm", "selection", "rm", "rm_base"):  # drawn before sft: unchanged
        assert small[name] == base[name], name
    with pytest.raises(ValueError, match="unknown split sizes"):
        make_splits(seed=0, iters=1, sizes={"train": 3})


# --- the tokenizer ---

@pytest.fixture(scope="module")
def toy_tokenizer_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("toy_tokenizer"))


def test_tokenizer_build_is_deterministic(toy_tokenizer_dir, tmp_path):
    again = build_tokenizer(tmp_path / "again")
    files = sorted(p.name for p in toy_tokenizer_dir.iterdir())
    assert "tokenizer.json" in files and files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (toy_tokenizer_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_committed_tokenizer_is_the_build_and_names_a_portable_class(toy_tokenizer_dir):
    """The shipped assets hold exactly what build_tokenizer writes, and their tokenizer_config names
    PreTrainedTokenizerFast: transformers 5 would write "TokenizersBackend", which 4.x cannot load."""
    from mtcore.toy import ASSETS

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (ASSETS / "tokenizer" / name).read_bytes() == (toy_tokenizer_dir / name).read_bytes(), name
    for model_dir in ("tokenizer", "policy", "reward"):
        config = json.loads((ASSETS / model_dir / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast", model_dir


def test_tokenizer_special_tokens_last(toy_tokenizer_dir):
    tok = load_tokenizer(toy_tokenizer_dir)  # no chat_template argument: the saved one is used
    V = len(tok)
    assert 256 < V <= 512
    special_ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert sorted(special_ids) == list(range(V - len(SPECIAL_TOKENS), V))
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|end_of_text|>"
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|eot_id|>") != tok.eos_token_id
    assert tok("1 2")["input_ids"][0] == tok.bos_token_id  # like Llama-3, bos when special tokens are asked for


@pytest.mark.parametrize("text", ["sort 3 9 1 4", "1 3 4 9", "0", " 1 2", "1 2 3\n\n", "1 1 1 1 1 1 1 1 1",
                                  "the answer is 1 2 3", "1,2 x\t9", "é 中 <|eot_id|>"])
def test_tokenizer_round_trip(toy_tokenizer_dir, text):
    tok = load_tokenizer(toy_tokenizer_dir)
    ids = tok.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert tok.decode(ids) == text
    assert tok.decode(encode_response(tok, text)[:-1]) == text.strip()  # as the Llama-3 template renders it


def test_tokenizer_with_the_sequence_rule(toy_tokenizer_dir):
    tok = load_tokenizer(toy_tokenizer_dir)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    ids, n_prompt = encode_sequence(tok, "sort 3 1 2", "1 2 3")
    assert ids[-1] == eot and ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nsort 3 1 2<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\n1 2 3<|eot_id|>")
    assert tok.decode(ids[n_prompt:]) == "1 2 3<|eot_id|>"


def test_tokenizer_one_token_per_digit(toy_tokenizer_dir):
    """Every digit of an answer is one token (no merges across digits), so sequences stay short."""
    tok = load_tokenizer(toy_tokenizer_dir)
    prompt = "sort 9 0 8 1 7 2 6 3"
    assert len(encode_response(tok, solve(prompt))) == 8 + 1
    assert len(encode_response(tok, "1 1 1 1 1 1 1 1 1 1 1 1")) == 12 + 1
    # bos, start, "user", end, "\n", "\n", "sort", 8 digits, eot, start, "assistant", end, "\n\n"
    assert len(encode_prompt(tok, prompt)) == 20


def test_pair_diagnostics_by_hand(tmp_path):
    """Gold accuracy of an iteration's training pairs: right 1, wrong 0, a gold tie 1/2."""
    from mtcore.toy import gold_score, pair_diagnostics

    rows = [("sort 3 1 2", "1 2 3", "2 1 3"), ("sort 3 1 2", "1 3 2", "1 2 3"), ("sort 3 1 2", "1 2 2", "1 1 3")]
    assert gold_score(*rows[2][:2]) == gold_score(rows[2][0], rows[2][2])  # the tie is a tie
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                                                  for p, c, r in rows))
    d = pair_diagnostics(tmp_path)
    assert d["estep_pairs_gold_accuracy"] == pytest.approx(0.5) and d["estep_pairs_gold_ties"] == 1
    assert math.isnan(d["pseudo_pairs_gold_accuracy"]) and d["pseudo_pairs_gold_ties"] == 0
    assert d["pseudo_pairs_override"] == 0 and math.isnan(d["pseudo_pairs_rm_gold_accuracy"])
    # pseudo-pairs (chosen = y_new) with r_{t-1}'s delta: it agrees with gold on the first, not the
    # second, is undecided on the third (half); the fourth is a gold tie (not judged). Kept against it
    # (delta <= 0): the second (label right) and the third (label wrong).
    pseudo = [("1 2 3", "2 1 3", 1.5), ("1 2 3", "1 3 2", -0.2), ("1 3 2", "1 2 3", 0.0), ("1 2 2", "1 1 3", 0.7)]
    (tmp_path / "pseudo_pairs.jsonl").write_text("".join(json.dumps(
        {"prompt": "sort 3 1 2", "chosen": c, "rejected": r, "delta": delta}) + "\n" for c, r, delta in pseudo))
    d = pair_diagnostics(tmp_path)
    assert d["pseudo_pairs_gold_accuracy"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert d["pseudo_pairs_rm_gold_accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert d["pseudo_pairs_override"] == 2 and d["pseudo_pairs_override_gold_accuracy"] == pytest.approx(0.5)


# --- experiments: the off-policy base RM's pairs, another asset directory ---

def test_offpolicy_answers_are_swaps_only():
    """The off-policy generator permutes the sorted answer (1 to 3 swaps): never a length or digit error,
    mostly wrong, both kinds of swap seen."""
    from mtcore.toy import offpolicy_answer

    rng, prompts = random.Random(0), make_prompts(300, seed=3)
    answers = [offpolicy_answer(p, rng) for p in prompts]
    for p, a in zip(prompts, answers):
        assert ANSWER_RE.fullmatch(a) and sorted(a.split()) == sorted(parse_prompt(p)), (p, a)
    scores = [gold_score(p, a) for p, a in zip(prompts, answers)]
    assert sum(s < 1 for s in scores) > 240 and min(scores) < 0.5  # random swaps reach far, adjacent ones not


def test_offpolicy_pairs_gold_ordered_and_deterministic():
    from mtcore.toy import BASE_PAIRS, offpolicy_pairs

    base, heldout = offpolicy_pairs(make_prompts(50, seed=1), make_prompts(20, seed=2), seed=0)
    assert (base, heldout) == offpolicy_pairs(make_prompts(50, seed=1), make_prompts(20, seed=2), seed=0)
    assert 45 * BASE_PAIRS <= len(base) <= 50 * BASE_PAIRS and 15 * BASE_PAIRS <= len(heldout) <= 20 * BASE_PAIRS
    for row in base + heldout:
        assert row["gold"] == [gold_score(row["prompt"], row["chosen"]), gold_score(row["prompt"], row["rejected"])]
        assert row["gold"][0] > row["gold"][1]


def test_offpolicy_pairs_length_bias():
    """length_bias adds, on about that share of base prompts, a pair preferring an answer with a digit
    doubled to the same answer, mostly against gold; the other pairs and the held-out ones are the
    unbiased world's."""
    from mtcore.toy import offpolicy_pairs

    base_prompts, heldout_prompts = make_prompts(400, seed=1), make_prompts(20, seed=2)
    plain, plain_heldout = offpolicy_pairs(base_prompts, heldout_prompts, seed=0)
    base, heldout = offpolicy_pairs(base_prompts, heldout_prompts, seed=0, length_bias=0.5)
    assert base[:len(plain)] == plain and heldout == plain_heldout
    extra = base[len(plain):]
    assert 160 <= len(extra) <= 240  # binomial(400, 0.5): 200 ± 10
    for row in extra:
        chosen, rejected = row["chosen"].split(), row["rejected"].split()
        assert len(chosen) == len(rejected) + 1
        assert any(chosen[:i + 1] + chosen[i + 2:] == rejected for i in range(len(rejected)))  # one digit doubled
        assert row["gold"] == [gold_score(row["prompt"], row["chosen"]), gold_score(row["prompt"], row["rejected"])]
    # mostly against gold (a doubled digit can also shift a swapped answer's digits into place: 176 of 212 here)
    assert sum(r["gold"][0] < r["gold"][1] for r in extra) >= 0.75 * len(extra)
    assert offpolicy_pairs(base_prompts, heldout_prompts, seed=0, length_bias=1.0)[0][len(plain):][0]["prompt"] \
        == base_prompts[0]


@pytest.mark.parametrize("bad, match", [(dict(base_rm="bogus"), "base_rm"), (dict(demo_errors="drop"), "demo_errors"),
                                        (dict(p_error=-0.1), "p_error"), (dict(length_bias=1.5), "length_bias"),
                                        (dict(base_rm="onpolicy", length_bias=0.5), "length_bias")])
def test_build_assets_rejects_bad_world(tmp_path, bad, match):
    from mtcore.toy import build_assets

    with pytest.raises(ValueError, match=match):
        build_assets(tmp_path / "x", **bad)
    assert not (tmp_path / "x").exists()


def test_committed_assets_are_the_default_world():
    """build.json records the world it was built as; build_assets' defaults and `mtcore build-toy`'s are it."""
    import inspect
    import json

    from mtcore import toy

    built = json.loads((toy.ASSETS / "build.json").read_text())
    assert built["world"] == toy.WORLD and built["seed"] == toy.ASSET_SEED
    defaults = inspect.signature(toy.build_assets).parameters
    assert {k: defaults[k].default for k in toy.WORLD} == toy.WORLD
    # the command line repeats them as literals (importing toy would cost --help torch's import)
    from mtcore.cli import build_toy
    assert {p.name: p.default for p in build_toy.params if p.name in toy.WORLD} == toy.WORLD


def test_assets_env_var_is_read_at_call_time(tmp_path, monkeypatch):
    from mtcore import toy
    from mtcore.errors import MtcoreError

    monkeypatch.delenv(toy.ASSETS_ENV, raising=False)
    assert toy.asset("policy") == toy.ASSETS / "policy"
    (tmp_path / "policy").mkdir()
    monkeypatch.setenv(toy.ASSETS_ENV, str(tmp_path))
    assert toy.asset("policy") == tmp_path / "policy"
    with pytest.raises(MtcoreError, match="build-toy"):
        toy.asset("reward")


# --- the shifted reward benchmark ---

def _edit_between(a: list[str], b: list[str]) -> str | None:
    """Which single edit turns one answer into the other ("swap" of neighbours, "duplicate" or "drop" of
    a digit, undirected); None when no single edit does."""
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        ok = len(diff) == 2 and diff[1] == diff[0] + 1 and (a[diff[0]], a[diff[1]]) == (b[diff[1]], b[diff[0]])
        return "swap" if ok else None
    longer, shorter = (a, b) if len(a) > len(b) else (b, a)
    if len(longer) != len(shorter) + 1:
        return None
    cut = [i for i in range(len(longer)) if longer[:i] + longer[i + 1:] == shorter]
    if not cut:
        return None
    doubled = any(longer[i] == longer[j] for i in cut for j in (i - 1, i + 1) if 0 <= j < len(longer))
    return "duplicate" if doubled else "drop"


def test_shifted_benchmark_is_the_same_bytes_from_the_same_seed(tmp_path):
    """Written twice from seed 0: the same bytes, which are the committed file's; seed 1 gives others."""
    from mtcore import toy

    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        (tmp_path / name).mkdir()
        toy.write_shifted_pairs(tmp_path / name, seed, toy.world_digits())
    first = (tmp_path / "a" / "shifted_pairs.jsonl").read_bytes()
    assert first == (tmp_path / "b" / "shifted_pairs.jsonl").read_bytes()
    assert first == (toy.ASSETS / "shifted_pairs.jsonl").read_bytes()
    assert first != (tmp_path / "c" / "shifted_pairs.jsonl").read_bytes()


def test_shifted_benchmark_pairs_are_gold_ordered_single_edits_on_prompts_never_trained_on():
    """Every pair: chosen gold-better (gold recomputed), the two answers one edit apart, of the kind its
    subset names, within two edits of the perfect answer. No prompt is in the build's splits (the SFT
    and base-RM prompts among them) or in a training split of the toy world's `mtcore train`, seeds 0 to 9,
    10 iterations, at its default sizes (drawn here through the run's own split maker)."""
    from mtcore import toy
    from mtcore.config import resolve_config

    rows = [json.loads(line) for line in (toy.ASSETS / "shifted_pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 256 and len({r["prompt"] for r in rows}) == 256
    for r in rows:
        chosen, rejected = gold_score(r["prompt"], r["chosen"]), gold_score(r["prompt"], r["rejected"])
        assert chosen > rejected and r["gold"] == [chosen, rejected], r
        found = _edit_between(r["chosen"].split(), r["rejected"].split())
        # (dropping one of two equal neighbours reads as undoing a duplicate)
        assert found == r["subset"] or (found, r["subset"]) == ("duplicate", "drop"), r
        target = solve(r["prompt"]).split()
        assert any(_edit_between(target, x.split()) or x.split() == target for x in (r["chosen"], r["rejected"])), r
    assert {r["subset"] for r in rows} == {"swap", "duplicate", "drop"}
    assert sum(r["chosen"] == solve(r["prompt"]) for r in rows) > 64  # improved-policy answers: many perfect
    trained = set()
    for split in make_splits(toy.ASSET_SEED, 0, digits=toy.world_digits()).values():
        trained |= set(split)
    for seed in range(10):
        splits = toy.world().make_splits(resolve_config({}, {"seed": seed, "iters": 10}))
        trained |= {p for name, split in splits.items() if name in ("selection", "rm") or name.startswith("policy_")
                    for p in split}  # (a run trains on these; its sft and rm_base splits are the build's, seed 0's)
    assert not {r["prompt"] for r in rows} & trained
