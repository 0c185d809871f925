"""Attention statistics the eviction methods rank tokens by (torch reference implementations).

All functions take the keys NOT repeated for GQA and reduce the query heads of a group onto their KV head (mean),
so decisions are made per KV head — where the memory is.
"""

from __future__ import annotations

import torch

#: Queries scored at once; bounds the ``[batch, heads, chunk, kv]`` probability block of long prefills.
QUERY_CHUNK = 512


def allowed_mask(attention_mask: torch.Tensor | None, num_queries: int, num_keys: int, device) -> torch.Tensor:
    """``[batch or 1, 1, q, kv]`` True where query ``i`` may attend key ``j``.

    Uses the model's mask when given (boolean, or additive float), else causal with the queries as the last
    ``num_queries`` positions of the ``num_keys`` keys.
    """
    if attention_mask is not None:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        return mask[..., -num_queries:, -num_keys:]
    q_pos = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    return (torch.arange(num_keys, device=device)[None, :] <= q_pos)[None, None]


def attention_probs(query: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention probabilities in float32.

    Args:
        query: ``[batch, q_heads, q, head_dim]``.
        keys: ``[batch, kv_heads, kv, head_dim]``.
        allowed: ``[batch or 1, 1, q, kv]`` bool.

    Returns:
        ``[batch, kv_heads, group, q, kv]`` with ``group = q_heads // kv_heads``.
    """
    batch, q_heads, num_q, head_dim = query.shape
    kv_heads = keys.shape[1]
    q = query.float().view(batch, kv_heads, q_heads // kv_heads, num_q, head_dim)
    logits = torch.einsum("bhgqd,bhkd->bhgqk", q, keys.float()) * scaling
    logits = logits.masked_fill(~allowed[:, :, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # fully masked rows (pad queries) give zeros


def column_scores(
    query: torch.Tensor, keys: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Attention each key receives, summed over the queries, averaged over the heads of a GQA group.

    Args:
        query: ``[batch, q_heads, q, head_dim]`` (the last ``q`` positions).
        keys: ``[batch, kv_heads, kv, head_dim]``.
        attention_mask: the model's mask for these queries (``[batch, 1, q, kv]``) or ``None`` (causal).

    Returns:
        ``[batch, kv_heads, kv]`` float32.
    """
    num_q, num_k = query.shape[-2], keys.shape[-2]
    allowed = allowed_mask(attention_mask, num_q, num_k, query.device)
    total = query.new_zeros(keys.shape[0], keys.shape[1], num_k, dtype=torch.float32)
    for start in range(0, num_q, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, num_q)
        probs = attention_probs(query[:, :, start:stop], keys, allowed[:, :, start:stop], scaling)
        total += probs.sum(dim=3).mean(dim=2)
    return total


#: Queries per block of :func:`causal_head_column_sums` (``[block, n]`` logits per head stay cache-sized).
CAUSAL_QUERY_BLOCK = 128


def causal_head_column_sums(
    query: torch.Tensor, keys: torch.Tensor, scaling: float, lse: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention each key receives from causal queries, summed over the queries, per query head.

    The queries are the last ``q`` of the ``n`` keys, nothing else is masked (no pad slot, no window). Per block of
    queries only the keys the block can see are scored (a prefix of ``n - q + stop`` keys: about half the ``[q, n]``
    matrix in all), with no mask tensor and no ``nan_to_num`` (every query sees itself): the float32 arithmetic of
    :func:`column_scores` on the unmasked half only.

    Args:
        query: ``[batch, q_heads, q, head_dim]``.
        keys: ``[batch, kv_heads, n, head_dim]`` (not repeated for GQA).
        lse: ``[batch, q_heads, q]`` float32 log-sum-exp of each query's scaled logits, when the attention already
            computed it (SDPA's CPU flash kernel returns it): the probabilities are then ``exp(logit - lse)``, one
            matmul and one ``exp`` per block (:func:`causal_head_column_sums_from_lse`) instead of a softmax.

    Returns:
        ``[batch, q_heads, n]`` float32.
    """
    batch, q_heads, num_q, head_dim = query.shape
    kv_heads, num_k = keys.shape[1], keys.shape[-2]
    group, offset = q_heads // kv_heads, num_k - num_q
    if num_q == 1:
        return _decoded_query_probs(query, keys, scaling).view(batch, q_heads, num_k)
    if lse is not None:
        return causal_head_column_sums_from_lse(query, keys, scaling, lse)
    q = query.float().view(batch, kv_heads, group, num_q, head_dim)
    k = keys.float()
    total = q.new_zeros(batch, kv_heads, group, num_k)
    for start in range(0, num_q, CAUSAL_QUERY_BLOCK):
        stop = min(start + CAUSAL_QUERY_BLOCK, num_q)
        size, seen = stop - start, offset + stop  # the block's last query sees `seen` keys
        block = q[:, :, :, start:stop].reshape(batch, kv_heads, group * size, head_dim) * scaling
        logits = torch.matmul(block, k[:, :, :seen].transpose(-1, -2)).view(batch, kv_heads, group, size, seen)
        future = torch.ones(size, size, dtype=torch.bool, device=query.device).triu_(1)
        logits[..., offset + start :].masked_fill_(future, float("-inf"))  # the block's own keys: causal
        total[..., :seen] += torch.softmax(logits, dim=-1).sum(dim=3)
    return total.view(batch, q_heads, num_k)


#: Queries per block of :func:`causal_head_column_sums_from_lse` (measured fastest on a 4k CPU prefill).
LSE_QUERY_BLOCK = 64


def causal_head_column_sums_from_lse(
    query: torch.Tensor, keys: torch.Tensor, scaling: float, lse: torch.Tensor
) -> torch.Tensor:
    """:func:`causal_head_column_sums` given each query's log-sum-exp: ``p = exp(scaling * q.k - lse)``.

    ``-lse`` rides in the matmul as one more feature (queries ``[scaling * q, -lse]``, keys ``[k, 1]``), so a block
    of queries costs one matmul, one in-place ``exp`` and one sum over its rows: no max, no normalisation pass.
    Equal to the softmax path to float32 rounding (``|lse|`` ulps in each logit: about ``1e-6`` relative).

    Args:
        query: ``[batch, q_heads, q, head_dim]`` (the last ``q`` of the keys, plain causal).
        keys: ``[batch, kv_heads, n, head_dim]`` (not repeated for GQA).
        lse: ``[batch, q_heads, q]``: ``logsumexp`` over the keys each query sees of ``scaling * q.k``.

    Returns:
        ``[batch, q_heads, n]`` float32.
    """
    batch, q_heads, num_q, head_dim = query.shape
    kv_heads, num_k = keys.shape[1], keys.shape[-2]
    group, offset = q_heads // kv_heads, num_k - num_q
    q = torch.cat((query.float() * scaling, -lse.float()[..., None]), dim=-1)
    q = q.view(batch, kv_heads, group, num_q, head_dim + 1)
    k = torch.cat((keys.float(), keys.new_ones(batch, kv_heads, num_k, 1, dtype=torch.float32)), dim=-1)
    k = k.transpose(-1, -2)  # [b, hkv, d + 1, n]
    total = q.new_zeros(batch, kv_heads, group, 1, num_k)
    ones = q.new_ones(1, 1, 1, 1, LSE_QUERY_BLOCK)  # the sum over a block's queries as a (batched) matrix-vector
    for start in range(0, num_q, LSE_QUERY_BLOCK):
        stop = min(start + LSE_QUERY_BLOCK, num_q)
        size, seen = stop - start, offset + stop  # the block's last query sees `seen` keys
        block = q[:, :, :, start:stop].reshape(batch, kv_heads, group * size, head_dim + 1)
        probs = torch.matmul(block, k[..., :seen]).view(batch, kv_heads, group, size, seen)
        future = torch.ones(size, size, dtype=torch.bool, device=query.device).triu_(1)
        probs[..., offset + start :].masked_fill_(future, float("-inf"))  # the block's own keys: causal
        total[..., :seen] += torch.matmul(ones[..., :size], probs.exp_())
    return total.view(batch, q_heads, num_k)


def causal_column_scores(
    query: torch.Tensor, keys: torch.Tensor, scaling: float, lse: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`column_scores` of causal queries (the last ``q`` of the keys, nothing else masked), flash-style
    (:func:`causal_head_column_sums`, ``lse`` as there): ``[batch, kv_heads, n]`` float32, group-averaged."""
    batch, kv_heads, num_k = keys.shape[0], keys.shape[1], keys.shape[-2]
    if query.shape[-2] == 1:  # what the general path computes, with fewer views
        return _decoded_query_probs(query, keys, scaling).view(batch, kv_heads, -1, num_k).mean(dim=2)
    sums = causal_head_column_sums(query, keys, scaling, lse)
    return sums.view(batch, kv_heads, -1, num_k).mean(dim=2)


def _decoded_query_probs(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention probabilities of one decoded query (it sees every key: no mask, loop or running sum).

    Args:
        query: ``[batch, q_heads, 1, head_dim]``.
        keys: ``[batch, kv_heads, n, head_dim]``.

    Returns:
        ``[batch * kv_heads, group, n]`` float32 (the query heads of a KV head's group in order).
    """
    batch, q_heads, _, head_dim = query.shape
    kv_heads, num_k = keys.shape[1], keys.shape[-2]
    block = query.float().reshape(batch * kv_heads, q_heads // kv_heads, head_dim) * scaling
    logits = torch.bmm(block, keys.float().reshape(batch * kv_heads, num_k, head_dim).transpose(1, 2))
    return torch.softmax(logits, dim=-1)


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str, real: torch.Tensor | None = None) -> torch.Tensor:
    """SnapKV's 1-D pooling over the key axis (stride 1, same length), over each row's real slots only.

    A window reaching past the ends of the sequence, or onto pad slots, pools the real slots inside it only (as
    ``avg_pool1d(count_include_pad=False)`` does at the ends), so a row of a left-padded batch gets the scores it
    gets alone.

    Args:
        scores: ``[batch, heads, n]``.
        kernel_size: odd pooling width (``<= 1``: no pooling).
        pooling: ``"avg"`` or ``"max"``.
        real: ``[batch, n]`` or ``[batch, 1 or heads, n]`` bool, True on real (non-pad) slots; ``None``: all real.

    Returns:
        ``[batch, heads, n]``; pad slots get 0 (avg) or ``-inf`` (max), and are never to be kept.
    """
    if kernel_size <= 1:
        return scores
    batch, heads, n = scores.shape
    pad = kernel_size // 2
    # One arithmetic for every row, padded or not (adding a pad's exact 0 changes no sum), so rows agree bit for bit.
    if real is None:
        real = torch.ones(batch, 1, n, dtype=torch.bool, device=scores.device)
    real = (real[:, None] if real.ndim == 2 else real).expand(batch, heads, n)
    if pooling == "max":
        masked = scores.masked_fill(~real, float("-inf")).reshape(batch * heads, 1, n)
        pooled = torch.nn.functional.max_pool1d(masked, kernel_size, stride=1, padding=pad)
        return pooled[..., :n].reshape(batch, heads, n)
    weights = torch.stack((scores.masked_fill(~real, 0.0), real.to(scores.dtype)), dim=2)  # [b, h, 2, n]
    sums = torch.nn.functional.avg_pool1d(
        weights.reshape(batch * heads * 2, 1, n), kernel_size, stride=1, padding=pad, count_include_pad=True
    )[..., :n].reshape(batch, heads, 2, n)
    return (sums[:, :, 0] / sums[:, :, 1].clamp(min=1.0 / kernel_size)).masked_fill(~real, 0.0)
