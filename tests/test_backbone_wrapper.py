"""Shared wrapper plumbing (modeling/backbone.py): nested backbone config, from_backbone, freezing, mismatches."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from hf_longmem.modeling.backbone import BackboneWrapperConfig, BackboneWrapperMixin, build_backbone


class _WrapperConfig(BackboneWrapperConfig):
    model_type = "hf_longmem_test_wrapper"

    def __init__(self, gate: float = 0.0, **kwargs):
        self.gate = gate
        super().__init__(**kwargs)


class _Wrapper(BackboneWrapperMixin, PreTrainedModel):
    config_class = _WrapperConfig

    def __init__(self, config):
        super().__init__(config)
        self.backbone = build_backbone(config)
        self.side = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()


def _backbone():
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=40,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )


def test_from_backbone_copies_weights_and_freezes(tmp_path):
    backbone = _backbone()
    model = _Wrapper.from_backbone(backbone, gate=0.5)
    assert model.config.backbone_config.hidden_size == 16 and model.config.gate == 0.5
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model.backbone(ids).logits, backbone(ids).logits)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert model.trainable_parameter_count() == sum(p.numel() for p in model.side.parameters())

    model.save_pretrained(tmp_path)
    loaded = _Wrapper.from_pretrained(tmp_path)
    assert isinstance(loaded.config.backbone_config, LlamaConfig)
    torch.testing.assert_close(loaded.backbone(ids).logits, backbone(ids).logits)


def test_bad_inputs():
    with pytest.raises(ValueError, match="backbone_config"):
        _Wrapper(_WrapperConfig())
    with pytest.raises(ValueError, match="model_type"):
        _WrapperConfig(backbone_config={"hidden_size": 4})
    other = _Wrapper(_WrapperConfig(backbone_config=_backbone().config))
    big = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=40,
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    from hf_longmem.modeling.backbone import check_backbone_matches

    with pytest.raises(ValueError, match="hidden_size"):
        check_backbone_matches(other.config.backbone_config, big)
