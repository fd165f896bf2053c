"""What makes a sequence's numbers on the CPU independent of the others computed beside it, so that a run's
samples and scores do not follow --shard-prompts, the slot count, the ranks or a resume mid-shard.

Always, in every packed forward (scoring, training, the DPO reference): train.hidden_states runs a packed
micro-batch with a sequence of padding after it, up to a multiple of ROW_MULTIPLE tokens, and the fused
log-probs' torch CPU path pads a short last chunk alike (kernels/fused_logprobs.py, _padded). A CPU GEMM
of 11 rows or fewer runs other kernels, and an element-wise op's scalar tails (past its vectors, at its
threads' chunk ends) fall where the row count puts them. (Also always: the reward head is a row-wise
product and sum, model.score_rewards; the SDPA fallback pads each packed sequence to its row_length.)

With batch_invariant (sampler.generate, the runs' --batch-invariant; the CPU's eager one-step decode only,
config.batch_invariant_fits), the sampler too, where three things made a request's log-probs follow its
neighbours, each measured on a random 34M Llama:
- the row count, as above: every step's rows, and every prefill's tokens, are padded to a multiple of
  ROW_MULTIPLE (pad_rows);
- the CPU's SDPA gave a row other bits at another batch size (at head_dim 64): decode_attention_rows,
  plain matmuls and a masked softmax, instead;
- attention's sums over the cache columns ran over the longest prompt's slot length, which follows the
  prompts in the same call (a shard's): each row reads row_length(its own length) columns
  (attention_by_width), so a sum's length depends on the row alone.

The cost: bench/invariance.py. Training across rank counts still differs by its gradients' sums:
bench/ranks.py."""

import torch

from mtcore.kernels.decode_attention import decode_attention_rows
from mtcore.model import row_length

ROW_MULTIPLE = 16  # rows (tokens) of a forward come in multiples of this


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
