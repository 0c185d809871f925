"""Continual training on accelerate: strategies at fixed hooks, LR schedules, replay and continual evaluation.

    from hf_longmem.continual import ContinualTrainer, TrainerConfig, fact_domains, build_strategy
    trainer = ContinualTrainer(model, tokenizer, fact_domains(3), [build_strategy({"name": "ewc", "lam": 100})],
                               TrainerConfig(steps_per_task=150))
    results = trainer.train()     # accuracy matrix, forgetting, min-ACC / WC-ACC, periodic evaluations

Recipes: ``recipes/continual_pretrain.py`` and ``recipes/continual_finetune.py``; see ``docs/continual.md``.
"""

from hf_longmem.registration import import_submodules

from .base import STRATEGIES, Strategy, build_strategy, register_strategy
from .data import ContinualTask, Example, fact_domains, tokenize_task
from .evaluation import ContinualEvaluator, matrix_metrics, plot_results, stability_metrics
from .probes import (
    CopyingProbe,
    LogProbProbe,
    Probe,
    RecallProbe,
    RecognitionProbe,
    fit_forgetting_curve,
    injection_metrics,
    knowledge_accumulation,
    probe_series,
    repeated_data_task,
    scole_stream,
)
from .schedules import ConstantSchedule, InfiniteSchedule, Position, RewarmCosineSchedule, build_schedule
from .trainer import ContinualTrainer, TrainerConfig, latest_checkpoint

#: Modules of this package that hold the trainer and its machinery, not a strategy.
SHARED_MODULES = ("base", "data", "evaluation", "probes", "recipe", "schedules", "state_io", "trainer")

# Every other module defines strategies that register themselves (@register_strategy) when imported.
import_submodules(__name__, __path__, skip=SHARED_MODULES)

__all__ = [
    "STRATEGIES",
    "ConstantSchedule",
    "ContinualEvaluator",
    "ContinualTask",
    "ContinualTrainer",
    "CopyingProbe",
    "Example",
    "InfiniteSchedule",
    "LogProbProbe",
    "Position",
    "Probe",
    "RecallProbe",
    "RecognitionProbe",
    "RewarmCosineSchedule",
    "Strategy",
    "TrainerConfig",
    "build_schedule",
    "build_strategy",
    "fact_domains",
    "fit_forgetting_curve",
    "injection_metrics",
    "knowledge_accumulation",
    "latest_checkpoint",
    "matrix_metrics",
    "plot_results",
    "probe_series",
    "register_strategy",
    "repeated_data_task",
    "scole_stream",
    "stability_metrics",
    "tokenize_task",
]
