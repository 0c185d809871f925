"""ChunkMemoryBank (hf_longmem/memory/memory_bank.py): chunking, FIFO bounds, exact top-k retrieval, bad inputs."""

from __future__ import annotations

import pytest
import torch

from hf_longmem.memory.memory_bank import ChunkMemoryBank


def _kv(batch=2, heads=2, length=10, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, length, dim, generator=g), torch.randn(batch, heads, length, dim, generator=g)


def _stored(bank, row):
    """Stored chunks of ``row`` in write order (oldest first): (keys [n, H, c, d], values, mask)."""
    n, written = int(bank.num_chunks()[row]), int(bank.written[row])
    slots = [(written - n + i) % bank.max_chunks for i in range(n)]
    return (
        bank.keys[row][:, slots].transpose(0, 1),
        bank.values[row][:, slots].transpose(0, 1),
        bank.token_mask[row, slots],
    )


def test_chunks_and_chunk_mean_keys():
    keys, values = _kv(batch=1, length=8)
    bank = ChunkMemoryBank(num_heads=2, head_dim=4, chunk_size=4, max_tokens=16)
    bank.write(keys, values)
    k, v, m = _stored(bank, 0)
    assert k.shape == (2, 2, 4, 4) and m.all()
    torch.testing.assert_close(k, keys[0].view(2, 2, 4, 4).transpose(0, 1))
    torch.testing.assert_close(v, values[0].view(2, 2, 4, 4).transpose(0, 1))
    torch.testing.assert_close(bank.chunk_keys[0, :, :2], keys[0].view(2, 2, 4, 4).mean(dim=2))
    assert bank.num_tokens().tolist() == [8]


def test_pieces_equal_one_write_and_padding_is_never_stored():
    keys, values = _kv(batch=2, length=13)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, :3] = False  # left padding of row 1
    whole = ChunkMemoryBank(2, 4, chunk_size=4, max_tokens=64)
    whole.write(keys, values, mask)
    pieces = ChunkMemoryBank(2, 4, chunk_size=4, max_tokens=64)
    for start, stop in ((0, 1), (1, 6), (6, 13)):
        pieces.write(keys[:, :, start:stop], values[:, :, start:stop], mask[:, start:stop])
    for name in ("keys", "values", "chunk_keys", "token_mask", "written", "pending_count"):
        torch.testing.assert_close(getattr(pieces, name), getattr(whole, name))
    assert whole.written.tolist() == [3, 2] and whole.pending_count.tolist() == [1, 2]
    k, _, _ = _stored(whole, 1)
    torch.testing.assert_close(k.transpose(0, 1).reshape(2, 8, 4), keys[1, :, 3:11])  # real tokens only


def test_fifo_eviction_keeps_the_newest_chunks():
    bank = ChunkMemoryBank(1, 2, chunk_size=2, max_tokens=6)  # 3 chunks
    stream = torch.arange(10, dtype=torch.float32).view(1, 1, 10, 1).expand(1, 1, 10, 2).contiguous()
    bank.write(stream[:, :, :4], stream[:, :, :4])
    bank.write(stream[:, :, 4:10], stream[:, :, 4:10])  # 5 chunks ever written, 3 fit
    assert bank.num_chunks().tolist() == [3] and bank.written.tolist() == [5]
    k, v, _ = _stored(bank, 0)
    assert k[:, 0, :, 0].tolist() == [[4.0, 5.0], [6.0, 7.0], [8.0, 9.0]]
    # A single write larger than the bank keeps only its newest chunks.
    big = ChunkMemoryBank(1, 2, chunk_size=2, max_tokens=6)
    big.write(stream, stream)
    assert _stored(big, 0)[0][:, 0, :, 0].tolist() == [[4.0, 5.0], [6.0, 7.0], [8.0, 9.0]]
    assert big.memory_bytes() == bank.memory_bytes() > 0


def test_flush_stores_a_masked_partial_chunk():
    keys, values = _kv(batch=1, heads=1, length=6)
    bank = ChunkMemoryBank(1, 4, chunk_size=4, max_tokens=16)
    bank.write(keys, values)
    assert bank.num_chunks().tolist() == [1] and bank.pending_count.tolist() == [2]
    bank.flush()
    k, _, m = _stored(bank, 0)
    assert bank.num_chunks().tolist() == [2] and m[1].tolist() == [True, True, False, False]
    torch.testing.assert_close(bank.chunk_keys[0, 0, 1], keys[0, 0, 4:6].mean(dim=0))
    assert bank.pending_count.tolist() == [0]


def test_retrieve_is_exact_topk_with_gqa():
    keys, values = _kv(batch=2, heads=2, length=24, dim=4, seed=1)
    bank = ChunkMemoryBank(2, 4, chunk_size=3, max_tokens=30)
    bank.write(keys, values)
    queries = torch.randn(2, 4, 5, 4, generator=torch.Generator().manual_seed(2))  # 4 query heads, 2 kv heads
    got_k, got_v, got_mask = bank.retrieve(queries, k=2)
    assert got_k.shape == (2, 4, 5, 6, 4) and got_mask.all()
    chunk_k = keys.view(2, 2, 8, 3, 4)
    chunk_v = values.view(2, 2, 8, 3, 4)
    for b in range(2):
        for h in range(4):
            kv = h // 2
            scores = queries[b, h] @ chunk_k[b, kv].mean(dim=1).T  # [T, 8]
            top = scores.topk(2, dim=-1).indices
            torch.testing.assert_close(got_k[b, h], chunk_k[b, kv][top].flatten(1, 2))
            torch.testing.assert_close(got_v[b, h], chunk_v[b, kv][top].flatten(1, 2))


def test_retrieve_more_chunks_than_held_is_masked():
    keys, values = _kv(batch=2, heads=1, length=4)
    bank = ChunkMemoryBank(1, 4, chunk_size=2, max_tokens=8)
    bank.write(keys, values, torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]))
    _, _, mask = bank.retrieve(torch.randn(2, 1, 3, 4), k=3)
    assert mask.sum(dim=-1)[:, 0, 0].tolist() == [4, 2]


def test_batch_ops_and_atomic_save(tmp_path):
    keys, values = _kv(batch=1, length=8)
    bank = ChunkMemoryBank(2, 4, chunk_size=4, max_tokens=16)
    bank.write(keys, values)
    bank.repeat_rows(3)
    assert bank.batch_size == 3 and torch.equal(bank.keys[2], bank.keys[0])
    path = tmp_path / "bank.pt"
    bank.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["bank.pt"]
    loaded = ChunkMemoryBank.load(path)
    torch.testing.assert_close(
        loaded.retrieve(torch.ones(3, 2, 1, 4), 1)[0], bank.retrieve(torch.ones(3, 2, 1, 4), 1)[0]
    )
    bank.reset()
    assert bank.is_empty() and bank.batch_size == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="max_tokens"):
        ChunkMemoryBank(2, 4, chunk_size=4, max_tokens=10)
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkMemoryBank(2, 4, chunk_size=0, max_tokens=8)
    bank = ChunkMemoryBank(2, 4, chunk_size=4, max_tokens=16)
    with pytest.raises(ValueError, match="empty"):
        bank.retrieve(torch.randn(1, 2, 1, 4), 1)
    keys, values = _kv(batch=1, length=8)
    with pytest.raises(ValueError, match="at least one token"):
        bank.write(keys[:, :, :0], values[:, :, :0])
    with pytest.raises(ValueError, match="heads"):
        bank.write(torch.randn(1, 3, 8, 4), torch.randn(1, 3, 8, 4))
    with pytest.raises(ValueError, match="values"):
        bank.write(keys, values[..., :2])
    with pytest.raises(ValueError, match="mask"):
        bank.write(keys, values, torch.ones(1, 7))
    bank.write(keys, values)
    with pytest.raises(ValueError, match="batch"):
        bank.write(*_kv(batch=2, length=8))
    with pytest.raises(ValueError, match="queries"):
        bank.retrieve(torch.randn(1, 3, 1, 4), 1)  # 3 query heads for 2 kv heads
    with pytest.raises(ValueError, match="`k`"):
        bank.retrieve(torch.randn(1, 2, 1, 4), 0)
