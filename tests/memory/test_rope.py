"""Key re-rotation: derived per layer from the model's own RoPE, exact on every layout, or refused.

The reference is always the model itself: the keys a model caches for the same tokens placed ``delta`` positions
later (a uniform shift of a whole row leaves every relative distance, hence every hidden state, unchanged, so layer
``i``'s keys differ only by RoPE at ``position + delta``).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from hf_longmem.memory.rope import ModelRotary, ModuleRotation, NoRotation, RotaryShift
from tests.helpers.rope_models import arch_config, arch_model
from tests.helpers.tiny_models import random_ids, tiny_config, tiny_model

LAYERS = {"gemma3": 3, "smollm3": 3, "exaone4": 4}
OVERRIDES = {
    "gemma3": {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "smollm3": {"no_rope_layers": [1, 0, 1]},
}
NOPE = {"smollm3": [1], "exaone4": [1, 3]}


def cached_keys(model, ids: torch.Tensor, start: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's cached keys ``[batch, kv_heads, seq, head_dim]`` with row ``b`` placed at ``start[b]..``."""
    position_ids = start[:, None] + torch.arange(ids.shape[1])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, position_ids=position_ids, cache=cache)
    return [layer.keys for layer in cache.layers]


@pytest.mark.parametrize(
    "arch",
    [
        "llama",
        "cohere",
        "glm",
        "glm4",
        "ernie4_5",
        "gptj",
        "phi",
        "stablelm",
        "gpt_neox",
        "gemma3",
        "smollm3",
        "exaone4",
        "gpt_oss",
    ],
)
def test_rotation_equals_the_models_own_rope_at_the_new_position(arch):
    layers = LAYERS.get(arch, 2)
    model = arch_model(arch, layers, **OVERRIDES.get(arch, {}))
    rotary = ModelRotary.from_model(model)
    from_config = ModelRotary.from_config(arch_config(arch, layers, **OVERRIDES.get(arch, {})))
    ids = random_ids(1, 6).expand(3, -1)
    base = torch.tensor([9, 9, 9])
    delta = torch.tensor([0, 13, -7])  # per row; negative deltas too
    at_base = cached_keys(model, ids, base)
    shifted = cached_keys(model, ids, base + delta)
    twice = cached_keys(model, ids, base + delta + 5)
    per_slot = delta[:, None].expand(-1, ids.shape[1])  # [batch, seq]
    for layer_idx, (k0, k1, k2) in enumerate(zip(at_base, shifted, twice)):
        rotation = rotary.for_layer(layer_idx)
        expected_type = NoRotation if layer_idx in NOPE.get(arch, []) else ModuleRotation
        assert type(rotation) is expected_type, (arch, layer_idx)
        assert type(from_config.for_layer(layer_idx)) is expected_type
        tol = dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rotation.rotate(k0, per_slot), k1, **tol)
        torch.testing.assert_close(rotation.rotate(k1, -per_slot), k0, **tol)  # back
        # composition: rotate(rotate(k at p, d), 5) == the model's keys at p + d + 5; per-head deltas
        per_head = (per_slot + 5)[:, None, :].expand(-1, k0.shape[1], -1)
        torch.testing.assert_close(
            rotation.rotate(rotation.rotate(k0, per_slot), per_head - per_slot[:, None]), k2, **tol
        )
        torch.testing.assert_close(from_config.for_layer(layer_idx).rotate(k0, per_slot), k1, **tol)
    if arch in NOPE:
        assert not torch.allclose(shifted[0], at_base[0])  # the RoPE layers do move
        assert torch.allclose(shifted[NOPE[arch][0]], at_base[NOPE[arch][0]], atol=1e-5)  # NoPE layers do not


def test_queries_rotate_like_keys_and_bfloat16_keys_keep_their_dtype():
    model = arch_model("cohere", 1)
    rotation = ModelRotary.from_model(model).for_layer(0)
    keys = torch.randn(2, 4, 5, 16)
    delta = torch.randint(-20, 20, (2, 5))
    torch.testing.assert_close(rotation.rotate(keys, delta, query=True), rotation.rotate(keys, delta))
    half = rotation.rotate(keys.bfloat16(), delta)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), rotation.rotate(keys, delta), rtol=2e-2, atol=2e-2)


def test_llama_rotation_equals_the_explicit_rotate_half_one():
    model = tiny_model("llama_gqa")
    rotary = ModelRotary.from_model(model)
    explicit = RotaryShift(model.model.rotary_emb.inv_freq)
    keys = torch.randn(2, 2, 7, 16)
    delta = torch.randint(-50, 50, (2, 2, 7))
    torch.testing.assert_close(rotary.rotate(keys, delta), explicit.rotate(keys, delta), rtol=1e-5, atol=1e-5)
    assert explicit.for_layer(1) is explicit


def test_rotate_without_a_layer_is_refused_where_layers_differ():
    rotary = ModelRotary.from_model(arch_model("smollm3", 3, no_rope_layers=[1, 0, 1]))
    with pytest.raises(ValueError, match="for_layer"):
        rotary.rotate(torch.randn(1, 2, 3, 16), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="no layer 3"):
        rotary.for_layer(3)


def _refused(model_type: str, match: str, **overrides):
    kwargs = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=match):
        ModelRotary.from_model(model)
    with pytest.raises(ValueError, match=match):
        ModelRotary.from_config(config)


def test_mla_is_refused():
    _refused(
        "deepseek_v3",
        "multi-head latent attention",
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
    )


def test_models_without_rope_are_refused():
    _refused("gpt2", "no rotary embedding", n_embd=64, n_head=4, n_layer=2)


def test_complex_valued_rope_is_refused():
    _refused(
        "llama4_text",
        "apply_rotary_pos_emb",
        head_dim=16,
        no_rope_layers=[1, 0],
        attention_chunk_size=None,
        num_local_experts=2,
        intermediate_size_mlp=128,
    )


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_rope_that_is_not_linear_in_the_position_is_refused(rope_type):
    params = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0}
    if rope_type == "longrope":
        params.update(short_factor=[1.0] * 8, long_factor=[2.0] * 8, original_max_position_embeddings=128)
    config = tiny_config("llama_gqa", rope_parameters=params)
    with pytest.raises(ValueError, match="rope_type"):
        ModelRotary.from_config(config)
    with pytest.raises(ValueError, match="rope_type"):
        ModelRotary.from_model(AutoModelForCausalLM.from_config(config))


def test_rotary_shift_partial_rotary_leaves_the_other_channels():
    rotary = RotaryShift(torch.tensor([1.0, 0.5]))  # rotary_dim 4 of head_dim 6
    keys = torch.randn(1, 1, 3, 6)
    out = rotary.rotate(keys, torch.tensor([[1, 2, 3]]))
    assert torch.equal(out[..., 4:], keys[..., 4:])
    assert not torch.allclose(out[..., :4], keys[..., :4])


def test_infllm_and_emllm_place_memory_with_each_layers_own_rotation():
    from hf_longmem import make_cache

    model = arch_model("smollm3", 3, no_rope_layers=[1, 0, 1])
    options = dict(n_init=4, n_local=16, block_size=8, topk=2, repr_topk=2, max_cached_blocks=2, exc_block_size=8)
    cache = make_cache("infllm", model, **options)
    assert [type(layer.rotary) for layer in cache.layers] == [ModuleRotation, NoRotation, ModuleRotation]
    em = make_cache(
        "emllm", model, n_init=4, n_local=16, n_mem=24, min_block_size=2, max_block_size=16, exc_block_size=8
    )
    assert [type(layer.rotary) for layer in em.layers] == [ModuleRotation, NoRotation, ModuleRotation]
    with pytest.raises(ValueError, match="latent attention"):
        make_cache(
            "infllm",
            AutoModelForCausalLM.from_config(
                AutoConfig.for_model(
                    "deepseek_v3",
                    vocab_size=97,
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    kv_lora_rank=16,
                    q_lora_rank=16,
                    qk_rope_head_dim=8,
                    qk_nope_head_dim=8,
                    v_head_dim=16,
                    n_routed_experts=4,
                    num_experts_per_tok=2,
                    moe_intermediate_size=32,
                )
            ),
            **options,
        )


def test_a_delta_broadcast_over_rows_rotates_every_row():
    rotation = ModelRotary.from_model(arch_model("glm", 1)).for_layer(0)
    keys = torch.randn(3, 2, 4, 16)
    delta = torch.tensor([[1, -2, 3, 40]])
    torch.testing.assert_close(rotation.rotate(keys, delta), rotation.rotate(keys, delta.expand(3, -1)))
    torch.testing.assert_close(rotation.rotate(keys, delta[:, None]), rotation.rotate(keys, delta.expand(3, -1)))


def test_layers_that_are_not_attention_layers_are_refused_with_their_type():
    _refused(
        "minimax",
        "'linear_attention' layer",
        head_dim=16,
        num_local_experts=2,
        num_experts_per_tok=1,
        layer_types=["full_attention", "linear_attention"],
    )


@pytest.mark.parametrize("arch", ["llama", "glm", "cohere"])
def test_cached_tables_give_exactly_the_per_call_rotation(arch):
    """``max_delta`` lets a RoPE read its tables from a cache (InfLLM/EM-LLM decoding): the same values, per head
    and per row deltas, grown as the bound grows; beyond ``TABLE_POSITIONS``, no cache."""
    from hf_longmem.memory import rope

    rotation = ModelRotary.from_model(arch_model(arch, 1)).for_layer(0)
    assert isinstance(rotation, ModuleRotation) and rotation._static
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 4, 7, 16, generator=generator)
    for bound in (60, 3000):  # the second grows the table past its first size
        for delta in (
            torch.randint(-bound, bound + 1, (2, 7), generator=generator),
            torch.randint(-bound, bound + 1, (2, 4, 7), generator=generator),
        ):
            for query in (False, True):
                expected = rotation.rotate(keys, delta, query=query)
                assert torch.equal(rotation.rotate(keys, delta, query=query, max_delta=bound), expected)
        assert rotation._signed[keys.device][0] >= bound
    assert rotation._signed_tables(rope.TABLE_POSITIONS + 1, keys.device) is None
    rotation._static = False  # a rotary module of another kind: no cache, the per-call tables
    assert rotation._signed_tables(10, torch.device("cpu")) is None


@pytest.mark.parametrize("arch", ["llama", "glm", "cohere", "gpt_neox", "phi", "glm4_moe"])
def test_rotate_to_and_the_rotate_half_formula_give_exactly_the_models_rotation(arch):
    """Llama's layout is rotated with the 4-op rotate-half formula (checked bit for bit against its apply function),
    interleaved ones and partial rotary (sliced by the attention, or inside the apply function as GPT-NeoX's and
    GLM-4-MoE's: tables narrower than the head) keep the apply function; ``rotate_to`` (InfLLM's memory query, tables
    shared by the layers of a forward) equals ``rotate`` by ``target - positions``, also for a new positions tensor
    or one changed in place."""
    from tests.helpers.architectures import build_model

    model = build_model(arch) if arch == "glm4_moe" else arch_model(arch, 1)  # GLM-4-MoE: rotate-half, partial
    rotation = ModelRotary.from_model(model).for_layer(0)
    if arch in ("llama", "glm", "cohere", "glm4_moe"):
        assert rotation._is_rotate_half(16, query=True) == (arch in ("llama", "glm4_moe"))
        assert rotation._is_rotate_half(16, query=False) == (arch in ("llama", "glm4_moe"))
    formula = rotation._half_tables(torch.zeros(1, 1, dtype=torch.long), 10, 16, True, torch.device("cpu"))
    assert (formula is not None) == (arch == "llama")
    generator = torch.Generator().manual_seed(1)
    states = torch.randn(2, 4, 3, 16, generator=generator)
    for query in (False, True):
        positions = torch.randint(-1, 900, (2, 3), generator=generator)
        for max_delta in (None, 1000):
            reference = rotation.rotate(states, 99 - positions, query=query)  # the apply function, per-call tables
            assert torch.equal(rotation.rotate(states, 99 - positions, query=query, max_delta=max_delta), reference)
            for _ in range(2):  # the second call reads the kept tables
                assert torch.equal(
                    rotation.rotate_to(states, positions, 99, query=query, max_delta=max_delta), reference
                )
        positions.add_(1)  # changed in place: not the kept tables
        expected = rotation.rotate(states, 99 - positions, query=query)
        assert torch.equal(rotation.rotate_to(states, positions, 99, query=query, max_delta=1000), expected)
        bf16 = states.to(torch.bfloat16)
        assert torch.equal(
            rotation.rotate_to(bf16, positions, 99, query=query, max_delta=1000),
            rotation.rotate(bf16, 99 - positions, query=query),
        )
