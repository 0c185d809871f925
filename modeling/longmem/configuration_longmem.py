"""Configuration of LongMem (Wang et al., 2023, "Augmenting Language Models with Long-Term Memory").

LongMem wraps a frozen pretrained causal LM (the *backbone*). The backbone encodes the input segment by segment; the
attention keys/values of one backbone layer (``retrieval_layer_index``) of every finished segment go into a memory
bank (chunks of ``chunk_size`` tokens, chunk-mean keys, at most ``memory_size`` tokens, oldest evicted first). A
trainable residual SideNet of ``num_hidden_layers // layer_reduction_factor`` layers reads the backbone's hidden states;
its layer ``memory_layer_index`` attends jointly over the local segment and the ``topk_chunks`` retrieved chunks per
query token and head, mixed per head by a learned gate ``sigmoid(g)``.
"""

from __future__ import annotations

from hf_longmem.modeling.backbone import BackboneWrapperConfig
from hf_longmem.validation import check_int

SIDENET_INITS = ("zero_output", "copy")


def _positive_int(name: str, value) -> int:
    return check_int(name, value, low=1)


class LongMemConfig(BackboneWrapperConfig):
    """LongMem wrapper config (``model_type="longmem"``).

    Args:
        backbone_config: the wrapped causal LM's config (Llama, Mistral, Qwen2 shapes), see
            :class:`hf_longmem.modeling.backbone.BackboneWrapperConfig`.
        segment_length: tokens the backbone encodes at once (positions restart in every segment); a finished
            segment's keys/values go to the memory bank. Keep it within the backbone's training length.
            Official: 1024 (``--tokens-per-sample``).
        chunk_size: tokens per memory chunk (official ``--chunk-size 4``).
        memory_size: bank capacity in tokens, a multiple of ``chunk_size`` (official 65,536).
        topk_chunks: chunks retrieved per query token and head (official ``--k 64`` tokens = 16 chunks of 4).
        layer_reduction_factor: backbone layers per SideNet layer (official 2); must divide the backbone depth.
        memory_layer_index: the SideNet layer that reads the memory; default ``int(2 / 3 * sidenet_layers)`` (official
            layer 8 of 12).
        retrieval_layer_index: the backbone layer whose keys/values fill the bank; default the layer the memory
            layer is copied from, ``r * memory_layer_index + r - 1`` (official 17 = 2 * 8 + 1).
        sidenet_init: ``"zero_output"`` (default): SideNet layer ``i`` copies backbone layer ``r * i + r - 1`` and its
            output projections (``o_proj``, ``down_proj``) start at zero, so the untrained wrapper equals the backbone
            exactly; ``"copy"``: the official ``--reload-ptm-layer`` full copy.
        memory_gate_init: initial per-head gate logit ``g`` (official 0, i.e. ``sigmoid(g) = 0.5``).
        initializer_range: std of the normal init of fresh weights.
        use_cache: return the :class:`LongMemBankCache` from ``forward`` by default.
    """

    model_type = "longmem"

    def __init__(
        self,
        backbone_config=None,
        segment_length: int = 1024,
        chunk_size: int = 4,
        memory_size: int = 65536,
        topk_chunks: int = 16,
        layer_reduction_factor: int = 2,
        memory_layer_index: int | None = None,
        retrieval_layer_index: int | None = None,
        sidenet_init: str = "zero_output",
        memory_gate_init: float = 0.0,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        **kwargs,
    ):
        self.segment_length = _positive_int("segment_length", segment_length)
        self.chunk_size = _positive_int("chunk_size", chunk_size)
        self.memory_size = _positive_int("memory_size", memory_size)
        self.topk_chunks = _positive_int("topk_chunks", topk_chunks)
        self.layer_reduction_factor = _positive_int("layer_reduction_factor", layer_reduction_factor)
        if self.memory_size % self.chunk_size:
            raise ValueError(f"memory_size ({memory_size}) must be a multiple of chunk_size ({chunk_size})")
        if sidenet_init not in SIDENET_INITS:
            raise ValueError(f"sidenet_init must be one of {SIDENET_INITS}, got {sidenet_init!r}")
        self.sidenet_init = sidenet_init
        self.memory_gate_init = float(memory_gate_init)
        self.initializer_range = float(initializer_range)
        self.memory_layer_index = memory_layer_index
        self.retrieval_layer_index = retrieval_layer_index
        self.use_cache = bool(use_cache)
        # ``tie_word_embeddings`` is the backbone's (BackboneWrapperConfig passes it on); the wrapper ties nothing itself.
        super().__init__(backbone_config=backbone_config, **kwargs)
        if self.backbone_config is not None:
            self._resolve_layers()

    def _resolve_layers(self) -> None:
        depth = self.backbone_config.num_hidden_layers
        r = self.layer_reduction_factor
        if depth % r:
            raise ValueError(f"layer_reduction_factor ({r}) must divide the backbone's num_hidden_layers ({depth})")
        layers = depth // r
        if self.memory_layer_index is None:
            self.memory_layer_index = int(2 * layers / 3)
        if (
            isinstance(self.memory_layer_index, bool)
            or not isinstance(self.memory_layer_index, int)
            or not (0 <= self.memory_layer_index < layers)
        ):
            raise ValueError(f"memory_layer_index must be an int in [0, {layers}), got {self.memory_layer_index!r}")
        if self.retrieval_layer_index is None:
            self.retrieval_layer_index = r * self.memory_layer_index + r - 1
        if (
            isinstance(self.retrieval_layer_index, bool)
            or not isinstance(self.retrieval_layer_index, int)
            or not (0 <= self.retrieval_layer_index < depth)
        ):
            raise ValueError(
                f"retrieval_layer_index must be an int in [0, {depth}), got {self.retrieval_layer_index!r}"
            )

    @property
    def num_sidenet_layers(self) -> int:
        return self.require_backbone_config().num_hidden_layers // self.layer_reduction_factor

    def sidenet_source_layer(self, index: int) -> int:
        """Backbone layer that SideNet layer ``index`` is initialised from (official ``r * i + 1`` for ``r = 2``)."""
        return self.layer_reduction_factor * index + self.layer_reduction_factor - 1
