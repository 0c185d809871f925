import pytest
import torch

from hf_longmem.continual.kfpf import KFPF
from hf_longmem.continual.lora_constraints import OLoRA
from hf_longmem.continual.refresh import Refresh
from hf_longmem.continual.subspace import SubspaceFT, adaptive_rank, project

from .util import StrategyCase, make_trainer, tiny_lora, tiny_model

# The shared strategy test (test_strategy_contract.py): tiny buffers and sample counts; O-LoRA and RegLoRA need a LoRA
# rank that leaves room for every task's subspace.
STRATEGY_CASES = [
    StrategyCase("subspace"),
    StrategyCase("olora", {"lambda_orth": 0.5}, lora_rank=6),
    StrategyCase("reglora", {"top_p": 0.1, "lam": 10.0}, lora_rank=6),
    StrategyCase("kfpf", {"fpf_every": 2, "fpf_steps": 2, "fpf_batch_size": 4}),
    StrategyCase("refresh", {"fisher_samples": 4}),
]


def test_subspace_update_is_orthogonal_to_the_protected_directions():
    sub = SubspaceFT(energy=0.6, max_rank_fraction=0.5)
    trainer = make_trainer([sub], weight_decay=0.1)  # AdamW with decay: projection of the update keeps it exact
    sub.on_task_start(0)
    before = {n: p.detach().clone() for n, p in sub.params.items()}
    for _ in range(2):
        trainer.train_step()
    ranks = sub.protected_rank()
    assert all(1 <= r <= 16 for r in ranks.values()) and len(set(ranks.values())) >= 1
    for n, p in sub.params.items():
        u, v = sub.bases[n]
        delta = p.detach() - before[n]
        assert delta.norm() > 0
        assert (u.T @ delta).abs().max() < 1e-6 * max(1.0, delta.abs().max().item()) + 1e-7
        assert (delta @ v).abs().max() < 1e-6 * max(1.0, delta.abs().max().item()) + 1e-7
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert adaptive_rank(s, 0.6, 4) == 1 and adaptive_rank(s, 0.7, 4) == 2 and adaptive_rank(s, 1.0, 2) == 2
    m = torch.randn(5, 4)
    u = torch.linalg.qr(torch.randn(5, 2))[0]
    v = torch.linalg.qr(torch.randn(4, 1))[0]
    assert torch.allclose(u.T @ project(m, u, v), torch.zeros(2, 4), atol=1e-6)


def test_olora_freezes_earlier_blocks_and_penalises_overlap():
    with pytest.raises(ValueError, match="multiple"):
        make_trainer([OLoRA()], model=tiny_lora())  # rank 4 for 3 tasks
    with pytest.raises(ValueError, match="LoRA"):
        make_trainer([OLoRA()])  # not a LoRA model
    trainer = make_trainer([OLoRA(lambda_orth=0.5)], model=_lora(rank=6), grad_clip=None)
    olora = trainer.strategies[0]
    assert olora.block == 2
    olora.on_task_start(0)
    trainer.train_step()
    trainer.train_step()
    trainer.task_index, trainer.step_in_task = 1, 0
    olora.on_task_start(1)
    snapshot = {id(a): (a.detach().clone(), b.detach().clone()) for _, a, _, b in olora.pairs}
    assert olora.orthogonality(1).item() > 0
    trainer.train_step()
    for _, a, _, b in olora.pairs:
        a0, b0 = snapshot[id(a)]
        assert torch.equal(a[:2], a0[:2]) and torch.equal(b[:, :2], b0[:, :2])  # task 0 block frozen
        assert not torch.equal(a[2:4], a0[2:4])  # task 1 block trained
        assert torch.equal(a[4:], a0[4:]) and torch.all(b[:, 4:] == 0)  # task 2 block untouched, B still zero
    a = olora.pairs[0][1]
    manual = sum(((p[:2] @ p[2:4].T) ** 2).sum() for _, p, _, _ in olora.pairs)
    assert olora.orthogonality(1).item() == pytest.approx(manual.item(), rel=1e-5)
    assert a.shape[0] == 6


def _lora(rank):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(
        tiny_model(),
        LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]),
    )


def test_kfpf_updates_only_the_forgetting_prone_parameters_on_its_period():
    kfpf = KFPF(fpf_every=2, fpf_steps=2, fpf_lr=0.5, fpf_batch_size=4)
    trainer = make_trainer([kfpf], learning_rate=1e-2)
    names = {n for n, _ in kfpf.selected}
    assert names and all("norm" in n or "layers.1." in n for n in names)
    trainer.train_step()
    assert kfpf.num_phases == 0 and len(kfpf.buffer) == 4
    before = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters()}
    kfpf.fpf_phase()
    changed = [n for n, p in trainer.unwrapped.named_parameters() if not torch.equal(p, before[n])]
    assert changed and set(changed) <= names
    trainer.train_step()
    assert kfpf.num_phases == 2  # the periodic trigger at step 2
    with pytest.raises(ValueError, match="matches no"):
        make_trainer([KFPF(fpf_params="nothing_matches")])


def test_refresh_unlearn_step_follows_its_formula():
    refresh = Refresh(delta=1e-3, noise_scale=0.0, fisher_coef=0.5)
    trainer = make_trainer([refresh])
    p = dict(trainer.unwrapped.named_parameters())["model.layers.0.mlp.down_proj.weight"]
    grads = {"model.layers.0.mlp.down_proj.weight": torch.randn_like(p)}
    refresh.fisher = {"model.layers.0.mlp.down_proj.weight": torch.full_like(p, 2.0)}
    upd = refresh.unlearn_update(grads, torch.Generator().manual_seed(0))["model.layers.0.mlp.down_proj.weight"]
    g = grads["model.layers.0.mlp.down_proj.weight"]
    expected = 1e-3 * (1 / (1 + 0.5 * 2.0)) * p.detach().norm() * g / g.norm()
    assert torch.allclose(upd, expected, atol=1e-9)
    refresh.fisher = {}
    trainer.train_step()  # step + unlearn on the same batch: runs, changes weights, leaves no gradient behind
    assert all(q.grad is None for q in trainer.unwrapped.parameters())
    refresh.on_task_end(0)
    first = {n: f.clone() for n, f in refresh.fisher.items()}
    assert all((f >= 0).all() for f in first.values()) and any(f.sum() > 0 for f in first.values())
    refresh.on_task_end(0)
    name = next(iter(first))
    assert torch.allclose(refresh.fisher[name], first[name] * (1 + refresh.tau))


def test_reglora_key_elements_and_penalty():
    from hf_longmem.continual.lora_constraints import RegLoRA

    trainer = make_trainer([RegLoRA(top_p=0.1, lam=10.0)], model=_lora(rank=6), grad_clip=None)
    reg = trainer.strategies[0]
    trainer.train_step()
    trainer.train_step()
    assert reg.regularizer(1) is None
    reg.on_task_end(0)
    name, a, _, b = reg.pairs[0]
    mask = reg.key_masks[name]
    d0 = (b[:, :2] @ a[:2]).detach().abs()
    k = round(0.1 * d0.numel())
    assert int(mask.sum()) == k and d0[mask].min() >= d0[~mask].max()  # the top 10% entries of |B_0 A_0|
    assert reg.regularizer(1).item() == 0.0  # task 1's block has B = 0
    with torch.no_grad():
        b[:, 2:4].normal_()
    expected = torch.stack([(q[:, 2:4] @ p[2:4])[reg.key_masks[n]].abs().mean() for n, p, _, q in reg.pairs]).mean()
    trainer.task_index = 1
    assert reg.extra_loss(None, None).item() == pytest.approx(10.0 * expected.item(), rel=1e-5)
    reg.on_task_end(1)
    assert int(reg.key_masks[name].sum()) >= k  # union across tasks
