"""MoM's generation cache: per layer, the memories' recurrent states and their short-conv states.

Built on transformers' linear-attention cache API (``get/update_recurrent_state``, ``get/update_conv_state``), so a
``DynamicCache(config=mom_config)`` (whose layers are ``LinearAttentionLayer``) works too; ``MomCache`` adds the
count of tokens seen and ``memory_bytes()``.

Per layer and sequence: recurrent state ``[M', H, K, V]`` float32 and conv state ``[M', 2HK + HV, W - 1]``, i.e.
constant in the context length.
"""

from __future__ import annotations

from transformers.cache_utils import Cache, LinearAttentionLayer

from hf_longmem.memory.accounting import RESIDENT, CacheMemoryReport, MemoryParts, MemoryReport, tensor_bytes


class MomCacheLayer(MemoryReport, LinearAttentionLayer):
    """One layer's MoM state: ``recurrent_states[0] [batch, M', H, K, V]``, ``conv_states[0] [batch, M', C, W-1]``."""

    def __init__(self):
        super().__init__(number_of_states=1)

    def memory_parts(self) -> MemoryParts:
        """``{"state": ("resident", bytes of the conv and recurrent states)}``."""
        return {"state": (RESIDENT, tensor_bytes(self.conv_states[0], self.recurrent_states[0]))}


class MomCache(CacheMemoryReport, Cache):
    """Cache holding every MoM layer's memory states; built by ``MomForCausalLM.generate`` unless one is passed.

    Args:
        config: the ``MomConfig`` (its ``num_hidden_layers``).
    """

    def __init__(self, config):
        super().__init__(layers=[MomCacheLayer() for _ in range(config.num_hidden_layers)])
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (the states summarise all of them; nothing is stored per token)."""
        return self.seen_tokens

    def advance(self, num_tokens: int) -> None:
        """Count ``num_tokens`` more tokens seen (called once per forward by the model)."""
        self.seen_tokens += num_tokens

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0
