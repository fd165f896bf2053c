"""One optimisation loop and the step functions of Mutual-Taught's two updates.

- DPO (the E-step's policy update): per-sequence log-prob sums of the response tokens from the fused
  log-prob kernel over packed batches, against reference sums computed once per dataset with one
  no-grad pass (so no reference model is in memory while training), into the DPO loss kernel.
- Bradley-Terry (the M-step's reward-model fit): the reward head read at each sequence's last token
  that is not the RM's pad id (where transformers reads it), into the BT loss kernel.
- SFT (to build the toy world's initial policy): the mean NLL of the response tokens.

The loop (`fit`): the examples are shuffled each epoch (seeded) and cut into global batches of
`batch_size` examples; each global batch is packed into micro-batches of at most
`micro_batch_tokens` tokens (first-fit decreasing, a pair's two sequences together), and every
micro-batch's loss is its examples' loss sum over the global batch's count, so one optimizer step
computes the mean over the global batch whatever the micro-batching. AdamW (biases and norm weights
exempt from weight decay), cosine schedule with linear warm-up (both as transformers' Trainer has them,
which the paper trained with), gradient clipping on the total L2 norm. A NaN or inf loss stops before the optimizer
step that would use it, so the model in memory is still the last good one.

Under torchrun the caller shards the model first (parallel.parallelize, once, from outside), and each
rank runs its share of every global batch; the loss, its gradient and the metrics are still the global
batch's.
"""

import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mtcore import parallel, preempt, profile
from mtcore.checkpoint import inspect_checkpoint, stored_dtype
from mtcore.data import Batch, Example, cut_to_length, make_batch, pack
from mtcore.device import precision
from mtcore.files import check_free_space, default_file_mode, remove_quietly, write_text_atomic
from mtcore.invariant import ROW_MULTIPLE
from mtcore.config import TrainConfig
from mtcore.errors import MtcoreError
from mtcore.kernels import bt_loss, bt_loss_ref, dpo_loss, dpo_loss_ref, fused_logprobs, fused_logprobs_ref
from mtcore.kernels import sequence_logps
from mtcore.model import Llama, RMSNorm
from mtcore.progress import Progress

log = logging.getLogger(__name__)

# Norm layers, whose weights take no weight decay (transformers' Trainer's rule).
NORM_LAYERS = (RMSNorm, torch.nn.RMSNorm, torch.nn.LayerNorm)
# The optimizer's conventions, in a resumable state's identity: a state saved under others (mtcore's own,
# before it followed the Trainer's warm-up and decay groups) is refused, not resumed.
CONVENTIONS = "transformers-trainer"


class NonFiniteLoss(MtcoreError):
    """The loss or gradient norm of an optimizer step is NaN or inf; the model is the last good one."""


def hidden_states(model: Llama, batch: Batch) -> torch.Tensor:
    """Flat hidden states [N', dim], in the order of batch.labels. On the CPU a packed batch runs with a
    sequence of padding after it, up to a multiple of ROW_MULTIPLE tokens (mtcore/invariant.py): a
    sequence's hidden states are then the same bits whichever others are packed with it, so a reward
    does not follow --shard-prompts, the ranks or a resume in between."""
    if batch.attention_mask is not None:
        return model(batch.tokens, attention_mask=batch.attention_mask).flatten(0, 1)  # [S, T, dim] -> [S*T, dim]
    n = batch.tokens.numel()
    extra = -n % ROW_MULTIPLE if batch.tokens.device.type == "cpu" else 0
    if not extra:
        return model(batch.tokens, batch.positions, batch.cu_seqlens, batch.max_seqlen)  # [N, dim]
    tokens = torch.cat([batch.tokens, batch.tokens.new_zeros(extra)])
    positions = torch.cat([batch.positions, torch.arange(extra, device=tokens.device)])
    cu_seqlens = torch.cat([batch.cu_seqlens, batch.cu_seqlens.new_tensor([n + extra])])
    return model(tokens, positions, cu_seqlens, max(batch.max_seqlen, extra))[:n]  # [N, dim]


def response_logps(model: Llama, batch: Batch, reference_ops: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums [S] fp32 of the scored tokens' log-probs per sequence, scored-token counts [S])."""
    hidden = hidden_states(model, batch)
    logprobs = fused_logprobs_ref if reference_ops else fused_logprobs
    logps = logprobs(hidden, model.head_weight, batch.labels)  # [N'] fp32, 0 where unscored
    return sequence_logps(logps, batch.seq_bounds, batch.labels)


def reward_index(batch: Batch, pad_id: int | None) -> torch.Tensor:
    """[S] flat index of the token each sequence's reward is read at: its last token that is not the
    RM's pad id, as transformers' LlamaForSequenceClassification reads it (with pad = <|eot_id|>, the
    token before the closing <|eot_id|>; with a pad token of its own, the last token). A sequence of
    pad tokens only reads at its first token, as transformers' argmax does."""
    if pad_id is None:
        return batch.last_index
    tokens = batch.tokens.flatten()  # [N'] in the flat order of labels
    starts = batch.seq_bounds[:-1]  # [S]
    seq = torch.repeat_interleave(torch.arange(len(starts), device=tokens.device), batch.seq_bounds.diff(),
                                  output_size=len(tokens))  # [N'] sequence of each token; no host sync
    position = torch.arange(len(tokens), device=tokens.device)  # [N']
    real = (tokens != pad_id) & (position <= batch.last_index[seq])  # padded rows: not past the sequence's end
    candidates = torch.where(real, position, -1)
    return starts.clone().scatter_reduce(0, seq, candidates, "amax")  # [S]: max(start, last real non-pad)


def sequence_rewards(model: Llama, batch: Batch) -> torch.Tensor:
    """[S] fp32 rewards, each read at reward_index (the sequence's last token that is not the pad id)."""
    hidden = hidden_states(model, batch)
    return model.score_rewards(hidden[reward_index(batch, model.args.pad_token_id)])


@dataclass
class DPO:
    """The DPO objective, against reference sums ref_logps [n_examples, 2] (chosen, rejected)."""
    ref_logps: torch.Tensor
    ref_counts: torch.Tensor
    beta: float = 0.01
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    length_normalize: bool = False  # mean instead of sum of the response tokens' log-probs

    def __call__(self, model, batch, reference_ops=False):
        sums, counts = response_logps(model, batch, reference_ops)  # [2P]
        idx = torch.tensor(batch.index)
        ref, ref_counts = self.ref_logps[idx].to(sums.device), self.ref_counts[idx].to(sums.device)  # [P, 2]
        policy = sums.view(-1, 2)  # [2P] -> [P, 2]: chosen, rejected
        if self.length_normalize:
            policy = policy / counts.view(-1, 2).clamp(min=1)
            ref = ref / ref_counts.clamp(min=1)
        loss_fn = dpo_loss_ref if reference_ops else dpo_loss
        out = loss_fn(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=self.beta, loss_type=self.loss_type,
                      label_smoothing=self.label_smoothing)
        P = policy.shape[0]
        return out.loss * P, {"accuracy": (out.margins > 0).sum(), "chosen_reward": out.chosen_rewards.sum(),
                              "rejected_reward": out.rejected_rewards.sum(), "margin": out.margins.sum()}

    @staticmethod
    def units(examples: list[Example], index: list[int]) -> int:
        return len(index)


@dataclass
class BradleyTerry:
    """-log sigmoid(r(chosen) - r(rejected) - margin) (+ centering), margin per pair from the data."""
    center_coef: float = 0.0

    def __call__(self, model, batch, reference_ops=False):
        rewards = sequence_rewards(model, batch).view(-1, 2)  # [2P] -> [P, 2]
        loss_fn = bt_loss_ref if reference_ops else bt_loss
        out = loss_fn(rewards[:, 0], rewards[:, 1], margin=batch.margins.to(rewards.device),
                      center_coef=self.center_coef)
        P = rewards.shape[0]
        return out.loss * P, {"accuracy": (out.margins > 0).sum(), "chosen_reward": rewards[:, 0].detach().sum(),
                              "rejected_reward": rewards[:, 1].detach().sum(), "margin": out.margins.sum()}

    @staticmethod
    def units(examples: list[Example], index: list[int]) -> int:
        return len(index)


class SFT:
    """The mean negative log-likelihood of the response tokens of the global batch."""

    def __call__(self, model, batch, reference_ops=False):
        sums, counts = response_logps(model, batch, reference_ops)
        return -sums.sum(), {"nll": -sums.detach().sum()}

    @staticmethod
    def units(examples: list[Example], index: list[int]) -> int:
        return sum(len(ids) - n for i in index for ids, n in examples[i].seqs)


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor at optimizer step `step` (0-based), as transformers'
    get_cosine_schedule_with_warmup gives it (the paper trained with Hugging Face's Trainer): linear
    warm-up, step s getting s/warmup (so the first step's rate is 0), then cosine decay to 0 at `total`."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def global_batches(examples: list[Example], cfg: TrainConfig) -> list[list[int]]:
    """Every optimizer step's example indices, over all epochs: reshuffled each epoch (seeded)."""
    steps = []
    for epoch in range(cfg.epochs):
        order = list(range(len(examples)))
        random.Random(cfg.seed * 1000003 + epoch).shuffle(order)
        steps.extend(order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size))
    return steps


def micro_batches(examples: list[Example], index: list[int], cfg: TrainConfig) -> list[list[int]]:
    """A global batch's example indices packed into micro-batches (first-fit decreasing on tokens)."""
    bins = pack([examples[i].n_tokens for i in index], cfg.micro_batch_tokens)
    return [[index[j] for j in b] for b in bins]


def check_micro_batches(examples: list[Example], cfg: TrainConfig, where: str) -> None:
    """Every example must fit one micro-batch: say which does not, and what to change."""
    for ex in examples:
        if ex.n_tokens > cfg.micro_batch_tokens:
            raise MtcoreError(f"{where}:{ex.line}: {ex.n_tokens} tokens ({'+'.join(str(len(s)) for s, _ in ex.seqs)}) "
                              f"do not fit --micro-batch-tokens {cfg.micro_batch_tokens}; raise it to at least twice "
                              f"--max-length, or lower --max-length")


# Resumable state on disk: fp32 weights (4 bytes a parameter) and AdamW's two fp32 moments (8).
STATE_BYTES_PER_PARAM = 12


def state_disk_bytes(n_params: int, n_steps: int, cfg: TrainConfig, saved: bool = False) -> int:
    """Bytes the resumable state (fit's state_dir) takes on disk at most while training runs: each save
    writes a whole new state beside the last one before it replaces it, so two are there when a state
    is saved again (one already there when `saved`, from an interrupted run). None without
    --save-state-every."""
    saves = (n_steps - 1) // cfg.save_state_every if cfg.save_state_every else 0
    return max(0, min(saves, 2) - saved) * STATE_BYTES_PER_PARAM * n_params


def check_training_disk(where: Path, src: Path, examples: list[Example], cfg: TrainConfig, models: int, what: str,
                        saved: bool = False) -> None:
    """Refuse, before training starts, a training whose writes will not fit the disk of `where`:
    `models` checkpoints the size of `src` (in its stored dtype) and the resumable state."""
    n_params = inspect_checkpoint(src)[3]
    need = (models * n_params * stored_dtype(src).itemsize
            + state_disk_bytes(n_params, len(global_batches(examples, cfg)), cfg, saved))
    check_free_space(where, need, what)


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """The parameters weight decay applies to, as transformers' Trainer chooses them
    (get_decay_parameter_names): every one but the biases and the weights of norm layers."""
    norms = {name for name, m in model.named_modules() if isinstance(m, NORM_LAYERS)}
    return {name for name, _ in model.named_parameters()
            if "bias" not in name.lower() and name.rpartition(".")[0] not in norms}


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's groups: the decayed parameters, and the rest at weight decay 0 (empty groups left out)."""
    decays = decay_parameter_names(model)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for name, p in named if name in decays], "weight_decay": weight_decay},
              {"params": [p for name, p in named if name not in decays], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: Llama, cfg: TrainConfig, total_steps: int):
    groups = parameter_groups(model, cfg.weight_decay)
    fused = groups[0]["params"][0].is_cuda
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    warmup = math.ceil(total_steps * cfg.warmup_ratio)  # the Trainer's warm-up steps for a ratio
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, total_steps, warmup))
    return optimizer, scheduler


def accumulate_gradients(model: Llama, examples: list[Example], index: list[int], objective, cfg: TrainConfig,
                         step: int = 0):
    """Forward and backward every micro-batch of one global batch (example indices `index`), leaving
    the gradient of the global batch's mean loss in .grad. Returns the global batch's (loss sum,
    units, stat sums, real tokens), over all ranks.

    With several ranks, each takes its share of the examples (balanced by tokens) and packs it into
    its own micro-batches; FSDP averages the ranks' gradients, hence the loss times world_size. Every
    rank runs as many passes as the busiest one, since each pass gathers and reduces parameters
    with all of them: a rank short of passes repeats the global batch's first example at weight 0.
    For the same reason a NaN/inf loss still runs its backward; the gradients are then cleared and
    NonFiniteLoss raised, before any optimizer step."""
    device = next(model.parameters()).device
    units = objective.units(examples, index)
    mine = [index[j] for j in parallel.my_share([examples[i].n_tokens for i in index])]
    micros = micro_batches(examples, mine, cfg)
    n_real = len(micros)
    micros += [[index[0]]] * (parallel.all_max(n_real) - n_real)
    totals: dict[str, float] = {}
    loss_sum, n_tokens, bad = 0.0, 0, ""
    for k, micro in enumerate(micros):
        real = k < n_real
        batch = make_batch(examples, micro, padded=cfg.padded).to(device)
        with precision(device).autocast:
            loss, stats = objective(model, batch, cfg.reference_ops)
        (loss * (float(real) * parallel.world_size()) / units).backward()
        for name, v in stats.items():
            totals[name] = totals.get(name, 0.0) + (float(v) if real else 0.0)
        if not real:
            continue
        value = loss.item()
        if not math.isfinite(value) and not bad:
            bad = f"the loss is {value} (examples at lines {sorted(examples[i].line for i in micro)[:5]})"
        loss_sum += value
        n_tokens += batch.n_tokens
    loss_sum, n_tokens, n_bad, *sums = parallel.all_reduce_sum([loss_sum, n_tokens, bool(bad), *totals.values()])
    if n_bad:
        model.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"step {step}: {next(b for b in parallel.all_gather_object(bad) if b)}")
    return loss_sum, units, dict(zip(totals, sums)), int(n_tokens)


def fit(model: Llama, examples: list[Example], objective, cfg: TrainConfig, metrics_file=None,
        desc: str = "train", on_step=None, state_dir=None, report=None) -> list[dict]:
    """Train `model` in place on `examples` with `objective`. Returns one metrics dict per optimizer
    step (also written, atomically after each step, to metrics_file as JSONL when given).
    on_step(step, n_steps, model), if given, runs after each optimizer step (e.g. to save checkpoints);
    report(row), if given, gets each step's metrics row (report.Reporter.step_logger).

    Under torchrun the model must be sharded already (parallel.parallelize, called by the caller;
    checkpoint.save_model saves it either way), and each rank runs its share of every global batch;
    the metrics are the global batch's. With state_dir, the model and optimizer state are saved there every
    cfg.save_state_every steps, and a fit that finds a state there resumes after its step.

    Raises NonFiniteLoss at a NaN/inf loss or gradient norm, before the optimizer step that would
    apply it: the model is then as it was after the last good step. After a stop signal
    (mtcore/preempt.py) the state is saved at the end of the step and Preempted raised."""
    device = next(model.parameters()).device
    torch.manual_seed(cfg.seed)
    if parallel.world_size() > 1 and not parallel.is_sharded(model):
        raise ValueError("fit under torchrun needs a sharded model: call parallel.parallelize(model) first")
    steps = global_batches(examples, cfg)
    optimizer, scheduler = make_optimizer(model, cfg, len(steps))
    history = []
    run_id = {"config": {k: v for k, v in asdict(cfg).items() if k not in ("save_state_every", "log_every")},
              "examples": len(examples), "steps": len(steps), "conventions": CONVENTIONS}
    saved = parallel.load_train_state(state_dir, model, optimizer) if state_dir is not None else None
    if saved is not None:
        if saved["run"] != run_id:
            raise MtcoreError(f"{state_dir}: holds the state of another training run; remove it to start afresh")
        scheduler.load_state_dict(saved["scheduler"])
        history = saved["history"]
        log.info("%s: resuming after step %d of %d", state_dir, len(history), len(steps))
    peak = profile.peak_flops(str(device))[0] * parallel.world_size() if device.type == "cuda" else 0.0
    model.train()
    with Progress(len(steps), desc, "steps", initial=len(history), log_every=cfg.log_every) as bar:
        for step, index in enumerate(steps[len(history):], len(history) + 1):
            start = time.perf_counter()
            loss_sum, units, totals, n_tokens = accumulate_gradients(model, examples, index, objective, cfg, step)
            grad_norm = parallel.clip_grad_norm_(model.parameters(),
                                                 cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            if not math.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLoss(f"step {step}: the gradient norm is {grad_norm}")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            profile.sync(device)
            seconds = time.perf_counter() - start
            row = {"step": step, "loss": loss_sum / units, "grad_norm": grad_norm, "lr": lr}
            n_examples = len(index)
            row.update({k: v / (units if k == "nll" else n_examples) for k, v in totals.items()})
            row.update(examples=n_examples, tokens=n_tokens, seconds=seconds, tokens_per_s=n_tokens / seconds,
                       peak_memory_mib=profile.peak_memory_mib(device))
            if peak:  # fwd + bwd = 3x the forward's model FLOPs of the global batch (known on every rank)
                row["mfu"] = 3 * forward_flops(model, [examples[i] for i in index]) / seconds / peak
            history.append(row)
            if metrics_file is not None:
                write_history(metrics_file, history)
            if report is not None:
                report(row)
            if on_step is not None:
                on_step(step, len(steps), model)
            stop = step < len(steps) and preempt.requested()
            if state_dir is not None and step < len(steps) and (
                    stop or cfg.save_state_every and step % cfg.save_state_every == 0):
                parallel.save_train_state(state_dir, model, optimizer, {
                    "run": run_id, "scheduler": scheduler.state_dict(), "history": history})
            if stop:
                raise preempt.Preempted(f"after step {step} of {len(steps)} of {desc}"
                                        + (f" (its state saved in {state_dir})" if state_dir is not None else ""))
            bar.update(1, tokens=n_tokens, loss=row["loss"], **({"accuracy": row["accuracy"]} if "accuracy" in row
                                                                 else {}))
    model.eval()
    return history


def forward_flops(model: Llama, examples: list[Example]) -> float:
    """Model FLOPs of one forward over the examples' sequences, the LM head counted only for the
    scored (response) tokens, the only ones fused_logprobs computes it for; none for a reward model."""
    seqs = [s for ex in examples for s in ex.seqs]
    scored = sum(len(ids) - n_prompt for ids, n_prompt in seqs) if model.kind == "policy" else 0
    return profile.matmul_flops(model.args, [len(ids) for ids, _ in seqs], head_tokens=scored)


def write_history(path, rows: list[dict]) -> None:
    """The metrics rows as JSONL, written by rank 0 alone."""
    if parallel.is_main():
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


@torch.no_grad()
def reference_logps(model: Llama, examples: list[Example], micro_batch_tokens: int, padded: bool = False,
                    desc: str = "reference log-probs", reference_ops: bool = False, log_every: float = 30.0,
                    finished: torch.Tensor | None = None, should_stop=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One no-grad pass: (sums [n, k] fp32, counts [n, k]) of every example's sequences' response log-probs.

    With several ranks, each computes every world_size-th micro-batch (as many passes as the busiest
    rank, for a sharded model's collectives) and the rows are summed over ranks (the others' are 0).
    finished: bool [n], updated in place. On entry, the examples already computed: a micro-batch made
    only of them is skipped (their rows are left 0), and the micro-batches are those of the whole
    pass, so a resumed pass computes the same ones as an uninterrupted pass. On return, the examples
    computed, which is all of them unless should_stop (a collective check, every rank the same answer:
    preempt.requested) said stop before a micro-batch."""
    device = next(model.parameters()).device
    k = len(examples[0].seqs)
    sums = torch.zeros(len(examples), k)
    counts = torch.zeros(len(examples), k, dtype=torch.long)
    finished = torch.zeros(len(examples), dtype=torch.bool) if finished is None else finished
    computed = torch.zeros(len(examples), dtype=torch.long)
    was_training = model.training
    model.eval()
    bins = [b for b in pack([ex.n_tokens for ex in examples], micro_batch_tokens) if not finished[b].all()]
    mine = bins[parallel.rank()::parallel.world_size()]
    n_passes = parallel.all_max(len(mine))
    with Progress(len(examples), desc, "examples", log_every=log_every) as bar:  # rank 0's share, times the ranks
        bar.resume(int(finished.sum()))
        for p in range(n_passes):
            if should_stop is not None and should_stop():
                break
            index = mine[p] if p < len(mine) else bins[0]  # a repeat only keeps the ranks in step
            batch = make_batch(examples, index, padded=padded).to(device)
            with precision(device).autocast:
                s, c = response_logps(model, batch, reference_ops)
            if p < len(mine):
                sums[index] = s.view(-1, k).float().cpu()
                counts[index] = c.view(-1, k).cpu()
                computed[index] = 1
                bar.update(len(index) * parallel.world_size(), tokens=batch.n_tokens * parallel.world_size())
    model.train(was_training)
    finished |= parallel.all_reduce_(computed) > 0
    return parallel.all_reduce_(sums), parallel.all_reduce_(counts)


def examples_digest(examples: list[Example]) -> str:
    """A hash of the token ids and prompt lengths of every example (tokenizer, template and length
    rule included, since they decide the ids)."""
    h = hashlib.sha256()
    for ex in examples:
        for ids, n in ex.seqs:
            h.update(json.dumps([n, ids], separators=(",", ":")).encode())
    return h.hexdigest()


def model_digest(src: Path, dtype: torch.dtype, device: torch.device) -> str:
    """What decides a checkpoint's outputs, cheaply: its config and each weight file's name, size and
    modification time (hashing 16 GB of weights would cost more than the pass it saves), the dtype
    and the device type."""
    h = hashlib.sha256(f"{dtype}|{device.type}".encode())
    for f in sorted(src.iterdir()):
        if f.suffix in (".safetensors", ".json"):
            st = f.stat()
            h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def reference_key(examples: list[Example], reference_dir: Path, device: torch.device) -> str:
    """A reference pass's key: its examples' token ids and the reference checkpoint, loaded in fp32
    (examples_digest, model_digest)."""
    return hashlib.sha256((examples_digest(examples) + model_digest(reference_dir, torch.float32, device)).encode()
                          ).hexdigest()


def cached_reference_logps(reference, examples: list[Example], cache_file: Path, micro_batch_tokens: int,
                           reference_ops: bool = False, log_every: float = 30.0, key: str = "", where: str = ""):
    """reference_logps, read from cache_file when present, else computed and written there (atomically).
    reference: the reference model, or a function that loads it (called only when the cache misses).
    key: what decides the log-probs (reference_key), kept in the file's metadata; a
    file of another key is not used. A cache that cannot be written (a read-only or full disk) is a
    warning, not an error: training goes on without it. The pass has a safe point before each
    micro-batch: a stop signal saves the examples computed so far beside the cache (partial_cache; only
    a rerun with the same micro_batch_tokens, whose micro-batches are the same, takes them), and the
    rerun computes the rest. where: the stop line's start ("in iteration 1's dpo stage")."""
    n, partial_file = len(examples), partial_cache(cache_file)
    partial_key = {"key": key, "micro_batch_tokens": str(micro_batch_tokens)}
    cached = _agreed(_read_tensors(cache_file, n, {"key": key}))
    if cached is not None:
        log.info("reference log-probs from %s", cache_file)
        if parallel.is_main() and partial_file is not None:  # another job finished the pass
            remove_quietly(partial_file)
        return cached["sums"], cached["counts"]
    partial = _agreed(_read_tensors(partial_file, n, partial_key))
    finished = partial["finished"].bool().clone() if partial is not None else torch.zeros(n, dtype=torch.bool)
    if partial is not None:
        log.info("%s: %d of %d examples' reference log-probs saved by an earlier run", partial_file,
                 int(finished.sum()), n)
    model = reference if isinstance(reference, torch.nn.Module) else reference()
    done = finished.clone()
    sums, counts = reference_logps(model, examples, micro_batch_tokens, reference_ops=reference_ops,
                                   log_every=log_every, finished=finished, should_stop=preempt.requested)
    del model
    if partial is not None:  # the rows saved earlier (0 in this pass's)
        sums = torch.where(done[:, None], partial["sums"], sums)
        counts = torch.where(done[:, None], partial["counts"], counts)
    if not finished.all():  # stopped by a signal (finished is all-reduced: every rank takes this branch)
        saved = partial_file is not None and _write_tensors(
            partial_file, {"sums": sums, "counts": counts, "finished": finished}, partial_key)
        parallel.barrier()
        raise preempt.Preempted(f"{where + ', ' if where else ''}in the reference log-probs, with "
                                f"{int(finished.sum())} of {n} examples "
                                + (f"saved in {partial_file}" if saved else "computed, none of them saved"))
    if cache_file is not None and _write_tensors(cache_file, {"sums": sums, "counts": counts}, {"key": key}) \
            and parallel.is_main():
        remove_quietly(partial_file)
    return sums, counts


def partial_cache(cache_file: Path | None) -> Path | None:
    """Where a reference pass stopped by a signal keeps the examples it computed (beside cache_file)."""
    return None if cache_file is None else cache_file.with_name(f"{cache_file.stem}.partial{cache_file.suffix}")


def _read_tensors(path: Path | None, n: int, metadata: dict[str, str]) -> dict | None:
    """A cache file's tensors, or None when absent, damaged (recomputed, never trusted), of another
    number of examples or of other metadata (another key: other examples or another reference)."""
    from safetensors import safe_open

    if path is None or not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if {k: (f.metadata() or {}).get(k) for k in metadata} != metadata:
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors if tensors["sums"].shape[0] == n else None
    except Exception as e:
        log.warning("%s: unreadable reference cache (%s); recomputing", path, e)
        return None


def _agreed(tensors: dict | None) -> dict | None:
    """tensors where every rank read the same ones, else None on every rank (reference_logps is
    collective, and the ranks must skip the same examples; a cache directory may be per node, missing
    on one, or hold another run's file there)."""
    digest = None
    if tensors is not None:
        h = hashlib.sha256()
        for k in sorted(tensors):
            h.update(k.encode() + tensors[k].contiguous().view(torch.uint8).numpy().tobytes())
        digest = h.hexdigest()
    digests = parallel.all_gather_object(digest)
    return tensors if digest is not None and digests == [digest] * len(digests) else None


def _write_tensors(path: Path, tensors: dict, metadata: dict[str, str]) -> bool:
    """tensors (and metadata) saved to path atomically by rank 0 (the others: True). A file that cannot
    be written (a read-only or full disk) is a warning: False."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if not parallel.is_main():
        return True
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, default_file_mode())  # safetensors writes 0600 whatever the umask
        os.replace(tmp, path)
        return True
    except (OSError, SafetensorError) as e:  # safetensors wraps the disk's error in its own
        remove_quietly(tmp)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        log.warning("%s: cannot cache the reference log-probs (%s)", path, reason)
        return False


def prepare_examples(examples: list[Example], where, max_length: int, cfg: TrainConfig) -> tuple[list[Example], dict]:
    """cut_to_length (the length rule, its counts logged), then the checks training needs: something
    left to train on, and every example within one micro-batch (a one-line error naming it)."""
    examples, report = cut_to_length(examples, max_length)
    if report["truncated"] or report["dropped"]:
        log.warning("%s: %d examples cut to --max-length %d, %d dropped (prompt alone >= --max-length)",
                    where, report["truncated"], max_length, report["dropped"])
    if not examples:
        raise MtcoreError(f"{where}: every example was dropped: each prompt alone is >= --max-length {max_length}")
    check_micro_batches(examples, cfg, str(where))
    return examples, report
