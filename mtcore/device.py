"""The device a command runs on, and the one precision policy (as nanoGPT's device/dtype/ctx block):
on CUDA bf16 compute (autocast over fp32 master weights in training; bf16 weights for inference),
FSDP gathering parameters in bf16 and reducing gradients in fp32; on the CPU fp32 throughout."""

import os
from typing import NamedTuple

import torch

from mtcore.errors import MtcoreError


def default_device(device=None) -> torch.device:
    """`device` as given, else $MTCORE_DEVICE (the tests pin themselves to the CPU with it), else
    CUDA where there is a GPU, else the CPU. A device this machine does not
    have, or a string that names none, is a one-line error."""
    device = device or os.environ.get("MTCORE_DEVICE")
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MtcoreError(f"--device {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise MtcoreError(f"--device {device!r}: mtcore runs on cpu or cuda")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise MtcoreError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return dev


class Precision(NamedTuple):
    device: torch.device
    dtype: torch.dtype  # what the matmuls compute in; inference loads its weights in it
    autocast: torch.autocast  # the context training and scoring compute under (re-enterable, not nestable)
    fsdp: "MixedPrecisionPolicy"  # how FSDP2 gathers parameters and reduces gradients


def precision(device=None) -> Precision:
    """The policy on `device` (as given, else default_device's choice)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    device = torch.device(device) if device is not None else default_device()
    cuda = device.type == "cuda"
    return Precision(device, torch.bfloat16 if cuda else torch.float32,
                     torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda),
                     MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else None, reduce_dtype=torch.float32))


def default_dtype(device) -> torch.dtype:
    """The dtype inference loads weights in on `device`: the policy's compute dtype."""
    return precision(device).dtype
