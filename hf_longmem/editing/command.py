"""The ``hf-longmem edit`` subcommand: write WISE edits from a file into a model and save the side memories.

    hf-longmem edit --model PATH --edits edits.jsonl --out DIR [--merge] [--layer N] [--option KEY=VALUE ...]

``--edits`` is read by :func:`hf_longmem.editing.load_edits` (ZsRE JSON/JSONL or ``prompt``/``target`` lines).
The irrelevant sample each edit is trained against comes from ``--irrelevant`` (one text per line), else from the
record's own locality prompt and answer, else from the built-in unrelated sentences.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_edit_arguments", "run_edit"]

EPILOG = """\
examples:
  hf-longmem edit --edits edits.jsonl --out wise-edits                 # embedded model, WISE-Retrieve
  hf-longmem edit --model ./llama --edits zsre_mend_eval.json --limit 100 --merge --out wise-merge --evaluate
  hf-longmem edit --model ./llama --edits edits.jsonl --config llama-7b.yaml --option n_iter=30 --out wise

--config takes an EasyEdit hparams/WISE YAML file or a JSON file of WISEConfig keys; --option KEY=VALUE sets one
WISEConfig field (values read as JSON when they parse: 0.5, true, [5, 20, 10]).
"""


def add_edit_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``hf-longmem edit`` (the model options are added by the CLI)."""
    parser.add_argument("--edits", required=True, metavar="FILE", help="edit requests (ZsRE JSON/JSONL)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for wise_config.json + safetensors")
    parser.add_argument("--limit", type=int, default=None, help="use the first N edits")
    parser.add_argument("--config", metavar="FILE", help="WISEConfig as JSON, or an EasyEdit WISE YAML file")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="WISEConfig field (repeatable)"
    )
    parser.add_argument("--merge", action="store_true", help="WISE-Merge instead of WISE-Retrieve")
    parser.add_argument("--layer", type=int, default=None, help="decoder layer whose FFN output projection is edited")
    parser.add_argument("--irrelevant", metavar="FILE", help="irrelevant texts trained against, one per line")
    parser.add_argument("--evaluate", action="store_true", help="print reliability/generalization/locality afterwards")
    parser.add_argument("--no-edit-log", action="store_true", help="do not save the edit texts (wise_edits.jsonl)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def build_config(args: argparse.Namespace, error: type[Exception]) -> Any:
    """The :class:`WISEConfig` of ``--config``, ``--option``, ``--merge`` and ``--layer``."""
    from .config import WISEConfig

    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise error(f"--config {str(path)!r} does not exist")
        try:
            if path.suffix in (".yaml", ".yml"):
                values = WISEConfig.from_easyedit_yaml(path).to_dict()
            else:
                values = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise error(f"--config {str(path)!r}: {exc}") from None
        if not isinstance(values, dict):
            raise error(f"--config {str(path)!r} must hold a JSON object of WISEConfig fields")
    for text in args.option:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise error(f"--option must look like KEY=VALUE, got {text!r}")
        values[key.strip()] = _parse_value(raw)
    if args.merge:
        values["retrieve"] = False
    if args.layer is not None:
        values["layer"] = args.layer
        values.pop("target_module", None)
    try:
        return WISEConfig.from_dict(values)
    except (ValueError, TypeError) as exc:
        raise error(f"bad WISE configuration: {exc}") from None


def run_edit(args: argparse.Namespace, load_model: Any, error: type[Exception]) -> int:
    """Run ``hf-longmem edit``; ``load_model(args) -> (model, tokenizer, name)`` and ``error`` come from the CLI."""
    from .data import load_edits
    from .editor import WISEEditor
    from .evaluate import evaluate_records, predicted_tokens

    if args.limit is not None and args.limit < 1:
        raise error(f"--limit must be a positive integer, got {args.limit}")
    try:
        records = load_edits(args.edits, limit=args.limit)
    except (FileNotFoundError, ValueError) as exc:
        raise error(f"--edits: {exc}") from None
    irrelevant: list[str] | None = None
    if args.irrelevant:
        path = Path(args.irrelevant)
        if not path.is_file():
            raise error(f"--irrelevant {str(path)!r} does not exist")
        irrelevant = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not irrelevant:
            raise error(f"--irrelevant {str(path)!r} holds no text")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise error(f"--out {str(out)!r} exists and is not a folder")
    from hf_longmem.files import check_writable

    try:  # before any edit: a folder that cannot be written is found now, not after the edits
        check_writable(out / "wise_config.json", "--out")
    except ValueError as exc:
        raise error(str(exc)) from None
    config = build_config(args, error)
    model, tokenizer, name = load_model(args)
    try:
        editor = WISEEditor(model, tokenizer, config)
    except ValueError as exc:
        raise error(str(exc)) from None
    localities = []
    for i, record in enumerate(records):
        if irrelevant is not None:
            localities.append(irrelevant[i % len(irrelevant)])
        elif record.locality_prompt:
            localities.append(f"{record.locality_prompt} {record.locality_answer or ''}".strip())
        else:
            localities.append(None)
    before = None
    if args.evaluate:
        with editor.disable_adapter():
            before = [
                predicted_tokens(model, tokenizer, [r.locality_prompt], [r.locality_answer or ""])[0]
                if r.locality_prompt and r.locality_answer
                else None
                for r in records
            ]
    start = time.perf_counter()
    try:
        stats = []
        iterator: Any = range(len(records))
        if not args.no_progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc=f"{config.variant} edits", unit="edit")
        for i in iterator:
            record = records[i]
            stats += editor.edit(
                record.prompt,
                record.target,
                paraphrases=[record.paraphrases or None],
                locality_prompts=None if localities[i] is None else [localities[i]],
                source=record.source,
            )
    except ValueError as exc:
        raise error(f"edit {len(stats)}: {exc}") from None
    elapsed = time.perf_counter() - start
    try:
        editor.save_pretrained(out, include_edit_log=not args.no_edit_log)
    except OSError as exc:  # the edits took time: keep them
        import tempfile

        fallback = Path(tempfile.mkdtemp(prefix=f"{out.name}-"))
        editor.save_pretrained(fallback, include_edit_log=not args.no_edit_log)
        print(f"hf-longmem: warning: could not write {str(out)!r} ({exc}); edits saved to {fallback}", file=sys.stderr)
        out = fallback
    print(
        f"{len(stats)} edits ({config.variant}, {editor.target_module}) into {name} in {elapsed:.1f} s "
        f"({elapsed / len(stats):.2f} s/edit); saved to {out}"
    )
    if args.evaluate:
        scores = evaluate_records(model, tokenizer, records, locality_before=before, separator=config.target_separator)
        gen = "-" if scores.generalization is None else f"{scores.generalization:.3f}"
        loc = "-" if scores.locality is None else f"{scores.locality:.3f}"
        print(f"reliability {scores.reliability:.3f}  generalization {gen}  locality {loc}  (T = {len(records)})")
    return 0
