"""HCAM's hierarchical chunk attention (official ``HierarchicalMemoryAttention``, deepmind-research
``hierarchical_transformer_memory/hierarchical_attention/htm_attention.py``), batched over query tokens.

For a query ``x_t`` and a memory of chunks ``m_1 .. m_N`` (contents ``[C, D]``, summary ``s_n = mean(m_n)``)::

    logits_n = (x_t W_q) . (s_n W_k) / sqrt(S)                  # attention over the chunk summaries
    top     = the k chunks with the largest logits that x_t may see
    w       = softmax(logits_top)                                # chunk-level relevance
    o_n     = MHA(x_t, m_n + PE)                                 # detailed attention within chunk n, its own softmax
    out_t   = sum_{n in top} w_n o_n

``MHA`` is a standard multi-head attention (query/key/value projections with bias, output projection with bias) over
the ``C`` positions of one chunk; ``PE`` is the official sinusoidal encoding of the position within the chunk (counted
from the chunk's end). The memory is a constant (stop-gradient, as officially); the projections learn.

Two ways to compute the detailed attention give the same numbers up to float rounding:
:func:`_detail_gathered` gathers the ``k`` chosen chunks of every query (cheap when queries are few, e.g. decoding);
:func:`_detail_dense` scores every chunk and weights all but the chosen ones by zero (cheap when every query would
gather more than the memory holds, e.g. a training forward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: Standard deviation of a unit normal truncated at two standard deviations (haiku's ``VarianceScaling``).
_TRUNCATED_NORMAL_STD = 0.87962566103423978


def sinusoid_position_encoding(length: int, size: int, dtype=None, device=None) -> torch.Tensor:
    """The official sinusoidal encoding ``[length, size]`` (``size`` even): position ``length - 1 - i`` for row ``i``,
    ``sin`` then ``cos`` halves over ``size / 2`` frequencies ``1e4 ** (-2j / size)``."""
    freqs = torch.arange(0, size, 2.0, dtype=torch.float64)
    inv_freq = 1e4 ** (-freqs / size)
    positions = torch.arange(length - 1, -1, -1.0, dtype=torch.float64)
    angles = positions[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype=dtype, device=device)


def rms_normalize(hidden: torch.Tensor, eps: float) -> torch.Tensor:
    """``hidden / sqrt(mean(hidden^2) + eps)`` in float32, back in ``hidden``'s dtype (no learned weight)."""
    x = hidden.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype)


def select_chunks(
    logits: torch.Tensor, visible: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` visible chunks per query and their softmax weights.

    Args:
        logits: ``[b, T, N]`` summary logits (float32).
        visible: ``[b, T, N]`` bool, which chunks each query may see.
        k: chunks per query.

    Returns:
        ``(index [b, T, k'], weights [b, T, k'], valid [b, T, k'])`` with ``k' = min(k, N)``, by descending logit;
        ``weights`` is the softmax over the valid chosen logits, 0 for invalid entries (a query that sees no chunk
        gets all-zero weights).
    """
    masked = logits.masked_fill(~visible, float("-inf"))
    top, index = masked.topk(min(k, masked.shape[-1]), dim=-1)
    valid = torch.isfinite(top)
    weights = torch.softmax(top.masked_fill(~valid, float("-inf")).nan_to_num(neginf=-1e30), dim=-1)
    return index, weights.masked_fill(~valid, 0.0), valid


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32, or wider when it already is (float64 stays float64)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _detail_gathered(q, chosen_keys, chosen_values, weights):
    """``q [b, T, H, d]``, the chosen chunks' ``keys/values [b, T, k, C, H, d]``, ``weights [b, T, k]`` ->
    ``[b, T, H, d]``: one softmax per chunk, then the weighted sum over the chunks."""
    scores = torch.einsum("bthd,btkchd->bthkc", q, chosen_keys) * q.shape[-1] ** -0.5
    probs = torch.softmax(_wide(scores), dim=-1).to(q.dtype)
    per_chunk = torch.einsum("bthkc,btkchd->btkhd", probs, chosen_values)
    return torch.einsum("btk,btkhd->bthd", weights.to(q.dtype), per_chunk)


def _detail_dense(q, keys, values, index, weights):
    """As :func:`_detail_gathered` from all chunks' ``keys/values [b, N, C, H, d]`` and the chosen ``index``
    ``[b, T, k]``: every chunk is scored, the chunks not chosen weigh 0."""
    b, t, h, d = q.shape
    n, c = keys.shape[1], keys.shape[2]
    dense = weights.new_zeros(b, t, n).scatter_add(2, index, weights).to(q.dtype)  # [b, T, N]
    scores = torch.einsum("bthd,bnchd->bhtnc", q, keys) * d**-0.5
    probs = torch.softmax(_wide(scores), dim=-1).to(q.dtype) * dense[:, None, :, :, None]
    out = torch.matmul(probs.reshape(b, h, t, n * c), values.permute(0, 3, 1, 2, 4).reshape(b, h, n * c, d))
    return out.transpose(1, 2)  # [b, T, H, d]


class HCAMBranch(nn.Module):
    """One layer's HCAM: summary attention, top-k chunk selection, within-chunk multi-head attention, gate.

    Args:
        hidden_size: ``D``, the backbone's width (queries and memory contents).
        memory_hidden_size: ``S``, width of the summary projections and of the within-chunk attention.
        num_heads: heads of the within-chunk attention (divides ``S``).
        topk: chunks per query ``k``.
        position_encoding: add the sinusoidal encoding to chunk contents.
        gate_init: initial gate logit ``g``.
        init_scale: variance-scaling init scale (official 2).
    """

    def __init__(
        self,
        hidden_size: int,
        memory_hidden_size: int,
        num_heads: int,
        topk: int,
        position_encoding: bool,
        gate_init: float,
        init_scale: float,
    ):
        super().__init__()
        self.topk = topk
        self.num_heads = num_heads
        self.position_encoding = position_encoding
        self.init_scale = init_scale
        self.gate_init = gate_init
        self.summary_query = nn.Linear(hidden_size, memory_hidden_size, bias=False)
        self.summary_key = nn.Linear(hidden_size, memory_hidden_size, bias=False)
        self.query = nn.Linear(hidden_size, memory_hidden_size)
        self.key = nn.Linear(hidden_size, memory_hidden_size)
        self.value = nn.Linear(hidden_size, memory_hidden_size)
        self.output = nn.Linear(memory_hidden_size, hidden_size)
        # one element, not a 0-dim scalar: FSDP2 (fully_shard) shards only parameters of at least one dimension
        self.gate = nn.Parameter(torch.full((1,), float(gate_init)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official init: haiku ``VarianceScaling(init_scale)`` (fan-in, truncated normal) weights, zero biases;
        the gate logit at ``gate_init``."""
        for linear in (self.summary_query, self.summary_key, self.query, self.key, self.value, self.output):
            std = math.sqrt(self.init_scale / linear.in_features) / _TRUNCATED_NORMAL_STD
            nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        self.gate.fill_(self.gate_init)

    @torch.no_grad()
    def init_from_attention(self, attention: nn.Module, norm_weight: torch.Tensor) -> None:
        """Start from a decoder layer's attention (``q/k/v/o_proj``, GQA) whose input is ``norm_weight * x``: the
        within-chunk attention becomes that attention without RoPE, the summary logits the sum over heads of
        ``q . mean(k)``; the gate is untouched."""
        heads = self.num_heads
        q, k, v, o = (getattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
        kv_heads = k.out_features * heads // q.out_features

        def repeat(weight: torch.Tensor) -> torch.Tensor:  # [kv_heads * d, ...] -> [heads * d, ...]
            return weight.unflatten(0, (kv_heads, -1)).repeat_interleave(heads // kv_heads, dim=0).flatten(0, 1)

        scale = norm_weight.to(q.weight.dtype)[None, :]
        pairs = [(self.summary_query, q.weight * scale, None), (self.query, q.weight * scale, q.bias)]
        pairs += [(self.summary_key, repeat(k.weight) * scale, None), (self.key, repeat(k.weight) * scale, k.bias)]
        pairs += [(self.value, repeat(v.weight) * scale, v.bias), (self.output, o.weight, o.bias)]
        for linear, weight, bias in pairs:
            if linear.weight.shape != weight.shape:
                raise ValueError(
                    f"the layer's attention does not fit the branch: {tuple(weight.shape)} vs {tuple(linear.weight.shape)}"
                )
            linear.weight.copy_(weight)
            if linear.bias is not None:
                if bias is None:
                    linear.bias.zero_()
                else:
                    linear.bias.copy_(repeat(bias[:, None])[:, 0] if bias.shape[0] != linear.bias.shape[0] else bias)

    def summary_logits(self, x: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        """``x [b, T, D]``, ``summaries [b, N, D]`` -> ``[b, T, N]`` logits (float32 at least) ``(x W_q).(s W_k) / sqrt(S)``."""
        # (x W_q) . (s W_k) = ((x W_q) W_k^T) . s: the query side is projected back to width D, so the N summaries
        # (all of the memory) are never projected (O(N D) per query instead of O(N D S) per call)
        q = _wide(self.summary_query(x)) @ _wide(self.summary_key.weight)  # [b, T, D]
        return torch.einsum("btd,bnd->btn", q, _wide(summaries)) / math.sqrt(self.summary_key.out_features)

    def forward(
        self, x: torch.Tensor, contents: torch.Tensor, summaries: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        """The ungated branch output.

        Args:
            x: ``[b, T, D]`` queries (the layer's normalised inputs).
            contents: ``[b, N, C, D]`` chunk contents (constants; may live on another device, e.g. offloaded to the
                CPU: only what the attention reads is copied to ``x``'s device).
            summaries: ``[b, N, D]`` chunk summaries (mean of the contents).
            visible: ``[b, T, N]`` bool, the chunks each query may see.

        Returns:
            ``[b, T, D]``; 0 where a query sees no chunk.
        """
        b, t, _ = x.shape
        n, c = contents.shape[1], contents.shape[2]
        index, weights, _ = select_chunks(self.summary_logits(x, summaries), visible, self.topk)
        pe = 0.0
        if self.position_encoding:
            pe = sinusoid_position_encoding(c, contents.shape[-1], x.dtype, x.device)
        h = self.num_heads
        q = self.query(x).view(b, t, h, -1)
        k = index.shape[-1]
        if t * k < n:  # few queries (decoding): only the chosen chunks are copied (from the CPU when offloaded)
            home = contents.device
            rows = torch.arange(b, device=home)[:, None, None]
            chosen = contents[rows, index.to(home)].to(x.device, non_blocking=True) + pe  # [b, T, k, C, D]
            keys = self.key(chosen).view(b, t, k, c, h, -1)
            values = self.value(chosen).view(b, t, k, c, h, -1)
            out = _detail_gathered(q, keys, values, weights)
        else:
            contents = contents.to(x.device, non_blocking=True) + pe
            keys = self.key(contents).view(b, n, c, h, -1)
            values = self.value(contents).view(b, n, c, h, -1)
            out = _detail_dense(q, keys, values, index, weights)
        # output projection of the weighted sum: sum_n w_n (W o_n + bias) = W (sum_n w_n o_n) + bias * sum_n w_n
        total = weights.sum(-1, keepdim=True).to(x.dtype)
        return F.linear(out.reshape(b, t, -1), self.output.weight) + self.output.bias * total

    def gated(self, update: torch.Tensor) -> torch.Tensor:
        """``tanh(g) * update`` (0 for the zero-initialised gate, whatever the update)."""
        return torch.tanh(self.gate).to(update.dtype) * update


__all__ = ["HCAMBranch", "rms_normalize", "select_chunks", "sinusoid_position_encoding"]
