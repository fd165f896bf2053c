"""The toy world: Mutual-Taught in miniature, on a task whose truth a program knows.

The task is sorting digits. A prompt is the word "sort" and digits separated by single spaces
(`sort 3 9 1 4`, of the world's min_digits to max_digits digits, 4 to 8 by default, repeats allowed); the perfect response is the sorted
digits, `1 3 4 9`. `gold_score` grades any response in [0, 1]: the fraction of positions that hold
the right digit, over max(len(target), len(response)). A wrong order earns partial credit, while a
missing digit, a duplicated digit or rambling on past the answer are penalised through the
denominator (and, for a dropped or inserted digit, through the shift of every later position).

Why a fixed reward model falls behind here (the paper's conditions, by design; issue #14). The
base RM is off-policy, as the paper's was: it is trained on gold-labelled pairs of synthetic answers
(`offpolicy_answer`: the sorted digits after a few swaps), so it learns order, and it never sees an
answer of the wrong length. The initial policy is weak and its errors are of the other kind: it is
fine-tuned on demonstrations of which 90% are wrong, each by one or two duplicated digits
(`demonstration`). So the base RM starts well below its held-out accuracy on the policy's own pairs
(metrics.json shows both), and DPO on its labels leaves the policy's length errors to chance. The
M-step retrains the RM on the policy's own answers (the E-step's pairs, labelled by r_{t-1}, and the
new-versus-old pseudo-pairs), which is what should keep it up with the moving policy; the gold judge
measures whether it does. `build_assets`' arguments build other worlds, such as the first one
(until issue #14): base_rm="onpolicy", demo_errors="both", p_error=0.5.

`make_splits` draws the disjoint prompt sets of one run; `build_tokenizer` writes a small byte-level
BPE tokenizer with Llama-3's special tokens and chat template, so the real code paths run unchanged.

The assets (`asset`) are read from the package's `toy_assets/`, or from the directory named by the
environment variable MTCORE_TOY_ASSETS when it is set (read at each call, so experiments can point
`mtcore train`/`eval` at an alternative set built with `mtcore build-toy --out DIR` without touching
the committed one).
"""

import logging
import os
import random
import re
from pathlib import Path

from mtcore.data import LLAMA3_CHAT_TEMPLATE, read_jsonl, write_jsonl
from mtcore.errors import MtcoreError

log = logging.getLogger(__name__)

TASK_WORD = "sort"
MIN_DIGITS, MAX_DIGITS = 4, 8  # the default prompt lengths (a world's min_digits, max_digits)
# Longest prompt a world may ask for: its answer, with the duplicates the demonstrations add, and the end
# of turn fit the toy's 20 new tokens, and prompt plus answer its 64-token training sequences.
DIGITS_LIMIT = 12
# Fewest distinct prompts a world's range must hold: every split, with room for many iterations and
# for drawing them without repeats quickly (4 to 4 digits make 10,000; 4 to 5 make 110,000).
MIN_CAPACITY = 100_000
_PROMPT_RE = re.compile(rf"{TASK_WORD}(?: [0-9])+")

# Prompts per split. "policy" is the size of each E-step split policy_1 .. policy_<iters>.
SPLIT_SIZES = {"sft": 4096, "rm_base": 2048, "policy": 160, "rm": 160, "selection": 64, "test": 128,
               "heldout_rm": 128}
# Drawn in this order, each from its own seeded stream: evaluation sets first, so they do not change
# when a training split is resized, and the E-step splits last, so iters=3 gives a prefix of iters=5.
_FIXED_SPLITS = ("test", "heldout_rm", "selection", "rm", "rm_base", "sft")

# Llama-3's spellings, in Llama-3's relative order, placed after the BPE ids as Llama-3 places them.
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, START_HEADER, END_HEADER, EOT)
_BPE_VOCAB_LIMIT = 512  # a ceiling the trainer never reaches: it stops once every corpus word is one token
_CORPUS_PROMPTS, _CORPUS_SEED = 1024, 0


# --- the task and its gold judge ---

def parse_prompt(prompt: str) -> list[str]:
    """The digits of a task prompt ("sort 3 9 1 4" -> ["3", "9", "1", "4"]); ValueError if it is not one."""
    if not isinstance(prompt, str) or not _PROMPT_RE.fullmatch(prompt):
        raise ValueError(f"not a toy prompt (\"{TASK_WORD}\" then digits separated by single spaces): {prompt!r}")
    return prompt.split()[1:]


def solve(prompt: str) -> str:
    """The perfect response: the prompt's digits sorted, separated by single spaces."""
    return " ".join(sorted(parse_prompt(prompt)))


def gold_score(prompt: str, response: str) -> float:
    """Positions holding the right digit / max(len(target), len(response tokens)), in [0, 1].

    The response is split on whitespace; a token that is not the target's digit at its position (a
    wrong digit, "12", "x", anything past the target's end) scores nothing there.
    """
    target = solve(prompt).split()
    tokens = response.split()
    hits = sum(t == r for t, r in zip(target, tokens))
    return hits / max(len(target), len(tokens))


# --- prompts and demonstrations ---

def _draw_prompts(rng: random.Random, n: int, taken: set[str], min_len: int = MIN_DIGITS,
                  max_len: int = MAX_DIGITS) -> list[str]:
    """n new prompts (none in `taken`, none repeated), each of a uniform length then uniform digits.

    Adds them to `taken`. Rejecting repeats skews lengths slightly toward the longer (rarer to
    collide) prompts once a split holds a sizeable share of the 10**min_len shortest ones.
    """
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    capacity = sum(10 ** k for k in range(min_len, max_len + 1))
    if n < 0 or n + len(taken) > capacity:
        raise ValueError(f"cannot draw {n} new prompts of {min_len} to {max_len} digits "
                         f"({capacity} exist, {len(taken)} already taken)")
    prompts = []
    while len(prompts) < n:
        digits = [str(rng.randrange(10)) for _ in range(rng.randint(min_len, max_len))]
        prompt = " ".join([TASK_WORD] + digits)
        if prompt not in taken:
            taken.add(prompt)
            prompts.append(prompt)
    return prompts


def make_prompts(n: int, seed: int, min_len: int = MIN_DIGITS, max_len: int = MAX_DIGITS) -> list[str]:
    """n distinct prompts of min_len to max_len digits, the same for the same arguments."""
    return _draw_prompts(random.Random(seed), n, set(), min_len, max_len)


def _swap_adjacent(digits: list[str], rng: random.Random) -> list[str]:
    if len(digits) < 2:
        return digits
    i = rng.randrange(len(digits) - 1)
    return digits[:i] + [digits[i + 1], digits[i]] + digits[i + 2:]


def _duplicate_digit(digits: list[str], rng: random.Random) -> list[str]:
    i = rng.randrange(len(digits))
    return digits[:i + 1] + digits[i:]


# The demonstrations' errors, by build_assets' demo_errors. No dropped digits: every error keeps or adds
# length, so, as with real RMs' taste for longer answers, a longer answer is never the better one here,
# and the gold judge penalises what a length-blind RM rewards. (With drops, shortness also meant a lost
# digit, and the length-controlled pairing rule chose those: in a 2-seed study the policy then fell
# behind the fixed-RM baseline's.)
CORRUPTIONS = {"both": (_swap_adjacent, _duplicate_digit), "duplicate": (_duplicate_digit,),
               "swap": (_swap_adjacent,)}


def _swap_random(digits: list[str], rng: random.Random) -> list[str]:
    if len(digits) < 2:
        return digits
    i, j = rng.sample(range(len(digits)), 2)
    out = list(digits)
    out[i], out[j] = out[j], out[i]
    return out


def offpolicy_answer(prompt: str, rng: random.Random) -> str:
    """The off-policy base RM's generator: the sorted digits after 1 to 3 swaps, each of an adjacent
    pair or of two random positions (equal chances). It never duplicates or drops a digit, so its
    answers are always the right length and multiset (the policy's length errors are never shown),
    and a swap of equal digits or swaps that cancel can leave the perfect answer."""
    digits = sorted(parse_prompt(prompt))
    for _ in range(rng.randint(1, 3)):
        digits = rng.choice((_swap_adjacent, _swap_random))(digits, rng)
    return " ".join(digits)


def check_demonstrations(p_error: float, errors: str) -> None:
    """ValueError unless p_error is a share and errors a kind of CORRUPTIONS: `demonstration`'s arguments."""
    if not 0.0 <= p_error <= 1.0:
        raise ValueError(f"p_error must be in [0, 1], got {p_error}")
    if errors not in CORRUPTIONS:
        raise ValueError(f"demo_errors must be one of {sorted(CORRUPTIONS)}, got {errors!r}")


def demonstration(prompt: str, rng: random.Random, p_error: float = 0.5, errors: str = "both") -> str:
    """An imperfect demonstration: with probability 1 - p_error the perfect answer, else one that is wrong.

    A wrong one is the sorted digits after one or two corruptions of CORRUPTIONS[errors] (an adjacent
    swap, a duplicated digit, or either), redrawn until it differs from the perfect answer (swapping
    equal digits would not), so exactly a p_error share of demonstrations are wrong in expectation.
    (Swaps cannot make "sort 1 1 1 1" wrong: with errors="swap", such a prompt's demonstration is its answer.)
    """
    check_demonstrations(p_error, errors)
    digits = sorted(parse_prompt(prompt))
    if rng.random() >= p_error or (errors == "swap" and len(set(digits)) == 1):
        return " ".join(digits)
    while True:
        noisy = digits
        for _ in range(rng.randint(1, 2)):
            noisy = rng.choice(CORRUPTIONS[errors])(noisy, rng)
        if noisy != digits:
            return " ".join(noisy)


# --- the prompt splits of a run ---

def _split_rng(seed: int, name: str) -> random.Random:
    return random.Random(f"mtcore.toy:{seed}:{name}")  # a str seed is hashed with SHA-512: stable across runs


def make_splits(seed: int, iters: int, sizes: dict | None = None,
                digits: tuple[int, int] = (MIN_DIGITS, MAX_DIGITS)) -> dict[str, list[str]]:
    """Disjoint prompt lists: the fixed splits of SPLIT_SIZES and policy_1 .. policy_<iters>, each
    prompt of digits[0] to digits[1] digits (the world's: `world_digits`).

    sizes overrides some entries of SPLIT_SIZES ("policy" sizes each E-step split). The same seed,
    sizes and digits give the same lists, and the policy_k of a shorter run equal those of a longer one.
    """
    unknown = set(sizes or {}) - set(SPLIT_SIZES)
    if unknown:
        raise ValueError(f"unknown split sizes {sorted(unknown)}; the splits are {sorted(SPLIT_SIZES)}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    sizes = {**SPLIT_SIZES, **(sizes or {})}
    taken: set[str] = set()
    splits = {name: _draw_prompts(_split_rng(seed, name), sizes[name], taken, *digits) for name in _FIXED_SPLITS}
    for k in range(1, iters + 1):
        splits[f"policy_{k}"] = _draw_prompts(_split_rng(seed, f"policy_{k}"), sizes["policy"], taken, *digits)
    log.debug("toy splits (seed %d): %s", seed, {name: len(p) for name, p in splits.items()})
    return splits


# --- the tokenizer ---

def _tokenizer_corpus() -> list[str]:
    """The text between special tokens that encoding chat-formatted toy data meets, one piece a string.

    A prompt's text is `...user<|end_header_id|>\\n\\n{prompt}<|eot_id|>...assistant<|end_header_id|>\\n\\n`
    (pieces "user", "\\n\\n" + prompt, "assistant", "\\n\\n"); a response is encoded on its own.
    """
    pieces = ["system", "user", "assistant", "\n\n"]
    for prompt in make_prompts(_CORPUS_PROMPTS, _CORPUS_SEED):
        pieces += ["\n\n" + prompt, solve(prompt)]
    return pieces


def _train_bpe():
    """A byte-level BPE trained on the toy corpus, then the special tokens appended (ids after the BPE's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    # GPT-2's split, no prefix space: " 3" is one word, so each digit (with its leading space) becomes one token.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_BPE_VOCAB_LIMIT, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(_tokenizer_corpus(), trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    bos_id = tokenizer.token_to_id(BOS)
    # Llama-3's post-processor: bos before each text when special tokens are asked for (mtcore never asks).
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    return tokenizer


def build_tokenizer(out_dir) -> Path:
    """Write the toy tokenizer (tokenizer.json, tokenizer_config.json, the chat template) to out_dir.

    The same bytes on every build; `mtcore.data.load_tokenizer(out_dir)` reads it with no extra argument.
    """
    from transformers import PreTrainedTokenizerFast

    from mtcore.checkpoint import save_tokenizer

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_train_bpe(), bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    out_dir = Path(out_dir)
    save_tokenizer(tokenizer, out_dir)
    log.info("toy tokenizer: %d ids (%d special, last) -> %s", len(tokenizer), len(SPECIAL_TOKENS), out_dir)
    return out_dir


# --- the assets: tokenizer, SFT policy, base RM, held-out RM pairs ---

ASSET_SEED = 0
ASSETS = Path(__file__).parent / "toy_assets"
ASSETS_ENV = "MTCORE_TOY_ASSETS"  # when set, the directory asset() reads instead of ASSETS
BASE_RMS = ("onpolicy", "offpolicy")  # build_assets's base_rm: what the base RM's gold-labelled pairs are drawn from
# The committed world, build_assets' defaults: an off-policy base RM, and a weak initial policy whose
# errors (90% of its demonstrations, all duplicated digits) are what that RM never saw; prompts of 4 to
# 8 digits. build.json records the world, and a run's splits take the prompt lengths from it.
WORLD = dict(base_rm="offpolicy", demo_errors="duplicate", p_error=0.9, min_digits=MIN_DIGITS,
             max_digits=MAX_DIGITS, length_bias=0.0)
# 0.8M parameters: the shape the feasibility run used (hidden 128, 4 layers, GQA 4/2).
MODEL_SHAPE = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=344, max_position_embeddings=128,
                   rope_theta=10000.0)
SFT_TRAINING = dict(lr=1e-3, epochs=4, batch_size=64, micro_batch_tokens=4096, warmup_ratio=0.05)
RM_TRAINING = dict(lr=3e-4, epochs=3, batch_size=32, micro_batch_tokens=4096, warmup_ratio=0.05)
BASE_SAMPLES = 5  # initial-policy samples per rm_base prompt
BASE_PAIRS = 2  # gold-differing pairs kept per rm_base prompt (512 x 1 gave a base RM of 74% held-out accuracy,
#                 2048 x 2 one of 91%: an RM good enough that DPO on its labels can improve the policy)


def check_digits(min_digits: int, max_digits: int) -> None:
    """ValueError unless min_digits..max_digits is a range of prompt lengths a world can use."""
    if not 1 <= min_digits <= max_digits <= DIGITS_LIMIT:
        raise ValueError(f"need 1 <= min_digits <= max_digits <= {DIGITS_LIMIT}, got min_digits={min_digits}, "
                         f"max_digits={max_digits}")
    capacity = sum(10 ** k for k in range(min_digits, max_digits + 1))
    if capacity < MIN_CAPACITY:
        raise ValueError(f"prompts of {min_digits} to {max_digits} digits: only {capacity} distinct ones, and a "
                         f"toy world needs at least {MIN_CAPACITY}; give a wider range")


def world_digits() -> tuple[int, int]:
    """The prompt lengths of the asset set asset() reads, from its build.json (4 to 8 when it does not
    say: a set built before they were a choice)."""
    import json

    world = json.loads(asset("build.json").read_text()).get("world", {})
    return world.get("min_digits", MIN_DIGITS), world.get("max_digits", MAX_DIGITS)


def asset(name: str) -> Path:
    """A built-in asset directory (policy, reward, tokenizer) or file (heldout_pairs.jsonl), under
    $MTCORE_TOY_ASSETS if set (read now), else under ASSETS."""
    path = Path(os.environ.get(ASSETS_ENV) or ASSETS) / name
    if not path.exists():
        raise MtcoreError(f"{path}: the toy world's assets are missing; build them with `mtcore build-toy`")
    return path


def _sample_texts(model, tokenizer, prompts, n, seed, temperature=1.0):
    from mtcore.data import encode_prompt, stop_ids
    from mtcore.sampler import SamplingParams, generate, response_text

    ids = [encode_prompt(tokenizer, p) for p in prompts]
    stops = stop_ids(tokenizer)
    params = SamplingParams(n=n, temperature=temperature, max_new_tokens=20, seed=seed, stop_ids=tuple(stops))
    return [[response_text(tokenizer, c, set(stops)) for c in completions] for completions in generate(model, ids, params)]


def _gold_pairs(prompts, samples, rng, per_prompt=1):
    """Up to per_prompt pairs per prompt of samples whose gold scores differ, the better one chosen."""
    rows = []
    for prompt, texts in zip(prompts, samples):
        scored = [(gold_score(prompt, t), t) for t in texts]
        options = [(a, b) for i, a in enumerate(scored) for b in scored[i + 1:] if a[0] != b[0]]
        for a, b in rng.sample(options, min(per_prompt, len(options))):
            (hi, lo) = (a, b) if a[0] > b[0] else (b, a)
            rows.append({"prompt": prompt, "chosen": hi[1], "rejected": lo[1], "gold": [hi[0], lo[0]]})
    return rows


def build_assets(out_dir=ASSETS, seed: int = ASSET_SEED, overwrite: bool = False, base_rm: str = WORLD["base_rm"],
                 demo_errors: str = WORLD["demo_errors"], p_error: float = WORLD["p_error"],
                 min_digits: int = WORLD["min_digits"], max_digits: int = WORLD["max_digits"],
                 length_bias: float = WORLD["length_bias"]) -> Path:
    """Build every toy asset from `seed`, deterministically (CPU, fp32, one torch thread):
    1. the tokenizer;
    2. a random 0.8M-parameter Llama, supervised-trained on imperfect demonstrations of the "sft"
       prompts (a p_error share carry one or two errors of kind demo_errors: see `demonstration`);
    3. a reward model, initialised from that policy with a fresh score head, Bradley-Terry-trained on
       BASE_PAIRS gold-labelled pairs per "rm_base" prompt: the stand-in for human preference data (no
       gold label is used after it). base_rm="offpolicy" draws them from BASE_SAMPLES `offpolicy_answer`s
       per prompt (synthetic swaps, from a random stream of their own, so steps 1 and 2 do not depend
       on it); "onpolicy" from the initial policy's samples;
    4. held-out RM pairs, the same way, on the "heldout_rm" prompts: rm_accuracy_heldout is the RM's
       accuracy on its own training distribution.
    5. the shifted benchmark (`shifted_pairs`, no training): gold-ordered pairs of near-correct
       answers on prompts no training split holds: rm_accuracy_shifted.
    Every prompt has min_digits to max_digits digits (the tokenizer is the same for any range).
    length_bias > 0 gives the base RM's annotators real RMs' taste for longer answers: on that share of
    the "rm_base" prompts (off-policy only) one more pair prefers an answer with a duplicated digit to
    the same answer without it, against gold (`offpolicy_pairs`); the held-out pairs stay gold-ordered.
    The defaults build the committed world (WORLD). out_dir is replaced whole (outputs.check_out_dir's
    rules), at the end."""
    if base_rm not in BASE_RMS:
        raise ValueError(f"base_rm must be one of {BASE_RMS}, got {base_rm!r}")
    check_demonstrations(p_error, demo_errors)  # before anything is written
    check_digits(min_digits, max_digits)
    if not 0.0 <= length_bias <= 1.0:
        raise ValueError(f"length_bias must be in [0, 1], got {length_bias}")
    if length_bias and base_rm != "offpolicy":
        raise ValueError("length_bias needs base_rm='offpolicy' (it biases the off-policy annotators)")
    import torch

    from mtcore.outputs import check_out_dir, commit_dir, open_partial

    # The whole set is built in OUT.partial and swapped in at the end: an interrupted build leaves
    # the previous assets, never a new policy beside an old reward model.
    final = check_out_dir(out_dir, "build-toy", (), overwrite)
    out = open_partial(final, "build-toy", keep=())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU sums split by thread: one thread makes the bytes the same on any core count
    try:
        _build_into(out, seed, dict(base_rm=base_rm, demo_errors=demo_errors, p_error=p_error, min_digits=min_digits,
                                    max_digits=max_digits, length_bias=length_bias))
    finally:
        torch.set_num_threads(threads)
    commit_dir(out, final, "build-toy")
    return final


def _build_into(out: Path, seed: int, world: dict) -> None:
    """build_assets' four steps, into the directory out."""
    import torch

    from mtcore.checkpoint import save_model

    from mtcore.files import write_json
    from mtcore.data import Example, encode_pair, encode_sequence, load_tokenizer
    from mtcore.model import Llama, ModelArgs
    from mtcore.train import SFT, BradleyTerry, TrainConfig, fit

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(build_tokenizer(out / "tokenizer"))
    splits = make_splits(seed, 0, digits=(world["min_digits"], world["max_digits"]))
    rng = random.Random(seed)
    args = ModelArgs(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.convert_tokens_to_ids(EOT), pad_token_id=tokenizer.pad_token_id,
                     **MODEL_SHAPE)
    policy = Llama(args, "policy").init_weights(seed)
    demos = []
    for p in splits["sft"]:
        ids, n = encode_sequence(tokenizer, p, demonstration(p, rng, world["p_error"], world["demo_errors"]))
        demos.append(Example(((ids, n),)))
    sft_log = fit(policy, demos, SFT(), TrainConfig(seed=seed, **SFT_TRAINING), desc="toy sft")
    save_model(policy, out / "policy", tokenizer=tokenizer)

    samples = _sample_texts(policy.eval(), tokenizer, splits["rm_base"], BASE_SAMPLES, seed)
    if world["base_rm"] == "offpolicy":
        base_pairs, heldout = offpolicy_pairs(splits["rm_base"], splits["heldout_rm"], seed, world["length_bias"])
    else:
        base_pairs = _gold_pairs(splits["rm_base"], samples, rng, BASE_PAIRS)
        heldout = _gold_pairs(splits["heldout_rm"], _sample_texts(policy, tokenizer, splits["heldout_rm"],
                                                                  BASE_SAMPLES, seed + 1), rng, BASE_PAIRS)
    write_jsonl(out / "heldout_pairs.jsonl", heldout)
    write_shifted_pairs(out, seed, (world["min_digits"], world["max_digits"]))
    reward = Llama(args, "reward").init_weights(seed)
    reward.model.load_state_dict(policy.model.state_dict())
    examples = [encode_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"]) for row in base_pairs]
    rm_log = fit(reward, examples, BradleyTerry(), TrainConfig(seed=seed, **RM_TRAINING), desc="toy rm")
    save_model(reward, out / "reward", tokenizer=tokenizer)
    flat = [gold_score(p, t) for p, ts in zip(splits["rm_base"], samples) for t in ts]
    write_json(out / "build.json", {
        "seed": seed, "model": MODEL_SHAPE, "sft": SFT_TRAINING, "rm": RM_TRAINING,
        "sft_final_nll": sft_log[-1]["nll"], "rm_final_loss": rm_log[-1]["loss"],
        "rm_train_accuracy": rm_log[-1]["accuracy"], "base_pairs": len(base_pairs), "heldout_pairs": len(heldout),
        "initial_gold_mean": sum(flat) / len(flat), "initial_perfect": sum(f == 1.0 for f in flat) / len(flat),
        "world": world})


def offpolicy_pairs(base_prompts, heldout_prompts, seed: int, length_bias: float = 0.0) -> tuple[list[dict], list[dict]]:
    """The off-policy base RM's training and held-out pairs: BASE_PAIRS gold-differing pairs per prompt
    among BASE_SAMPLES `offpolicy_answer`s, from a stream of their own (seed).

    With length_bias, each base prompt, with that chance (a stream of its own, so 0 leaves the rest as
    it was), adds a length-biased pair: its first answer with one digit duplicated chosen over the
    answer itself, mostly against gold (a doubled digit can also shift a swapped answer's digits into
    place; the row's "gold" says which). Held-out pairs are never biased."""
    rng = random.Random(f"mtcore.toy:{seed}:offpolicy")
    def draw(prompts):
        answers = [[offpolicy_answer(p, rng) for _ in range(BASE_SAMPLES)] for p in prompts]
        return _gold_pairs(prompts, answers, rng, BASE_PAIRS), answers
    (base, answers), (heldout, _) = draw(base_prompts), draw(heldout_prompts)
    if length_bias:
        biased = random.Random(f"mtcore.toy:{seed}:length_bias")
        for prompt, texts in zip(base_prompts, answers):
            if biased.random() < length_bias:
                longer = " ".join(_duplicate_digit(texts[0].split(), biased))
                base.append({"prompt": prompt, "chosen": longer, "rejected": texts[0],
                             "gold": [gold_score(prompt, longer), gold_score(prompt, texts[0])]})
    return base, heldout


# --- the shifted reward benchmark: the RewardBench analogue ---

SHIFTED_PROMPTS = 256  # one pair each
# Besides the build's splits, the benchmark avoids the training prompts (selection, RM and policy splits) of
# `mtcore train` at the toy defaults' sizes, seeds 0 to 9 (the study's), up to 10 iterations.
SHIFTED_AVOIDS = dict(seeds=10, iters=10)


def _drop_digit(digits: list[str], rng: random.Random) -> list[str]:
    i = rng.randrange(len(digits))
    return digits[:i] + digits[i + 1:] if len(digits) > 1 else digits


EDITS = {"swap": _swap_adjacent, "duplicate": _duplicate_digit, "drop": _drop_digit}  # the benchmark's subsets


def shifted_pair(prompt: str, rng: random.Random) -> dict:
    """Two answers such as an improved policy gives: the sorted digits with at most one edit (EDITS:
    an adjacent swap, a duplicated digit, a dropped digit; none half the time), and the same with one
    more edit, gold-ordered. Redrawn until gold tells them apart. "subset" names the second edit."""
    target = sorted(parse_prompt(prompt))
    while True:
        base = rng.choice(list(EDITS.values()))(target, rng) if rng.random() < 0.5 else target
        kind = rng.choice(sorted(EDITS))
        answers = [(gold_score(prompt, " ".join(x)), " ".join(x)) for x in (base, EDITS[kind](base, rng))]
        if answers[0][0] != answers[1][0]:
            (hi, chosen), (lo, rejected) = sorted(answers, reverse=True)
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "subset": kind, "gold": [hi, lo]}


def training_prompts(seed: int, digits: tuple[int, int]) -> set[str]:
    """Every prompt of the build's splits (seed) and of the selection, RM and policy splits of the toy
    runs of SHIFTED_AVOIDS: the prompts the benchmark leaves out."""
    from mtcore.config import TOY_DEFAULTS as TOY

    taken = {p for split in make_splits(seed, 0, digits=digits).values() for p in split}
    sizes = {"policy": TOY["policy_split_size"], "rm": TOY["rm_split_size"], "selection": TOY["selection_size"]}
    for run_seed in range(SHIFTED_AVOIDS["seeds"]):
        splits = make_splits(run_seed, SHIFTED_AVOIDS["iters"], sizes, digits)
        taken |= {p for name, split in splits.items() if name in ("selection", "rm") or name.startswith("policy_")
                  for p in split}
    return taken


def shifted_pairs(seed: int, digits: tuple[int, int] = (MIN_DIGITS, MAX_DIGITS)) -> list[dict]:
    """The shifted benchmark: one shifted_pair on each of SHIFTED_PROMPTS prompts that no model of the
    world, nor any run of SHIFTED_AVOIDS, trains on. Its own random stream (seed): no training, so the
    same rows on any machine. The same pairs judge every RM (rm_accuracy_shifted): the policy's
    improved answers, which the base RM's held-out pairs (swaps only) do not show."""
    rng = random.Random(f"mtcore.toy:{seed}:shifted")
    prompts = _draw_prompts(rng, SHIFTED_PROMPTS, training_prompts(seed, digits), *digits)
    return [shifted_pair(p, rng) for p in prompts]


def write_shifted_pairs(out_dir, seed: int = ASSET_SEED, digits: tuple[int, int] = (MIN_DIGITS, MAX_DIGITS)):
    """out_dir/shifted_pairs.jsonl (build_assets' step 5; the defaults write the committed world's)."""
    write_jsonl(Path(out_dir) / "shifted_pairs.jsonl", shifted_pairs(seed, digits))


# --- evaluation, after every iteration of `mtcore train` on the toy world ---

def _pairwise_accuracy(chosen: list[float], rejected: list[float]) -> float:
    """Share of gold-ordered pairs the RM orders the same way; an RM tie counts half."""
    hits = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected))
    return hits / max(1, len(chosen))


def _rm_accuracy(cfg, device, reward_dir, pairs: list[dict], meter=None) -> float:
    from mtcore.inference import score_responses

    if not pairs:
        return float("nan")
    scores = score_responses(cfg, device, reward_dir, [p["prompt"] for p in pairs],
                             [[p["chosen"], p["rejected"]] for p in pairs], meter)
    return _pairwise_accuracy([s[0] for s in scores], [s[1] for s in scores])


def _test_answers(cfg, device, policy_dir, prompts, seed, meter=None) -> list[list[str]]:
    from mtcore.inference import sample_responses

    return [[r["text"] for r in rs]
            for rs in sample_responses(cfg, device, policy_dir, prompts, cfg.eval_samples, seed, meter)]


def _metrics(cfg, device, reward_dir, prompts, answers, initial, meter=None, base_reward_dir=None) -> dict:
    """The gold-judged numbers (METRIC_KEYS) of a policy's test answers against the initial policy's,
    and of the RM on gold-ordered pairs of those answers, on the held-out pairs and on the shifted
    benchmark. With base_reward_dir, also that RM's accuracy on the same policy pairs
    (rm_accuracy_current_policy_base_rm)."""
    mine = [gold_score(p, a) for p, ts in zip(prompts, answers) for a in ts]
    theirs = [gold_score(p, a) for p, ts in zip(prompts, initial) for a in ts]
    pairs = _policy_pairs(prompts, answers)
    out = {"gold_win_rate_vs_initial": _pairwise_accuracy(mine, theirs), "gold_score": _mean(mine),
           "rm_accuracy_current_policy": _rm_accuracy(cfg, device, reward_dir, pairs, meter),
           "rm_accuracy_heldout": _rm_accuracy(cfg, device, reward_dir, _asset_pairs("heldout_pairs.jsonl"), meter),
           "rm_accuracy_shifted": _rm_accuracy(cfg, device, reward_dir, _asset_pairs("shifted_pairs.jsonl"), meter)}
    if base_reward_dir is not None:
        out["rm_accuracy_current_policy_base_rm"] = out["rm_accuracy_current_policy"] \
            if base_reward_dir == reward_dir else _rm_accuracy(cfg, device, base_reward_dir, pairs, meter)
    return out


def _asset_pairs(name: str) -> list[dict]:
    """An asset file's pairs; none (an accuracy of NaN) where the asset set predates the file."""
    try:
        return read_jsonl(asset(name))
    except MtcoreError:
        return []


def _policy_pairs(prompts, answers) -> list[dict]:
    """Every gold-ordered pair among each prompt's answers (pairs of equal gold are skipped)."""
    rows = []
    for prompt, texts in zip(prompts, answers):
        golds = [gold_score(prompt, t) for t in texts]
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                if golds[i] != golds[j]:
                    hi, lo = (i, j) if golds[i] > golds[j] else (j, i)
                    rows.append({"prompt": prompt, "chosen": texts[hi], "rejected": texts[lo]})
    return rows


def world():
    """The toy world as the loop meets it (rundir.World): the built-in models, the toy splits, the
    gold-judged metrics and the plot."""
    from mtcore.rundir import World

    def splits(cfg):
        return make_splits(cfg.seed, cfg.iters, {"policy": cfg.policy_split_size, "rm": cfg.rm_split_size,
                                                 "selection": cfg.selection_size}, world_digits())

    return World(asset("policy"), asset("reward"), splits, gold_metrics, plot)


def _gold_metrics_initial(run, meter) -> dict:
    """The initial policy's test answers (kept for the win rates; rank 0 writes them) and the base RM's
    accuracies: `mtcore train`'s evaluation at t = 0."""
    from mtcore import parallel
    prompts = run.splits["test"]
    answers = _test_answers(run.cfg, run.device, run.policy(0), prompts, run.seed(0, "eval"), meter)
    if parallel.is_main():
        write_jsonl(run.dir / "initial_test.jsonl", [{"prompt": p, "answers": a} for p, a in zip(prompts, answers)])
    return _metrics(run.cfg, run.device, run.reward(0), prompts, answers, answers, meter)  # win rate: 0.5


def gold_metrics(run, t: int, meter) -> dict:
    """Iteration t's gold-judged numbers: the policy pi_t against the initial policy on the test
    prompts (ties half), its mean gold score, and r_t's accuracy on gold-ordered pairs of pi_t's own
    answers and on the fixed held-out pairs of the initial policy's answers. (A run stopped early at
    t has no evaluation for t: it kept pi_{t-1}, evaluated at t - 1.) t = 0: the initial models.

    Beside r_t's accuracy on pi_t's pairs, the base RM r_0's on the same pairs
    (rm_accuracy_current_policy_base_rm): the M-step's gain, paired. Comparing with the fixed-RM
    baseline's own rm_accuracy_current_policy reads two RMs on two policies' pairs, whose difficulty
    differs with the policy."""
    if t == 0:
        return _gold_metrics_initial(run, meter)
    prompts = run.splits["test"]
    answers = _test_answers(run.cfg, run.device, run.policy(t), prompts, run.seed(t, "eval"), meter)
    initial = [r["answers"] for r in read_jsonl(run.dir / "initial_test.jsonl")]
    return {**_metrics(run.cfg, run.device, run.reward(t), prompts, answers, initial, meter, run.reward(0)),
            **pair_diagnostics(run.iter_dir(t))}


def pair_diagnostics(iter_dir: Path) -> dict:
    """What the gold judge says of the pairs an iteration trained on (diagnostics only: no gold label
    reaches training): the share of the E-step's chosen/rejected pairs and of the M-step's kept
    pseudo-pairs whose chosen side is gold-better (gold ties count half), and how many of each tie.

    For the pseudo-pairs, beside the pseudo-label's gold accuracy: r_{t-1}'s own (its delta's sign, a
    zero delta half) on the same gold-ordered pairs, and the "override" pairs, kept although r_{t-1}
    prefers y_old (delta <= 0, inside the epsilon filter), with their pseudo-label's gold accuracy. The
    M-step can only teach r_{t-1} something through pseudo-labels more right than r_{t-1} itself; the
    override pairs are the ones that can change its mind, and they need a gold accuracy above 0.5."""
    out = {}
    for name, file in (("estep_pairs", "pairs.jsonl"), ("pseudo_pairs", "pseudo_pairs.jsonl")):
        rows = read_jsonl(iter_dir / file) if (iter_dir / file).exists() else []
        chosen = [gold_score(r["prompt"], r["chosen"]) for r in rows]
        rejected = [gold_score(r["prompt"], r["rejected"]) for r in rows]
        out[f"{name}_gold_accuracy"] = _pairwise_accuracy(chosen, rejected) if rows else float("nan")
        out[f"{name}_gold_ties"] = sum(c == r for c, r in zip(chosen, rejected))
        if name == "pseudo_pairs":
            out.update(_override_diagnostics([r["delta"] for r in rows], chosen, rejected))
    return out


def _override_diagnostics(deltas: list[float], new: list[float], old: list[float]) -> dict:
    """r_{t-1}'s gold accuracy on the kept pseudo-pairs it can be judged on (gold not tied), and the
    override pairs (delta <= 0): how many, and their pseudo-label's gold accuracy."""
    ordered = [(d, n, o) for d, n, o in zip(deltas, new, old) if n != o]
    rm_right = [1.0 if (d > 0) == (n > o) and d != 0 else 0.5 if d == 0 else 0.0 for d, n, o in ordered]
    override = [(n, o) for d, n, o in zip(deltas, new, old) if d <= 0]
    return {"pseudo_pairs_rm_gold_accuracy": _mean(rm_right) if ordered else float("nan"),
            "pseudo_pairs_override": len(override),
            "pseudo_pairs_override_gold_accuracy": _pairwise_accuracy(*zip(*override)) if override else float("nan")}


def _mean(xs) -> float:
    return sum(xs) / max(1, len(xs))


METRIC_KEYS = ("gold_win_rate_vs_initial", "gold_score", "rm_accuracy_current_policy", "rm_accuracy_heldout",
               "rm_accuracy_shifted")
METRIC_TITLES = {"gold_win_rate_vs_initial": "policy: gold win rate vs pi_0", "gold_score": "policy: gold score",
                 "rm_accuracy_current_policy": "RM: accuracy on the policy's pairs",
                 "rm_accuracy_heldout": "RM: accuracy on held-out pairs",
                 "rm_accuracy_shifted": "RM: accuracy on the shifted benchmark"}
METRIC_UNITS = {"gold_win_rate_vs_initial": "win rate (ties 1/2)", "gold_score": "mean gold score",
                **{k: "accuracy" for k in METRIC_KEYS if k.startswith("rm_")}}


def plot(path, metrics: dict) -> None:
    """A PNG of the gold-judged metrics per iteration (0: the initial models; none where a run predates one)."""
    from mtcore.plots import Panel, save_panels

    entries = ([metrics["initial"]] if "initial" in metrics else []) + [e for e in metrics["iterations"] if
                                                                        "gold_score" in e]
    xs = ([0] if "initial" in metrics else []) + [e["iteration"] for e in metrics["iterations"] if "gold_score" in e]
    save_panels(path, "mtcore train on the toy world: gold-judged metrics per iteration"
                + (f" (stopped at iteration {metrics['stopped_at']})" if metrics.get("stopped_at") else ""),
                [Panel(METRIC_TITLES[k], METRIC_UNITS[k], xs, [e.get(k, float("nan")) for e in entries])
                 for k in METRIC_KEYS],
                xlabel="iteration (0: the initial models)")


def gold_metrics_of(cfg, device, policy_dir, reward_dir, seed: int = 0) -> dict:
    """`mtcore eval` on the toy world: the gold-judged numbers of any policy and RM, against the
    built-in initial policy, on the toy test prompts (the same as `mtcore train`'s, seed 0 splits)."""
    prompts = make_splits(ASSET_SEED, 0, digits=world_digits())["test"]
    answers = _test_answers(cfg, device, policy_dir, prompts, seed)
    initial = _test_answers(cfg, device, asset("policy"), prompts, seed)
    return _metrics(cfg, device, reward_dir, prompts, answers, initial)
