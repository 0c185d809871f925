"""Publish checkpoints to the Hugging Face Hub with a model card, remote code and evaluation results.

The flow of :func:`publish` is the one ``model.push_to_hub`` would follow if it kept our card:

1. stage everything in a temporary folder: ``model.save_pretrained`` (which also copies the remote-code files of
   classes registered with ``register_for_auto_class``), ``tokenizer.save_pretrained``, ``extra_files`` and a
   ``README.md`` rendered from a template of :mod:`hf_longmem.model_cards`;
2. ``api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)``;
3. ``api.upload_folder(repo_id=repo_id, folder_path=stage, commit_message=...)``.

``model.push_to_hub`` is not used: it replaces ``README.md`` with the card found on the Hub or a default one.

``api`` is any object with ``create_repo`` and ``upload_folder`` methods shaped like those of
:class:`huggingface_hub.HfApi` (the default). :class:`LocalFolderApi` implements them by copying into a local folder,
for dry runs and tests::

    >>> from hf_longmem.hub import LocalFolderApi, publish
    >>> publish(model, "me/tiny-snapkv", eval_results="results.json", api=LocalFolderApi("/tmp/hub"))
    '/tmp/hub/me/tiny-snapkv'
    >>> AutoModelForCausalLM.from_pretrained("/tmp/hub/me/tiny-snapkv")

Evaluation results come from the evaluation harness, whose JSON is ``{"meta": {...}, "rows": [row, ...]}`` with rows
such as ``{"model": "tiny", "task": "passkey", "cache": "snapkv", "cache_kwargs": {"budget": 256},
"context_length": 1024, "num_samples": 50, "accuracy": 0.96, "kv_bytes": 123456, "prefill_s": 0.1,
"decode_tokens_per_s": 500.0, "peak_memory_bytes": 0, "top1_agreement": 0.99, "kl": 0.01}``. They become the
``model-index`` of the card metadata (:func:`eval_results_from_harness`) and a table in its body
(:func:`eval_table_markdown`).

The package has one module per job: :mod:`.results` (harness rows -> card data), :mod:`.cards` (rendering),
:mod:`.local_api` (the API shape and :class:`LocalFolderApi`) and :mod:`.publish`.
"""

from .cards import BASELINE_CACHES, DEFAULT_EXAMPLE_CACHE, LIBRARY_TAG, list_card_templates, render_model_card
from .local_api import HubApi, LocalFolderApi
from .publish import publish
from .results import (
    DEFAULT_EVAL_METRICS,
    HarnessResults,
    eval_results_from_harness,
    eval_table_markdown,
    load_harness_results,
)

__all__ = [
    "BASELINE_CACHES",
    "DEFAULT_EVAL_METRICS",
    "DEFAULT_EXAMPLE_CACHE",
    "HarnessResults",
    "HubApi",
    "LIBRARY_TAG",
    "LocalFolderApi",
    "eval_results_from_harness",
    "eval_table_markdown",
    "list_card_templates",
    "load_harness_results",
    "publish",
    "render_model_card",
]
