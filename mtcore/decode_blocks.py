"""Decode in blocks: K decode steps per visit of the host, the stop checks on the device.

sampler.generate's plain step (K = 1) returns to Python after every token: one blocking copy of the
sampled tokens for the stop checks, the scheduler, the next launch. On a GPU the device idles
meanwhile (25% of the wall at the Llama-3-8B shape, 44% at 1B, on an H100: bench/results/
decode_profile_h100_20261127.md). A block runs K steps with no host in between:

  per slot, on the device   pos (the cache column its input token goes to), n (tokens generated),
                            limit (its token budget: max_new_tokens, and the slot's length), word
                            (its random stream, draws.request_word), done (finished)
  each step                 logits -> sample (stream (word, n), as the plain step draws) -> the
                            token; a slot that is done feeds its last token again at its frozen
                            position (it rewrites a column of its own finished cache: harmless)
  after K steps             one copy of the K x slots tokens to the host, which applies the same
                            stop rule token by token (sampler.take_token) and frees finished slots

A slot that finishes inside a block wastes at most K - 1 steps; refills happen between blocks. The
tokens are those of K = 1 exactly: the same streams, the same stop rule, the same logits (each step
is the plain step's computation on the same inputs). In mode "graphs" the whole block (K forwards
and K samplings) is one captured CUDA graph. This module is the device's side (the state and the K
steps); the host's side (loading the state, taking the tokens) is sampler.block_decoder's.
"""

import torch

from mtcore.draws import Draws
from mtcore.sampling import sample

FIELDS = ("pos", "n", "limit", "word", "done")


class SlotState:
    """The block's per-slot state on the device, one column per slot it decodes: pos, n, limit, word,
    done (see the module docstring). The host loads it at each block's start in one copy into `table`'s
    storage (sampler.load_block_state), so a captured graph reads it."""

    def __init__(self, rows: int, device):
        self.table = torch.zeros(len(FIELDS), rows, dtype=torch.long, device=device)
        self.pos, self.n, self.limit, self.word, self.done = self.table  # views, updated in place


def run_block(step, state: SlotState, last: torch.Tensor, steps: int, params, stops: torch.Tensor):
    """`steps` decode steps from the tokens `last` [R] (step(tokens, pos, k) -> logits [R, V]), sampling
    and stopping on the device: (the tokens fed next [R], the sampled tokens [K, R], their log-probs
    [K, R] or None). Nothing here reads the device from the host."""
    tokens, logps = [], []
    for k in range(steps):
        logits = step(last, state.pos, k)  # [R, V]
        draws = None if params.temperature == 0 else Draws(torch.stack([state.word, state.n], 1))  # [R, 2]
        done = state.done.bool()
        token = torch.where(done, last, sample(logits, params, draws))  # [R]
        if params.logprobs:
            logps.append(logits.log_softmax(-1).gather(1, token[:, None]).squeeze(1))
        n = state.n + (~done).long()
        finished = done | torch.isin(token, stops) | (n >= state.limit)
        state.pos.copy_(torch.where(finished, state.pos, state.pos + 1))
        state.n.copy_(n)
        state.done.copy_(finished.long())
        tokens.append(token)
        last = token
    return last, torch.stack(tokens), torch.stack(logps) if logps else None
