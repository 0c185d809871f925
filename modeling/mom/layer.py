"""The MoM token mixer: routed gated-delta-rule memories plus a shared memory, with short convs and a gated norm.

Per layer (``x [batch, seq, D]``, ``H`` heads, key width ``K``, value width ``V``, ``M`` routed memories and
``M' = M + shared_mem`` memories with a state):

1. router: ``softmax(x W_g)``, top-k memories, weights renormalised (unless ``norm_topk_prob=False``); the shared
   memory is one more slot with weight 1;
2. memory ``m`` sees only its routed tokens, in order: ``q = x W_q`` (shared), ``k = x W_k^m``, ``v = x W_v^m``, each
   through the short causal conv + SiLU over that memory's token stream, then ``q, k`` L2-normalised;
   ``beta = sigmoid(x W_b^m)``, ``g = -exp(A_log) * softplus(x W_a^m + dt_bias)``;
3. gated delta rule per memory (state ``[K, V]`` per head), read with the token's own ``q``;
4. ``o = sum_slots w * read``; gated RMSNorm per head (``norm(o) * silu(x W_g_out)``); output projection.

Two execution paths compute the same function: the packed path (any length; routed tokens packed into per-memory
streams, chunked gated delta rule, linear in length) and the one-token path used in decoding (every memory's
projection of the token, the routing fused into the recurrent step; constant cost per token).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hf_longmem.kernels.gated_delta import (
    chunk_gated_delta_rule,
    fused_recurrent_mom_gated_delta_rule,
    l2norm,
    pack_streams,
    plan_routing,
    unpack_mix,
)
from hf_longmem.modeling.mom.conv import step_short_conv, stream_short_conv
from hf_longmem.modeling.mom.router import MomRouter


class MomMixer(nn.Module):
    """Mixture-of-memories token mixer (one decoder layer's sequence mixing).

    Args:
        config: a ``MomConfig``.
        layer_idx: index of the layer in the model (its slot in the cache).
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.value_dim = config.value_dim
        self.num_memories = config.num_memories
        self.total_memories = config.total_memories
        self.shared_mem = config.shared_mem
        self.topk = config.topk
        self.conv_size = config.conv_size
        self.chunk_size = config.chunk_size
        self.kernel_backend = config.kernel_backend
        self.norm_eps = config.norm_eps
        self.use_output_gate = config.use_output_gate
        hidden = config.hidden_size
        self.key_width = self.num_heads * self.head_dim
        self.value_width = self.num_heads * self.value_dim
        self.router = MomRouter(hidden, config.num_memories, config.topk, config.norm_topk_prob)
        self.q_proj = nn.Linear(hidden, self.key_width, bias=False)
        # per memory, rows: [k (H*K) | v (H*V) | beta logits (H) | decay logits (H)]
        self.memory_rows = self.key_width + self.value_width + 2 * self.num_heads
        self.memory_proj = nn.Parameter(torch.empty(self.total_memories, self.memory_rows, hidden))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        # depthwise conv taps for the [q | k | v] channels, shared by all memories (fla's q/k/v_conv1d)
        self.conv_channels = 2 * self.key_width + self.value_width
        self.conv_weight = nn.Parameter(torch.empty(self.conv_channels, self.conv_size))
        if self.use_output_gate:
            self.g_proj = nn.Linear(hidden, self.value_width, bias=False)
        self.o_norm_weight = nn.Parameter(torch.ones(self.value_dim))
        self.o_proj = nn.Linear(self.value_width, hidden, bias=False)
        self.reset_memory_parameters(config.initializer_range)

    @torch.no_grad()
    def reset_memory_parameters(self, std: float) -> None:
        """Initialise the parameters the generic ``_init_weights`` does not know (fla's Gated DeltaNet scheme)."""
        self.memory_proj.normal_(0.0, std)
        self.A_log.copy_(torch.empty(self.num_heads).uniform_(1.0, 16.0).log())
        dt = torch.exp(torch.rand(self.num_heads) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        dt = dt.clamp_min(1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        bound = self.conv_size**-0.5
        self.conv_weight.uniform_(-bound, bound)
        self.o_norm_weight.fill_(1.0)

    # ---------------------------------------------------------------------------------------------------------------
    def _gates(self, beta_logits: torch.Tensor, decay_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        beta = beta_logits.float().sigmoid()
        g = -self.A_log.float().exp() * F.softplus(decay_logits.float() + self.dt_bias.float())
        return g, beta

    def _split(self, conv_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[..., C]`` -> ``q, k [..., H, K]`` (L2-normalised) and ``v [..., H, V]``."""
        q, k, v = conv_out.split([self.key_width, self.key_width, self.value_width], dim=-1)
        heads = self.num_heads
        q = l2norm(q.unflatten(-1, (heads, self.head_dim)))
        k = l2norm(k.unflatten(-1, (heads, self.head_dim)))
        return q, k, v.unflatten(-1, (heads, self.value_dim))

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, index, weights = self.router(x)
        if self.shared_mem:
            shared = torch.full_like(index[..., :1], self.num_memories)
            index = torch.cat([index, shared], dim=-1)
            weights = torch.cat([weights, torch.ones_like(weights[..., :1])], dim=-1)
        return logits, index, weights

    def forward(
        self,
        hidden_states: torch.Tensor,
        valid: torch.Tensor | None = None,
        cache=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix ``hidden_states [batch, seq, D]``; ``valid [batch, seq]`` bool (False = pad token, skipped by every
        memory); ``cache``: a ``MomCache`` (or any cache with transformers' linear-attention state API), read and
        updated in place.

        Returns:
            ``out [batch, seq, D]`` and the router logits ``[batch, seq, M]``.
        """
        logits, index, weights = self._route(hidden_states)
        conv_state = recurrent_state = None
        if cache is not None:
            conv_state = cache.get_conv_state(self.layer_idx)
            recurrent_state = cache.get_recurrent_state(self.layer_idx)
        if hidden_states.shape[1] == 1:
            o, conv_state, recurrent_state = self._step(
                hidden_states, index, weights, valid, conv_state, recurrent_state, cache is not None
            )
        else:
            o, conv_state, recurrent_state = self._packed(
                hidden_states, index, weights, valid, conv_state, recurrent_state, cache is not None
            )
        if cache is not None:
            # conv first: transformers' LinearAttentionLayer marks the layer as having a state on a conv update
            cache.update_conv_state(conv_state, self.layer_idx)
            cache.update_recurrent_state(recurrent_state, self.layer_idx)
        return self._output(o, hidden_states), logits

    def _packed(self, x, index, weights, valid, conv_state, recurrent_state, keep_state):
        """Any length: routed tokens packed into per-memory streams, chunked gated delta rule."""
        batch = x.shape[0]
        mems = self.total_memories
        plan = plan_routing(index, weights, mems, valid)
        q_pre = pack_streams(self.q_proj(x), plan)  # [b, M', L, H*K]
        x_mem = pack_streams(x, plan)  # [b, M', L, D]
        proj = torch.einsum("bmld,mrd->bmlr", x_mem, self.memory_proj.to(x.dtype))
        k_pre, v_pre, beta_logits, decay_logits = proj.split(
            [self.key_width, self.value_width, self.num_heads, self.num_heads], dim=-1
        )
        pre = torch.cat([q_pre, k_pre, v_pre], dim=-1).flatten(0, 1)  # [b*M', L, C]
        state = None if conv_state is None else conv_state.flatten(0, 1)
        conv_out, new_conv = stream_short_conv(pre, self.conv_weight, state, plan.lengths.flatten())
        q, k, v = self._split(conv_out)  # [b*M', L, H, .]
        g, beta = self._gates(beta_logits, decay_logits)  # [b, M', L, H]
        real = plan.stream_mask[..., None]
        g = torch.where(real, g, torch.zeros_like(g)).flatten(0, 1)
        beta = torch.where(real, beta, torch.zeros_like(beta)).flatten(0, 1)
        initial = None if recurrent_state is None else recurrent_state.flatten(0, 1)
        o, final = chunk_gated_delta_rule(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            g.transpose(1, 2),
            beta.transpose(1, 2),
            initial_state=initial,
            output_final_state=keep_state,
            chunk_size=self.chunk_size,
            backend=self.kernel_backend,
        )  # o [b*M', H, L, V]
        o = o.transpose(1, 2).unflatten(0, (batch, mems))  # [b, M', L, H, V]
        o = unpack_mix(o, plan)  # [b, T, H, V]
        new_conv = new_conv.unflatten(0, (batch, mems))
        final = final.unflatten(0, (batch, mems)) if final is not None else None
        return o, new_conv, final

    def _step(self, x, index, weights, valid, conv_state, recurrent_state, keep_state):
        """One token per row (decoding): every memory's projection of it; routing fused into the recurrent step."""
        batch = x.shape[0]
        mems = self.total_memories
        routed = torch.zeros(batch, 1, mems, dtype=torch.bool, device=x.device).scatter_(2, index, True)
        dense = torch.zeros(batch, 1, mems, dtype=weights.dtype, device=x.device).scatter_(2, index, weights)
        if valid is not None:
            routed &= valid[:, :, None]
        xt = x[:, 0]
        proj = F.linear(xt, self.memory_proj.to(x.dtype).flatten(0, 1)).unflatten(-1, (mems, self.memory_rows))
        k_pre, v_pre, beta_logits, decay_logits = proj.split(
            [self.key_width, self.value_width, self.num_heads, self.num_heads], dim=-1
        )
        q_pre = self.q_proj(xt)[:, None, :].expand(-1, mems, -1)
        pre = torch.cat([q_pre, k_pre, v_pre], dim=-1).flatten(0, 1)  # [b*M', C]
        state = None if conv_state is None else conv_state.flatten(0, 1)
        conv_out, new_conv = step_short_conv(pre, self.conv_weight, state, routed[:, 0].flatten())
        q, k, v = self._split(conv_out.unflatten(0, (batch, mems)))  # [b, M', H, .]
        g, beta = self._gates(beta_logits, decay_logits)  # [b, M', H]
        o, final = fused_recurrent_mom_gated_delta_rule(
            q[:, :, :, None],
            k[:, :, :, None],
            v[:, :, :, None],
            g[..., None],
            beta[..., None],
            dense,
            routed,
            initial_state=recurrent_state,
            output_final_state=keep_state,
            backend=self.kernel_backend,
        )  # o [b, H, 1, V]
        return o.transpose(1, 2), new_conv.unflatten(0, (batch, mems)), final

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gated RMSNorm per head, then the output projection: ``o [b, T, H, V]`` -> ``[b, T, D]``."""
        of = o.float()
        of = of * torch.rsqrt((of * of).mean(-1, keepdim=True) + self.norm_eps) * self.o_norm_weight.float()
        if self.use_output_gate:
            gate = self.g_proj(x).unflatten(-1, (self.num_heads, self.value_dim))
            of = of * F.silu(gate.float())
        return self.o_proj(of.to(x.dtype).flatten(-2))
