"""Configuration of LongGen (Ge et al., 2024, "A Little Goes a Long Way: Efficient Long Context Training and Inference
with Partial Contexts"): a Llama decoder whose layers attend sparsely except a few full-attention layers."""

from __future__ import annotations

from transformers import LlamaConfig

from hf_longmem.kernels.sparse_attention import KINDS, SparsePattern
from hf_longmem.modeling.remote_code import RemoteCodeMixin
from hf_longmem.validation import check_choice


def default_full_layers(num_layers: int) -> list[int]:
    """The middle third of the layers (at least one): LongGen keeps its full-attention layers in the middle."""
    count = max(1, round(num_layers / 3))
    start = (num_layers - count) // 2
    return list(range(start, start + count))


class LongGenConfig(RemoteCodeMixin, LlamaConfig):
    """A :class:`~transformers.LlamaConfig` plus LongGen's layer plan and sparse pattern.

    Args:
        full_layers: indices of the layers with full attention (``None``: the middle third). Every other layer uses
            the sparse pattern and its cache keeps only the keys that pattern can still read.
        sparse: ``"sink_window"`` (``sink_size`` attention sinks + the ``window`` most recent tokens, the query
            included) or ``"block_sparse"`` (blocks of ``block_size`` tokens; a query block reads the
            ``local_blocks`` most recent blocks and every block ``kb`` with ``(kb + 1) % vertical_stride == 0``).
        sparse_backend: backend of :func:`~hf_longmem.kernels.sparse_attention.sparse_attention` (``None``: Triton on
            CUDA, torch elsewhere). With ``attn_implementation="eager"`` the sparse layers run the torch reference
            (it returns the attention weights).
    """

    model_type = "longgen"

    full_layers: list[int] | None = None
    sparse: str = "sink_window"
    sink_size: int = 4
    window: int = 256
    block_size: int = 64
    local_blocks: int = 4
    vertical_stride: int = 8
    sparse_backend: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.full_layers is None:
            self.full_layers = default_full_layers(self.num_hidden_layers)
        layers = self.full_layers
        if not isinstance(layers, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
            raise ValueError(f"`full_layers` must be a list of layer indices, got {layers!r}")
        if any(not 0 <= i < self.num_hidden_layers for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(
                f"`full_layers` must hold distinct indices in [0, {self.num_hidden_layers}) "
                f"(num_hidden_layers={self.num_hidden_layers}), got {list(layers)}"
            )
        self.full_layers = sorted(layers)
        check_choice("sparse_backend", self.sparse_backend, (None, "torch", "triton"))
        check_choice("sparse", self.sparse, KINDS)
        self.sparse_pattern()  # validates the pattern's sizes

    def sparse_pattern(self) -> SparsePattern:
        """The :class:`~hf_longmem.kernels.sparse_attention.SparsePattern` of the sparse layers."""
        return SparsePattern(
            kind=self.sparse,
            sink_size=self.sink_size,
            window=self.window,
            block_size=self.block_size,
            local_blocks=self.local_blocks,
            vertical_stride=self.vertical_stride,
        )

    def is_full_layer(self, layer_idx: int) -> bool:
        return layer_idx in self.full_layers
