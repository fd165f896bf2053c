"""The numbers mtcore reports and computes with: rewards in fp32 from the score head under autocast,
and model FLOPs (MFU) that count the LM head only where it is computed."""

import pytest
import torch

from mtcore.data import Example, make_batch
from mtcore.model import Llama, ModelArgs
from mtcore.train import forward_flops, sequence_rewards

pytestmark = pytest.mark.usefixtures("torch_cpu_path")

ARGS = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48, pad_token_id=96)


def test_rewards_are_fp32_under_bf16_autocast():
    """The score head runs in fp32 on the autocast hidden states: the rewards equal the float64
    product of those hidden states and the head, not that product rounded to bf16."""
    model = Llama(ModelArgs(**ARGS), kind="reward").init_weights(seed=0)
    with torch.no_grad():
        model.score.weight.mul_(40)  # rewards of a few units, where bf16's spacing is 1/64 or more
    gen = torch.Generator().manual_seed(1)
    examples = [Example(((torch.randint(0, 96, (n,), generator=gen).tolist(), 2),)) for n in (5, 9, 14, 3, 11, 7)]
    batch = make_batch(examples, list(range(len(examples))))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(batch.tokens, batch.positions, batch.cu_seqlens, batch.max_seqlen)  # [N, dim]
        rewards = sequence_rewards(model, batch)
        padded = model.rewards(batch.tokens[None, :5])
    expected = hidden.double()[batch.last_index] @ model.score.weight.double()[0]  # [S]
    assert rewards.dtype == torch.float32 and padded.dtype == torch.float32
    err = (rewards.double() - expected).abs().max().item()
    assert err <= 1e-5 * expected.abs().max().item(), f"max err {err:.3g}"
    assert (rewards.to(torch.bfloat16).float() != rewards).any()  # not bf16 values in an fp32 tensor


def test_forward_flops_count_the_head_for_scored_tokens_only():
    """Counted by hand: dim 32, 2 layers, 4 query and 2 KV heads of 8, MLP 48, V 97. One pair of
    10 and 7 tokens after a 4-token prompt: 17 tokens, 6 + 3 = 9 scored.
      projections and MLP: 2 layers x (2*32*8*(2*4 + 2*2) + 2*3*32*48) x 17 tokens = 522,240
      causal attention:    2 layers x 4*4*8 x (10*11/2 + 7*8/2)                    =  21,248
      LM head (policy):    2*32*97 x 9 scored tokens                               =  55,872"""
    pair = Example(((list(range(10)), 4), (list(range(7)), 4)))
    policy = Llama(ModelArgs(**ARGS), kind="policy")
    reward = Llama(ModelArgs(**ARGS), kind="reward")
    assert forward_flops(policy, [pair]) == 522240 + 21248 + 55872
    assert forward_flops(reward, [pair]) == 522240 + 21248


def test_one_precision_policy():
    """CUDA: bf16 compute, bf16-gathered FSDP parameters, fp32 gradient reduction; CPU: fp32, autocast
    off even inside an outer autocast. Built without a GPU: only the policy is read."""
    import warnings

    from mtcore import device

    cpu = device.precision("cpu")
    assert cpu.device == torch.device("cpu") and cpu.dtype == torch.float32
    assert cpu.fsdp.param_dtype is None and cpu.fsdp.reduce_dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with cpu.autocast:
            assert not torch.is_autocast_enabled("cpu")
    assert device.precision().device == torch.device("cpu")  # MTCORE_DEVICE=cpu in the tests
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.autocast warns that CUDA is missing here
        cuda = device.precision("cuda")
        assert device.default_dtype("cuda") == torch.bfloat16
    assert cuda.dtype == torch.bfloat16 and cuda.autocast.fast_dtype == torch.bfloat16
    assert cuda.fsdp.param_dtype == torch.bfloat16 and cuda.fsdp.reduce_dtype == torch.float32
    assert device.default_dtype("cpu") == torch.float32


def test_the_trainer_computes_under_the_policy(monkeypatch):
    """accumulate_gradients takes its autocast from device.precision (a bf16 policy stood in for
    CUDA's on the CPU: the rewards then come from bf16 hidden states)."""
    from mtcore import train
    from mtcore.train import BradleyTerry, TrainConfig, accumulate_gradients

    model = Llama(ModelArgs(**ARGS), kind="reward").init_weights(seed=0)
    pairs = [Example(((list(range(3, 9)), 2), (list(range(4, 13)), 2)), line=1)]
    seen = []
    real = train.precision

    def bf16_policy(device=None):
        seen.append(torch.device(device).type)
        p = real(device)
        return p._replace(autocast=torch.autocast("cpu", dtype=torch.bfloat16))

    cfg = TrainConfig(batch_size=1, micro_batch_tokens=64)
    fp32_loss = accumulate_gradients(model, pairs, [0], BradleyTerry(), cfg)[0]
    monkeypatch.setattr(train, "precision", bf16_policy)
    bf16_loss = accumulate_gradients(model, pairs, [0], BradleyTerry(), cfg)[0]
    assert seen == ["cpu"] and bf16_loss != fp32_loss
