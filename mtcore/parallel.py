"""Scale-out on torch.distributed, applied from outside the model: the process group, FSDP2,
activation checkpointing, full and sharded checkpoints, and the data-parallel helpers.

`mtcore ...` runs in one process; `torchrun --nproc_per_node N [--nnodes ...] -m mtcore ...` runs N
per node. Every helper here is the identity (or a no-op) in one process, so the trainers and the
sampler read the same either way and one process computes exactly what it did before.

- Training (train.fit): each block is `fully_shard`ed, then the root (embedding, final norm, head).
  The root keeps its parameters gathered from forward to the end of backward
  (reshard_after_forward=False), so the head weight that fused_logprobs reads outside the model's
  forward is the full [V, dim] matrix, and its gradient is reduce-scattered with the root's at the
  end of backward. On CUDA, parameters are all-gathered in bf16 and gradients reduced in fp32 over
  fp32 shards (the master weights); on the CPU everything stays fp32.
- Data parallelism: each rank runs its share of a global batch; the trainers all-reduce sums
  (losses, counts, tokens) so every rank reports the global batch.
- Generation and scoring: each rank holds the full model and serves every world_size-th item;
  `map_shards` gathers the results back into item order.
- Checkpoints: rank 0 writes the Hugging Face checkpoint from the gathered full state dict;
  model and optimizer shards go through torch.distributed.checkpoint (every rank writes its own
  shard, so several nodes need a shared filesystem), so a run resumes mid-fit.
"""

import atexit
import contextlib
import functools
import logging
import os
import shutil
import signal
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from mtcore.device import precision, default_device
from mtcore.errors import MtcoreError
from mtcore.files import read_json, replace_dir, write_json
from mtcore.model import Llama


# ------------------------------------------------------------------------------------------------
# The process group
# ------------------------------------------------------------------------------------------------

def init() -> None:
    """Join the process group when torchrun started this process (it sets WORLD_SIZE); else nothing.
    NCCL carries CUDA tensors, gloo CPU ones (and everything on a machine without CUDA, or where
    MTCORE_DEVICE=cpu keeps the run off its GPUs)."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return
    _die_with_launcher()
    backend = "gloo"
    if default_device().type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # then "cuda" means this rank's GPU
        backend = "cpu:gloo,cuda:nccl"
    store = _attempt_store()
    if store is None:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
    atexit.register(_destroy)


def _attempt_store():
    """Under torchrun's shared store (TORCHELASTIC_USE_AGENT_STORE, the default), the store seen by this
    attempt only: a prefix per restart (TORCHELASTIC_RESTART_COUNT). torchrun keeps one TCPStore across
    --max-restarts, unprefixed, so a restarted rank read the killed ranks' addresses from the attempt
    before: "Gloo connectFullMesh failed ... Connection refused" on a dead rank's port, or a hang, when
    it looked before its peer had written its new one (docs/scale-out.md#restarts). None elsewhere."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed.constants import default_pg_timeout

    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                           is_master=False, timeout=default_pg_timeout)
    return dist.PrefixStore(f"mtcore/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


def _die_with_launcher() -> None:
    """Under torchrun (it sets TORCHELASTIC_RUN_ID) on Linux, SIGTERM to this rank when its launcher
    dies (prctl PR_SET_PDEATHSIG). torchrun starts each rank in a session of its own, so what kills the
    launcher outright (SIGKILL, or a signal it does not handle: SIGUSR1 without --signals-to-handle)
    reaches no rank, and the ranks ran on as orphans; now they stop at their next safe point."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
        logging.getLogger(__name__).warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this rank will outlive "
                                            "a launcher that is killed", ctypes.get_errno())


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """End a process that succeeded under torchrun: wait until every rank is here (a gloo barrier
    also waits for this rank's earlier collectives), leave the process group, flush, and exit 0
    at once. Not returning is the point: a gloo worker thread may still be releasing its last
    collective's tensors, which takes the GIL, and if that happens while the interpreter is
    finalising the thread calls std::terminate and the rank dies with SIGABRT after its work was
    done (seen in the 2-process tests; FSDP2 keeps the group alive past destroy_process_group, so
    its threads are not joined there). Every output is already written (atomically) by then.
    After an error there is no barrier, since the other ranks may never arrive; the atexit hook
    destroys the group. Without a process group (no torchrun): returns."""
    if not dist.is_initialized():
        return
    if world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Every rank's values, summed elementwise (float64)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a CPU tensor over ranks, in place."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_max(value: int) -> int:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def all_gather_object(obj) -> list:
    """[rank 0's obj, rank 1's, ...] on every rank (pickled: for small, plain objects)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------------------
# Shares of the work
# ------------------------------------------------------------------------------------------------

def balanced_shares(sizes: list[int], n: int) -> list[list[int]]:
    """Positions of items of the given sizes (tokens) dealt to n ranks, each share in input order:
    the largest item first, each to the rank with the fewest tokens so far (ties: the lowest rank)."""
    shares, load = [[] for _ in range(n)], [0] * n
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = min(range(n), key=lambda r: (load[r], r))
        load[r] += sizes[i]
        shares[r].append(i)
    return [sorted(s) for s in shares]


def my_share(sizes: list[int]) -> list[int]:
    """This rank's share of balanced_shares (all positions, in order, in one process)."""
    return balanced_shares(sizes, world_size())[rank()]


def map_shards(fn, items: list) -> list:
    """fn(items[rank::world_size]) -> one result per item on each rank, gathered into item order."""
    n = world_size()
    mine = fn(items[rank()::n])
    if n == 1:
        return mine
    out = [None] * len(items)
    for r, part in enumerate(all_gather_object(mine)):
        out[r::n] = part
    return out


# ------------------------------------------------------------------------------------------------
# FSDP2 and activation checkpointing
# ------------------------------------------------------------------------------------------------

def checkpoint_blocks(model: Llama) -> None:
    """Activation checkpointing per transformer block: each block's forward is recomputed in
    backward instead of keeping its activations (before shard_model, as torchtitan orders them)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.model.layers:
        block.forward = functools.partial(checkpoint, block.__class__.forward.__get__(block), use_reentrant=False)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: Llama) -> Llama:
    """FSDP2 over all ranks: each transformer block, then the root; in place. A no-op in one process
    and on a model already sharded."""
    if world_size() == 1 or is_sharded(model):
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world_size(),))
    mp = precision(device).fsdp
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    # The head is used outside forward (fused_logprobs, the reward head): keep the root gathered
    # until backward has produced its gradient, which the root's post-backward then reduce-scatters.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def parallelize(model: Llama, grad_checkpointing: bool = False) -> Llama:
    """How a model trains here, applied from outside it, once, before train.fit (torchtitan's
    parallelize_fn): activation checkpointing per block if asked, then FSDP2 over all ranks (in one
    process, unsharded). Returns the model, changed in place."""
    if grad_checkpointing:
        checkpoint_blocks(model)
    return shard_model(model)


def clip_grad_norm_(parameters, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ over parameters sharded or not: returns the total L2 norm of all
    the gradients before clipping, on every rank (a sharded norm is reduced over the shards first)."""
    from torch.distributed.tensor import DTensor

    parameters = list(parameters)
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return float(norm)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

def full_model(model: Llama) -> Llama | None:
    """A sharded model's full state dict gathered onto rank 0's CPU, as a plain Llama there (None on
    the other ranks). Every rank must call it: the gather is a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None
    with torch.device("meta"):
        full = Llama(model.args, model.kind)
    full.load_state_dict(state, assign=True)
    full.tie_weights()
    full.source = getattr(model, "source", None)
    return full


@contextlib.contextmanager
def _one_process_dcp():
    """Silence DCP's warning that it runs in one process: here, that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_train_state(path, model, optimizer, trainer: dict) -> None:
    """Model and optimizer state, sharded as they are, through torch.distributed.checkpoint, and
    `trainer` (JSON: step, schedule, metrics so far) into `path`, replacing what is there."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        with _one_process_dcp():
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp, no_dist=world_size() == 1)
        if is_main():  # trainer.json last, then one rename: a directory holding it is complete
            write_json(tmp / "trainer.json", trainer)
            replace_dir(tmp, path)
    except (Exception, CheckpointException) as e:  # a full or read-only disk; the last state stays
        if isinstance(e, MtcoreError):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise MtcoreError(f"{path}: cannot save the training state ({_dcp_reason(e)}); the last one saved, if any, "
                          f"is unchanged") from None
    barrier()


def _dcp_reason(e: BaseException) -> str:
    """The cause of a torch.distributed.checkpoint error in a few words: DCP's CheckpointException
    wraps each rank's exception (an OSError's strerror, e.g. "No space left on device")."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))[0]
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def load_train_state(path, model, optimizer) -> dict | None:
    """Restore what save_train_state wrote into model and optimizer (resharded to this world size
    if it changed); returns its `trainer` dict, or None when `path` holds no complete state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    if not (path / "trainer.json").exists():
        return None
    trainer = read_json(path / "trainer.json")
    if not isinstance(trainer, dict) or not {"run", "scheduler", "history"} <= trainer.keys():
        raise MtcoreError(f"{path / 'trainer.json'}: not a training state that mtcore wrote; delete {path} to "
                          f"start this training from its first step")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        with _one_process_dcp():
            dcp.load(state, checkpoint_id=path, no_dist=world_size() == 1)
    except (Exception, CheckpointException) as e:  # DCP's errors (its CheckpointException is a BaseException)
        raise MtcoreError(f"{path}: unreadable training state ({_dcp_reason(e)}); delete it to start this training "
                          f"from its first step") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return trainer
