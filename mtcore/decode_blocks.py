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
and K samplings) is one captured CUDA graph. In the static modes the host runs one block behind
(sampler.pipelined): it launches block c, then reads block c - 1's tokens from pinned memory after an
event, while block c runs; the state stays on the device, and the host loads only the columns of the
slots it refilled or freed. This module is the device's side (the state and the K steps) and the
choice of K (choose_steps, from StepTimer's measurements); the host's side is sampler.block_decoder's.
"""

import math
import time

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

    @classmethod
    def of(cls, table: torch.Tensor) -> "SlotState":
        """The state whose storage is `table` [len(FIELDS), rows]."""
        state = cls.__new__(cls)
        state.table = table
        state.pos, state.n, state.limit, state.word, state.done = table
        return state


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


MAX_AUTO_STEPS = 16
HOST_SHARE = 0.1  # automatic K: the host's time per visit, over K device steps, at most this share
WASTE_SHARE = 1 / 16  # ... and the K - 1 steps a stopped slot may waste, at most this share of max_new_tokens
TIMED_STEPS = 8  # plain steps timed before K is chosen


def choose_steps(device_s: float, host_s: float, max_new_tokens: int) -> int:
    """Automatic K (--decode-steps 0): the smallest power of two with host_s / K <= HOST_SHARE * device_s
    (host_s: the time a plain step's device waits for the host; device_s: the step's own time on the
    device), at most MAX_AUTO_STEPS, and at most 1 + WASTE_SHARE * max_new_tokens (a slot that stops
    inside a block runs up to K - 1 steps for nothing)."""
    need = host_s / (HOST_SHARE * device_s) if device_s > 0 else 1.0
    k = 1 << max(0, math.ceil(math.log2(max(need, 1.0))))
    cap = max(1, int(1 + WASTE_SHARE * max_new_tokens))
    return max(1, min(k, MAX_AUTO_STEPS, 1 << (cap.bit_length() - 1)))


class StepTimer:
    """Times the first plain decode steps: each step's device time and its whole wall time, through the
    host's sampling, copy and stop checks. Their difference is the host's share, which blocks remove.
    The device time starts at device_start, which the decoder calls once its own host preparation is
    done (so the device's wait for that preparation counts as host time): on CUDA, events from there
    to the launch's end; off CUDA, where the host runs the forward, the wall time from there to the
    launch's return."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        # per step: wall start, wall at the device work's start, wall after the launch, wall end, and
        # on CUDA the events at the device work's start and after the launch
        self.steps = []

    def _event(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def start(self):
        now = time.perf_counter()
        self.steps.append([now, now, 0.0, 0.0, self._event() if self.cuda else None, None])

    def device_start(self):
        """Where the decoder's own preparation ends and the device work begins (else: at start)."""
        self.steps[-1][1] = time.perf_counter()
        if self.cuda:
            self.steps[-1][4] = self._event()

    def launched(self):
        self.steps[-1][2] = time.perf_counter()
        if self.cuda:
            self.steps[-1][5] = self._event()

    def stop(self):
        self.steps[-1][3] = time.perf_counter()

    def ready(self) -> bool:
        return len(self.steps) > TIMED_STEPS  # the first step is not counted: it may compile or allocate

    def measured(self) -> tuple[float, float]:
        """(device seconds per step, host seconds per step that the device waited)."""
        steps = self.steps[1:]
        if self.cuda:
            device_s = sum(a.elapsed_time(b) for *_, a, b in steps) / 1e3 / len(steps)  # the steps synced
        else:
            device_s = sum(launched - begun for _, begun, launched, *_ in steps) / len(steps)
        wall_s = sum(end - start for start, _, _, end, *_ in steps) / len(steps)
        return device_s, max(0.0, wall_s - device_s)
