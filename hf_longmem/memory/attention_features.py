"""The model attention features that hf_longmem's own attention paths honour — the one place that knows them.

A transformers attention module calls its attention function as
``fn(module, query, key, value, attention_mask, dropout=..., scaling=..., **kwargs)``; what else changes the
attention math comes in ``kwargs`` (``softcap``, ``s_aux``, ``sliding_window``, ...) or is read from the module by
the model's own ``eager_attention_forward`` (``module.sinks``, ``module.head_dim``, ...). Where a cache computes
attention itself (ThinK's packed prompt, InfLLM/EM-LLM's window + memory, the Triton decode kernels, DuoAttention's
head groups) it must apply every one of them exactly as the model's eager attention does, or refuse the model.

Every kwarg that reaches hf_longmem's attention function is in exactly one of these sets:

* :data:`APPLIED_KWARGS` — change the attention math; :class:`AttentionFeatures` reads them and every path applies
  them (or refuses with :meth:`AttentionFeatures.refuse`):

  - ``scaling``: logit scale (``None``: ``head_dim ** -0.5``);
  - ``softcap``: Gemma-2 logit soft-capping, ``tanh(logits / cap) * cap`` on the scaled logits, before the mask;
  - ``s_aux``: attention sinks (GPT-OSS passes ``module.sinks``): one logit per query head added to the softmax
    denominator, its probability dropped after the softmax (equivalently ``out * sigmoid(lse - sink)``);
  - ``sliding_window``: a query at position ``p`` sees keys at positions ``> p - window`` (transformers'
    ``sliding_window_overlay``); ``None`` on full-attention layers;
  - ``dropout``: attention-probability dropout, applied only when ``module.training`` (as eager attention);

* :data:`CACHE_KWARGS` — read by the cache layers in ``update()`` (``position_ids``, ``cache_position``) or ours;
* :data:`INERT_KWARGS` — flags that do not change the attention output (``use_cache``, ``output_attentions``, ...);
* :data:`REFUSED_KWARGS` — features no hf_longmem path supports (packed sequences, additive position biases,
  bidirectional attention): a cache layer refuses the model at its first attention call, before any token is
  produced.

Any other kwarg is unknown: :func:`check_attention_kwargs` raises a ``ValueError`` naming it and the model instead
of silently ignoring it. :data:`MODULE_ATTRIBUTES` lists what models' eager attention functions read from the
module; ``tests/test_attention_features.py`` fails when an installed architecture's attention passes a kwarg or
reads a module attribute outside these sets.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

#: kwargs that change the attention math and that every path applies (see the module docstring).
APPLIED_KWARGS = frozenset({"scaling", "dropout", "softcap", "s_aux", "sliding_window"})
#: kwargs read by the cache layers (``update()`` receives the same dict) or put there by hf_longmem.
CACHE_KWARGS = frozenset({"position_ids", "cache_position", "longmem_layer"})
#: kwargs that do not change the attention output.
INERT_KWARGS = frozenset(
    {
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "output_router_logits",
        "return_dict",
        "position_embeddings",
        "layer_idx",
        "kernel_options",
        "logits_to_keep",
    }
)
#: kwargs of features no hf_longmem attention path supports, with the reason shown to the user.
REFUSED_KWARGS = {
    "cu_seq_lens_q": "packed sequences (flash-attention varlen kwargs)",
    "cu_seq_lens_k": "packed sequences (flash-attention varlen kwargs)",
    "max_length_q": "packed sequences (flash-attention varlen kwargs)",
    "max_length_k": "packed sequences (flash-attention varlen kwargs)",
    "position_bias": "an additive attention position bias",
    "is_causal": "non-causal (bidirectional) attention",
    "indices": "sparse attention over selected key indices",
    "block_indices": "sparse attention over selected key blocks",
    "encoder_hidden_states": "cross-attention over encoder states",
    "sinks": "attention sinks passed as `sinks` (only GPT-OSS-style `s_aux` / `module.sinks` are applied)",
}
#: Every kwarg with a known meaning.
KNOWN_KWARGS = APPLIED_KWARGS | CACHE_KWARGS | INERT_KWARGS | frozenset(REFUSED_KWARGS)
#: Module attributes that models' ``eager_attention_forward`` read, all honoured: ``sinks`` is applied (as
#: ``s_aux``), the others describe shapes/mode that every path already follows.
MODULE_ATTRIBUTES = frozenset(
    {"training", "num_key_value_groups", "head_dim", "sinks", "scaling", "is_causal", "config"}
)


def model_name(module: torch.nn.Module) -> str:
    """``"Gemma2Attention (gemma2)"``: the attention class and model type, for error messages."""
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    return f"{type(module).__name__} ({model_type})" if model_type else type(module).__name__


def check_attention_kwargs(module: torch.nn.Module, kwargs: dict, method: str = "hf_longmem") -> None:
    """Raises ``ValueError`` for a kwarg that no hf_longmem attention path handles (refused or unknown).

    ``is_causal=True`` is the default and accepted; ``None`` values of refused kwargs are accepted too.
    """
    for name, value in kwargs.items():
        if name in APPLIED_KWARGS or name in CACHE_KWARGS or name in INERT_KWARGS:
            continue
        if name in REFUSED_KWARGS:
            if value is None or (name == "is_causal" and value is True):
                continue
            raise ValueError(
                f"unsupported model: {method} cannot run {model_name(module)}: its attention uses "
                f"{REFUSED_KWARGS[name]} (attention kwarg {name!r})"
            )
        raise ValueError(
            f"unsupported model: {method} cannot run {model_name(module)}: its attention passes the kwarg {name!r}, "
            "which hf_longmem's attention paths do not know (it may change the attention math); "
            "add it to hf_longmem.memory.attention_features with how it is applied"
        )


@dataclass(frozen=True)
class AttentionFeatures:
    """What a model's attention call asks for, as eager attention would apply it.

    Attributes:
        scaling: logit scale.
        softcap: ``tanh(logits / softcap) * softcap`` on the scaled logits before the mask, or ``None``.
        sinks: ``[q_heads]`` sink logits (added to the softmax denominator, dropped after), or ``None``.
        sliding_window: a query at position ``p`` sees keys at positions ``> p - sliding_window``, or ``None``.
        dropout: probability dropout actually applied (0 unless the module is training).
    """

    scaling: float
    softcap: float | None = None
    sinks: torch.Tensor | None = None
    sliding_window: int | None = None
    dropout: float = 0.0

    @classmethod
    def of_call(
        cls, module: torch.nn.Module, query: torch.Tensor, scaling: float | None, dropout: float, kwargs: dict
    ) -> AttentionFeatures:
        """The features of one attention call: ``query`` ``[batch, q_heads, q, head_dim]``, the call's kwargs."""
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        sinks = kwargs.get("s_aux")
        module_sinks = getattr(module, "sinks", None)
        if isinstance(module_sinks, torch.Tensor):  # eager attention reads module.sinks (the same as s_aux)
            sinks = module_sinks
        if sinks is not None and sinks.shape != (query.shape[1],):
            raise ValueError(
                f"attention sinks of {model_name(module)} have shape {tuple(sinks.shape)}, expected one per query "
                f"head ({query.shape[1]})"
            )
        training = bool(getattr(module, "training", False))
        return cls(
            scaling=float(scaling),
            softcap=kwargs.get("softcap") or None,
            sinks=sinks,
            sliding_window=kwargs.get("sliding_window"),
            dropout=float(dropout or 0.0) if training else 0.0,
        )

    # --------------------------------------------------------------------------------------------- queries
    @property
    def plain(self) -> bool:
        """No softcap, sinks, window or dropout: plain scaled softmax attention."""
        return self.softcap is None and self.sinks is None and self.sliding_window is None and not self.dropout

    def names(self) -> list[str]:
        """The features present, as named in messages."""
        present = {
            "softcap": self.softcap is not None,
            "attention sinks": self.sinks is not None,
            "sliding_window": self.sliding_window is not None,
            "dropout": bool(self.dropout),
        }
        return [name for name, on in present.items() if on]

    def refuse(
        self, method: str, module: torch.nn.Module, *, softcap=False, sinks=False, sliding_window=False, dropout=False
    ) -> None:
        """Raises ``ValueError`` if a feature flagged ``True`` (one ``method`` cannot apply) is present."""
        cannot = {
            "logit softcapping (softcap)": softcap and self.softcap is not None,
            "attention sinks (s_aux / module.sinks)": sinks and self.sinks is not None,
            f"a sliding window ({self.sliding_window})": sliding_window and self.sliding_window is not None,
            "attention dropout in training": dropout and bool(self.dropout),
        }
        missing = [name for name, hit in cannot.items() if hit]
        if missing:
            raise ValueError(
                f"unsupported model: {method} does not apply {' and '.join(missing)}, which the attention of "
                f"{model_name(module)} uses"
            )

    def head_subset(self, heads: torch.Tensor) -> AttentionFeatures:
        """The features of a subset ``heads`` ``[h]`` of the query heads (sinks are per head)."""
        if self.sinks is None:
            return self
        return replace(self, sinks=self.sinks.index_select(0, heads.to(self.sinks.device)))

    # ----------------------------------------------------------------------------------------- application
    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        """Soft-caps scaled logits (any shape): ``tanh(logits / softcap) * softcap``; identity without a cap."""
        if self.softcap is None:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap

    def window_allows(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor | None:
        """``[..., q, n]`` bool: the window lets a query see a key; ``None`` without a window.

        Args:
            query_positions: ``[..., q]`` true positions of the queries (pad queries: any value; they are allowed
                everything here, their own masks keep them harmless).
            key_positions: ``[..., n]`` true positions of the keys (broadcastable with ``query_positions``).
        """
        if self.sliding_window is None:
            return None
        from hf_longmem.memory.padding import PAD_POSITION

        distance = query_positions[..., :, None].long() - key_positions[..., None, :].long()
        return (distance < self.sliding_window) | (query_positions == PAD_POSITION)[..., :, None]

    def sink_logits(self, kv_heads: int, num_q: int, dtype: torch.dtype) -> torch.Tensor:
        """``[1, kv_heads, group * q, 1]``: the sink logit of each row of logits grouped as ``[b, Hkv, g * q, n]``
        (row ``j * q + i`` is query ``i`` of query head ``kv * group + j``)."""
        group = self.sinks.shape[0] // kv_heads
        rows = self.sinks.to(dtype).view(kv_heads, group, 1).expand(kv_heads, group, num_q)
        return rows.reshape(1, kv_heads, group * num_q, 1)

    def softmax(self, logits: torch.Tensor, sink_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax over the last axis with the sink column (``sink_rows`` broadcastable to ``logits[..., :1]``)
        added and dropped, then dropout (in training). Logits are already capped and masked."""
        if sink_rows is None:
            probs = torch.softmax(logits, dim=-1)
        else:
            combined = torch.cat((logits, sink_rows.expand(*logits.shape[:-1], 1)), dim=-1)
            probs = torch.softmax(combined, dim=-1)[..., :-1]
        if self.dropout:
            probs = torch.nn.functional.dropout(probs, p=self.dropout, training=True)
        return probs

    def add_sinks(self, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds the sinks to attention given with its log-sum-exp (exact: a sink is one more softmax slot whose
        value is zero).

        Args:
            out: ``[b, q_heads, q, dv]``.
            lse: ``[b, q_heads, q]`` float32 log-sum-exp of the (capped, masked) logits.

        Returns:
            ``out * sigmoid(lse - sink)`` in ``out``'s dtype and ``logaddexp(lse, sink)``.
        """
        if self.sinks is None:
            return out, lse
        sinks = self.sinks.float().view(1, -1, 1)
        weight = torch.sigmoid(lse - sinks)  # exp(lse) / (exp(lse) + exp(sink)); lse = -inf gives 0
        return (out.float() * weight[..., None]).to(out.dtype), torch.logaddexp(lse, sinks)


class HeadSubsetModule:
    """An attention module seen through a subset of its query heads, for the model's own attention function.

    Eager attention reads per-query-head module state (``module.sinks``, GPT-OSS); DuoAttention calls it once per
    head group with only that group's query heads, so the state must be sliced the same way. Every other attribute
    is the module's own.

    Args:
        module: the attention module.
        heads: ``[h]`` query-head indices of the group.
    """

    def __init__(self, module: torch.nn.Module, heads: torch.Tensor):
        object.__setattr__(self, "_module", module)
        sinks = getattr(module, "sinks", None)
        if isinstance(sinks, torch.Tensor):
            sinks = sinks.index_select(0, heads.to(sinks.device))
        object.__setattr__(self, "sinks", sinks)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_module"), name)


__all__ = [
    "APPLIED_KWARGS",
    "CACHE_KWARGS",
    "INERT_KWARGS",
    "KNOWN_KWARGS",
    "MODULE_ATTRIBUTES",
    "REFUSED_KWARGS",
    "AttentionFeatures",
    "HeadSubsetModule",
    "check_attention_kwargs",
    "model_name",
]
