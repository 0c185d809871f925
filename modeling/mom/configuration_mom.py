"""Configuration of MoM (Mixture-of-Memories, Du et al. 2025, arXiv 2502.13685) with gated-delta-rule memories."""

from __future__ import annotations

from transformers import PretrainedConfig

from hf_longmem.modeling.remote_code import RemoteCodeMixin
from hf_longmem.validation import check_choice, check_int, check_real

KERNEL_BACKENDS = (None, "torch", "triton")


class MomConfig(RemoteCodeMixin, PretrainedConfig):
    """MoM language model: every layer's token mixer is a mixture of gated-delta-rule memories.

    A router sends each token to its ``topk`` of ``num_memories`` memories (plus an always-on shared memory when
    ``shared_mem``). Each memory is a per-head ``[head_dim, head_dim * expand_v]`` state updated only by its tokens.

    State per layer during generation (``MomCache``): ``(num_memories + shared_mem) x num_heads x head_dim x
    (head_dim * expand_v)`` float32 numbers per sequence, plus ``conv_size - 1`` pre-conv q/k/v vectors per memory;
    independent of the context length.

    Args:
        vocab_size, hidden_size, num_hidden_layers: the usual.
        num_heads: heads per memory; head_dim: key width ``K`` per head; expand_v: value width ``V = K * expand_v``.
        num_memories: routed memories ``M``; topk: memories per token; shared_mem: add a memory every token updates.
        norm_topk_prob: renormalise the chosen memories' router probabilities to sum to 1 (the official code).
            ``False`` mixes the reads by the probabilities themselves, which gives a ``topk=1`` router a gradient
            from the language-model loss (renormalised top-1 weights are constant 1).
        conv_size: short causal depthwise conv on q/k/v (run over each memory's own token stream, as in the official
            code); at least 2.
        use_output_gate: gated RMSNorm on the mixed memory output (``norm(o) * silu(x W_g)``), else plain RMSNorm.
        hidden_ratio / intermediate_size: SwiGLU MLP width (``intermediate_size`` wins when given; otherwise
            ``hidden_size * hidden_ratio * 2 / 3`` rounded up to a multiple of 256, as in fla).
        aux_loss_scale: weight of the Switch-style load-balancing loss added to the LM loss (per layer, averaged).
        chunk_size: tokens per chunk of the chunked gated delta rule (the Triton kernel uses at most this, capped to
            16-64 by its shared memory; the result does not depend on it).
        kernel_backend: ``None`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.
    """

    model_type = "mom_gdn"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        num_hidden_layers: int = 24,
        num_heads: int = 4,
        head_dim: int = 256,
        expand_v: float = 1.0,
        num_memories: int = 4,
        topk: int = 2,
        shared_mem: bool = True,
        norm_topk_prob: bool = True,
        conv_size: int = 4,
        use_output_gate: bool = True,
        hidden_ratio: int | None = 4,
        intermediate_size: int | None = None,
        hidden_act: str = "silu",
        norm_eps: float = 1e-6,
        aux_loss_scale: float = 0.01,
        chunk_size: int = 64,
        kernel_backend: str | None = None,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        **kwargs,
    ):
        for name, value in (
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_heads", num_heads),
            ("head_dim", head_dim),
            ("num_memories", num_memories),
            ("topk", topk),
            ("chunk_size", chunk_size),
        ):
            check_int(name, value, low=1)
        if topk > num_memories:
            raise ValueError(f"`topk` ({topk}) must be at most `num_memories` ({num_memories})")
        check_int("conv_size", conv_size, low=2, hint="the short conv is part of MoM")
        if not expand_v > 0 or int(head_dim * expand_v) != head_dim * expand_v:
            raise ValueError(f"`expand_v` must make head_dim * expand_v a positive int, got {expand_v!r}")
        check_choice("kernel_backend", kernel_backend, KERNEL_BACKENDS)
        check_real("aux_loss_scale", aux_loss_scale, low=0.0)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.expand_v = expand_v
        self.num_memories = num_memories
        self.topk = topk
        self.shared_mem = bool(shared_mem)
        self.norm_topk_prob = bool(norm_topk_prob)
        self.conv_size = conv_size
        self.use_output_gate = bool(use_output_gate)
        self.hidden_ratio = hidden_ratio
        if intermediate_size is None:
            ratio = 4 if hidden_ratio is None else hidden_ratio
            intermediate_size = int(hidden_size * ratio * 2 / 3)
            intermediate_size = 256 * ((intermediate_size + 255) // 256)
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.norm_eps = norm_eps
        self.aux_loss_scale = aux_loss_scale
        self.chunk_size = chunk_size
        self.kernel_backend = kernel_backend
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        # every layer carries recurrent + conv state: transformers' DynamicCache(config=...) then builds
        # LinearAttentionLayer objects, which the MoM layer also accepts (generate builds a MomCache by default)
        kwargs.pop("layer_types", None)
        self.layer_types = ["linear_attention"] * num_hidden_layers
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def value_dim(self) -> int:
        """``V``: value width per head."""
        return int(self.head_dim * self.expand_v)

    @property
    def total_memories(self) -> int:
        """Memories with a state: the routed ones plus the shared one."""
        return self.num_memories + int(self.shared_mem)

    def state_size(self) -> int:
        """Recurrent-state numbers per layer and sequence: ``total_memories * num_heads * head_dim * value_dim``."""
        return self.total_memories * self.num_heads * self.head_dim * self.value_dim
