"""Counter-based random streams for sampling: every uniform draw is a hash of (seed, prompt key,
sample index, token position, attempt), computed on the tensors' device without a host sync.

A request's tokens then depend on its own key alone: the same seed gives the same samples with 1
cache slot or 256, on 1 rank or 8, in one call or in shards, before or after a resume (on the same
kind of device: the logits themselves may differ across devices). Two policies answering the same
prompts under one seed draw the same uniforms, prompt by prompt and position by position: common
random numbers, which make a comparison of the two sharper (mutual_taught.stage_seed).

The hash is MurmurHash3's 32-bit finaliser (fmix32) chained over the key's words, in int64 arithmetic
kept below 2**63 (each 32-bit product is split in two halves); the top 24 bits of the result are the
uniform, exactly representable in float32 as torch.rand's are. tests/test_sampler.py checks the
uniforms' distribution and the independence of neighbouring keys.
"""

import torch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_POSITION_BITS = 20  # the attempt counter sits above the position: positions stay below 2**20


def _mul32(x, c: int):
    """(x * c) mod 2**32 for 32-bit x (int or int64 tensor) and constant c, every product < 2**49."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def request_word(seed: int, prompt_key: int, sample: int) -> int:
    """The hash state of one request (on the host, once per request): seed, prompt key, sample index."""
    h = _fmix32(_GOLDEN ^ (seed & _M32))
    h = _fmix32(h ^ ((seed >> 32) & _M32))
    h = _fmix32(h ^ (prompt_key & _M32))
    return _fmix32(h ^ (sample & _M32))


class Draws:
    """The uniform draws of one sampling step, one row per sequence: keys [R, 2] int64 on the device,
    each row (its request's word, request_word; the position of the token drawn)."""

    def __init__(self, keys: torch.Tensor):
        self.keys = keys

    @classmethod
    def for_rows(cls, seed: int, n: int, device="cpu", position: int = 0) -> "Draws":
        """n independent rows (prompt keys 0..n-1, sample 0, one position): for tests and one-off draws."""
        words = [request_word(seed, i, 0) for i in range(n)]
        return cls(torch.tensor([[w, position] for w in words], dtype=torch.long, device=device))

    def uniform(self, attempt: int = 0, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[R, 1] float32 uniforms in [0, 1) (rows: a subset of the rows, [r]). attempt numbers the
        redraws of a row at one position (nucleus_by_rejection's), each an independent draw."""
        keys = self.keys if rows is None else self.keys[rows]
        if keys.device.type == "cpu":  # the same integer arithmetic in numpy: fewer dispatch costs
            return torch.from_numpy(_top24(keys.numpy(), attempt)).to(torch.float32)[:, None] * 2.0**-24
        return (_top24(keys, attempt).to(torch.float32) * 2.0**-24)[:, None]


def _top24(keys, attempt: int):
    """The top 24 bits of fmix32(word ^ (position + attempt * 2**20)) per row (int64 tensor or numpy)."""
    return _fmix32(keys[:, 0] ^ ((keys[:, 1] + (attempt << _POSITION_BITS)) & _M32)) >> 8
