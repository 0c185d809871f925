"""Re-rotating cached keys to new RoPE positions.

RoPE rotates each channel pair by ``position * inv_freq``; rotations compose, so a key cached at position ``p`` is
moved to ``p + delta`` by one more rotation by ``delta * inv_freq``. Caches that keep keys post-RoPE (as HF models
store them) use this for the StreamingLLM / SirLLM "position shift", where kept tokens are given contiguous
positions inside the cache instead of their original ones.
"""

from __future__ import annotations

import torch
from torch import nn

# RoPE variants whose angle is linear in the position (inv_freq may be rescaled, the magnitude factor is irrelevant
# to a pure rotation). "dynamic" and "longrope" change inv_freq with the sequence length: a delta is not defined.
SHIFTABLE_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class RotaryShift:
    """Applies extra RoPE rotations to post-RoPE keys.

    Args:
        inv_freq: ``[rotary_dim // 2]`` inverse frequencies of the model's rotary embedding. The first ``rotary_dim``
            channels of a head are rotated (HF's ``rotate_half`` layout); the rest (partial rotary) are left alone.
    """

    def __init__(self, inv_freq: torch.Tensor):
        if inv_freq.ndim != 1 or inv_freq.numel() == 0:
            raise ValueError(f"`inv_freq` must be a non-empty 1-D tensor, got shape {tuple(inv_freq.shape)}")
        self.inv_freq = inv_freq.detach().to(torch.float32)

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    @classmethod
    def from_model(cls, model: nn.Module) -> RotaryShift:
        """Finds the rotary embedding of an HF model (the first module with an ``inv_freq`` buffer)."""
        for module in model.modules():
            inv_freq = getattr(module, "inv_freq", None)
            if isinstance(inv_freq, torch.Tensor):
                rope_type = getattr(module, "rope_type", "default")
                if rope_type not in SHIFTABLE_ROPE_TYPES:
                    raise ValueError(
                        f"position_mode='shift' needs a RoPE whose angle is linear in the position "
                        f"({', '.join(SHIFTABLE_ROPE_TYPES)}); this model uses rope_type={rope_type!r}"
                    )
                return cls(inv_freq)
        raise ValueError("position_mode='shift' needs a RoPE model: no module with an `inv_freq` buffer was found")

    @classmethod
    def from_config(cls, config) -> RotaryShift:
        """Computes ``inv_freq`` from a transformers config (``rope_parameters``)."""
        params = getattr(config, "rope_parameters", None)
        if not params or "rope_theta" not in params:
            raise ValueError("position_mode='shift' needs a RoPE config with `rope_parameters['rope_theta']`")
        rope_type = params.get("rope_type", "default")
        if rope_type not in SHIFTABLE_ROPE_TYPES:
            raise ValueError(f"position_mode='shift' does not support rope_type={rope_type!r}")
        if rope_type == "default":
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            dim = int(head_dim * params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
            inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        return cls(inv_freq)

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Rotates ``keys`` by ``delta`` positions.

        Args:
            keys: ``[batch, heads, seq, head_dim]`` post-RoPE keys.
            delta: ``[batch, seq]`` (same for every head) or ``[batch, heads, seq]`` integer position offsets
                (0 leaves a key unchanged).

        Returns:
            ``[batch, heads, seq, head_dim]`` keys as if RoPE had been applied at ``position + delta``.
        """
        rot = self.rotary_dim
        if rot > keys.shape[-1]:
            raise ValueError(f"rotary dim {rot} exceeds head_dim {keys.shape[-1]}")
        if delta.ndim == 2:
            delta = delta[:, None, :]
        angles = delta.to(torch.float32)[..., None] * self.inv_freq.to(keys.device)  # [b, h or 1, seq, rot/2]
        angles = torch.cat((angles, angles), dim=-1)  # [b, h or 1, seq, rot]
        cos, sin = angles.cos(), angles.sin()
        k_rot = keys[..., :rot].to(torch.float32)
        half = rot // 2
        rotated_half = torch.cat((-k_rot[..., half:], k_rot[..., :half]), dim=-1)
        out = (k_rot * cos + rotated_half * sin).to(keys.dtype)
        if rot == keys.shape[-1]:
            return out
        return torch.cat((out, keys[..., rot:]), dim=-1)


def shift_to_cache_positions(
    rotary: RotaryShift, keys: torch.Tensor, positions: torch.Tensor, real_before: torch.Tensor
) -> torch.Tensor:
    """The StreamingLLM/SirLLM "position shift": stored keys moved to contiguous positions before the query.

    Slot ``j`` of ``stored`` slots is moved to position ``real_before - stored + j``, right before the first new
    token (which the model places at ``real_before``); pad slots are left alone (they are masked).

    Args:
        keys: ``[batch, kv_heads, stored, head_dim]`` post-RoPE keys at their true positions.
        positions: ``[batch, kv_heads, stored]`` true positions, negative for pad slots.
        real_before: ``[batch]`` real tokens seen before this step.
    """
    stored = keys.shape[-2]
    target = real_before[:, None, None] - stored + torch.arange(stored, device=keys.device)
    delta = torch.where(positions < 0, torch.zeros_like(target), target - positions.long())
    return rotary.rotate(keys, delta)
