"""Bradley-Terry reward-model loss, with its gradient computed in the same pass.

Inputs: chosen_rewards, rejected_rewards [B]; margin [B], a float or None; center_coef >= 0.
    d = chosen - rejected - margin                                                  [B]
    loss = mean(-logsigmoid(d)) + center_coef * mean((chosen + rejected)^2)
    d loss / d chosen   = (-sigmoid(-d) + 2 center_coef (chosen + rejected)) / B
    d loss / d rejected = ( sigmoid(-d) + 2 center_coef (chosen + rejected)) / B
Also returned (no gradient): margins chosen - rejected, and accuracy (share of pairs with chosen > rejected).

One Triton program per BLOCK pairs, all math in fp32. The torch path computes the same closed forms.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mtcore.kernels.utils import device_guard, next_power_of_2, tl, triton, use_triton

MAX_BLOCK = 1024


class BTOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable in both reward vectors
    margins: torch.Tensor  # [B] chosen - rejected, detached
    accuracy: torch.Tensor  # scalar, share of pairs with chosen > rejected


@triton.jit
def _bt_fwd_kernel(chosen_ptr, rejected_ptr, margin_ptr, loss_ptr, grad_chosen_ptr, grad_rejected_ptr, n_pairs,
                   center_coef, HAS_MARGIN: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_pairs
    rc = tl.load(chosen_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rr = tl.load(rejected_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = rc - rr
    if HAS_MARGIN:
        d -= tl.load(margin_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # -logsigmoid(d) = log(1 + exp(-|d|)) - min(d, 0); sigmoid(-d) = exp(logsigmoid(-d))
    log_sig_neg = tl.minimum(-d, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(d)))
    total = rc + rr
    loss = tl.log(1.0 + tl.exp(-tl.abs(d))) - tl.minimum(d, 0.0) + center_coef * total * total
    sig_neg = tl.exp(log_sig_neg)
    tl.store(loss_ptr + offs, loss, mask=mask)
    tl.store(grad_chosen_ptr + offs, -sig_neg + 2.0 * center_coef * total, mask=mask)
    tl.store(grad_rejected_ptr + offs, sig_neg + 2.0 * center_coef * total, mask=mask)


def launch_config(n_pairs: int) -> int:
    """BLOCK for n_pairs pairs: the only configs ever launched are powers of two in [128, MAX_BLOCK]."""
    return min(MAX_BLOCK, max(128, next_power_of_2(n_pairs)))


def _bt_forward_triton(chosen, rejected, margin, center_coef):
    # fp32 in: [B] is tiny, and one pointer dtype means one compiled kernel per config
    chosen, rejected = chosen.float(), rejected.float()
    margin = None if margin is None else margin.float()
    B = chosen.shape[0]
    out = [torch.empty(B, dtype=torch.float32, device=chosen.device) for _ in range(3)]
    block = launch_config(B)
    with device_guard(chosen):
        _bt_fwd_kernel[(triton.cdiv(B, block),)](chosen, rejected, chosen if margin is None else margin, *out, B,
                                                 float(center_coef), HAS_MARGIN=margin is not None, BLOCK=block)
    return out  # losses, d/dchosen, d/drejected (per pair, before the 1/B of the mean)


def _bt_forward_torch(chosen, rejected, margin, center_coef):
    rc, rr = chosen.float(), rejected.float()
    d = rc - rr if margin is None else rc - rr - margin.float()
    total = rc + rr
    sig_neg = torch.sigmoid(-d)
    losses = -F.logsigmoid(d) + center_coef * total * total
    return losses, -sig_neg + 2 * center_coef * total, sig_neg + 2 * center_coef * total


class BTLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chosen, rejected, margin, center_coef):
        forward = _bt_forward_triton if use_triton(chosen) else _bt_forward_torch
        losses, grad_chosen, grad_rejected = forward(chosen.contiguous(), rejected.contiguous(),
                                                     None if margin is None else margin.contiguous(), center_coef)
        ctx.save_for_backward(grad_chosen, grad_rejected)
        ctx.dtypes = (chosen.dtype, rejected.dtype)
        return losses.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_chosen, grad_rejected = ctx.saved_tensors
        scale = grad_loss / grad_chosen.shape[0]
        return (grad_chosen * scale).to(ctx.dtypes[0]), (grad_rejected * scale).to(ctx.dtypes[1]), None, None


def _as_margin(margin, like):
    if margin is None or isinstance(margin, torch.Tensor):
        return None if margin is None else margin.detach()
    return torch.full_like(like, float(margin), dtype=torch.float32)


def bt_loss(chosen_rewards, rejected_rewards, *, margin=None, center_coef=0.0) -> BTOutput:
    """Bradley-Terry loss (mean over pairs), margins and accuracy. Inputs [B] rewards."""
    if chosen_rewards.dim() != 1 or chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.numel() == 0:
        raise ValueError(f"chosen and rejected rewards must be two non-empty [B] tensors, got "
                         f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}")
    if center_coef < 0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef}")
    margin = _as_margin(margin, chosen_rewards)
    if margin is not None and margin.shape != chosen_rewards.shape:
        raise ValueError(f"margin must be a float or a [B] tensor, got shape {tuple(margin.shape)}")
    loss = BTLoss.apply(chosen_rewards, rejected_rewards, margin, center_coef)
    margins = (chosen_rewards - rejected_rewards).detach()
    return BTOutput(loss, margins, (margins > 0).float().mean())


def bt_loss_ref(chosen_rewards, rejected_rewards, *, margin=None, center_coef=0.0) -> BTOutput:
    """The specification, in plain torch with autograd (float64 in the tests)."""
    d = chosen_rewards - rejected_rewards
    if margin is not None:
        d = d - margin
    loss = -F.logsigmoid(d).mean() + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    margins = (chosen_rewards - rejected_rewards).detach()
    return BTOutput(loss, margins, (margins > 0).float().mean())
