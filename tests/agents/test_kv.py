"""Memories as model state: spliced KV states equal re-prefilling the same tokens, and prefill only the question."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

import hf_longmem
from hf_longmem.agents import MemoryAgent, MemoryStore
from hf_longmem.agents.evaluate import PASSKEY_READER
from hf_longmem.agents.kv import KVMemory, block_attention_mask

PREFIX = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them.\n"
MEMORIES = [
    "tiger : The pass key is 48213. Remember it. 48213 is the pass key.\n",
    "lion : The grass is green. The sky is blue. The sun is yellow.\n",
    "eagle : The pass key is 90517. Remember it. 90517 is the pass key.\n",
    "otter : Here we go. There and back again. The grass is green.\n",
]
SUFFIX = "What is the pass key? The pass key is"
# float32 bound: the rotation by L positions of a key computed at 0..n-1 differs from RoPE at L.. by a few ulp
# (cos/sin of L * inv_freq), amplified through a few layers; 1e-4 leaves two orders of magnitude of margin.
TOL = 1e-4


@pytest.fixture(scope="module")
def embedded():
    return hf_longmem.load_default_model()


def test_block_attention_mask():
    mask = block_attention_mask([2, 1, 2])[0, 0] == 0
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)


def test_embedded_model_logits_equal_reprefill_and_prefill_drops_10x(embedded):
    model, tokenizer = embedded
    kv = KVMemory(model, tokenizer)
    states = [kv.encode(text) for text in MEMORIES]
    assert kv.encoded_tokens == sum(s.num_tokens for s in states)
    first = kv.logits(PREFIX, states, SUFFIX)  # computes (and caches) the prefix too
    spliced = kv.logits(PREFIX, states, SUFFIX)
    spliced_prefill = kv.last_prefill_tokens
    reference = kv.reference_logits(PREFIX, MEMORIES, SUFFIX)
    reprefill = kv.last_prefill_tokens
    torch.testing.assert_close(first, spliced, rtol=0, atol=0)
    assert (spliced - reference).abs().max().item() <= TOL
    suffix_tokens = len(tokenizer(SUFFIX, add_special_tokens=False)["input_ids"])
    assert spliced_prefill == suffix_tokens
    assert reprefill == kv.splice(PREFIX, states)[1].numel() + suffix_tokens
    assert reprefill >= 10 * spliced_prefill
    # A stored state (safetensors bytes) reads back to the same answer.
    restored = [kv.from_bytes(kv.to_bytes(s)) for s in states]
    torch.testing.assert_close(kv.logits(PREFIX, restored, SUFFIX), spliced, rtol=0, atol=0)
    text, prefilled = kv.generate(PREFIX, states[:1], SUFFIX, max_new_tokens=8)
    assert "48213" in text and prefilled == suffix_tokens


def _tiny_qwen2():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        use_sliding_window=False,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    return model


class _CharTokenizer:
    """Bytes as token ids (mod the tiny vocabulary); enough for a random model."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = ([1] if add_special_tokens else []) + [3 + b % 120 for b in text.encode()]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


def test_second_architecture_qwen2_logits_equal_reprefill():
    model, tokenizer = _tiny_qwen2(), _CharTokenizer()
    kv = KVMemory(model, tokenizer)
    states = [kv.encode(text) for text in MEMORIES[:3]]
    spliced = kv.logits(PREFIX, states, SUFFIX)
    reference = kv.reference_logits(PREFIX, MEMORIES[:3], SUFFIX)
    assert (spliced - reference).abs().max().item() <= TOL
    # Not a vacuous equality: without re-rotating the keys the logits differ.
    unrotated = KVMemory(model, tokenizer)
    unrotated.rotary.layers = [type("Identity", (), {"rotate": lambda self, k, d, query=False: k})()] * 2
    assert (unrotated.logits(PREFIX, states, SUFFIX) - reference).abs().max().item() > 1e-2


def test_compressed_memories_through_a_registered_cache(embedded):
    model, tokenizer = embedded
    plain, full = KVMemory(model, tokenizer), KVMemory(model, tokenizer, compress="streaming", budget=512)
    states = [full.encode(text) for text in MEMORIES[:2]]
    # A budget that keeps every token stores the same state: the same logits.
    assert (full.logits(PREFIX, states, SUFFIX) - plain.logits(PREFIX, states, SUFFIX)).abs().max() == 0
    small = KVMemory(model, tokenizer, compress="streaming", budget=12, sink_size=4)
    state = small.encode(MEMORIES[0])
    assert state.stored == 12 < state.num_tokens
    assert state.positions[0][0].tolist() == [0, 1, 2, 3, *range(state.num_tokens - 8, state.num_tokens)]
    assert small.logits(PREFIX, [state], SUFFIX).shape[0] == len(
        tokenizer(SUFFIX, add_special_tokens=False)["input_ids"]
    )
    with pytest.raises(ValueError, match="another model or compression"):
        plain.from_bytes(small.to_bytes(state))
    for name in ("duo_attention", "infllm"):  # state beyond keys/values/positions: refused, not silently dropped
        with pytest.raises(ValueError, match="keeps state beyond"):
            KVMemory(model, tokenizer, compress=name)


def test_refuses_models_whose_keys_cannot_be_rerotated():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError):
        KVMemory(gpt2, _CharTokenizer())
    sliding = AutoModelForCausalLM.from_config(
        Qwen2Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            use_sliding_window=True,
            sliding_window=16,
            max_window_layers=0,
        )
    )
    with pytest.raises(ValueError, match="sliding-window"):
        KVMemory(sliding, _CharTokenizer())


def test_agent_answers_from_stored_state(embedded):
    model, tokenizer = embedded
    store = MemoryStore()
    kv = KVMemory(model, tokenizer)
    agent = MemoryAgent(model, tokenizer, store, k=1, kv=kv, write_back=False, max_new_tokens=8, **PASSKEY_READER)
    plain = MemoryAgent(model, tokenizer, store, k=1, write_back=False, max_new_tokens=8, **PASSKEY_READER)
    memory_id = agent.remember("tiger : The pass key is 48213. Remember it.", session_id="s1", timestamp=1)
    agent.remember("lion : The grass is green.", session_id="s2", timestamp=2)
    reply = agent.answer("What was the pass key of tiger?", now=3)
    # Both answer the pass key; past it they may differ: stored states are encoded one memory at a time (block
    # attention, see block_attention_mask), the plain prompt attends across the whole text.
    assert reply.text.split()[0] == "48213"
    assert plain.answer("What was the pass key of tiger?", now=3).text.startswith("48213")
    assert reply.prompt_tokens < reply.extra["reprefill_tokens"]
    (encoder,) = store._conn.execute("SELECT encoder FROM kv_states WHERE id = ?", (memory_id,)).fetchone()
    assert kv.from_bytes(store.get_kv(memory_id, 1, encoder)).num_tokens > 0
    encoded = kv.encoded_tokens
    agent.answer("What was the pass key of tiger?", now=4)
    assert kv.encoded_tokens == encoded  # read from the store, not encoded again
    with pytest.raises(ValueError, match="KVMemory"):
        MemoryAgent(model, tokenizer, store, kv=object())


def test_memory_encoded_after_the_prefix_equals_the_plain_prompt(embedded):
    model, tokenizer = embedded
    kv = KVMemory(model, tokenizer)
    state = kv.encode(MEMORIES[0], context=PREFIX)
    spliced = kv.logits(PREFIX, [state], SUFFIX)
    assert kv.last_prefill_tokens == len(tokenizer(SUFFIX, add_special_tokens=False)["input_ids"]) + len(
        tokenizer(PREFIX)["input_ids"]
    )
    ids = torch.cat(
        [kv._ids(PREFIX, special=True), kv._ids(MEMORIES[0], special=False), kv._ids(SUFFIX, special=False)]
    )
    with torch.no_grad():
        plain = model(input_ids=ids[None]).logits[0, -spliced.shape[0] :]
    assert (spliced - plain).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="another prefix"):
        kv.logits("Another prefix\n", [state], SUFFIX)
    with pytest.raises(ValueError, match="compress"):
        KVMemory(model, tokenizer, compress="streaming", budget=8).encode(MEMORIES[0], context=PREFIX)
