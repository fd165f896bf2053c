"""mtcore's Triton kernels, one op a file. Installed as `mtcore.kernels`, never as top-level `kernels`.

Each op runs Triton on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1), and a torch
implementation of the same algorithm on CPU tensors otherwise. Each has a plain-torch `*_ref`.
"""

from mtcore.kernels.bt_loss import BTOutput, bt_loss, bt_loss_ref
from mtcore.kernels.dpo_loss import DPOOutput, dpo_loss, dpo_loss_ref
from mtcore.kernels.fused_logprobs import fused_logprobs, fused_logprobs_ref, sequence_logps

__all__ = ["BTOutput", "DPOOutput", "bt_loss", "bt_loss_ref", "dpo_loss", "dpo_loss_ref", "fused_logprobs",
           "fused_logprobs_ref", "sequence_logps"]
