"""What makes a sampled sequence's numbers independent of the others served beside it, on the CPU
(sampler.generate(batch_invariant=True), the runs' --batch-invariant; scoring's part is inference.fixed_bins).

Three things made a request's log-probs follow its neighbours, each measured on a random 34M Llama:
- a CPU GEMM of 11 rows or fewer runs other kernels, and an element-wise op's scalar tails (past its
  vectors, at its threads' chunk ends) fall where the row count puts them: every step's rows, and every
  prefill's tokens, are padded to a multiple of ROW_MULTIPLE (pad_rows);
- the CPU's SDPA gave a row other bits at another batch size (at head_dim 64): decode_attention_rows,
  plain matmuls and a masked softmax, instead;
- attention's sums over the cache columns ran over the longest prompt's slot length, which follows the
  prompts in the same call (a shard's): each row reads row_length(its own length) columns
  (attention_by_width), so a sum's length depends on the row alone."""

import torch

from mtcore.kernels.decode_attention import decode_attention_rows
from mtcore.model import row_length

ROW_MULTIPLE = 16  # a batch-invariant step's rows come in multiples of this (pad_rows)


def pad_rows(rows: torch.Tensor, multiple: int) -> torch.Tensor:
    """rows [R, ...] with row 0 repeated up to a multiple of `multiple` (KVCache.row_multiple): padded, a
    row's numbers do not depend on how many others run."""
    extra = -len(rows) % multiple
    return rows if not extra else torch.cat([rows, rows[:1].expand(extra, *rows.shape[1:])])


def attention_by_width(q, k_cache, v_cache, slots, lens) -> torch.Tensor:
    """decode_attention_rows with each row over the first row_length(its length) columns, the rows grouped
    by that width. The cache must hold row_length(its slot length) columns (sampler.generate sizes it so).
    q [R, Hq, D]; k_cache, v_cache [S, L, Hkv, D]; slots, lens [R]. Reads lens on the host: the CPU only."""
    groups: dict[int, list[int]] = {}
    for r, n in enumerate(lens.tolist()):
        groups.setdefault(row_length(n), []).append(r)
    out = torch.empty(q.shape, dtype=k_cache.dtype, device=q.device)
    for width, rows in groups.items():
        n, rows = len(rows), pad_rows(torch.tensor(rows, device=q.device), ROW_MULTIPLE)
        out[rows[:n]] = decode_attention_rows(q[rows], k_cache[:, :width], v_cache[:, :width], slots[rows],
                                              lens[rows])[:n]
    return out
