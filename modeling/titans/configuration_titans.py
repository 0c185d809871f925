"""Configuration of Titans (Behrouz et al., 2024): MAC, MAG and MAL variants with a neural long-term memory."""

from __future__ import annotations

from transformers import PretrainedConfig

from hf_longmem.modeling.remote_code import RemoteCodeMixin
from hf_longmem.validation import check_choice, check_int, check_optional_int, check_real

VARIANTS = ("mac", "mag", "mal")


class TitansConfig(RemoteCodeMixin, PretrainedConfig):
    """Titans decoder: every layer has attention (sliding window for MAG/MAL, segmented for MAC), a SwiGLU MLP and,
    in ``memory_layers``, a neural long-term memory (an MLP updated at test time by gradient descent with momentum
    and weight decay on the associative loss).

    Args:
        variant: ``"mac"`` (memory as context: segments attend to ``[persistent ‖ memory read-out ‖ segment]``),
            ``"mag"`` (memory as gate over sliding-window attention) or ``"mal"`` (memory layer, then sliding-window
            attention).
        sliding_window: attention window of MAG/MAL (a token sees itself and the ``sliding_window - 1`` before it).
        segment_size: MAC segment length; a multiple of ``memory_chunk_size``.
        num_persistent_tokens: learned persistent memory tokens per layer (keys/values every query may attend to).
        memory_layers: indices of the layers that carry a neural memory (``None``: all layers). Layers without one
            are attention + MLP only.
        memory_heads, memory_head_dim: memory heads and their width ``d``.
        memory_depth: 1 (linear memory ``x + x W``) or 2 (``x + silu(x W1) W2``, the paper's ``L_M = 2``).
        memory_expansion: hidden width of the depth-2 memory as a multiple of ``memory_head_dim``.
        memory_chunk_size: tokens per chunk: gradients of a chunk are taken at the weights it starts with, and
            weights become readable at chunk ends.
        memory_max_lr: upper bound of the data-dependent learning rate ``theta_t = max_lr * sigmoid(.)``.
        memory_conv_size: depthwise causal convolution after the q/k/v projections of the memory (paper Sec. 4.4);
            1 disables it.
        memory_backend: chunk-step backend of :mod:`hf_longmem.kernels.titans_memory` (``None``: Triton on CUDA).
    """

    model_type = "titans"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        intermediate_size: int = 512,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        head_dim: int | None = None,
        variant: str = "mag",
        sliding_window: int = 64,
        segment_size: int = 64,
        num_persistent_tokens: int = 4,
        memory_layers: list[int] | None = None,
        memory_heads: int = 4,
        memory_head_dim: int | None = None,
        memory_depth: int = 2,
        memory_expansion: int = 2,
        memory_chunk_size: int = 16,
        memory_max_lr: float = 0.1,
        memory_conv_size: int = 4,
        memory_backend: str | None = None,
        max_position_embeddings: int = 65536,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs,
    ):
        check_choice("variant", variant, VARIANTS)
        for name, value in (
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_attention_heads", num_attention_heads),
            ("sliding_window", sliding_window),
            ("segment_size", segment_size),
            ("memory_heads", memory_heads),
            ("memory_chunk_size", memory_chunk_size),
            ("memory_conv_size", memory_conv_size),
            ("memory_expansion", memory_expansion),
            ("max_position_embeddings", max_position_embeddings),
        ):
            check_int(name, value, low=1)
        check_optional_int("head_dim", head_dim, low=1)
        check_optional_int("memory_head_dim", memory_head_dim, low=1)
        head_dim = head_dim or hidden_size // num_attention_heads
        memory_head_dim = memory_head_dim or hidden_size // memory_heads
        for name, value in (("head_dim", head_dim), ("memory_head_dim", memory_head_dim)):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1 (hidden_size / heads is below 1), got {value}")
        check_int("num_persistent_tokens", num_persistent_tokens, low=0)
        check_choice("memory_depth", memory_depth, (1, 2))
        check_real("memory_max_lr", memory_max_lr, low=0.0, strict_low=True)
        check_real("rope_theta", rope_theta, low=0.0, strict_low=True)
        check_real("rms_norm_eps", rms_norm_eps, low=0.0, strict_low=True)
        if variant == "mac" and segment_size % memory_chunk_size:
            raise ValueError(
                f"segment_size ({segment_size}) must be a multiple of memory_chunk_size ({memory_chunk_size}) for MAC"
            )
        if memory_layers is not None and any(
            isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_hidden_layers for i in memory_layers
        ):
            raise ValueError(f"memory_layers must index layers in [0, {num_hidden_layers}), got {memory_layers}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.variant = variant
        self.sliding_window = sliding_window
        self.segment_size = segment_size
        self.num_persistent_tokens = num_persistent_tokens
        self.memory_layers = list(memory_layers) if memory_layers is not None else list(range(num_hidden_layers))
        self.memory_heads = memory_heads
        self.memory_head_dim = memory_head_dim
        self.memory_depth = memory_depth
        self.memory_expansion = memory_expansion
        self.memory_chunk_size = memory_chunk_size
        self.memory_max_lr = memory_max_lr
        self.memory_conv_size = memory_conv_size
        self.memory_backend = memory_backend
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_token_id, bos_token_id, eos_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
