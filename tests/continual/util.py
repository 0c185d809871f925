"""Helpers of the continual tests: a tiny random Llama over ``build_tokenizer()`` and tiny task sequences."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from hf_longmem.continual import ContinualTrainer, TrainerConfig, fact_domains, tokenize_task
from hf_longmem.evals.vocab import build_tokenizer

TINY_MODEL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
}

_TOKENIZER = None


def tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = build_tokenizer()
    return _TOKENIZER


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    tok = tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **TINY_MODEL,
    )
    return LlamaForCausalLM(cfg)


def tiny_lora(seed: int = 0, rank: int = 4):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(seed)
    torch.manual_seed(seed)
    return get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
        ),
    )


def tiny_tasks(num_tasks: int = 3, facts: int = 4):
    return [tokenize_task(t, tokenizer()) for t in fact_domains(num_tasks, facts, num_digits=2)]


def make_trainer(strategies=(), model=None, tmp_path=None, tasks=None, probes=(), **config) -> ContinualTrainer:
    defaults = {"steps_per_task": 3, "batch_size": 4, "learning_rate": 1e-2, "eval_every": 2}
    defaults.update(config)
    if tmp_path is not None:
        defaults["output_dir"] = str(tmp_path)
    return ContinualTrainer(
        model if model is not None else tiny_model(),
        tokenizer(),
        tiny_tasks() if tasks is None else tasks,
        list(strategies),
        TrainerConfig(**defaults),
        accelerator=Accelerator(cpu=True),
        probes=probes,
    )


@dataclass(frozen=True)
class StrategyCase:
    """How the shared strategy test (``test_strategy_contract.py``) runs one registered strategy; declared in the
    strategy's own test module.

    Attributes:
        name: the registry name (``hf_longmem.continual.STRATEGIES``).
        options: its config besides ``name`` (small buffers and sample counts for tiny runs).
        lora_rank: train a LoRA adapter of this rank (strategies that need one); 0: the full model.
        trainer: ``TrainerConfig`` fields for the run.
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    lora_rank: int = 0
    trainer: dict[str, Any] = field(default_factory=dict)
