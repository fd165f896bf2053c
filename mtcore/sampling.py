"""Sampling a token from each row of logits: greedy, temperature, top-k, top-p, each row drawing from
its own counter-based random stream (mtcore/draws.py), on the logits' device. The sampler
(mtcore/sampler.py) calls sample() once per decode step; a block of steps (mtcore/decode_blocks.py)
calls it on the device with no host in between."""

import torch
import torch.nn.functional as F

from mtcore.draws import Draws
from mtcore.errors import MtcoreError


def sample(logits: torch.Tensor, params, draws: Draws) -> torch.Tensor:
    """logits [R, V] fp32 -> token ids [R], on the logits' device, each row drawing from its own random
    stream (draws: one row per logits row). Order as transformers: temperature, top-k, top-p. Top-p on
    CUDA sorts (no host sync); on the CPU it draws by rejection (nucleus_by_rejection), which is faster
    there and where a sync costs nothing."""
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]  # [R, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)  # [R, V]
    if params.top_p >= 1.0:
        return _draw(probs, draws.uniform())
    nucleus = nucleus_sorted if probs.is_cuda else nucleus_by_rejection
    return nucleus(probs, params.top_p, draws)


DRAW_BLOCK = 256  # tokens per block of the two-level inverse CDF


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One inverse-CDF draw per row of probs [R, V] (unnormalised), at the uniforms u [R, 1] in [0, 1)
    -> [R], in two levels: the block of
    DRAW_BLOCK tokens the draw falls in (a cumsum over block sums), then the token within it (a cumsum
    of that block only). Exact, and a full-vocabulary cumsum (slow on the CPU) is never built."""
    R, V = probs.shape
    padded = F.pad(probs, (0, -V % DRAW_BLOCK)) if V % DRAW_BLOCK else probs  # (Llama-3's 128256 = 501 x 256)
    blocks = padded.view(R, -1, DRAW_BLOCK)  # [R, nb, B]
    block_cdf = blocks.sum(-1).cumsum(-1)  # [R, nb]
    u = u.to(probs.device) * block_cdf[:, -1:]  # [R, 1]
    # right=True: the first entry > u, so never a zero-weight token (u may be 0); the clamps keep a draw
    # that rounding put at the very top on the last block, then token, with weight
    b = torch.minimum(torch.searchsorted(block_cdf, u, right=True), _last_positive(block_cdf))  # [R, 1]
    within = blocks.gather(1, b[:, :, None].expand(R, 1, DRAW_BLOCK)).squeeze(1).cumsum(-1)  # [R, B]
    before = block_cdf.gather(1, b) - within[:, -1:]  # the mass of the blocks before b, [R, 1]
    j = torch.minimum(torch.searchsorted(within, (u - before).clamp_(min=0), right=True), _last_positive(within))
    return (b * DRAW_BLOCK + j).squeeze(1)


def _last_positive(cdf: torch.Tensor) -> torch.Tensor:
    """[R, n] cumulative weights -> [R, 1] the index of the last entry with weight (where the cdf first
    reaches its total)."""
    return (cdf < cdf[:, -1:]).sum(-1, keepdim=True)


def nucleus_sorted(probs: torch.Tensor, top_p: float, draws: Draws) -> torch.Tensor:
    """Top-p by sorting: keep the most probable tokens whose mass before them is < top_p, draw there."""
    sorted_probs, order = probs.sort(-1, descending=True)  # [R, V]
    kept = torch.where(sorted_probs.cumsum(-1) - sorted_probs < top_p, sorted_probs, 0.0)
    return order.gather(1, _draw(kept, draws.uniform())[:, None]).squeeze(1)


def nucleus_by_rejection(probs: torch.Tensor, top_p: float, draws: Draws) -> torch.Tensor:
    """Top-p without sorting the vocabulary: draw from probs by inverse CDF, and keep the draw if it lies
    in the nucleus (the probability mass strictly above it is < top_p); redraw the rows that do not.
    Rejection from p restricted to a set samples p renormalised on that set, so this is the nucleus
    distribution exactly, at a cost of a few passes over [R, V] instead of a sort (a sort was 70% of
    sampling time on CPU). A draw is rejected with probability <= 1 - top_p. A row's k-th redraw is its
    stream's attempt k at this position, so it does not depend on the other rows."""
    tokens = _draw_in_nucleus(probs, top_p, draws.uniform())  # [R], -1 where rejected
    attempt = 0
    while True:
        redo = (tokens < 0).nonzero().squeeze(1)  # the rows to draw again (only those are copied)
        if not redo.numel():
            return tokens
        again = probs[redo]
        if torch.isnan(again).any():  # a NaN row is never accepted
            raise MtcoreError("sampling: the logits hold NaN (the model's weights or inputs do)")
        attempt += 1
        tokens[redo] = _draw_in_nucleus(again, top_p, draws.uniform(attempt, redo))


def _draw_in_nucleus(probs, top_p, u):
    """One draw per row at the uniforms u [R, 1]; -1 where it lies outside the top_p nucleus."""
    draw = _draw(probs, u)  # [R]
    mass_above = (probs * (probs > probs.gather(1, draw[:, None]))).sum(-1)  # [R]
    return torch.where(mass_above < top_p, draw, -1)
