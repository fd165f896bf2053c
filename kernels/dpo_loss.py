"""DPO loss over per-pair sequence log-probs, with its gradient computed in the same pass.

Inputs: policy_chosen, policy_rejected, ref_chosen, ref_rejected, each [B] (sequence log-prob sums).
    m = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)          [B]
    sigmoid: l = -(1 - ls) * logsigmoid(beta * m) - ls * logsigmoid(-beta * m)
    ipo:     l = (m - 1 / (2 beta))^2
    hinge:   l = relu(1 - beta * m)
    loss = mean(l);  dl/dm in closed form, so backward is a scale:
    d loss / d policy_chosen = dl/dm / B,   d loss / d policy_rejected = -dl/dm / B.
Also returned (no gradient): rewards beta * (policy - ref) for chosen and rejected, margins
(chosen - rejected rewards) and accuracy (share of pairs with a positive margin).

One Triton program per BLOCK pairs, all math in fp32. The torch path computes the same closed forms.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mtcore.kernels.utils import device_guard, next_power_of_2, tl, triton, use_triton

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
MAX_BLOCK = 1024


class DPOOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable in the policy log-probs
    chosen_rewards: torch.Tensor  # [B] beta * (policy_chosen - ref_chosen), detached
    rejected_rewards: torch.Tensor  # [B]
    margins: torch.Tensor  # [B] chosen_rewards - rejected_rewards
    accuracy: torch.Tensor  # scalar, share of pairs with margin > 0


@triton.jit
def _log_sigmoid(x):
    # min(x, 0) - log(1 + exp(-|x|)): no overflow for either sign
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _dpo_fwd_kernel(pc_ptr, pr_ptr, rc_ptr, rr_ptr, loss_ptr, dldm_ptr, chosen_rw_ptr, rejected_rw_ptr, n_pairs,
                    beta, label_smoothing, LOSS_TYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_pairs
    pc = tl.load(pc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pr = tl.load(pr_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rc = tl.load(rc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rr = tl.load(rr_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = (pc - pr) - (rc - rr)
    if LOSS_TYPE == 0:  # sigmoid, with label smoothing
        x = beta * m
        log_sig_pos = _log_sigmoid(x)
        log_sig_neg = _log_sigmoid(-x)
        loss = -(1.0 - label_smoothing) * log_sig_pos - label_smoothing * log_sig_neg
        dldm = beta * (-(1.0 - label_smoothing) * tl.exp(log_sig_neg) + label_smoothing * tl.exp(log_sig_pos))
    elif LOSS_TYPE == 1:  # ipo
        d = m - 1.0 / (2.0 * beta)
        loss = d * d
        dldm = 2.0 * d
    else:  # hinge
        h = 1.0 - beta * m
        loss = tl.maximum(h, 0.0)
        dldm = tl.where(h > 0.0, -beta, 0.0)
    tl.store(loss_ptr + offs, loss, mask=mask)
    tl.store(dldm_ptr + offs, dldm, mask=mask)
    tl.store(chosen_rw_ptr + offs, beta * (pc - rc), mask=mask)
    tl.store(rejected_rw_ptr + offs, beta * (pr - rr), mask=mask)


def launch_config(n_pairs: int) -> int:
    """BLOCK for n_pairs pairs: the only configs ever launched are powers of two in [128, MAX_BLOCK]."""
    return min(MAX_BLOCK, max(128, next_power_of_2(n_pairs)))


def _dpo_forward_triton(pc, pr, rc, rr, beta, loss_type, label_smoothing):
    # fp32 in: [B] is tiny, and one pointer dtype means one compiled kernel per config
    pc, pr, rc, rr = (t.float() for t in (pc, pr, rc, rr))
    B = pc.shape[0]
    out = [torch.empty(B, dtype=torch.float32, device=pc.device) for _ in range(4)]
    block = launch_config(B)
    with device_guard(pc):
        _dpo_fwd_kernel[(triton.cdiv(B, block),)](pc, pr, rc, rr, *out, B, float(beta), float(label_smoothing),
                                                  LOSS_TYPE=LOSS_TYPES.index(loss_type), BLOCK=block)
    return out  # losses, dldm, chosen_rewards, rejected_rewards


def _dpo_forward_torch(pc, pr, rc, rr, beta, loss_type, label_smoothing):
    pc, pr, rc, rr = (t.float() for t in (pc, pr, rc, rr))
    m = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        x = beta * m
        log_sig_pos, log_sig_neg = F.logsigmoid(x), F.logsigmoid(-x)
        losses = -(1 - label_smoothing) * log_sig_pos - label_smoothing * log_sig_neg
        dldm = beta * (-(1 - label_smoothing) * log_sig_neg.exp() + label_smoothing * log_sig_pos.exp())
    elif loss_type == "ipo":
        d = m - 1 / (2 * beta)
        losses, dldm = d * d, 2 * d
    else:
        h = 1 - beta * m
        losses, dldm = h.clamp(min=0), torch.where(h > 0, -beta, 0.0)
    return losses, dldm, beta * (pc - rc), beta * (pr - rr)


def _check(tensors, beta, loss_type, label_smoothing):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    shape = tensors[0].shape
    if len(shape) != 1 or shape[0] == 0 or any(t.shape != shape for t in tensors):
        raise ValueError(f"inputs must be four non-empty [B] tensors, got {[tuple(t.shape) for t in tensors]}")


class DPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pc, pr, rc, rr, beta, loss_type, label_smoothing):
        forward = _dpo_forward_triton if use_triton(pc) else _dpo_forward_torch
        losses, dldm, chosen_rewards, rejected_rewards = forward(
            *(t.contiguous() for t in (pc, pr, rc, rr)), beta, loss_type, label_smoothing)
        ctx.save_for_backward(dldm)
        ctx.dtypes = (pc.dtype, pr.dtype)
        ctx.mark_non_differentiable(chosen_rewards, rejected_rewards)
        return losses.mean(), chosen_rewards, rejected_rewards

    @staticmethod
    def backward(ctx, grad_loss, _grad_chosen_rewards, _grad_rejected_rewards):
        (dldm,) = ctx.saved_tensors
        grad_m = dldm * (grad_loss / dldm.shape[0])  # [B]
        return grad_m.to(ctx.dtypes[0]), (-grad_m).to(ctx.dtypes[1]), None, None, None, None, None


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, loss_type="sigmoid",
             label_smoothing=0.0) -> DPOOutput:
    """DPO loss (mean over pairs) and per-pair rewards, margins and accuracy. Inputs [B] log-prob sums."""
    _check((policy_chosen, policy_rejected, ref_chosen, ref_rejected), beta, loss_type, label_smoothing)
    loss, chosen_rewards, rejected_rewards = DPOLoss.apply(
        policy_chosen, policy_rejected, ref_chosen.detach(), ref_rejected.detach(), beta, loss_type,
        label_smoothing)
    margins = chosen_rewards - rejected_rewards
    return DPOOutput(loss, chosen_rewards, rejected_rewards, margins, (margins > 0).float().mean())


def dpo_loss_ref(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, loss_type="sigmoid",
                 label_smoothing=0.0) -> DPOOutput:
    """The specification, in plain torch with autograd (float64 in the tests)."""
    m = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * m) - label_smoothing * F.logsigmoid(-beta * m))
    elif loss_type == "ipo":
        losses = (m - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * m)
    else:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    chosen_rewards = (beta * (policy_chosen - ref_chosen)).detach()
    rejected_rewards = (beta * (policy_rejected - ref_rejected)).detach()
    margins = chosen_rewards - rejected_rewards
    return DPOOutput(losses.mean(), chosen_rewards, rejected_rewards, margins, (margins > 0).float().mean())
