"""Configuration of HCAM (Lampinen et al., 2021, "Towards mental time travel: a hierarchical memory for reinforcement
learning agents") as a memory branch on a pretrained causal LM.

The backbone reads the input in segments of ``segment_length`` tokens (positions restart in every segment, its KV cache
holds the current segment only). At each layer of ``memory_layers`` an HCAM branch reads a memory of that layer's past
inputs, split into chunks of ``chunk_size`` tokens: the query attends over the chunk summaries (mean of a chunk), keeps
the ``topk_chunks`` best chunks, attends in detail within each of them and sums the results weighted by the summary
attention. The branch output is added to the layer's output through a gate ``tanh(g)`` with ``g`` initialised to
``gate_init`` (0: the untrained model is the backbone).
"""

from __future__ import annotations

from hf_longmem.modeling.backbone import BackboneWrapperConfig
from hf_longmem.validation import check_choice, check_int, check_real

BRANCH_INITS = ("random", "attention")


class HCAMConfig(BackboneWrapperConfig):
    """HCAM wrapper config (``model_type="hcam"``).

    Args:
        backbone_config, backbone_name_or_path, freeze_backbone: see
            :class:`hf_longmem.modeling.backbone.BackboneWrapperConfig` (Llama-family decoders: Llama, Mistral, Qwen2).
        segment_length: tokens the backbone attends over locally (its KV cache is reset at every multiple of
            ``segment_length``; positions restart there), a multiple of ``chunk_size``. Keep it within the backbone's
            training length; everything older reaches the model through the HCAM memory only.
        chunk_size: tokens per memory chunk ``C`` (htm-pytorch's README example: 32).
        topk_chunks: chunks attended in detail per query token ``k`` (htm-pytorch's README example: 8).
        memory_size: tokens of memory per layer and batch row, a multiple of ``chunk_size``; a query sees the
            ``memory_size // chunk_size`` most recent complete chunks before it (first in, first out).
        memory_layers: decoder layers that get an HCAM branch (``None``: every layer, as the paper puts HCAM in every
            layer of the agent's memory).
        memory_hidden_size: width ``S`` of the summary projections and of the within-chunk attention (official
            ``feature_size``; default the backbone's hidden size).
        num_memory_heads: heads of the within-chunk attention (default the backbone's attention heads); must divide
            ``memory_hidden_size``.
        memory_position_encoding: add the official sinusoidal position encoding to a chunk's contents before the
            within-chunk attention (needs an even hidden size).
        init_scale: scale of the variance-scaling init of the branch's projections (official ``init_scale=2``).
        branch_init: ``"random"`` (official variance-scaling init) or ``"attention"``: each branch's projections
            start from its decoder layer's attention (``from_backbone`` copies them: summary and within-chunk query /
            key from ``q_proj`` / ``k_proj``, value from ``v_proj``, output from ``o_proj``, the layer's input-norm
            weight folded in, KV heads repeated for GQA), so the branch starts as the layer's own attention within
            the chosen chunks (without RoPE). Needs ``memory_hidden_size = num_attention_heads * head_dim`` and
            ``num_memory_heads = num_attention_heads`` (the defaults then follow them).
        gate_init: initial gate logit ``g`` (branch output scaled by ``tanh(g)``; 0: the model starts as the backbone).
        memory_offload: keep the chunk contents in CPU memory (the summaries, ``1 / chunk_size`` of the bytes, stay on
            the compute device); a step copies only the chunks it attends to (all of them for a long prefill).
        use_cache: return the :class:`HCAMCache` from ``forward`` by default.
    """

    model_type = "hcam"

    def __init__(
        self,
        backbone_config=None,
        segment_length: int = 1024,
        chunk_size: int = 32,
        topk_chunks: int = 8,
        memory_size: int = 65536,
        memory_layers: list[int] | None = None,
        memory_hidden_size: int | None = None,
        num_memory_heads: int | None = None,
        memory_position_encoding: bool = True,
        init_scale: float = 2.0,
        gate_init: float = 0.0,
        branch_init: str = "random",
        memory_offload: bool = False,
        use_cache: bool = True,
        **kwargs,
    ):
        self.segment_length = check_int("segment_length", segment_length, low=1)
        self.chunk_size = check_int("chunk_size", chunk_size, low=1)
        self.topk_chunks = check_int("topk_chunks", topk_chunks, low=1)
        self.memory_size = check_int("memory_size", memory_size, low=1)
        if self.segment_length % self.chunk_size:
            raise ValueError(
                f"`segment_length` ({segment_length}) must be a multiple of `chunk_size` ({chunk_size}): chunks never "
                "straddle a segment boundary"
            )
        if self.memory_size % self.chunk_size:
            raise ValueError(f"`memory_size` ({memory_size}) must be a multiple of `chunk_size` ({chunk_size})")
        self.memory_layers = None if memory_layers is None else list(memory_layers)
        self.memory_hidden_size = (
            None if memory_hidden_size is None else check_int("memory_hidden_size", memory_hidden_size, low=1)
        )
        self.num_memory_heads = (
            None if num_memory_heads is None else check_int("num_memory_heads", num_memory_heads, low=1)
        )
        if not isinstance(memory_position_encoding, bool):
            raise ValueError(f"`memory_position_encoding` must be a bool, got {memory_position_encoding!r}")
        self.memory_position_encoding = memory_position_encoding
        self.init_scale = check_real("init_scale", init_scale, low=0.0, strict_low=True)
        self.gate_init = check_real("gate_init", gate_init)
        self.branch_init = check_choice("branch_init", branch_init, BRANCH_INITS)
        if not isinstance(memory_offload, bool):
            raise ValueError(f"`memory_offload` must be a bool, got {memory_offload!r}")
        self.memory_offload = memory_offload
        self.use_cache = bool(use_cache)
        super().__init__(backbone_config=backbone_config, **kwargs)
        if self.backbone_config is not None:
            self._resolve()

    def _resolve(self) -> None:
        """Defaults that depend on the backbone, and the checks against it."""
        backbone = self.backbone_config
        depth, hidden = backbone.num_hidden_layers, backbone.hidden_size
        if self.memory_layers is None:
            self.memory_layers = list(range(depth))
        layers = self.memory_layers
        if (
            not layers
            or any(isinstance(i, bool) or not isinstance(i, int) for i in layers)
            or any(not 0 <= i < depth for i in layers)
            or len(set(layers)) != len(layers)
        ):
            raise ValueError(
                f"`memory_layers` must be a non-empty list of distinct layer indices in [0, {depth}), got {layers!r}"
            )
        self.memory_layers = sorted(layers)
        heads = backbone.num_attention_heads
        attention_width = heads * (getattr(backbone, "head_dim", None) or hidden // heads)
        if self.memory_hidden_size is None:
            self.memory_hidden_size = attention_width if self.branch_init == "attention" else hidden
        if self.num_memory_heads is None:
            self.num_memory_heads = heads
        if self.branch_init == "attention" and (self.memory_hidden_size, self.num_memory_heads) != (
            attention_width,
            heads,
        ):
            raise ValueError(
                f"`branch_init='attention'` copies the layer's attention: it needs memory_hidden_size={attention_width} "
                f"and num_memory_heads={heads}, got {self.memory_hidden_size} and {self.num_memory_heads}"
            )
        if self.memory_hidden_size % self.num_memory_heads:
            raise ValueError(
                f"`num_memory_heads` ({self.num_memory_heads}) must divide `memory_hidden_size` "
                f"({self.memory_hidden_size})"
            )
        if self.memory_position_encoding and hidden % 2:
            raise ValueError(
                f"`memory_position_encoding` needs an even hidden size (sin and cos halves), the backbone's is {hidden}"
            )

    @property
    def max_chunks(self) -> int:
        """Chunks of memory a query sees at most (``memory_size // chunk_size``)."""
        return self.memory_size // self.chunk_size
