"""BlockStore: bit-exact round trips, the device LRU bound, byte accounting, rows and bad arguments."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_longmem.memory.block_store import BlockStore

HKV, H, D = 2, 4, 8


def blocks(batch: int, sizes: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    keys = torch.randn(batch, HKV, total, D, generator=g)
    values = torch.randn(batch, HKV, total, D + 2, generator=g)
    reprs = torch.randn(batch, len(sizes), H, D, generator=g)
    return keys, values, reprs


@pytest.mark.parametrize("offload", [False, True])
def test_round_trip_is_bit_exact(offload):
    store = BlockStore("cpu", max_cached_blocks=2, offload=offload)
    keys, values, reprs = blocks(2, [4, 4, 4])
    store.add_blocks(keys, values, [4, 4, 4], reprs)
    keys[:] = 0  # the store owns its copies
    fresh_keys, fresh_values, fresh_reprs = blocks(2, [4, 4, 4])
    got_keys, got_values, valid = store.gather([[2, 0], [1, 2]])
    assert valid is None
    assert torch.equal(got_keys[0], torch.cat((fresh_keys[0, :, 8:12], fresh_keys[0, :, 0:4]), dim=1))
    assert torch.equal(got_values[1], fresh_values[1, :, 4:12])
    assert torch.equal(store.representatives(), fresh_reprs)
    assert store.num_blocks() == [3, 3]
    assert store.block_sizes(0) == [4, 4, 4]


def test_lru_never_exceeds_its_size_and_evicts_least_recent():
    store = BlockStore("cpu", max_cached_blocks=3, offload=True)
    keys, values, reprs = blocks(1, [2] * 10)
    store.add_blocks(keys, values, [2] * 10, reprs)
    assert store.resident_blocks(0) == []  # new blocks are not resident (official load_to_cache=False)
    requests = [[0, 1], [2], [0, 3], [4, 5, 6], [1], [7, 8, 9, 0, 1], [2, 3]]
    for ids in requests:
        got, _, _ = store.gather([ids])
        assert torch.equal(got[0], torch.cat([keys[0, :, 2 * i : 2 * i + 2] for i in ids], dim=1))
        assert len(store.resident_blocks(0)) <= 3
    assert store.resident_blocks(0) == [1, 2, 3]  # LRU order, most recent last
    store.gather([[1]])
    assert store.resident_blocks(0)[-1] == 1
    loads = store.loads
    store.gather([[1, 2, 3]])  # all resident: no copy
    assert store.loads == loads


def test_memory_bytes_split():
    keys, values, reprs = blocks(1, [4, 4])
    block_bytes = (keys.numel() + values.numel()) * 4
    repr_capacity = 16 * H * D * 4  # the representative buffer grows by doubling from 16 blocks
    plain = BlockStore("cpu", offload=False)
    plain.add_blocks(keys, values, [4, 4], reprs)
    assert plain.memory_breakdown() == {"resident": block_bytes + repr_capacity, "offloaded": 0}
    assert plain.memory_bytes() == block_bytes + repr_capacity
    offloaded = BlockStore("cpu", max_cached_blocks=1, offload=True)
    offloaded.add_blocks(keys, values, [4, 4], reprs)
    assert offloaded.memory_breakdown() == {"resident": repr_capacity, "offloaded": block_bytes}
    offloaded.gather([[1]])
    assert offloaded.memory_breakdown()["resident"] == repr_capacity + block_bytes // 2


@pytest.mark.parametrize("per_head", [False, True])
def test_topk_scores_representatives_where_they_live(per_head):
    from hf_longmem.kernels.block_topk import naive_block_topk

    keys, values, reprs = blocks(2, [2] * 20)
    query = torch.randn(2, H, D, generator=torch.Generator().manual_seed(1))
    device_side = BlockStore("cpu", max_cached_blocks=2, offload=True)
    host_side = BlockStore("cpu", max_cached_blocks=2, offload=True, offload_representatives=True)
    for store in (device_side, host_side):
        store.add_blocks(keys, values, [2] * 20, reprs)
    assert host_side.reprs_device == host_side.home and device_side.reprs_device == device_side.device
    got = host_side.topk(query, 5, per_head=per_head)
    assert torch.equal(got, device_side.topk(query, 5, per_head=per_head))
    if per_head:
        expected = naive_block_topk(query.reshape(2 * H, D), reprs.transpose(1, 2).reshape(2 * H, 20, D), 5)[0]
        assert torch.equal(got, expected.view(2, H, 5))
    else:
        assert torch.equal(got, naive_block_topk(query.flatten(1), reprs.flatten(2), 5)[0])
    assert host_side.memory_parts()["representatives"] == ("offloaded", 2 * 20 * H * D * 4)  # capacity: 20 blocks
    assert host_side.memory_breakdown()["resident"] == 0  # nothing gathered yet: the LRU is empty
    host_side.gather([[0], [3]])
    assert host_side.memory_breakdown()["resident"] == (keys.numel() + values.numel()) * 4 // 20  # one block per row


def test_rows_with_different_blocks_are_padded_and_masked():
    store = BlockStore("cpu", offload=False)
    keys, values, reprs = blocks(2, [3, 5])
    store.add_blocks(keys, values, [3, 5], reprs)
    extra_keys, extra_values, extra_reprs = blocks(1, [6], seed=1)
    store.add_blocks(extra_keys, extra_values, [6], extra_reprs, rows=[1])
    assert store.num_blocks() == [2, 3]
    assert torch.equal(store.counts(), torch.tensor([2, 3]))
    assert torch.equal(store.representatives()[1, 2], extra_reprs[0, 0])
    got, got_values, valid = store.gather([[0], [2, -1]])
    assert got.shape == (2, HKV, 6, D)
    assert valid.tolist() == [[True] * 3 + [False] * 3, [True] * 6]
    assert torch.equal(got[0, :, :3], keys[0, :, :3]) and (got[0, :, 3:] == 0).all()
    assert torch.equal(got_values[1], extra_values[0])


def test_reorder_and_deepcopy():
    store = BlockStore("cpu", max_cached_blocks=2, offload=True)
    keys, values, reprs = blocks(2, [4])
    store.add_blocks(keys, values, [4], reprs)
    store.gather([[0], [0]])
    snapshot = copy.deepcopy(store)
    store.reorder(torch.tensor([1, 1, 0]))
    assert store.batch_size == 3
    got, _, _ = store.gather([[0], [0], [0]])
    assert torch.equal(got[0], keys[1]) and torch.equal(got[2], keys[0])
    assert torch.equal(store.representatives()[1], reprs[1])
    assert snapshot.batch_size == 2
    assert torch.equal(snapshot.gather([[0], [0]])[0], keys)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_cached_blocks"):
        BlockStore("cpu", max_cached_blocks=0)
    store = BlockStore("cpu")
    keys, values, reprs = blocks(1, [4])
    with pytest.raises(ValueError, match="sizes"):
        store.add_blocks(keys, values, [3], reprs)
    with pytest.raises(ValueError, match=">= 1"):
        store.add_blocks(keys, values, [4, 0], torch.cat((reprs, reprs), 1))
    store.add_blocks(keys, values, [4], reprs)
    with pytest.raises(ValueError, match="has 1 blocks"):
        store.gather([[1]])
    with pytest.raises(ValueError, match="each of the 1 rows"):
        store.gather([[0], [0]])
    two_keys, two_values, two_reprs = blocks(2, [4])
    with pytest.raises(ValueError, match="rows"):
        store.add_blocks(two_keys, two_values, [4], two_reprs)
    with pytest.raises(ValueError, match="no block"):
        store.gather([[]])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory"):
            BlockStore("cpu", offload=True, pin_memory=True)


def test_block_sizes_follow_reorder_and_tensor_view_matches():
    store = BlockStore("cpu", max_cached_blocks=4, offload=False)
    keys = torch.randn(2, 1, 7, 3)
    store.add_blocks(keys, keys.clone(), [3, 4], torch.randn(2, 2, 2, 3))
    store.add_blocks(keys[:, :, :2], keys[:, :, :2].clone(), [2], torch.randn(2, 1, 2, 3))
    assert store.block_sizes(0) == [3, 4, 2]
    assert store.block_sizes_tensor(1).tolist() == [3, 4, 2]
    store.reorder([1, 1])
    assert store.block_sizes(1) == [3, 4, 2] and store.block_sizes_tensor(0).tolist() == [3, 4, 2]
    store.add_blocks(keys[:1, :, :6], keys[:1, :, :6].clone(), [6], torch.randn(1, 1, 2, 3), rows=[1])
    assert [store.max_block_size(0), store.max_block_size(1), store.max_block_size()] == [4, 6, 6]
    store.reorder([1, 0])
    assert [store.max_block_size(0), store.max_block_size(1)] == [6, 4]
    assert copy.deepcopy(store).max_block_size(0) == 6
    store.clear()
    assert store.batch_size == 0 and store.max_block_size() == 0


@pytest.mark.parametrize("offload", [False, True])
def test_rows_of_a_padded_batch_hold_their_own_blocks(offload):
    """A left-padded batch: rows get blocks at different times (``ensure_rows`` then ``rows=``); a row without blocks
    gathers nothing (invalid slots) and scores no block (``-1``)."""
    torch.manual_seed(0)
    store = BlockStore("cpu", max_cached_blocks=4, offload=offload)
    store.ensure_rows(3)
    keys, values = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    store.add_blocks(keys, values, [2, 3], torch.randn(1, 2, 4, 4), rows=[2])
    store.add_blocks(
        keys[:, :, :2].expand(2, -1, -1, -1),
        values[:, :, :2].expand(2, -1, -1, -1),
        [2],
        torch.randn(2, 1, 4, 4),
        rows=[0, 2],
    )
    assert store.num_blocks() == [1, 0, 3] and store.block_sizes(2) == [2, 3, 2]
    got_keys, _, valid = store.gather([[0], [], [1, 0]])
    assert valid.tolist() == [[True, True, False, False, False], [False] * 5, [True] * 5]
    torch.testing.assert_close(got_keys[2, :, :3], keys[0, :, 2:5])
    index = store.topk(torch.randn(3, 4, 4), 2)
    assert index[1].tolist() == [-1, -1] and (index[0] >= 0).sum() == 1 and (index[2] >= 0).all()
    with pytest.raises(ValueError, match="holds 3 rows"):
        store.ensure_rows(2)


def test_kept_scoring_view_gives_the_reference_topk_ties_included():
    """Equal rows, ``k`` within the blocks: ``topk`` scores with the transposed representatives kept between block
    additions (``_torch_topk``); the ids equal the reference's, ties included, as blocks are added and rows reordered."""
    from hf_longmem.kernels.block_topk import naive_block_topk

    generator = torch.Generator().manual_seed(2)
    store = BlockStore("cpu", offload=False)
    for step in range(3):
        keys, values, reprs = blocks(2, [2] * 6, seed=step)
        reprs = reprs.round()  # small integers: equal scores are common
        store.add_blocks(keys, values, [2] * 6, reprs)
        if step == 2:
            store.reorder([1, 0])
        query = torch.randint(-2, 3, (2, H, D), generator=generator).float()
        for k in (1, 4, store.num_blocks()[0]):
            expected = naive_block_topk(query.flatten(1), store.representatives().flatten(2), k)[0]
            assert torch.equal(store.topk(query, k), expected)
        assert store._scoring is not None and store._scoring[1] == store.num_blocks()[0]
    assert copy.deepcopy(store)._scoring is None
