"""HCAM (modeling/hcam): untrained == backbone, pieces == one call, top-k chunk attention against a brute-force
reference, chunk visibility, generate, bad configs, and the transformers conformance suite."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import hf_longmem.modeling.hcam as hcam_pkg
from hf_longmem.memory.memory_bank import ChunkMemoryBank
from hf_longmem.modeling.hcam import HCAMBranch, HCAMCache, HCAMConfig, HCAMForCausalLM, HCAMModel
from hf_longmem.modeling.hcam.attention import (
    _detail_dense,
    _detail_gathered,
    select_chunks,
    sinusoid_position_encoding,
)
from hf_longmem.modeling.hcam.memory import read_set, stored_chunk_index, visible_chunks
from tests.helpers.tiny_models import random_ids, tiny_model
from tests.modeling.conformance import ConformanceSuite, ModelTester, randomize_, tiny_backbone_config

SMALL = dict(segment_length=8, chunk_size=2, topk_chunks=2, memory_size=8)
# float32 logits of order 10 from sums taken in another order (per piece vs one call): a few 2**-24 relative per
# layer and branch; 2e-5 absolute leaves a factor of ~10
ATOL, RTOL = 2e-5, 1e-4


def _hcam(shape="llama_gqa", gate=0.0, seed=0, layers=2, **overrides):
    backbone = tiny_model(shape, seed=seed, num_hidden_layers=layers)
    model = HCAMForCausalLM.from_backbone(backbone, **{**SMALL, **overrides}).eval()
    with torch.no_grad():
        for branch in model.model.branches:
            branch.gate.fill_(gate)
    return backbone, model


# ---- the model ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["llama_gqa", "llama_mha", "mistral", "qwen2"])
def test_untrained_branch_equals_backbone(shape):
    """gate_init=0: tanh(0) * branch adds exactly 0, so the logits are the backbone's on each segment of 8 tokens
    (exactly the backbone's own computation), while the memory is filled and read."""
    backbone, model = _hcam(shape)
    ids = random_ids(2, 21)
    with torch.no_grad():
        out = model(ids)
        expected = torch.cat([backbone(ids[:, s : s + 8]).logits for s in range(0, 21, 8)], dim=1)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
    assert all(store.num_chunks().tolist() == [4, 4] for store in out.cache.stores)  # FIFO of 8 tokens = 4 chunks
    assert out.cache.real_tokens.tolist() == [21, 21] and out.cache.get_seq_length() == 21
    assert type(AutoModelForCausalLM.from_config(model.config)) is HCAMForCausalLM


def test_live_branch_changes_the_output_only_after_the_first_chunk():
    """A query sees chunk g only once the chunk is complete before it (t >= (g + 1) * C): the first chunk's tokens
    equal the backbone, later ones do not."""
    backbone, model = _hcam(gate=1.0)
    ids = random_ids(1, 8)
    with torch.no_grad():
        out, base = model(ids).logits, backbone(ids).logits
    torch.testing.assert_close(out[:, :2], base[:, :2], rtol=0, atol=0)
    assert (out[:, 2:] - base[:, 2:]).abs().amax(dim=-1).min() > 1e-4


def test_pieces_and_token_by_token_equal_one_call():
    """Segment-by-segment definition: positions restart and the backbone's KV cache is reset at every multiple of
    ``segment_length`` of the token count; a query at stream position t reads the most recent ``memory_size / C``
    chunks complete before t. So one call over 37 tokens equals pieces of any size, token by token included, across
    four segment boundaries and FIFO evictions (the memory holds 4 of the 18 chunks)."""
    _, model = _hcam(gate=0.8, layers=3, memory_layers=[0, 2])
    ids = random_ids(2, 37, seed=3)
    with torch.no_grad():
        full = model(ids)
        cache, pieces = model.make_cache(), []
        for start, stop in ((0, 3), (3, 11), (11, 12), (12, 25)):
            pieces.append(model(ids[:, start:stop], cache=cache).logits)
        for position in range(25, 37):
            pieces.append(model(ids[:, position : position + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full.logits, atol=ATOL, rtol=RTOL)
    for mine, theirs in zip(cache.stores, full.cache.stores):
        torch.testing.assert_close(mine.keys, theirs.keys, atol=ATOL, rtol=RTOL)
        assert mine.written.tolist() == theirs.written.tolist() == [18, 18]
    assert cache.get_seq_length() == 37 and cache.segment_fill == 5


def test_generate_equals_greedy_full_forwards_and_honours_a_user_cache():
    """Prefill + decode inside ``generate`` (default HCAMCache) == greedy decoding by full forwards without a cache."""
    _, model = _hcam(gate=0.8)
    ids = random_ids(2, 13, seed=4)
    out = model.generate(
        ids, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True
    )
    sequence = ids
    with torch.no_grad():
        for step in range(6):
            logits = model(sequence, use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[step], logits, atol=ATOL, rtol=RTOL)
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, sequence)
    user_cache = model.make_cache()
    again = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, cache=user_cache)
    assert torch.equal(again, sequence) and user_cache.get_seq_length() == 18
    from transformers import DynamicCache

    with pytest.raises(ValueError, match="cache must be a HCAMCache"):
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, cache=DynamicCache())


def test_offloaded_memory_gives_the_same_logits_and_keeps_summaries_in_step():
    """``memory_offload``: chunk contents in CPU memory, a device copy of the summaries updated slot by slot (FIFO
    wrap-around, rows writing different numbers of chunks); the logits are those of the resident memory, one call,
    pieces, token by token and beam search alike."""
    _, model = _hcam(gate=0.8)
    ids = random_ids(2, 37, seed=7)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # right padding: row 1 writes fewer chunks
    with torch.no_grad():
        resident = model(ids, attention_mask=mask).logits
        cache = HCAMCache(model.config, offload=True)
        pieces = [model(ids[:, :13], attention_mask=mask[:, :13], cache=cache).logits]
        pieces += [model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits for t in range(13, 37)]
    torch.testing.assert_close(torch.cat(pieces, dim=1)[0], resident[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.cat(pieces, dim=1)[1, :30], resident[1, :30], atol=ATOL, rtol=RTOL)
    for store, summaries in zip(cache.stores, cache.summaries):
        assert store.written.tolist() == [18, 15]  # 4 chunk slots: wrapped around several times
        torch.testing.assert_close(summaries, store.chunk_keys[:, 0], rtol=0, atol=0)
    assert cache.memory_breakdown()["offloaded"] == sum(store.memory_bytes() for store in cache.stores) > 0
    model.config.memory_offload = True  # generate builds an offloading cache from the config
    options = dict(max_new_tokens=5, num_beams=2, do_sample=False, pad_token_id=0)
    offloaded = model.generate(ids[:, :20], **options)
    model.config.memory_offload = False
    assert torch.equal(offloaded, model.generate(ids[:, :20], **options))


def test_right_padding_real_tokens_equal_rows_alone():
    """Training batches padded on the right: pads never enter the memory, real tokens give what the row gives alone."""
    _, model = _hcam(gate=0.8)
    ids = random_ids(2, 21, seed=5)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    with torch.no_grad():
        out = model(ids.masked_fill(mask == 0, 0), attention_mask=mask)
        alone = model(ids[1:, :14])
    torch.testing.assert_close(out.logits[1, :14], alone.logits[0], atol=ATOL, rtol=RTOL)
    assert out.cache.stores[0].written.tolist() == [10, 7]


def test_only_the_branches_train_and_the_gate_moves_first(tmp_path):
    _, model = _hcam(gate=0.0)
    model.save_pretrained(tmp_path)
    model = HCAMForCausalLM.from_pretrained(tmp_path).eval()  # loading must not unfreeze the backbone
    model.train()
    ids = random_ids(2, 21, seed=6)
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all(name.startswith("model.branches.") for name in grads)
    assert all(float(grads[f"model.branches.{i}.gate"].abs()) > 0 for i in range(2))  # d/dg = branch . dL/dh
    assert float(grads["model.branches.0.query.weight"].abs().max()) == 0.0  # tanh(0) = 0 blocks the rest at first
    branch_parameters = sum(p.numel() for p in model.model.branches.parameters())
    assert model.trainable_parameter_count() == branch_parameters


def test_gradient_checkpointing_refuses_a_filled_cache():
    _, model = _hcam(gate=0.5)
    cache = model.make_cache()
    with torch.no_grad():
        model(random_ids(1, 5), cache=cache)
    model.train()
    model.activation_checkpointing_enable({"use_reentrant": False})
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(random_ids(1, 3), cache=cache)
    assert model(random_ids(1, 11), labels=random_ids(1, 11)).cache is None  # trains without returning a cache
    fresh = model.make_cache()
    model(random_ids(1, 11), cache=fresh)  # ends 3 tokens into a segment whose backbone keys/values are not kept
    model.eval()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(random_ids(1, 1), cache=fresh)


# ---- the attention against brute force -----------------------------------------------------------------------------


def _reference_branch(branch: HCAMBranch, x, contents, summaries, visible):
    """Query by query, chunk by chunk, head by head (float64), as ``htm_attention.py`` defines it."""
    b, t, d = x.shape
    c = contents.shape[2]
    heads = branch.num_heads
    pe = sinusoid_position_encoding(c, d, torch.float64)
    out = torch.zeros(b, t, d, dtype=torch.float64)
    size = branch.summary_query.out_features
    for r in range(b):
        for i in range(t):
            seen = [n for n in range(contents.shape[1]) if visible[r, i, n]]
            if not seen:
                continue
            q_sum = branch.summary_query.weight @ x[r, i]
            logits = {n: float(q_sum @ (branch.summary_key.weight @ summaries[r, n])) / math.sqrt(size) for n in seen}
            top = sorted(seen, key=lambda n: -logits[n])[: branch.topk]
            weights = torch.softmax(torch.tensor([logits[n] for n in top], dtype=torch.float64), dim=0)
            for weight, n in zip(weights, top):
                memory = contents[r, n] + pe  # [C, D]
                q = branch.query(x[r, i]).view(heads, -1)
                k = branch.key(memory).view(c, heads, -1)
                v = branch.value(memory).view(c, heads, -1)
                per_head = []
                for h in range(heads):
                    probs = torch.softmax(k[:, h] @ q[h] / math.sqrt(q.shape[-1]), dim=0)
                    per_head.append(probs @ v[:, h])
                out[r, i] += weight * branch.output(torch.cat(per_head))
    return out


@pytest.mark.parametrize("queries", [2, 9], ids=["gathered-T2", "dense-T9"])
def test_branch_equals_brute_force_top_k_chunk_attention(queries):
    """Summary attention, top-k over the visible chunks, per-chunk softmax, relevance-weighted sum: the batched
    branch equals a loop over queries, chunks and heads; both detail paths (T*k < N gathers, else dense) are hit.
    Row 1's first query sees no chunk (output 0), another sees fewer than k."""
    torch.manual_seed(0)
    branch = HCAMBranch(8, 12, 3, topk=3, position_encoding=True, gate_init=0.0, init_scale=2.0).double()
    b, n, c, d = 2, 7, 4, 8
    x = torch.randn(b, queries, d, dtype=torch.float64)
    contents = torch.randn(b, n, c, d, dtype=torch.float64)
    summaries = contents.mean(dim=2)
    visible = torch.rand(b, queries, n, generator=torch.Generator().manual_seed(1)) < 0.7
    visible[1, 0] = False
    visible[0, 1] = False
    visible[0, 1, 2] = True  # one chunk only: k > visible
    with torch.no_grad():
        got = branch(x, contents, summaries, visible)
        expected = _reference_branch(branch, x, contents, summaries, visible)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    assert float(got[1, 0].abs().max()) == 0.0


@pytest.mark.parametrize("shape", ["llama_gqa", "qwen2"])
def test_attention_init_is_the_layers_attention_within_a_chunk(shape):
    """``branch_init="attention"``: with one visible chunk and no position encoding, the branch computes its decoder
    layer's attention (GQA heads, biases, input norm) of the query over that chunk's tokens, without RoPE."""
    backbone, model = _hcam(shape, branch_init="attention", memory_position_encoding=False)
    layer = backbone.model.layers[1]
    branch = model.model.branches[1]
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(1, 3, 64, generator=g)
    chunk = torch.randn(1, 1, 2, 64, generator=g)
    x = hidden / hidden.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    contents = chunk / chunk.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    with torch.no_grad():
        got = branch(x, contents, contents.mean(dim=2), torch.ones(1, 3, 1, dtype=torch.bool))
        attention, norm = layer.self_attn, layer.input_layernorm
        q = attention.q_proj(norm.weight * x).view(1, 3, 4, 16).transpose(1, 2)
        k = attention.k_proj(norm.weight * contents[:, 0]).view(1, 2, 2, 16).transpose(1, 2).repeat_interleave(2, 1)
        v = attention.v_proj(norm.weight * contents[:, 0]).view(1, 2, 2, 16).transpose(1, 2).repeat_interleave(2, 1)
        probs = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
        expected = attention.o_proj((probs @ v).transpose(1, 2).reshape(1, 3, 64))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the gate is still 0: the model is still the backbone
        ids = random_ids(1, 8)
        torch.testing.assert_close(model(ids).logits, backbone(ids).logits, rtol=0, atol=0)


def test_top_k_selection_against_sorting():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 11, generator=g)
    visible = torch.rand(3, 5, 11, generator=g) < 0.5
    visible[0, 0] = False
    index, weights, valid = select_chunks(logits, visible, 4)
    for r in range(3):
        for t in range(5):
            seen = visible[r, t].nonzero().flatten().tolist()
            best = sorted(seen, key=lambda n: -float(logits[r, t, n]))[:4]
            assert index[r, t, : len(best)].tolist() == best and valid[r, t].sum() == len(best)
            if best:
                torch.testing.assert_close(weights[r, t, : len(best)], torch.softmax(logits[r, t, best], dim=0))
            assert float(weights[r, t, len(best) :].abs().sum()) == 0.0


def test_gathered_and_dense_detail_paths_agree():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    keys = torch.randn(2, 6, 4, 3, 4, generator=g, dtype=torch.float64)
    values = torch.randn(2, 6, 4, 3, 4, generator=g, dtype=torch.float64)
    index = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(10)]).view(2, 5, 3)
    weights = torch.softmax(torch.randn(2, 5, 3, generator=g, dtype=torch.float64), dim=-1)
    rows = torch.arange(2)[:, None, None]
    gathered = _detail_gathered(q, keys[rows, index], values[rows, index], weights)
    torch.testing.assert_close(_detail_dense(q, keys, values, index, weights), gathered, atol=1e-12, rtol=1e-12)


def test_position_encoding_is_the_official_one():
    pe = sinusoid_position_encoding(3, 4, torch.float64)
    inv = torch.tensor([1.0, 1e4**-0.5], dtype=torch.float64)
    for row, position in enumerate((2.0, 1.0, 0.0)):  # counted from the chunk's end
        torch.testing.assert_close(pe[row], torch.cat([torch.sin(position * inv), torch.cos(position * inv)]))


def test_read_set_and_visibility_against_the_stream():
    """Write a stream in pieces into a FIFO store of 3 chunks: the stored slots carry the right stream indices, the
    read set of the next piece is the stored chunks plus those it completes, and visibility keeps the window."""
    store = ChunkMemoryBank(1, 2, 2, 6, value_dim=1)
    stream = torch.arange(2 * 17 * 2, dtype=torch.float32).view(2, 17, 2)
    for start, stop in ((0, 5), (5, 12)):
        piece = stream[:, start:stop]
        store.write(piece[:, None], piece.new_zeros(2, 1, stop - start, 1))
    assert stored_chunk_index(store).tolist() == [[3, 4, 5], [3, 4, 5]]
    piece = stream[:, 12:17]  # completes chunks 6 (tokens 12, 13) and 7 (14, 15); 16 stays pending
    contents, summaries, index = read_set(store, piece, torch.ones(2, 5, dtype=torch.bool))
    assert index.tolist() == [[3, 4, 5, 6, 7]] * 2
    expected = stream[:, 6:16].view(2, 5, 2, 2)
    torch.testing.assert_close(contents, expected)
    torch.testing.assert_close(summaries, expected.mean(dim=2))
    positions = torch.arange(12, 17)[None].expand(2, 5)
    visible = visible_chunks(index, positions, chunk_size=2, max_chunks=3)
    # t=12,13 -> chunks 3..5; t=14,15 -> 4..6; t=16 -> 5..7
    assert visible[0].long().tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 1, 1, 1, 0],
        [0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]


# ---- refusals -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(segment_length=9, chunk_size=2), "segment_length"),
        (dict(memory_size=7, chunk_size=2), "memory_size"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(topk_chunks=0), "topk_chunks"),
        (dict(memory_layers=[2]), "memory_layers"),
        (dict(memory_layers=[0, 0]), "memory_layers"),
        (dict(memory_layers=[]), "memory_layers"),
        (dict(memory_layers=[True]), "memory_layers"),
        (dict(num_memory_heads=3), "num_memory_heads"),
        (dict(memory_hidden_size=0), "memory_hidden_size"),
        (dict(init_scale=0.0), "init_scale"),
        (dict(gate_init=float("nan")), "gate_init"),
        (dict(memory_position_encoding="yes"), "memory_position_encoding"),
        (dict(memory_offload=1), "memory_offload"),
        (dict(branch_init="copy"), "branch_init"),
        (dict(branch_init="attention", memory_hidden_size=16), "branch_init"),
        (dict(segment_length=2.5), "segment_length"),
    ],
)
def test_bad_config_values_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        HCAMConfig(backbone_config=tiny_backbone_config(), **fields)


def test_bad_inputs_are_refused():
    backbone, model = _hcam()
    with pytest.raises(ValueError, match="even hidden size"):
        HCAMConfig(
            backbone_config=tiny_backbone_config(
                hidden_size=33, num_attention_heads=3, num_key_value_heads=3, head_dim=12
            )
        )
    with pytest.raises(ValueError, match="Llama-family"):
        HCAMForCausalLM.from_backbone(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)))
    with pytest.raises(ValueError, match="HCAMCache"):
        model(random_ids(1, 4), cache=model.make_cache().backbone_cache)
    cache = model.make_cache()
    model(random_ids(2, 4), cache=cache)
    with pytest.raises(ValueError, match="batch"):
        model(random_ids(1, 4), cache=cache)
    with pytest.raises(ValueError, match="crop"):
        cache.crop(1)
    with pytest.raises(ValueError, match="padding inside a row"):
        model(random_ids(1, 6), attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1]]))
    assert isinstance(cache, HCAMCache) and cache.memory_bytes() > 0 and hcam_pkg.__all__


# ---- transformers conformance (tests/modeling/conformance.py) -----------------------------------------------------


class HCAMTester(ModelTester):
    """A 2-layer Llama backbone with HCAM in both layers; 11 tokens fill one segment (8) and start the next, and the
    chunks of 2 tokens are read from the third token on."""

    model_class = HCAMForCausalLM
    base_model_class = HCAMModel
    num_hidden_states = 3
    doc = "docs/hcam.md"

    def get_config(self, **overrides):
        backbone = tiny_backbone_config(tie_word_embeddings=overrides.pop("tie_word_embeddings", False))
        fields = dict(SMALL, gate_init=0.7)
        fields.update(overrides)
        return HCAMConfig(backbone_config=backbone, **fields)

    def prepare_model(self, model):
        randomize_(model.backbone)
        return model


class TestHCAMConformance(ConformanceSuite):
    tester = HCAMTester()
