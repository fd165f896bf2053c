"""The trainers against independent references: transformers' Llama in float64, unpacked, with full
logits and the losses written out by hand. Then packing, accumulation and overfitting properties."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_hf_model, save_hf
from mtcore import load_model
from mtcore.data import Example, make_batch, pack
from mtcore.train import DPO, SFT, BradleyTerry, NonFiniteLoss, TrainConfig, accumulate_gradients, fit
from mtcore.train import reference_logps


pytestmark = pytest.mark.usefixtures("torch_cpu_path")


def random_pairs(n, vocab=97, seed=0, prompt=(2, 8), response=(1, 10)):
    """Pairs of random token ids sharing a prompt, with unequal chosen/rejected lengths."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(0, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    out = []
    for i in range(n):
        p = ids(*prompt)
        out.append(Example(((p + ids(*response), len(p)), (p + ids(*response), len(p))), line=i + 1,
                           margin=float(torch.rand(1, generator=g))))
    return out


def hf_seq_logps(hf, ids, n_prompt):
    """Sum of log p(response token | prefix) from full float64 logits of one unpadded sequence."""
    logits = hf(torch.tensor([ids])).logits[0]  # [L, V]
    logps = logits[:-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)  # [L-1]
    return logps[n_prompt - 1:].sum()


def hf_reward(hf, ids):
    return hf(torch.tensor([ids])).logits[0, 0]


def grads_close(ours, hf, tol):
    """Every parameter's gradient, ours (fp32) against transformers' float64, relative to its scale."""
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    worst = 0.0
    for name, p in ours.named_parameters():
        ref = hf_grads[name]
        err = (p.grad.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
        worst = max(worst, err)
        assert err < tol, f"{name}: max rel error {err:.2e}"
    return worst


@pytest.mark.parametrize("length_normalize", [False, True])
def test_dpo_step_equals_float64_transformers(tmp_path, length_normalize):
    pairs = random_pairs(6)
    policy_dir = save_hf(make_hf_model("policy", seed=0), tmp_path / "policy")
    ref_dir = save_hf(make_hf_model("policy", seed=1), tmp_path / "ref")
    beta = 0.5
    # reference: float64 transformers, one sequence at a time
    hf = make_hf_model("policy", seed=0).double()
    hf_ref = make_hf_model("policy", seed=1).double()

    def logp(model, ids, n):
        s = hf_seq_logps(model, ids, n)
        return s / (len(ids) - n) if length_normalize else s

    with torch.no_grad():
        ref = torch.stack([torch.stack([logp(hf_ref, ids, n) for ids, n in ex.seqs]) for ex in pairs])  # [P, 2]
    pol = torch.stack([torch.stack([logp(hf, ids, n) for ids, n in ex.seqs]) for ex in pairs])
    m = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
    loss_ref = -F.logsigmoid(beta * m).mean()
    loss_ref.backward()

    model = load_model(policy_dir, dtype=torch.float32)
    ref_model = load_model(ref_dir, dtype=torch.float32)
    cfg = TrainConfig(lr=1e-3, batch_size=6, micro_batch_tokens=40)
    sums, counts = reference_logps(ref_model, pairs, micro_batch_tokens=40)
    objective = DPO(sums, counts, beta=beta, length_normalize=length_normalize)
    loss_sum, units, stats, _ = accumulate_gradients(model, pairs, list(range(6)), objective, cfg)
    assert len(pack([ex.n_tokens for ex in pairs], 40)) > 1  # several micro-batches accumulated
    assert loss_sum / units == pytest.approx(loss_ref.item(), rel=1e-5)
    assert stats["accuracy"] == (m > 0).sum().item()
    grads_close(model, hf, 1e-4)


def test_first_step_loss_and_grad_norm(tmp_path):
    """fit's metrics row 1: the loss and the total gradient L2 norm before clipping, as a reference computes."""
    pairs = random_pairs(4, seed=3)
    hf = make_hf_model("policy", seed=0).double()
    with torch.no_grad():
        ref = torch.stack([torch.stack([hf_seq_logps(hf, ids, n) for ids, n in ex.seqs]) for ex in pairs])
    pol = torch.stack([torch.stack([hf_seq_logps(hf, ids, n) for ids, n in ex.seqs]) for ex in pairs])
    m = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
    (-F.logsigmoid(0.1 * m).mean()).backward()
    norm_ref = torch.sqrt(sum(p.grad.pow(2).sum() for p in hf.parameters())).item()

    model = load_model(save_hf(make_hf_model("policy", seed=0), tmp_path / "p"), dtype=torch.float32)
    sums, counts = reference_logps(model, pairs, 64)
    history = fit(model, pairs, DPO(sums, counts, beta=0.1), TrainConfig(lr=1e-4, batch_size=4, micro_batch_tokens=64,
                                                                         max_grad_norm=1e-3))
    assert history[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # policy == reference at step 1
    assert history[0]["grad_norm"] == pytest.approx(norm_ref, rel=1e-4)
    assert history[0]["grad_norm"] > 1e-3  # so the clip applied, yet the reported norm is the unclipped one


def test_rm_step_equals_float64_transformers(tmp_path):
    pairs = random_pairs(5, seed=2)
    hf = make_hf_model("reward", seed=0).double()
    r = torch.stack([torch.stack([hf_reward(hf, ids) for ids, _ in ex.seqs]) for ex in pairs])  # [P, 2]
    margin = torch.tensor([ex.margin for ex in pairs], dtype=torch.float64)
    center = 0.01
    loss_ref = -F.logsigmoid(r[:, 0] - r[:, 1] - margin).mean() + center * (r.sum(1) ** 2).mean()
    loss_ref.backward()

    model = load_model(save_hf(make_hf_model("reward", seed=0), tmp_path / "rm"), kind="reward", dtype=torch.float32)
    cfg = TrainConfig(batch_size=5, micro_batch_tokens=36)
    loss_sum, units, stats, _ = accumulate_gradients(model, pairs, list(range(5)), BradleyTerry(center), cfg)
    assert loss_sum / units == pytest.approx(loss_ref.item(), rel=1e-5)
    assert stats["accuracy"] == (r[:, 0] > r[:, 1]).sum().item()
    grads_close(model, hf, 1e-4)


def test_sft_step_equals_float64_transformers(tmp_path):
    demos = [Example((ex.seqs[0],), line=ex.line) for ex in random_pairs(5, seed=4)]
    hf = make_hf_model("policy", seed=0).double()
    nll = -sum(hf_seq_logps(hf, ids, n) for ex in demos for ids, n in ex.seqs)
    tokens = sum(len(ids) - n for ex in demos for ids, n in ex.seqs)
    (nll / tokens).backward()
    model = load_model(save_hf(make_hf_model("policy", seed=0), tmp_path / "p"), dtype=torch.float32)
    loss_sum, units, _, _ = accumulate_gradients(model, demos, list(range(5)), SFT(),
                                                    TrainConfig(batch_size=5, micro_batch_tokens=20))
    assert units == tokens
    assert loss_sum / units == pytest.approx((nll / tokens).item(), rel=1e-5)
    grads_close(model, hf, 1e-4)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["policy", "reward"])
def test_packed_equals_padded_and_accumulation_invariance(tmp_path, kind):
    """One global batch of 8 pairs: packed into one micro-batch, padded, and 8 micro-batches of one
    pair each all give the same loss and gradients."""
    pairs = random_pairs(8, seed=5)
    path = save_hf(make_hf_model(kind, seed=0), tmp_path / "m")
    if kind == "policy":
        ref_model = load_model(save_hf(make_hf_model("policy", seed=1), tmp_path / "r"), dtype=torch.float32)
        objective = DPO(*reference_logps(ref_model, pairs, 1000), beta=0.3)
    else:
        objective = BradleyTerry()
    results = {}
    for name, cfg in {"packed": TrainConfig(batch_size=8, micro_batch_tokens=1000),
                      "padded": TrainConfig(batch_size=8, micro_batch_tokens=1000, padded=True),
                      "one_pair": TrainConfig(batch_size=8, micro_batch_tokens=max(ex.n_tokens for ex in pairs)),
                      "reference_ops": TrainConfig(batch_size=8, micro_batch_tokens=1000, reference_ops=True)}.items():
        model = load_model(path, kind=kind, dtype=torch.float32)
        loss_sum, units, _, _ = accumulate_gradients(model, pairs, list(range(8)), objective, cfg)
        results[name] = (loss_sum / units, _grads(model))
    n_micro = len(pack([ex.n_tokens for ex in pairs], max(ex.n_tokens for ex in pairs)))
    assert n_micro >= 4
    base_loss, base_grads = results["packed"]
    for name, (loss, grads) in results.items():
        assert loss == pytest.approx(base_loss, rel=1e-5), name
        for k, g in grads.items():
            err = (g - base_grads[k]).abs().max().item() / base_grads[k].abs().max().item()
            assert err < 1e-4, f"{name}: {k} rel error {err:.2e}"


def test_padded_batch_layout():
    pairs = random_pairs(3, seed=6)
    packed, padded = make_batch(pairs, [0, 2]), make_batch(pairs, [0, 2], padded=True)
    lens = [len(ids) for i in (0, 2) for ids, _ in pairs[i].seqs]
    assert packed.cu_seqlens.tolist() == [0, *torch.tensor(lens).cumsum(0).tolist()]
    assert padded.tokens.shape == (4, max(lens))
    flat = padded.tokens.flatten()
    assert flat[padded.last_index].tolist() == packed.tokens[packed.last_index].tolist()
    assert sorted(padded.labels[padded.labels != -100].tolist()) == sorted(packed.labels[packed.labels != -100].tolist())
    # scored labels are exactly the response tokens
    ids, n = pairs[0].seqs[0]
    assert packed.labels[:len(ids)].tolist() == [-100] * (n - 1) + ids[n:] + [-100]


def test_pack_first_fit_decreasing():
    sizes = [7, 3, 5, 2, 6, 4, 1]
    bins = pack(sizes, 10)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(sizes[i] for i in b) <= 10 for b in bins)
    assert len(bins) == math.ceil(sum(sizes) / 10)  # FFD is optimal here: 28 tokens in 3 bins
    with pytest.raises(ValueError, match="does not fit"):
        pack([11], 10)


@pytest.mark.parametrize("kind", ["policy", "reward"])
def test_tiny_model_overfits(tmp_path, kind):
    pairs = random_pairs(4, seed=7)
    model = load_model(save_hf(make_hf_model(kind, seed=0), tmp_path / "m"), kind=kind, dtype=torch.float32)
    if kind == "policy":
        objective = DPO(*reference_logps(model, pairs, 100), beta=0.5)
    else:
        objective = BradleyTerry()
    cfg = TrainConfig(lr=3e-3, epochs=60, batch_size=4, micro_batch_tokens=100, warmup_ratio=0.0)
    history = fit(model, pairs, objective, cfg)
    assert history[0]["loss"] > 0.5 and history[-1]["loss"] < 0.05
    assert history[-1]["accuracy"] == 1.0


def test_nan_loss_stops_before_the_step(tmp_path):
    pairs = random_pairs(4, seed=8)
    model = load_model(save_hf(make_hf_model("policy", seed=0), tmp_path / "m"), dtype=torch.float32)
    sums, counts = reference_logps(model, pairs, 100)
    sums[3, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NonFiniteLoss, match="step 1: the loss is nan"):
        fit(model, pairs, DPO(sums, counts), TrainConfig(lr=1e-2, batch_size=4, micro_batch_tokens=100))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_cosine_schedule_and_step_count(tmp_path):
    pairs = random_pairs(10, seed=9)
    model = load_model(save_hf(make_hf_model("reward", seed=0), tmp_path / "m"), kind="reward", dtype=torch.float32)
    history = fit(model, pairs, BradleyTerry(), TrainConfig(lr=1e-3, epochs=2, batch_size=4, micro_batch_tokens=100,
                                                              warmup_ratio=0.2))
    assert [r["examples"] for r in history] == [4, 4, 2, 4, 4, 2]  # 2 epochs of ceil(10 / 4) steps
    lrs = [r["lr"] for r in history]
    warmup = math.ceil(0.2 * 6)
    assert lrs[:warmup] == pytest.approx([1e-3 * s / warmup for s in range(warmup)])  # step 0: rate 0
    assert lrs[warmup] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (5 - warmup) / (6 - warmup))))


@pytest.mark.parametrize("total,ratio", [(1, 0.1), (6, 0.2), (10, 0.1), (47, 0.1), (123, 0.05), (20, 0.0)])
def test_schedule_equals_transformers_cosine_with_warmup(tmp_path, total, ratio):
    """Every step's learning rate equals the one transformers' Trainer gives for the same ratio
    (TrainingArguments.get_warmup_steps, get_cosine_schedule_with_warmup): step 0 of a warm-up is 0."""
    from types import SimpleNamespace

    from transformers import TrainingArguments, get_cosine_schedule_with_warmup

    from mtcore.train import make_optimizer

    # (its method on a stand-in: a TrainingArguments needs accelerate, which mtcore does not install)
    warmup = TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=ratio), total)
    theirs = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    their_schedule = get_cosine_schedule_with_warmup(theirs, warmup, total)
    model = load_model(save_hf(make_hf_model("policy", seed=0), tmp_path / "m"), dtype=torch.float32)
    my_optimizer, mine = make_optimizer(model, TrainConfig(lr=3e-4, warmup_ratio=ratio), total)
    got, want = [], []
    for _ in range(total):
        got.append(mine.get_last_lr()[0])
        want.append(their_schedule.get_last_lr()[0])
        for optimizer, schedule in ((my_optimizer, mine), (theirs, their_schedule)):
            optimizer.step()  # (no gradients: no change; the order the scheduler expects)
            schedule.step()
    assert got == want, [(s, a, b) for s, (a, b) in enumerate(zip(got, want)) if a != b]
    if warmup:
        assert got[0] == 0.0


def test_weight_decay_groups_equal_the_trainers(tmp_path):
    """The decayed parameters are the ones transformers' Trainer decays (get_decay_parameter_names:
    not biases, not norm weights), on a tiny model with attention and MLP biases, policy and reward."""
    from transformers import Trainer

    from mtcore.train import make_optimizer

    for kind in ("policy", "reward"):
        model = load_model(save_hf(make_hf_model(kind, seed=0, attention_bias=True, mlp_bias=True), tmp_path / kind),
                           kind=kind, dtype=torch.float32)
        optimizer, _ = make_optimizer(model, TrainConfig(weight_decay=0.1), 10)
        name_of = {id(p): n for n, p in model.named_parameters()}
        groups = {g["weight_decay"]: {name_of[id(p)] for p in g["params"]} for g in optimizer.param_groups}
        want = set(Trainer.get_decay_parameter_names(None, model))
        assert groups[0.1] == want, sorted(groups[0.1] ^ want)
        assert groups[0.0] == set(name_of.values()) - want
        assert any("bias" in n for n in groups[0.0]) and any("norm" in n for n in groups[0.0])
        assert len(groups[0.1]) > 0 and not any("bias" in n or "norm" in n for n in groups[0.1])


def test_a_reference_cache_of_another_key_is_computed_again(tmp_path, monkeypatch):
    """The cache's key (the pairs' and the reference's digests) is in its metadata: the same key reads
    it back without a pass, another key (a redone earlier stage: other pairs of the same count, or
    another reference) computes the log-probs again and replaces it; a file without the key (an
    earlier version's) too."""
    from safetensors.torch import save_file

    from mtcore import train

    model = load_model(save_hf(make_hf_model("policy", seed=0), tmp_path / "p"), dtype=torch.float32)
    pairs, cache = random_pairs(6, seed=3), tmp_path / "ref.safetensors"
    want = reference_logps(model, pairs, 64)
    passes = []
    real = train.response_logps
    monkeypatch.setattr(train, "response_logps", lambda *a, **k: passes.append(1) or real(*a, **k))
    for key, computed in (("a", True), ("a", False), ("b", True), ("b", False)):
        passes.clear()
        got = train.cached_reference_logps(model, pairs, cache, 64, key=key)
        assert bool(passes) == computed, key
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    save_file({"sums": torch.zeros_like(want[0]), "counts": want[1]}, str(cache))  # no key in its metadata
    passes.clear()
    assert torch.equal(train.cached_reference_logps(model, pairs, cache, 64, key="b")[0], want[0]) and passes
