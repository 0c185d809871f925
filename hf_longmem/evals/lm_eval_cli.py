"""lm-eval's command line with the ``hf_longmem`` model registered.

    python -m hf_longmem.evals.lm_eval_cli run --model hf_longmem \\
        --model_args pretrained=PATH,cache=snapkv,budget=512 --device cpu --tasks hellaswag

lm-eval 0.4.13's ``lm_eval`` command resolves ``--model`` from its built-in table only; this entry point imports
:mod:`hf_longmem.evals.lm_eval_model` (which registers ``hf_longmem``) and then runs lm-eval's own CLI unchanged.
"""

from __future__ import annotations

import sys

from hf_longmem.evals import lm_eval_model  # noqa: F401 (registers the "hf_longmem" lm-eval model)

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI (``argv``: its arguments; default ``sys.argv[1:]``)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
