"""LongProc-style procedural generation (Ye et al., 2025, "LongProc: Benchmarking long-context language models on
long procedural generation"): path traversal over a generated graph, scored exactly on the long output.

Each city has one one-way connection to another city; the model must write the unique route from a source city to
a destination, one step per line, between ``<Route>`` tags. The prompt is LongProc's ``path_traversal`` prompt
(princeton-pli/LongProc ``data/path_traversal/prompts.yaml``, its worked example included) and the scoring is its
``eval_path_traversal``: ``"route_exact"`` (the whole route, 1 or 0) and ``"route_prefix"`` (the fraction of route
lines right before the first wrong one).

Deviations, and why:

- City names are capitalised words of :data:`hf_longmem.evals.ruler.WORDS` (LongProc: real city names); the number
  of cities is fitted to ``length`` tokens (LongProc: fixed sets at 0.5k/2k/8k output tokens); the route has
  ``num_steps`` steps.
- The query ends with ``"<Route>"`` so that the output starts with the first step (the prediction may still
  repeat the tag; text inside the tags is used when present).
- ``"route_prefix"`` counts the lines before the first mismatch; LongProc's loop also counts the mismatching line
  (``i += 1`` after ``break``), which gives 1/n to an answer whose first line is wrong.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

from hf_longmem.validation import check_int

from .metrics import METRICS
from .ruler import WORDS, fit_prompt, known_words
from .schema import Sample, Turn
from .tasks import _check_common, _max_new_tokens, register_task

TASK_PROMPT = (
    "[TASK]\nIn a completely hypothetical world, there are a number of cities. Each city has a one-way connection to "
    "only one other city via a specific transit method (bus, train, plane, or ferry). Your task is to provide a route "
    "from a city to another city. You should follow the specific instruction provided later and output the route "
    "following the format provided in the instruction.\n\n\n"
    "[IMPORTANT NOTES]\n- All connections are one-way. If city A is connected to city B, you can travel from A to B, "
    "but not the other way around.\n- Because each city is connected to only one other city, so there's only one "
    "possible route. To find the route, you can simply start from the starting city, identify the next city it's "
    "connected to, and repeat the process until you reach the destination city.\n- Please follow the exact format "
    "specified below when outputting the route.\n\n\n"
    "[OUTPUT FORMAT]\nPlease mark the route with <Route> and </Route> tags. The route should be in the following "
    "format, where one line is one step of the route:\n<Route>\nFrom <CITY_NAME>, take a <TRANSIT_METHOD> to "
    "<CITY_NAME>.\n...\nFrom <CITY_NAME>, take a <TRANSIT_METHOD> to <CITY_NAME>.\n</Route>\n\n\n"
    "[EXAMPLE]\nIn a hypothetical world, there are a number of cities. Each city has a one-way connection to only one "
    "other city via a specific transit method. The details of the cities are as follows:\n"
    "Fort Worth is a lively city. You can travel from Fort Worth to Manchester by ferry.\n"
    "Leeds is a lively city. You can travel from Leeds to London by bus.\n"
    "Manchester is a lively city. You can travel from Manchester to Indianapolis by plane.\n"
    "Houston is a lively city. You can travel from Houston to London by ferry.\n"
    "Charlotte is a lively city. You can travel from Charlotte to Charlotte by bus.\n"
    "London is a lively city. You can travel from London to San Antonio by train.\n"
    "San Antonio is a lively city. You can travel from San Antonio to Kitchener by train.\n"
    "Seattle is a lively city. You can travel from Seattle to London by train.\n"
    "Indianapolis is a lively city. You can travel from Indianapolis to Houston by ferry.\n\n"
    "Now find the route from Manchester to Kitchener based on the information above.\n\n"
    "<Route>\nFrom Manchester, take a plane to Indianapolis.\nFrom Indianapolis, take a ferry to Houston.\n"
    "From Houston, take a ferry to London.\nFrom London, take a train to San Antonio.\n"
    "From San Antonio, take a train to Kitchener.\n</Route>\n\n\n[PROBLEM]\n"
    "In a hypothetical world, there are a number of cities. Each city has a one-way connection to only one other "
    "city via a specific transit method. The details of the cities are as follows:\n"
)
CITY_LINE = "{src} is a lively city. You can travel from {src} to {dst} by {transit}."
STEP_LINE = "From {src}, take a {transit} to {dst}."
QUERY = (
    "\n\nNow find the route from {src} to {dst} based on the information above. Some reminders:\n"
    "- All connections are one-way. You can solve the problem by iteratively finding the next city to travel to "
    "until you reach the destination city.\n"
    "- Follow the specific format for the route output. Mark the route with <Route> and </Route> tags.\n<Route>"
)
TRANSITS = ("bus", "train", "plane", "ferry")
_ROUTE = re.compile(r"<Route>(.*?)(?:</Route>|$)", re.DOTALL)


def extract_route(prediction: str) -> list[str]:
    """The route lines of a prediction: the text inside ``<Route>`` tags when present, else up to ``</Route>``."""
    match = _ROUTE.search(prediction)
    text = match.group(1) if match else prediction.split("</Route>")[0]
    return [line.strip() for line in text.strip().splitlines() if line.strip()]


def route_exact(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the predicted route equals the reference route (``answers[0]``) line for line."""
    return float(extract_route(prediction) == extract_route(answers[0]))


def route_prefix(prediction: str, answers: Sequence[str]) -> float:
    """The fraction of reference route lines matched before the first wrong (or missing) line."""
    predicted, reference = extract_route(prediction), extract_route(answers[0])
    right = 0
    for got, want in zip(predicted, reference):
        if got != want:
            break
        right += 1
    return right / len(reference) if reference else float(not predicted)


METRICS["route_exact"] = route_exact
METRICS["route_prefix"] = route_prefix


def _cities(tokenizer: Any) -> list[str]:
    words = known_words(tokenizer, [w.capitalize() for w in WORDS])
    return words if len(words) >= 8 else [w.capitalize() for w in WORDS]


@register_task("path_traversal", metric="route_exact")
def path_traversal(tokenizer: Any, length: int, num_samples: int, seed: int = 0, *, num_steps: int = 6) -> list[Sample]:
    """LongProc ``path_traversal``: write the ``num_steps``-step route between two cities of a generated graph.

    Args:
        tokenizer, length, num_samples, seed: as in :func:`hf_longmem.evals.tasks.passkey`; the number of cities
            (one line each) is fitted to ``length``.
        num_steps: steps of the route (the output has this many lines).

    Returns:
        Single-turn samples; ``answers[0]`` is the route, one ``"From X, take a T to Y."`` line per step
        (``"route_exact"`` metric; ``"route_prefix"`` gives partial credit).
    """
    _check_common(tokenizer, length, num_samples, seed)
    names = _cities(tokenizer)
    check_int("num_steps", num_steps, low=1, high=len(names) - 1)
    samples = []
    for index in range(num_samples):
        rng = random.Random(f"path_traversal:{seed}:{index}")
        order = rng.sample(names, len(names))
        route = order[: num_steps + 1]
        transit = {city: rng.choice(TRANSITS) for city in order}
        # Every city has one outgoing connection: along the route, else to a random other city (the destination
        # points anywhere, so the route from the source is unique and ends at the destination).
        target = {src: dst for src, dst in zip(route, route[1:])}
        for city in order[num_steps:]:
            target[city] = rng.choice([c for c in order if c != city])
        lines = {city: CITY_LINE.format(src=city, dst=target[city], transit=transit[city]) for city in order}
        shuffle_key = {city: rng.random() for city in order}
        query = QUERY.format(src=route[0], dst=route[-1])

        def render(n: int, order: list[str] = order, lines: dict = lines, key: dict = shuffle_key) -> str:
            shown = sorted(order[: num_steps + 1 + n], key=key.__getitem__)  # the route's cities, then n others
            return TASK_PROMPT + "\n".join(lines[c] for c in shown)

        limit = len(names) - num_steps - 1
        extra, num_tokens = fit_prompt(
            lambda n, render=render, query=query: (render(n), query), tokenizer, length, limit=limit
        )
        reference = "\n".join(
            STEP_LINE.format(src=src, transit=transit[src], dst=dst) for src, dst in zip(route, route[1:])
        )
        turn = Turn(
            query=query, answers=[reference], max_new_tokens=_max_new_tokens(tokenizer, reference + "\n</Route>")
        )
        meta = {
            "length": length,
            "num_tokens": num_tokens,
            "num_cities": num_steps + 1 + extra,
            "num_steps": num_steps,
            "seed": seed,
            "index": index,
        }
        samples.append(Sample(f"path_traversal-{seed}-{index}", "path_traversal", render(extra), [turn], meta))
    return samples
