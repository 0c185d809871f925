"""Long-sequence training options: activation checkpointing, activation offload to host, chunked cross entropy.

Each option trades time for activation memory and leaves the gradients unchanged (the same operations on the same
numbers, recomputed, or copied to host and back):

- :func:`enable_activation_checkpointing`: transformers' ``activation_checkpointing_enable`` (non-reentrant
  ``torch.utils.checkpoint``) on any model that declares ``supports_gradient_checkpointing``; a clear ``ValueError``
  otherwise. Only each layer's input is kept for backward, the layer is recomputed.
- :class:`ActivationOffload`: a ``torch.autograd.graph.saved_tensors_hooks`` context (as
  ``torch.autograd.graph.save_on_cpu``) that copies every tensor autograd saves in its forward to (pinned) host memory
  and back in backward; parameters are left in place (``save_on_cpu`` would copy them too). Tensors already on the
  CPU stay where they are: on a CPU-only run the option moves nothing.
- :func:`chunked_causal_lm_loss` / :func:`chunked_token_cross_entropy`: the LM head applied over chunks of the
  sequence under ``torch.utils.checkpoint``, so neither forward nor backward ever holds more than one chunk's
  ``[batch, chunk, vocab]`` logits (the backward recomputes them per chunk), instead of ``[batch, seq, vocab]``
  logits plus their float32 copy and softmax. :func:`lm_head_bypassed` makes a model return its final hidden
  states in place of logits, so the head is applied only by the chunked loss.

MEMO's token-wise recomputation/swapping plan (no public code) is not implemented; these are the standard
layer-wise variants (as in DeepSpeed/Megatron activation checkpointing and CPU offload, Liger-Kernel's fused
linear cross entropy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hf_longmem.validation import check_int

IGNORE_INDEX = -100
# Config attributes that post-process the head's output; a bypassed head would silently drop them.
_LOGIT_POSTPROCESSING = (
    "final_logit_softcapping",
    "logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Turn on activation checkpointing (non-reentrant) on a transformers model.

    Raises:
        ValueError: the model is not a transformers ``PreTrainedModel`` or declares no checkpointing support.
    """
    if not hasattr(model, "activation_checkpointing_enable") or not getattr(
        model, "supports_gradient_checkpointing", False
    ):
        raise ValueError(
            f"activation_checkpointing is not supported by {type(model).__name__}: it does not declare "
            "supports_gradient_checkpointing; turn the option off or use activation_offload / chunked_ce"
        )
    model.activation_checkpointing_enable({"use_reentrant": False})


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    return (str(tensor.device), tensor.untyped_storage().data_ptr())


class SavedTensorBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes autograd saves for backward inside the context (distinct storages, parameters excluded).

    Attributes:
        bytes: total bytes of the distinct non-parameter storages saved.
        count: number of saved tensors packed (with repeats).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.bytes = 0
        self.count = 0
        self._seen = {_storage_key(t) for t in exclude}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            self.count += 1
            key = _storage_key(tensor)
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += tensor.untyped_storage().nbytes()
            return tensor

        super().__init__(pack, lambda tensor: tensor)

    def __enter__(self) -> SavedTensorBytes:
        super().__enter__()
        return self


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """Copy the tensors autograd saves for backward to host memory; copy them back when backward needs them.

    Use around the forward (and the loss); backward may run outside. Gradients are unchanged (exact copies).

    Args:
        pin_memory: pin the host copies (asynchronous copies); ``None``: when CUDA is available.
        keep: tensors not to copy (the model's parameters: they stay on the device anyway).

    Attributes:
        moved_bytes: bytes copied to host (per saved tensor; a storage saved twice is copied twice).
        kept_bytes: bytes of the distinct storages left in place (already on the CPU; ``keep`` excluded).
    """

    def __init__(self, pin_memory: bool | None = None, keep: Iterable[torch.Tensor] = ()):
        pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        if pin and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA (pinned host memory); pass pin_memory=None or False")
        self.moved_bytes = 0
        self.kept_bytes = 0
        keep_keys = {_storage_key(t) for t in keep}

        kept: set[tuple[str, int]] = set()

        def pack(tensor: torch.Tensor) -> Any:
            key = _storage_key(tensor)
            if key in keep_keys:
                return (None, tensor)
            if tensor.device.type == "cpu":
                if key not in kept:
                    kept.add(key)
                    self.kept_bytes += tensor.untyped_storage().nbytes()
                return (None, tensor)
            host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin)
            host.copy_(tensor, non_blocking=pin)
            self.moved_bytes += tensor.numel() * tensor.element_size()
            return (tensor.device, host)

        def unpack(packed: Any) -> torch.Tensor:
            device, tensor = packed
            return tensor if device is None else tensor.to(device, non_blocking=pin)

        super().__init__(pack, unpack)

    def __enter__(self) -> ActivationOffload:
        super().__enter__()
        return self


def _chunk_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(hidden, weight, bias).float()  # [batch, chunk, vocab], freed when the chunk ends
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction="none")
    return ce.view_as(targets), logits.argmax(-1)


def chunked_token_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross entropy of ``F.linear(hidden, weight, bias)`` against ``targets``, chunk by chunk.

    Each chunk runs under non-reentrant ``torch.utils.checkpoint``: only its ``hidden`` slice is kept for backward,
    which recomputes the chunk's logits. Equal to ``F.cross_entropy(logits.float(), targets, reduction="none")`` up
    to float32 summation order of the head's matmul.

    Args:
        hidden: final hidden states ``[batch, seq, hidden]`` (already aligned with ``targets``).
        weight: LM head weight ``[vocab, hidden]``.
        targets: ``[batch, seq]`` token ids; ``ignore_index`` positions get loss ``0``.
        chunk_size: positions per chunk (``>= 1``).
        bias: LM head bias ``[vocab]`` or ``None``.

    Returns:
        ``(ce [batch, seq] float32, predictions [batch, seq])`` with ``predictions`` the argmax token.
    """
    chunk_size = check_int("chunk_size", chunk_size, low=1)
    if (
        hidden.dim() != 3
        or targets.shape != hidden.shape[:2]
        or weight.dim() != 2
        or weight.shape[1] != hidden.shape[2]
    ):
        raise ValueError(
            f"expected hidden [batch, seq, hidden], targets [batch, seq], weight [vocab, hidden]; got "
            f"{tuple(hidden.shape)}, {tuple(targets.shape)}, {tuple(weight.shape)}"
        )
    ces, predictions = [], []
    for start in range(0, hidden.shape[1], chunk_size):
        piece = slice(start, start + chunk_size)
        ce, prediction = checkpoint(
            _chunk_cross_entropy, hidden[:, piece], weight, bias, targets[:, piece], ignore_index, use_reentrant=False
        )
        ces.append(ce)
        predictions.append(prediction)
    return torch.cat(ces, dim=1), torch.cat(predictions, dim=1)


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int,
    bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Next-token loss as transformers' ``ForCausalLMLoss`` (shift by one, mean over non-ignored labels) without
    ``[batch, seq, vocab]`` logits.

    Args:
        hidden: final hidden states ``[batch, seq, hidden]`` (the head's input).
        weight: LM head weight ``[vocab, hidden]``; bias ``[vocab]`` or ``None``.
        labels: ``[batch, seq]`` (unshifted, as passed to a causal LM), ``ignore_index`` where no loss.
        chunk_size: positions per chunk.

    Returns:
        scalar loss (``nan`` when no label is valid, as ``ForCausalLMLoss``).
    """
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must be [batch, seq] of hidden {tuple(hidden.shape)}")
    targets = labels[:, 1:]
    ce, _ = chunked_token_cross_entropy(hidden[:, :-1], weight, targets, chunk_size, bias, ignore_index)
    return ce.sum() / (targets != ignore_index).sum()


def next_token_cross_entropy(
    output: torch.Tensor, targets: torch.Tensor, head: nn.Linear | None = None, chunk_size: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token cross entropy and argmax predictions, from logits or (chunked) from hidden states.

    Args:
        output: ``model(...).logits``: logits ``[batch, seq, vocab]``, or with the head bypassed
            (:func:`lm_head_bypassed`, ``chunk_size > 0``) final hidden states ``[batch, seq, hidden]``.
        targets: ``[batch, seq - 1]`` (the ids shifted by one).
        head: the LM head (``chunk_size > 0``).
        chunk_size: ``0``: from full logits (cast to float32); ``> 0``: :func:`chunked_token_cross_entropy`.

    Returns:
        ``(ce [batch, seq - 1] float32, predictions [batch, seq - 1])``.
    """
    if chunk_size:
        if head is None:
            raise ValueError("chunked cross entropy needs the LM head (from lm_head_bypassed)")
        return chunked_token_cross_entropy(output[:, :-1], head.weight, targets, chunk_size, head.bias)
    logits = output[:, :-1].float()
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    return ce, logits.argmax(-1)


@contextlib.contextmanager
def lm_head_bypassed(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the context the model's output embeddings are the identity: ``model(...).logits`` holds the final
    hidden states ``[batch, seq, hidden]`` (for :func:`chunked_causal_lm_loss`). Yields the head (its ``weight`` /
    ``bias`` are the parameters to pass on).

    Raises:
        ValueError: no ``nn.Linear`` output embeddings, or the config post-processes logits (soft-capping, scaling)
            which the bypass would skip.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"chunked_ce needs a model whose get_output_embeddings() is an nn.Linear LM head; "
            f"{type(model).__name__} has {type(head).__name__}"
        )
    config = getattr(model, "config", None)
    for name in _LOGIT_POSTPROCESSING:
        value = getattr(config, name, None)
        if value not in (None, 0, 1, 0.0, 1.0):
            raise ValueError(f"chunked_ce cannot apply {name}={value!r} of {type(model).__name__}; turn chunked_ce off")
    if "forward" in head.__dict__:
        raise ValueError("the LM head is already bypassed (nested lm_head_bypassed)")
    head.forward = lambda hidden: hidden
    try:
        yield head
    finally:
        del head.forward


@dataclass
class LongSequenceOptions:
    """The recipes' long-sequence options (all off by default).

    Attributes:
        activation_checkpointing: recompute each layer in backward (:func:`enable_activation_checkpointing`).
        activation_offload: keep saved activations in host memory (:class:`ActivationOffload`).
        chunked_ce: positions per chunk of the chunked cross entropy (``0``: off, full logits).
    """

    activation_checkpointing: bool = False
    activation_offload: bool = False
    chunked_ce: int = 0

    def __post_init__(self) -> None:
        for name in ("activation_checkpointing", "activation_offload"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be true or false, got {getattr(self, name)!r}")
        self.chunked_ce = check_int("chunked_ce", self.chunked_ce, low=0, hint="0 turns chunked cross entropy off")

    def prepare(self, model: nn.Module) -> None:
        """Apply the model-level options (checkpointing) and check that the others can run on ``model``."""
        if self.activation_checkpointing:
            enable_activation_checkpointing(model)
        if self.chunked_ce:
            with lm_head_bypassed(model):
                pass

    @contextlib.contextmanager
    def step(self, model: nn.Module) -> Iterator[nn.Linear | None]:
        """Context of one forward + loss: the offload hooks and, with ``chunked_ce``, the head bypassed (yields the
        head for :func:`next_token_cross_entropy`; ``None`` without ``chunked_ce``). ``model`` may be wrapped
        (DDP): the head is looked up on ``model.module`` when there is one."""
        with self.offload(model), contextlib.ExitStack() as stack:
            inner = getattr(model, "module", model)
            yield stack.enter_context(lm_head_bypassed(inner)) if self.chunked_ce else None

    def offload(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The context to run forward (and loss) in: :class:`ActivationOffload` or a no-op."""
        return ActivationOffload(keep=model.parameters()) if self.activation_offload else contextlib.nullcontext()
