"""MoM model: parity of full forward vs chunked prefill + token-by-token decode (across routing changes), padded vs
unpadded, generate with its own / a user's cache, training step, fresh-process remote-code round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from hf_longmem.kernels.gated_delta import naive_recurrent_mom_gated_delta_rule
from hf_longmem.modeling.mom import MomCache, MomConfig, MomForCausalLM, MomModel
from hf_longmem.modeling.mom.conv import stream_short_conv
from tests.helpers.parity import assert_same_training_step
from tests.kernels.common import DEVICE, needs_triton
from tests.modeling.conformance import ConformanceSuite, ModelTester

VOCAB = 61


def tiny(seed: int = 0, **overrides) -> MomForCausalLM:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_heads=2,
        head_dim=8,
        expand_v=1.5,
        num_memories=4,
        topk=2,
        shared_mem=True,
        conv_size=3,
        intermediate_size=48,
        chunk_size=8,
        initializer_range=0.2,
        pad_token_id=0,
        kernel_backend="torch",
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return MomForCausalLM(MomConfig(**kwargs)).eval()


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def prefill_then_decode(model, input_ids, split: int, cache=None, attention_mask=None) -> torch.Tensor:
    cache = MomCache(model.config) if cache is None else cache
    mask = None if attention_mask is None else attention_mask[:, :split]
    logits = [model(input_ids[:, :split], attention_mask=mask, cache=cache, use_cache=True).logits]
    for t in range(split, input_ids.shape[1]):
        mask = None if attention_mask is None else attention_mask[:, : t + 1]
        logits.append(model(input_ids[:, t : t + 1], attention_mask=mask, cache=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1)


def test_config_rejects_bad_arguments():
    with pytest.raises(ValueError, match="topk"):
        MomConfig(num_memories=2, topk=3)
    with pytest.raises(ValueError, match="conv_size"):
        MomConfig(conv_size=1)
    with pytest.raises(ValueError, match="kernel_backend"):
        MomConfig(kernel_backend="cuda")
    with pytest.raises(ValueError, match="num_heads"):
        MomConfig(num_heads=0)
    config = MomConfig(num_hidden_layers=3, num_memories=4, shared_mem=True, num_heads=2, head_dim=8, expand_v=2)
    assert config.layer_types == ["linear_attention"] * 3
    assert config.state_size() == 5 * 2 * 8 * 16


def test_registered_with_auto_classes():
    config = AutoConfig.for_model(
        "mom_gdn", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_heads=2, head_dim=8, intermediate_size=32
    )
    assert isinstance(config, MomConfig)
    assert type(AutoModelForCausalLM.from_config(config)) is MomForCausalLM


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"shared_mem": False, "topk": 1},
        {"shared_mem": False, "topk": 1, "norm_topk_prob": False},
        {"num_memories": 1, "topk": 1},
    ],
    ids=["M4-top2-shared", "M4-top1", "M4-top1-unnormalised", "M1"],
)
def test_full_forward_equals_prefill_plus_decode(overrides):
    """Prefill crosses chunk boundaries (chunk 8, streams > 8 tokens); decoding crosses routing changes."""
    model = tiny(**overrides)
    input_ids = ids(2, 40)
    with torch.no_grad():
        full = model(input_ids)
        routes = full.router_logits[0][:, 25:].topk(model.config.topk, dim=-1).indices
        incremental = prefill_then_decode(model, input_ids, split=25)
    if model.config.num_memories > 1:
        # the decoded tokens really switch memories (else the test would not cover routing changes)
        assert len({tuple(r.tolist()) for r in routes.flatten(0, 1).sort(-1).values}) > 1
    torch.testing.assert_close(incremental, full.logits, atol=1e-5, rtol=1e-4)


def test_chunked_prefill_in_pieces_equals_full_forward():
    model = tiny()
    input_ids = ids(2, 45)
    with torch.no_grad():
        full = model(input_ids).logits
        cache = MomCache(model.config)
        pieces = [
            model(input_ids[:, a:b], cache=cache, use_cache=True).logits for a, b in ((0, 11), (11, 30), (30, 45))
        ]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-4)
    assert cache.get_seq_length() == 45
    # constant state: [M', H, K, V] float32 + conv [M', C, W-1] per layer, whatever the length
    c = model.config
    per_layer = 5 * 2 * 8 * 12 * 4 + 5 * (2 * 16 + 24) * 2 * 4
    assert cache.memory_bytes() == 2 * c.num_hidden_layers * per_layer


def test_padded_equals_unpadded_prefill_and_decode():
    model = tiny()
    long, short = ids(1, 30, seed=2), ids(1, 22, seed=3)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 8, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :8] = 0
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        solo_long, solo_short = model(long).logits, model(short).logits
        torch.testing.assert_close(padded[0], solo_long[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(padded[1, 8:], solo_short[0], atol=1e-5, rtol=1e-4)
        # padded prefill + decode == unpadded full forward, row by row
        decoded = prefill_then_decode(model, batch, split=20, attention_mask=mask)
        torch.testing.assert_close(decoded[1, 8:], solo_short[0], atol=1e-5, rtol=1e-4)
        greedy = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
        greedy_solo = model.generate(short, max_new_tokens=6, do_sample=False)
    assert torch.equal(greedy[1, 8:], greedy_solo[0])


def test_generate_builds_mom_cache_and_honours_user_cache():
    model = tiny()
    prompt = ids(2, 12)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
        assert isinstance(out.cache, MomCache)
        assert out.cache.get_seq_length() == 12 + 4  # the last generated token is never fed back
        user = DynamicCache(config=model.config)  # transformers' LinearAttentionLayer per layer
        out_user = model.generate(prompt, max_new_tokens=5, do_sample=False, cache=user, return_dict_in_generate=True)
        assert out_user.cache is user
        assert user.layers[0].recurrent_states[0].shape == (2, 5, 2, 8, 12)
        no_cache = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(out.sequences, out_user.sequences)
    assert torch.equal(out.sequences, no_cache)


def test_training_step_gradients_and_aux_loss():
    model = tiny().train()
    input_ids = ids(2, 20)
    out = model(input_ids, labels=input_ids)
    assert out.aux_loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_top1_router_gradient_from_the_output(norm_topk_prob):
    """Renormalised top-1 weights are constant 1: only ``norm_topk_prob=False`` trains the router through the LM
    loss (with ``aux_loss_scale=0`` nothing else reaches it)."""
    model = tiny(shared_mem=False, topk=1, norm_topk_prob=norm_topk_prob, aux_loss_scale=0.0).train()
    input_ids = ids(2, 20)
    model(input_ids, labels=input_ids).loss.backward()
    largest = [float(layer.attn.router.gate.weight.grad.abs().max()) for layer in model.model.layers]
    if norm_topk_prob:  # d(w / w) / dw = 0 up to rounding
        assert max(largest) < 1e-6, largest
    else:
        assert min(largest) > 1e-3, largest
    with torch.no_grad():
        _, _, weights = model.model.layers[0].attn.router(torch.randn(1, 5, 32))
    assert torch.equal(weights == 1.0, torch.full_like(weights, norm_topk_prob, dtype=torch.bool))


@needs_triton
def test_triton_backend_matches_torch_end_to_end():
    """The model on the Triton kernels (chunked kernel for the packed streams, routed recurrent kernel for decoding;
    run by the interpreter here) equals the torch path: logits, every gradient, and prefill + decode."""
    ref, tri = tiny().to(DEVICE).train(), tiny(kernel_backend="triton").to(DEVICE).train()
    input_ids = ids(2, 21).to(DEVICE)
    reference_logits = assert_same_training_step(ref, tri, input_ids, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        incremental = prefill_then_decode(tri.eval(), input_ids, split=17)
    torch.testing.assert_close(incremental, reference_logits, atol=1e-5, rtol=1e-4)


def test_layer_matches_mixture_of_memories_spec():
    """The packed-stream layer equals the token-loop spec fed with per-memory dense inputs (conv per memory
    stream computed independently here, by masking)."""
    model = tiny(num_hidden_layers=1)
    layer = model.model.layers[0].attn
    x = torch.randn(2, 19, 32)
    with torch.no_grad():
        logits, index, weights = layer._route(x)
        mems = layer.total_memories
        routed = torch.zeros(2, 19, mems, dtype=torch.bool).scatter_(2, index, True)
        dense = torch.zeros(2, 19, mems).scatter_(2, index, weights)
        proj = torch.einsum("btd,mrd->bmtr", x, layer.memory_proj)
        k_pre, v_pre, b_log, a_log = proj.split([16, 24, 2, 2], dim=-1)
        q_pre = layer.q_proj(x)[:, None].expand(-1, mems, -1, -1)
        pre = torch.cat([q_pre, k_pre, v_pre], -1)  # [b, M', T, C]
        # conv over each memory's routed stream, written independently: per (b, m), compact, conv, scatter back
        conv = torch.zeros_like(pre)
        for b in range(2):
            for m in range(mems):
                t_idx = routed[b, :, m].nonzero().flatten()
                out, _ = stream_short_conv(pre[b, m, t_idx][None], layer.conv_weight, None, torch.tensor([len(t_idx)]))
                conv[b, m, t_idx] = out[0]
        q, k, v = layer._split(conv)
        g, beta = layer._gates(b_log, a_log)
        o, _ = naive_recurrent_mom_gated_delta_rule(
            q.transpose(2, 3),
            k.transpose(2, 3),
            v.transpose(2, 3),
            g.transpose(2, 3),
            beta.transpose(2, 3),
            dense,
            routed,
        )
        expected = layer._output(o.transpose(1, 2), x)
        got, _ = layer(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_bad_attention_mask_raises():
    model = tiny()
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids(1, 5), attention_mask=torch.ones(1, 1, 5, 5))


def test_decode_scaling_benchmark_runs(tmp_path):
    from benchmarks.decode_scaling import main

    result = main(
        [
            "--models",
            "mom",
            "--contexts",
            "16",
            "40",
            "--new_tokens",
            "2",
            "--repeats",
            "1",
            "--out",
            str(tmp_path / "scaling.json"),
        ]
    )
    assert [row["context_length"] for row in result["rows"]] == [16, 40]
    assert all(row["ms_per_token"] > 0 for row in result["rows"]) and (tmp_path / "scaling.json").exists()


def test_routing_benchmark_group_purity_matches_groups_to_distinct_memories():
    """``benchmarks/mom_routing.py``: 1.0 only when each group has its own memory; a router that sends every key to
    one memory scores 1 / G (each group's most frequent memory taken independently would give it 1.0)."""
    from benchmarks.mom_routing import group_purity

    groups = torch.arange(4).repeat_interleave(5)  # 4 groups x 5 keys
    assert group_purity(torch.tensor([2, 0, 3, 1]).repeat_interleave(5), groups, 4, 4) == 1.0  # a permutation
    assert group_purity(torch.full((20,), 3), groups, 4, 4) == 0.25  # collapsed onto memory 3
    mixed = torch.tensor([0, 0, 0, 1, 1] + [0] * 5 + [2] * 5 + [3] * 5)  # groups 0 and 1 both prefer memory 0
    assert group_purity(mixed, groups, 4, 4) == (2 + 5 + 5 + 5) / 20  # best: g1 -> 0, g0 -> 1 (its 2 keys there)
    assert group_purity(torch.tensor([0, 1, 0, 1]).repeat_interleave(5), groups, 2, 4) == 1.0  # 2 groups a memory


# ---- transformers conformance (tests/modeling/conformance.py) ---------------------------------------------------------


class MomTester(ModelTester):
    """2 layers, 4 memories (top-2) + a shared one; 11 tokens cross a chunk (8) of the chunked delta rule."""

    model_class = MomForCausalLM
    base_model_class = MomModel
    num_hidden_states = 3
    doc = "docs/mom.md"

    def get_config(self, **overrides):
        fields = dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_heads=2,
            head_dim=8,
            expand_v=1.5,
            num_memories=4,
            topk=2,
            shared_mem=True,
            conv_size=3,
            intermediate_size=48,
            chunk_size=8,
            initializer_range=0.2,
            pad_token_id=0,
            kernel_backend="torch",
        )
        fields.update(overrides)
        return MomConfig(**fields)


class TestMomConformance(ConformanceSuite):
    tester = MomTester()
