"""What a new run's first stages would find, found before the run writes anything (rundir.Run calls
check() for real models; the toy world's are known good). Each refusal is one error naming the option
to change and a value that fits; a setting that works but wastes the run (a batch larger than the
data) is a warning naming the option and the number of steps it leaves.

  the chat templates    both tokenizers load with their template, and render every prompt
  the context           --max-new-tokens against each model's context (a prompt with less room
                        gets a shorter response: a warning; a setting no prompt fits: an error)
  --max-length          how many prompts alone fill a training sequence (their pairs are dropped)
  the batches           --dpo-batch-size / --rm-batch-size against the pairs an iteration can have,
                        --save-every against DPO's steps (the candidates the selection judges)
"""

import logging
import math

from mtcore.data import encode_prompt, encode_response, load_tokenizer
from mtcore.errors import MtcoreError

log = logging.getLogger(__name__)


def _tokenizer(path, template: str, option: str):
    """The tokenizer with its chat template, its errors naming `option` (the policy's or the RM's)."""
    try:
        return load_tokenizer(path, template or None)
    except MtcoreError as e:
        raise MtcoreError(str(e).replace("--chat-template", option)) from None


def _snippet(prompt) -> str:
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


def _prompt_lengths(tokenizer, prompts: list, whose: str) -> list[int]:
    lengths = []
    for p in prompts:
        try:
            lengths.append(len(encode_prompt(tokenizer, p, f"the prompt {_snippet(p)}")))
        except MtcoreError as e:
            raise MtcoreError(f"{e} ({whose}'s chat template; remove the prompt from --prompts, or give another "
                              f"template)") from None
    return lengths


def _check_context(lengths: list[int], cfg, context: int, whose: str, refuse: bool) -> None:
    """The prompts plus --max-new-tokens against the model's context (max_position_embeddings). The
    sampler gives a slot at most the context, so a prompt with less room gets a shorter response, and
    one with none is skipped: a warning with the count. A --max-new-tokens that not even the shortest
    prompt leaves room for is a setting that does not fit: an error (refuse), naming what fits."""
    shortest, longest = min(lengths), max(lengths)
    if longest + cfg.max_new_tokens <= context:
        return
    if refuse and shortest + cfg.max_new_tokens > context:
        fits = f"; --max-new-tokens {context - longest} fits every prompt" if context - longest >= 1 else ""
        raise MtcoreError(f"--max-new-tokens {cfg.max_new_tokens} does not fit the {whose}'s context of {context} "
                          f"tokens (max_position_embeddings), not even after the shortest prompt ({shortest} tokens): "
                          f"at most --max-new-tokens {context - shortest}{fits}")
    cut = sum(n + cfg.max_new_tokens > context for n in lengths)
    skipped = sum(n >= context for n in lengths)
    log.warning("%d of the %d prompts (the longest %d tokens) leave less than --max-new-tokens %d in the %s's context "
                "of %d tokens: their responses are cut shorter%s", cut, len(lengths), longest, cfg.max_new_tokens,
                whose, context, f", and {skipped} that fill it are skipped" if skipped else "")


def _check_batches(cfg, n_policy: int, n_rm: int) -> None:
    """Warnings, not errors: an iteration's DPO has at most one pair per prompt of its split; the RM's
    pairs are at most those plus one pseudo-pair per prompt of the RM split (fewer once filtered)."""
    dpo_steps = math.ceil(n_policy / cfg.dpo_batch_size) * cfg.dpo_epochs
    if cfg.dpo_batch_size > n_policy:
        log.warning("--dpo-batch-size %d is more than an iteration's at most %d pairs (one per prompt of its split, "
                    "--policy-split-size): DPO makes at most %d step(s); lower --dpo-batch-size",
                    cfg.dpo_batch_size, n_policy, dpo_steps)
    if cfg.save_every > dpo_steps:
        log.warning("--save-every %d is more than DPO's at most %d step(s): the selection judges one candidate, "
                    "the last step's; lower --save-every", cfg.save_every, dpo_steps)
    n_rm_pairs = n_policy + (n_rm if cfg.m_step else 0)
    if cfg.m_step and cfg.rm_batch_size > n_rm_pairs:
        log.warning("--rm-batch-size %d is more than an iteration's at most %d RM pairs: the RM makes at most %d "
                    "step(s); lower --rm-batch-size", cfg.rm_batch_size, n_rm_pairs,
                    math.ceil(n_rm_pairs / cfg.rm_batch_size) * cfg.rm_epochs)


def check(run, policy_args, reward_args) -> None:
    """Everything above for run (a rundir.Run whose splits are made, nothing written yet), its base
    models' ModelArgs as checkpoint.check_checkpoint read them."""
    cfg = run.cfg
    prompts = [p for name in sorted(run.splits) for p in run.splits[name]]
    policy_tok = _tokenizer(run.base_policy, cfg.chat_template, "--chat-template")
    lengths = _prompt_lengths(policy_tok, prompts, "the policy")
    _check_context(lengths, cfg, policy_args.max_position_embeddings, "policy", refuse=True)
    reward_tok = _tokenizer(run.base_reward, cfg.reward_chat_template, "--reward-chat-template")
    reward_lengths = _prompt_lengths(reward_tok, prompts, "the reward model")
    encode_response(reward_tok, "")  # the end-of-turn id exists
    # the scorer cuts each sequence to --max-length: only a reward model's context below that can cut it
    if reward_args.max_position_embeddings < cfg.max_length:
        _check_context([n + 1 for n in reward_lengths], cfg, reward_args.max_position_embeddings, "reward model",
                       refuse=False)
    too_long = sum(n >= cfg.max_length for n in lengths)
    if too_long:
        log.warning("--max-length %d: %d of the %d prompts alone fill a training sequence, so their pairs are "
                    "dropped from DPO and RM training; raise --max-length", cfg.max_length, too_long, len(prompts))
    _check_batches(cfg, len(run.splits["policy_1"]), len(run.splits["rm"]))
