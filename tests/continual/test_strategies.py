import numpy as np
import pytest
import torch

from hf_longmem.continual import build_strategy
from hf_longmem.continual.ilora import ILoRA
from hf_longmem.continual.migu import MIGU
from hf_longmem.continual.regularizers import EWC, EcoTTA, L2Anchor
from hf_longmem.continual.replay import Replay, ReservoirBuffer, ViewBatchReplay, replay_count

from .util import StrategyCase, make_trainer, tiny_lora

# The shared strategy test (test_strategy_contract.py): tiny buffers and sample counts.
STRATEGY_CASES = [
    StrategyCase("migu", {"threshold": 0.5}),
    StrategyCase("ewc", {"lam": 10.0, "fisher_samples": 2}),
    StrategyCase("l2", {"lam": 0.1}),
    StrategyCase("ilora", {"buffer_size": 6}, lora_rank=4),
    StrategyCase("replay", {"ratio": 0.25, "source": "reservoir", "buffer_size": 6}),
    StrategyCase("view_batch", {"num_views": 2}),
    StrategyCase("ecotta", {"partitions": 2}, lora_rank=4),
]


def _sgd(trainer, lr=0.5):
    params = [p for p in trainer.unwrapped.parameters() if p.requires_grad]
    trainer.optimizer = torch.optim.SGD(params, lr=lr)
    for g in trainer.optimizer.param_groups:
        g["lr_scale"] = 1.0


def test_migu_leaves_masked_rows_unchanged():
    migu = MIGU(threshold=0.7)
    trainer = make_trainer([migu], grad_clip=None)
    _sgd(trainer)
    trainer.train_step()  # first task: nothing masked
    assert migu.last_masks == {}
    trainer.task_index, trainer.step_in_task = 1, 0
    before = {n: m.weight.detach().clone() for n, m in migu.modules.items()}
    trainer.train_step()
    assert set(migu.last_masks) == set(migu.modules)
    for name, mask in migu.last_masks.items():
        after = migu.modules[name].weight.detach()
        frozen = mask == 0
        assert 0.6 <= frozen.float().mean() <= 0.8  # ~70% of the rows are frozen
        assert torch.equal(after[frozen], before[name][frozen])
        assert not torch.equal(after[~frozen], before[name][~frozen])


def test_migu_lora_path_masks_adapter_rows():
    migu = MIGU(threshold=0.5)
    trainer = make_trainer([migu], model=tiny_lora(), grad_clip=None)
    assert migu.modules and all("lora_" in n for n in migu.modules)
    trainer.task_index = 1
    trainer.train_step()
    for name, mask in migu.last_masks.items():
        grad_rows = migu.modules[name].weight.grad
        assert grad_rows is None or torch.all(grad_rows[mask == 0] == 0)


def test_ewc_penalty_zero_at_anchor_and_fisher_is_mean_squared_example_gradient():
    ewc = EWC(lam=3.0, fisher_samples=2)
    trainer = make_trainer([ewc])
    assert ewc.penalty() is None
    ewc.on_task_end(0)
    assert ewc.penalty().item() == 0.0
    # Fisher by hand for one parameter
    model = trainer.unwrapped
    name, p = next((n, q) for n, q in model.named_parameters() if n.endswith("down_proj.weight"))
    manual = torch.zeros_like(p)
    for i in range(2):
        model.zero_grad()
        batch = trainer.make_batch([(0, i, 0)])
        ce, _ = trainer.token_losses(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        )
        ce.sum().backward()
        manual += p.grad**2 / 2
    assert torch.allclose(ewc.terms[0]["fisher"][name], manual, atol=1e-7)
    with torch.no_grad():
        p.add_(0.1)
    expected = 0.5 * 3.0 * (ewc.terms[0]["fisher"][name] * 0.01).sum()
    assert ewc.extra_loss(None, None).item() == pytest.approx(expected.item(), rel=1e-4)
    online = EWC(mode="online", gamma=0.5)
    online.trainer = trainer
    online.on_task_end(0)
    first = {n: f.clone() for n, f in online.terms[0]["fisher"].items()}
    online.on_task_end(0)
    assert len(online.terms) == 1 and torch.allclose(online.terms[0]["fisher"][name], 1.5 * first[name])


def test_l2_penalty():
    l2 = L2Anchor(lam=2.0, param_regex=r"self_attn")
    trainer = make_trainer([l2])
    l2.on_task_end(0)
    assert l2.extra_loss(None, None).item() == 0.0 and all("self_attn" in n for n in l2.anchor)
    p = dict(trainer.unwrapped.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    with torch.no_grad():
        p.add_(0.5)
    assert l2.extra_loss(None, None).item() == pytest.approx(2.0 * 0.25 * p.numel(), rel=1e-5)


def test_ilora_ema_interpolation_replay_and_consistency():
    ilora = ILoRA(ema_alpha=0.25, buffer_size=8)
    trainer = make_trainer([ilora], model=tiny_lora())
    old = {n: t.clone() for n, t in ilora.ema.items()}
    trainer.train_step()
    a = min(1 - 1 / 2, 0.25)
    for n, p in ilora.trainable():
        assert torch.allclose(ilora.ema[n], a * old[n] + (1 - a) * p.detach())
    assert len(ilora.buffer) == 4
    rows = [(0, 0, 0)] * 4
    assert ilora.select_rows(rows) == rows  # no replay during the first task (as the reference)
    trainer.task_index = 1
    replayed = ilora.select_rows(rows)
    assert len(replayed) == 8 and all(g == 1 and t == 0 for t, _, g in replayed[4:])
    p = [torch.tensor([1.0, -2.0])]
    assert ILoRA.consistency(p, [torch.tensor([0.0, -3.0])]).item() == 0.0  # plastic above stable: no penalty
    assert ILoRA.consistency(p, [torch.tensor([3.0, -2.0])]).item() == pytest.approx(2.0)  # (1-3)^2 / 2
    trainer.step_in_task = 0
    trainer.train_step()
    assert ilora.last_consistency >= 0


def test_ilora_eval_context_swaps_in_the_ema_weights():
    ilora = ILoRA(infer_with="ema")
    trainer = make_trainer([ilora], model=tiny_lora())
    trainer.train_step()
    trainer.train_step()
    working = {n: p.detach().clone() for n, p in ilora.trainable()}
    with ilora.eval_context():
        assert all(torch.equal(p, ilora.ema[n]) for n, p in ilora.trainable())
    assert all(torch.equal(p, working[n]) for n, p in ilora.trainable())
    with pytest.raises(ValueError, match="LoRA"):
        make_trainer([ILoRA()])  # full model: not a LoRA model


def test_replay_fraction_is_exact_and_draws_earlier_tasks():
    assert sum(replay_count(s, 0.05, 16) for s in range(1000)) == int(1000 * 0.05 * 16)
    replay = Replay(ratio=0.25)
    trainer = make_trainer([replay], batch_size=8)
    rows = [(0, i % 4, 0) for i in range(8)]
    assert replay.select_rows(rows) == rows
    trainer.task_index, trainer.global_step = 2, 5
    out = replay.select_rows([(2, i % 4, 0) for i in range(8)])
    assert len(out) == 8 and sum(t < 2 for t, _, _ in out) == 2


def test_reservoir_buffer_is_uniform_bounded_and_resumable():
    buf = ReservoirBuffer(10, seed=1)
    for i in range(50):
        buf.add(i)
    assert len(buf) == 10 and buf.num_seen == 50
    state = buf.state_dict()
    clone = ReservoirBuffer(10, seed=99)
    clone.load_state_dict(state)
    for i in range(50, 80):
        buf.add(i)
        clone.add(i)
    assert buf.items == clone.items
    counts = np.zeros(100)
    for seed in range(300):
        b = ReservoirBuffer(10, seed=seed)
        for i in range(100):
            b.add(i)
        counts[b.items] += 1
    assert counts[:50].sum() == pytest.approx(counts[50:].sum(), rel=0.15)  # early and late items equally likely
    with pytest.raises(ValueError, match="capacity"):
        ReservoirBuffer(0)


def test_view_batch_repeats_examples_and_perturbs_only_prompts():
    vb = ViewBatchReplay(num_views=2, view_dropout=0.5)
    trainer = make_trainer([vb], batch_size=4)
    rows = vb.select_rows([(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 3, 0)])
    assert rows == [(0, 0, 0), (0, 0, 0), (0, 1, 0), (0, 1, 0)]
    batch = trainer.make_batch(rows)
    clean = {k: v.clone() for k, v in batch.items()}
    vb.before_forward(batch)
    assert torch.equal(batch["input_ids"][0::2], clean["input_ids"][0::2])  # view 0 is the clean example
    changed = batch["input_ids"] != clean["input_ids"]
    assert changed.any() and not (changed & clean["answer_mask"]).any() and not changed[:, 0].any()
    with pytest.raises(ValueError, match="num_views"):
        make_trainer([ViewBatchReplay(num_views=3)], batch_size=4)


def test_ecotta_distillation_is_zero_for_the_unadapted_model():
    eco = EcoTTA(lam=2.0, partitions=2)
    trainer = make_trainer([eco], model=tiny_lora())
    assert eco.indices == [1, 2]
    batch = trainer.make_batch([(0, 0, 0), (0, 1, 0)])
    out = trainer.forward(batch, output_hidden_states=True)
    assert eco.extra_loss(batch, out).item() == pytest.approx(0.0, abs=1e-7)  # LoRA B = 0 at init
    trainer.train_step()
    out = trainer.forward(batch, output_hidden_states=True)
    assert eco.extra_loss(batch, out).item() > 0
    full = EcoTTA(partitions=1)
    make_trainer([full])
    assert full.frozen is not None and not any(p.requires_grad for p in full.frozen.parameters())


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"name": "nope"}, "unknown strategy"),
        ({"name": "ewc", "mode": "x"}, "mode"),
        ({"name": "replay", "ratio": 1.5}, "ratio"),
        ({"name": "migu", "threshold": 2}, "threshold"),
        ({"name": "ilora", "infer_with": "x"}, "infer_with"),
        ({"name": "l2", "bogus": 1}, "bad options"),
    ],
)
def test_strategy_bad_arguments(spec, match):
    with pytest.raises(ValueError, match=match):
        build_strategy(spec)
