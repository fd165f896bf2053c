"""dpo_loss and bt_loss on both CPU paths (Triton interpreter, torch) against float64 autograd references."""

import pytest
import torch

from mtcore.kernels.bt_loss import bt_loss, bt_loss_ref
from mtcore.kernels.dpo_loss import dpo_loss, dpo_loss_ref

SIZES = [1, 7, 300, 2500]  # 2500 pairs: several Triton programs of the largest block


def leaves(tensors, dtype):
    return [t.to(dtype).detach().requires_grad_() for t in tensors]


def assert_close(got, ref64, base=None, name=""):
    err = (got.double() - ref64.double()).abs().max().item()
    if base is None:  # fp32: 1e-5 of the reference's scale
        assert err <= 1e-5 * max(1.0, ref64.abs().max().item()), f"{name}: max err {err:.3g}"
    else:
        base_err = (base.double() - ref64.double()).abs().max().item()
        assert err <= 2 * base_err + 1e-6, f"{name}: max err {err:.3g}, same-dtype torch reference {base_err:.3g}"


def dpo_inputs(B, seed, scale=30.0):
    gen = torch.Generator().manual_seed(seed)
    # sequence log-prob sums: negative, tens to hundreds; policy near the reference
    ref = -scale * torch.rand(2, B, generator=gen, dtype=torch.float64) * 10
    policy = ref + torch.randn(2, B, generator=gen, dtype=torch.float64) * scale / 10
    return policy[0], policy[1], ref[0], ref[1]


def run_dpo(fn, inputs, dtype, **kw):
    pc, pr, rc, rr = leaves(inputs, dtype)
    out = fn(pc, pr, rc, rr, **kw)
    out.loss.backward()
    return out, pc.grad, pr.grad


DPO_CASES = [("sigmoid", 0.1, 0.0), ("sigmoid", 0.1, 0.2), ("sigmoid", 0.01, 0.0), ("ipo", 0.1, 0.0),
             ("hinge", 0.1, 0.0)]


@pytest.mark.parametrize("scale", [30.0, 0.3])  # sums of hundreds of tokens, and of a few
@pytest.mark.parametrize("B", SIZES)
@pytest.mark.parametrize("case", DPO_CASES, ids=lambda c: f"{c[0]}-beta{c[1]}-ls{c[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dpo_matches_reference(kernel_path, B, case, dtype, scale):
    loss_type, beta, ls = case
    inputs = dpo_inputs(B, seed=B, scale=scale)
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=ls)
    got, g_pc, g_pr = run_dpo(dpo_loss, inputs, dtype, **kw)
    ref, r_pc, r_pr = run_dpo(dpo_loss_ref, [t.to(dtype).double() for t in inputs], torch.float64, **kw)
    base = run_dpo(dpo_loss_ref, inputs, dtype, **kw) if dtype != torch.float32 else (None,) * 3
    assert got.loss.shape == () and got.loss.dtype == torch.float32 and g_pc.dtype == dtype
    assert_close(got.loss, ref.loss, None if base[0] is None else base[0].loss, "loss")
    assert_close(g_pc, r_pc, base[1], "d policy_chosen")
    assert_close(g_pr, r_pr, base[2], "d policy_rejected")
    for field in ("chosen_rewards", "rejected_rewards", "margins"):
        assert_close(getattr(got, field), getattr(ref, field), None if base[0] is None else getattr(base[0], field),
                     field)
    assert not got.chosen_rewards.requires_grad
    if dtype == torch.float32:
        assert got.accuracy.item() == ref.accuracy.item()


def test_dpo_extreme_margins_stay_finite(kernel_path):
    pc = torch.tensor([0.0, -5000.0, -1.0], requires_grad=True)
    pr = torch.tensor([-5000.0, 0.0, -1.0], requires_grad=True)
    ref = torch.zeros(3)
    for loss_type in ("sigmoid", "ipo", "hinge"):
        out = dpo_loss(pc, pr, ref, ref, beta=1.0, loss_type=loss_type)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
        pc.grad = pr.grad = None
    out = dpo_loss(pc, pr, ref, ref, beta=1.0)
    # per pair -logsigmoid(m): m = 5000 -> 0, m = -5000 -> 5000, m = 0 -> log 2
    assert abs(out.loss.item() - (5000 + torch.log(torch.tensor(2.0)).item()) / 3) < 1e-3
    assert out.accuracy.item() == pytest.approx(1 / 3)


def test_dpo_gradient_does_not_reach_reference():
    pc, pr, rc, rr = leaves(dpo_inputs(4, seed=0), torch.float32)
    dpo_loss(pc, pr, rc, rr, beta=0.1).loss.backward()
    assert rc.grad is None and rr.grad is None


@pytest.mark.parametrize("bad", [dict(loss_type="kto"), dict(beta=0.0), dict(label_smoothing=0.5)])
def test_dpo_bad_arguments(bad):
    kw = dict(beta=0.1) | bad
    with pytest.raises(ValueError):
        dpo_loss(*dpo_inputs(3, seed=0), **kw)


def bt_inputs(B, seed):
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randn(B, generator=gen, dtype=torch.float64) * 3 + 0.5
    rejected = torch.randn(B, generator=gen, dtype=torch.float64) * 3
    margin = torch.rand(B, generator=gen, dtype=torch.float64)
    return chosen, rejected, margin


def run_bt(fn, chosen, rejected, dtype, **kw):
    c, r = leaves((chosen, rejected), dtype)
    out = fn(c, r, **kw)
    out.loss.backward()
    return out, c.grad, r.grad


@pytest.mark.parametrize("B", SIZES)
@pytest.mark.parametrize("margin", ["none", "float", "tensor"])
@pytest.mark.parametrize("center_coef", [0.0, 0.01])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bt_matches_reference(kernel_path, B, margin, center_coef, dtype):
    chosen, rejected, margins = bt_inputs(B, seed=B)
    m = {"none": None, "float": 0.25, "tensor": margins.to(dtype)}[margin]
    m64 = m.double() if isinstance(m, torch.Tensor) else m
    got, g_c, g_r = run_bt(bt_loss, chosen, rejected, dtype, margin=m, center_coef=center_coef)
    ref, r_c, r_r = run_bt(bt_loss_ref, chosen.to(dtype).double(), rejected.to(dtype).double(), torch.float64,
                           margin=m64, center_coef=center_coef)
    base = (run_bt(bt_loss_ref, chosen, rejected, dtype, margin=m, center_coef=center_coef)
            if dtype != torch.float32 else (None,) * 3)
    assert got.loss.shape == () and got.loss.dtype == torch.float32 and g_c.dtype == dtype
    assert_close(got.loss, ref.loss, None if base[0] is None else base[0].loss, "loss")
    assert_close(g_c, r_c, base[1], "d chosen")
    assert_close(g_r, r_r, base[2], "d rejected")
    assert got.accuracy.item() == ref.accuracy.item()
    assert not got.margins.requires_grad


def test_bt_extreme_rewards_stay_finite(kernel_path):
    chosen = torch.tensor([1e4, -1e4, 0.0], requires_grad=True)
    rejected = torch.tensor([-1e4, 1e4, 0.0], requires_grad=True)
    out = bt_loss(chosen, rejected)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(chosen.grad).all()
    assert abs(out.loss.item() - (2e4 + torch.log(torch.tensor(2.0)).item()) / 3) < 1e-2


def test_bt_bad_arguments():
    with pytest.raises(ValueError, match="center_coef"):
        bt_loss(torch.zeros(2), torch.zeros(2), center_coef=-1.0)
    with pytest.raises(ValueError, match="margin"):
        bt_loss(torch.zeros(2), torch.zeros(2), margin=torch.zeros(3))
    with pytest.raises(ValueError, match="non-empty"):
        bt_loss(torch.zeros(2), torch.zeros(3))
