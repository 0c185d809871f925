"""Titans layers: neural long-term memory, local attention with persistent memory, and the MAC/MAG/MAL blocks.

Every layer works on a *compacted* batch: row ``b``'s real tokens are ``[0, lengths[b])`` of the call (the model
moves pad tokens to the end before the layers and back after), with per-row absolute positions. One code path
serves training, prefill and decode: a layer call reads its state (empty for a plain forward), processes the call's
tokens and writes the state back, so a full forward and prefill + token-by-token decode do the same arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_longmem.kernels.titans_memory import chunk_titans_memory, memory_mlp
from hf_longmem.modeling.titans.cache import TitansLayerState


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE (rotate-half) of ``x [batch, heads, T, d]`` at ``positions [batch, T]``."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions.to(torch.float32)[:, None, :, None] * inv_freq  # [b, 1, T, d/2]
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), -1) * sin).to(x.dtype)


def gather_time(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` gathered along ``dim`` at per-row indices ``index [batch, n]`` (broadcast over the other dims)."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = index.shape
    expanded = list(x.shape)
    expanded[dim] = index.shape[1]
    return x.gather(dim, index.view(shape).expand(expanded))


def keep_last(old: torch.Tensor, old_valid: torch.Tensor, new: torch.Tensor, lengths: torch.Tensor, n: int, dim: int):
    """The last ``n`` slots of ``[old ‖ new[:lengths]]`` per row (along ``dim``) and their validity."""
    width = old.shape[dim]
    both = torch.cat((old, new), dim)
    valid = torch.cat((old_valid, torch.arange(new.shape[dim], device=new.device) < lengths[:, None]), 1)
    index = (lengths[:, None] + width - n + torch.arange(n, device=new.device)).clamp_min(0)
    shift = (lengths[:, None] + width - n + torch.arange(n, device=new.device)) >= 0
    return gather_time(both, index, dim), gather_time(valid, index, 1) & shift


class NeuralMemory(nn.Module):
    """Titans neural long-term memory (paper Sec. 3.1) with ``heads`` independent MLP memories of width ``d``.

    ``q, k, v = silu(conv(norm(x) W_{q,k,v}))`` (``q``, ``k`` l2-normalised per head), per-token gates
    ``theta = max_lr * sigmoid(.)``, ``eta = sigmoid(.)``, ``1 - alpha = sigmoid(-.)`` from ``norm(x)``; the memory is
    updated chunk by chunk (:func:`hf_longmem.kernels.titans_memory.chunk_titans_memory`) and read with ``q``; the
    read-out is RMS-normalised per head, gated by ``sigmoid(norm(x) W_g)`` and projected back to ``hidden``.
    """

    def __init__(self, config):
        super().__init__()
        hidden, self.heads, self.dim = config.hidden_size, config.memory_heads, config.memory_head_dim
        inner = self.heads * self.dim
        self.chunk, self.conv_size, self.max_lr = (
            config.memory_chunk_size,
            config.memory_conv_size,
            config.memory_max_lr,
        )
        self.backend = config.memory_backend
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.qkv = nn.Linear(hidden, 3 * inner, bias=False)
        self.conv = nn.Conv1d(3 * inner, 3 * inner, self.conv_size, groups=3 * inner, bias=False)
        self.gates = nn.Linear(hidden, 3 * self.heads)  # theta, eta, alpha logits
        self.out_norm = RMSNorm(self.dim, config.rms_norm_eps)
        self.out_gate = nn.Linear(hidden, inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden, bias=False)
        if config.memory_depth == 2:
            width = self.dim * config.memory_expansion
            self.init_w = nn.ParameterList(
                [
                    nn.Parameter(torch.randn(self.heads, self.dim, width) * self.dim**-0.5),
                    nn.Parameter(torch.randn(self.heads, width, self.dim) * 0.1 * width**-0.5),
                ]
            )
        else:
            self.init_w = nn.ParameterList([nn.Parameter(torch.zeros(self.heads, self.dim, self.dim))])
        with torch.no_grad():  # theta ~ 0.12 max_lr, eta ~ 0.5, alpha ~ 0.05 at initialisation
            self.gates.bias.copy_(torch.tensor([-2.0, 0.0, -3.0]).repeat_interleave(self.heads))
            self.conv.weight.zero_()
            self.conv.weight[:, 0, -1] = 1.0  # identity: the convolution starts as a pass-through

    def _project(self, x: torch.Tensor, lengths: torch.Tensor, conv_state: torch.Tensor | None, weight, conv_w):
        """``silu(conv(x W))`` over the call with the causal-conv state; returns ``[b, T, out]`` and the new state."""
        b, T, _ = x.shape
        proj = F.linear(x, weight).masked_fill((torch.arange(T, device=x.device) >= lengths[:, None])[..., None], 0)
        channels = proj.shape[-1]
        if conv_state is None:
            conv_state = proj.new_zeros(b, channels, self.conv_size - 1)
        seq = torch.cat((conv_state, proj.transpose(1, 2)), 2)  # [b, C, K-1+T]
        out = F.conv1d(seq, conv_w, groups=channels).transpose(1, 2)
        index = lengths[:, None] + torch.arange(self.conv_size - 1, device=x.device)
        new_state = gather_time(seq, index, 2) if self.conv_size > 1 else conv_state
        return F.silu(out), new_state

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.heads, self.dim).transpose(1, 2)  # [b, H, T, d]

    def read(self, x: torch.Tensor, lengths: torch.Tensor, weights, conv_state) -> tuple[torch.Tensor, torch.Tensor]:
        """MAC read-out ``M*(q)`` with fixed ``weights`` (no update): ``[b, T, hidden]`` and the new conv state."""
        xn = self.norm(x)
        inner = self.heads * self.dim
        q, conv_state = self._project(xn, lengths, conv_state, self.qkv.weight[:inner], self.conv.weight[:inner])
        q = F.normalize(self._heads(q), dim=-1)
        return self._output(memory_mlp(q, weights), xn), conv_state

    def _output(self, y: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
        y = self.out_norm(y).transpose(1, 2).reshape(*xn.shape[:2], -1)
        return self.o_proj(y * torch.sigmoid(self.out_gate(xn)))

    def initial_weights(self, batch: int) -> tuple[torch.Tensor, ...]:
        return tuple(w.unsqueeze(0).expand(batch, *w.shape) for w in self.init_w)

    def init_state(self, state: TitansLayerState, batch: int) -> None:
        """Fill an empty state: initial (learned) weights, zero momentum, empty chunk buffer."""
        s = state.values
        if "mem_w" in s:
            return
        ref = self.init_w[0]
        s["mem_w"] = self.initial_weights(batch)
        s["mem_s"] = tuple(torch.zeros_like(w) for w in s["mem_w"])
        zeros = ref.new_zeros(batch, self.heads, self.chunk)
        s.update(
            buf_k=ref.new_zeros(batch, self.heads, self.chunk, self.dim),
            buf_lr=zeros,
            buf_eta=zeros,
            buf_v=ref.new_zeros(batch, self.heads, self.chunk, self.dim),
            buf_keep=zeros,
            buf_n=torch.zeros(batch, dtype=torch.long, device=ref.device),
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, state: TitansLayerState) -> torch.Tensor:
        """Store the call's tokens and read the memory for each (``x [b, T, hidden]`` -> ``[b, T, hidden]``)."""
        b, T, _ = x.shape
        s, c = state.values, self.chunk
        xn = self.norm(x)
        qkv, s["conv"] = self._project(xn, lengths, s.get("conv"), self.qkv.weight, self.conv.weight)
        q, k, v = (self._heads(t) for t in qkv.chunk(3, dim=-1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        theta, eta, alpha = self.gates(xn).transpose(1, 2).chunk(3, dim=1)  # [b, H, T] each
        lr, log_eta, log_keep = self.max_lr * torch.sigmoid(theta), F.logsigmoid(eta), F.logsigmoid(-alpha)
        valid = torch.arange(T, device=x.device) < lengths[:, None]
        lr = lr * valid[:, None]  # pad tokens: no gradient, no decay, no momentum change
        log_eta, log_keep = log_eta * valid[:, None], log_keep * valid[:, None]
        self.init_state(state, b)
        buf_n = s["buf_n"]
        # the unfinished chunk, then the call's tokens, compacted per row
        order = torch.argsort(
            ~torch.cat((torch.arange(c, device=x.device) < buf_n[:, None], valid), 1).int(), dim=1, stable=True
        )
        total = buf_n + lengths

        def combine(buffered, new):
            return gather_time(torch.cat((buffered, new), 2), order, 2)

        qc = combine(torch.zeros_like(s["buf_k"]), q)
        kc, vc = combine(s["buf_k"], k), combine(s["buf_v"], v)
        lrc, etac, keepc = combine(s["buf_lr"], lr), combine(s["buf_eta"], log_eta), combine(s["buf_keep"], log_keep)
        out, s["mem_w"], s["mem_s"] = chunk_titans_memory(
            qc, kc, vc, lrc, etac, keepc, s["mem_w"], s["mem_s"], chunk_size=c, lengths=total, backend=self.backend
        )
        out = gather_time(out, buf_n[:, None] + torch.arange(T, device=x.device).clamp_max(c + T - 1), 2)
        # new unfinished chunk: combined tokens [floor(total / c) * c, total)
        start = total // c * c
        index = (start[:, None] + torch.arange(c, device=x.device)).clamp_max(c + T - 1)
        keep = (torch.arange(c, device=x.device) < (total - start)[:, None])[:, None]
        s["buf_k"] = gather_time(kc, index, 2) * keep[..., None]
        s["buf_v"] = gather_time(vc, index, 2) * keep[..., None]
        s["buf_lr"], s["buf_eta"], s["buf_keep"] = (gather_time(t, index, 2) * keep for t in (lrc, etac, keepc))
        s["buf_n"] = total - start
        return self._output(out, xn)


class LocalAttention(nn.Module):
    """Causal attention over ``[persistent ‖ cached window ‖ call]`` with a sliding window or MAC segments.

    A query at position ``i`` sees the persistent tokens and the valid tokens ``j <= i`` with ``i - j < window``;
    with ``segment`` set it sees instead the tokens of its own segment (``j // segment == i // segment``), plus the
    memory read-out tokens of the segment up to its own position (MAC). Persistent keys/values are learned per layer
    and carry no position (see ``docs/titans.md`` for why this equals the paper's persistent prefix).
    """

    def __init__(self, config, segmented: bool):
        super().__init__()
        self.heads, self.dim = config.num_attention_heads, config.head_dim
        inner = self.heads * self.dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)
        self.theta = config.rope_theta
        self.segmented = segmented
        self.span = config.segment_size if segmented else config.sliding_window
        n_p = config.num_persistent_tokens
        self.persistent_k = nn.Parameter(torch.randn(self.heads, n_p, self.dim) * config.initializer_range)
        self.persistent_v = nn.Parameter(torch.randn(self.heads, n_p, self.dim) * config.initializer_range)

    def _kv(self, x, positions):
        b, T, _ = x.shape
        k = rotary(self.k_proj(x).view(b, T, self.heads, self.dim).transpose(1, 2), positions, self.theta)
        return k, self.v_proj(x).view(b, T, self.heads, self.dim).transpose(1, 2)

    def forward(self, x, positions, lengths, state: TitansLayerState, retrieved: torch.Tensor | None = None):
        """``x [b, T, hidden]`` at ``positions [b, T]`` -> ``[b, T, hidden]``; ``retrieved`` are MAC read-outs."""
        b, T, _ = x.shape
        s = state.values
        q = rotary(self.q_proj(x).view(b, T, self.heads, self.dim).transpose(1, 2), positions, self.theta)
        k, v = self._kv(x, positions)
        if "attn_k" not in s:
            s.update(
                attn_k=k[:, :, :0],
                attn_v=v[:, :, :0],
                attn_pos=positions[:, :0],
                attn_valid=torch.zeros(b, 0, dtype=torch.bool, device=x.device),
            )
            if retrieved is not None:
                s.update(ret_k=k[:, :, :0], ret_v=v[:, :, :0])
        new_valid = torch.arange(T, device=x.device) < lengths[:, None]
        keys_k, keys_v = [torch.cat((s["attn_k"], k), 2)], [torch.cat((s["attn_v"], v), 2)]
        key_pos = torch.cat((s["attn_pos"], positions), 1)
        key_valid = torch.cat((s["attn_valid"], new_valid), 1)
        qp, kp = positions[:, :, None], key_pos[:, None, :]
        if self.segmented:
            allowed = (kp <= qp) & (kp // self.span == qp // self.span)
        else:
            allowed = (kp <= qp) & (qp - kp < self.span)
        masks = [allowed & key_valid[:, None, :]]
        if retrieved is not None:
            rk, rv = self._kv(retrieved, positions)
            keys_k.append(torch.cat((s["ret_k"], rk), 2))
            keys_v.append(torch.cat((s["ret_v"], rv), 2))
            masks.append(masks[0])  # read-out token j shares position and visibility with token j
        n_p = self.persistent_k.shape[1]
        keys_k.insert(0, self.persistent_k.unsqueeze(0).expand(b, -1, -1, -1))
        keys_v.insert(0, self.persistent_v.unsqueeze(0).expand(b, -1, -1, -1))
        masks.insert(0, torch.ones(b, T, n_p, dtype=torch.bool, device=x.device))
        mask = torch.cat(masks, 2)[:, None]
        if n_p == 0:  # a query whose row has no visible key (pad slots): let it see itself, output ignored
            mask = (
                mask
                | torch.eye(T, mask.shape[-1], dtype=torch.bool, device=x.device).roll(mask.shape[-1] - T, 1)[
                    None, None
                ]
            )
        out = F.scaled_dot_product_attention(q, torch.cat(keys_k, 2), torch.cat(keys_v, 2), attn_mask=mask)
        # keep the last ``span`` tokens
        s["attn_k"], valid = keep_last(s["attn_k"], s["attn_valid"], k, lengths, self.span, 2)
        s["attn_v"], _ = keep_last(s["attn_v"], s["attn_valid"], v, lengths, self.span, 2)
        s["attn_pos"], _ = keep_last(s["attn_pos"], s["attn_valid"], positions, lengths, self.span, 1)
        if retrieved is not None:
            s["ret_k"], _ = keep_last(s["ret_k"], s["attn_valid"], rk, lengths, self.span, 2)
            s["ret_v"], _ = keep_last(s["ret_v"], s["attn_valid"], rv, lengths, self.span, 2)
        s["attn_valid"] = valid
        return self.o_proj(out.transpose(1, 2).reshape(b, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class TitansBlock(nn.Module):
    """One decoder layer of the configured variant (``has_memory=False``: attention + MLP only).

    - MAG: ``h += norm_y(y) * sigmoid(norm_m(M(x)))`` with ``y = SWA([p ‖ x])`` (paper eq. 26-28).
    - MAL: ``h += M(x)``, then ``h += SWA([p ‖ h])`` (paper eq. 29-31).
    - MAC: per segment, ``r = M*_{segment start}(x)``, ``y = Attn([p ‖ r ‖ x])`` (read-out token ``j`` visible to
      queries ``>= j`` only), memory updated with ``y``, ``h += norm_y(y) * sigmoid(norm_m(M(y)))`` (eq. 21-25).
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.variant = config.variant
        self.has_memory = layer_idx in config.memory_layers
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = LocalAttention(config, segmented=self.variant == "mac")
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.segment = config.segment_size
        if self.has_memory:
            self.memory = NeuralMemory(config)
            if self.variant in ("mag", "mac"):
                self.gate_norm_y = RMSNorm(config.hidden_size, config.rms_norm_eps)
                self.gate_norm_m = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def _gate(self, y, m):
        return self.gate_norm_y(y) * torch.sigmoid(self.gate_norm_m(m))

    def forward(self, h, positions, lengths, state: TitansLayerState):
        if not self.has_memory:
            h = h + self.attn(self.attn_norm(h), positions, lengths, state)
        elif self.variant == "mal":
            h = h + self.memory(h, lengths, state)
            h = h + self.attn(self.attn_norm(h), positions, lengths, state)
        elif self.variant == "mag":
            x = self.attn_norm(h)
            h = h + self._gate(self.attn(x, positions, lengths, state), self.memory(x, lengths, state))
        else:
            h = h + self._mac(self.attn_norm(h), positions, lengths, state)
        return h + self.mlp(self.mlp_norm(h))

    def _mac(self, x, positions, lengths, state):
        """Split the call where any row starts a segment; each piece lies within one segment of every row."""
        T = x.shape[1]
        starts = ((positions % self.segment) == 0) & (torch.arange(T, device=x.device) < lengths[:, None])
        cuts = sorted({0, T} | set(torch.nonzero(starts.any(0)).flatten().tolist()))
        outs = []
        s = state.values
        for j0, j1 in zip(cuts[:-1], cuts[1:]):
            piece_len = (lengths - j0).clamp(0, j1 - j0)
            if "mem_w" not in s:  # first call: initial memory
                self.memory.init_state(state, x.shape[0])
                s["seg_w"] = s["mem_w"]
            new_segment = starts[:, j0].view(-1, *([1] * (s["mem_w"][0].dim() - 1)))
            s["seg_w"] = tuple(torch.where(new_segment, w, sw) for w, sw in zip(s["mem_w"], s["seg_w"]))
            xp = x[:, j0:j1]
            retrieved, s["ret_conv"] = self.memory.read(xp, piece_len, s["seg_w"], s.get("ret_conv"))
            y = self.attn(xp, positions[:, j0:j1], piece_len, state, retrieved=retrieved)
            outs.append(self._gate(y, self.memory(y, piece_len, state)))
        return torch.cat(outs, 1)
