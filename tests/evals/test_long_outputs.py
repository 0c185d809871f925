"""LongGenBench-style, LongProc-style and ALR²-style generators and their scoring."""

from __future__ import annotations

import re

import pytest

from hf_longmem.evals import alr2, longgenbench, longproc
from hf_longmem.evals.metrics import score
from hf_longmem.evals.schema import Sample, Turn
from hf_longmem.evals.vocab import build_tokenizer
from tests.evals.task_fixtures import bpe_tokenizer


@pytest.fixture(scope="module")
def word_tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def bpe_tok():
    return bpe_tokenizer()


# ---------------------------------------------------------------------------------------------------------------------
# LongGenBench-style
# ---------------------------------------------------------------------------------------------------------------------


def test_long_generation_questions_and_answers(bpe_tok):
    (s,) = longgenbench.long_generation(bpe_tok, 800, 1, seed=3)
    questions = re.findall(r"Question_(\d+): ([^\n]+)", s.context)
    assert [int(i) for i, _ in questions] == list(range(1, s.meta["num_questions"] + 1))
    for (_, text), answer in zip(questions, s.turns[0].answers):
        a, b = (int(x) for x in re.findall(r"\d+", text))
        expected = a + b if "more" in text else a - b if "gave away" in text else a * b
        assert int(answer) == expected
    capped = longgenbench.long_generation(bpe_tok, 800, 1, seed=3, max_questions=4)[0]
    assert capped.meta["num_questions"] == 4 and capped.turns[0].answers == s.turns[0].answers[:4]


def test_parse_answers_and_accuracy_by_index():
    text = " 3 + 4 = 7. The answer is 7. Answer_2: 10 - 2 = 8 Answer_3: The answer is 1,200. Answer_2: 99"
    assert longgenbench.parse_answers(text, 4) == [7, 8, 1200, None]
    assert longgenbench.answer_by_index(text, ["7", "8", "5", "1"]) == 0.5
    assert score(text, ["7", "8", "1200", "1"], "answer_by_index") == 0.75
    records = [
        {"prediction": text, "answers": ["7", "8", "5"]},
        {"prediction": " The answer is 1.", "answers": ["7", "8", "5", "6"]},
    ]
    assert longgenbench.accuracy_by_index(records) == [0.5, 0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="answers"):
        longgenbench.answer_by_index(text, [])


# ---------------------------------------------------------------------------------------------------------------------
# LongProc-style path traversal
# ---------------------------------------------------------------------------------------------------------------------


def _graph(context):
    edges = re.findall(r"You can travel from (\w+) to (\w+) by (\w+)\.", context.split("[PROBLEM]")[1])
    return {src: (dst, transit) for src, dst, transit in edges}, len(edges)


@pytest.mark.parametrize("num_steps", [1, 6])
def test_route_is_the_unique_walk_of_the_graph(num_steps, bpe_tok):
    for s in longproc.path_traversal(bpe_tok, 3000, 2, num_steps=num_steps):
        graph, num_lines = _graph(s.context)
        assert num_lines == len(graph) == s.meta["num_cities"]  # one outgoing connection per city
        src, dst = re.search(r"route from (\w+) to (\w+) based", s.turns[0].query).groups()
        walk, city = [], src
        while city != dst:
            nxt, transit = graph[city]
            walk.append(f"From {city}, take a {transit} to {nxt}.")
            city = nxt
            assert len(walk) <= num_steps
        assert "\n".join(walk) == s.turns[0].answers[0]


def test_route_metrics():
    reference = ["From A, take a bus to B.\nFrom B, take a train to C.\nFrom C, take a ferry to D."]
    assert longproc.route_exact("\n" + reference[0] + "\n</Route> done", reference) == 1.0
    assert longproc.route_exact("<Route>\n" + reference[0] + "\n</Route>", reference) == 1.0
    wrong = "From A, take a bus to B.\nFrom B, take a plane to C.\nFrom C, take a ferry to D."
    assert longproc.route_exact(wrong, reference) == 0.0
    assert longproc.route_prefix(wrong, reference) == pytest.approx(1 / 3)
    assert longproc.route_prefix("From A, take a bus to B.", reference) == pytest.approx(1 / 3)
    assert longproc.route_prefix("nothing", reference) == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# ALR²-style
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_hops", [1, 3])
def test_multihop_world_is_consistent(num_hops, bpe_tok):
    for s in alr2.multihop_facts(bpe_tok, 900, 2, num_hops=num_hops):
        sentences = re.findall(r"[^.\n]+\.", s.context.split("\n", 1)[1])
        subjects = [
            re.match(r" ?(.+?) (?:was born in|is located in|is part of|belongs to)", x).group(1) for x in sentences
        ]
        assert len(subjects) == len(set(subjects))  # every entity has one fact of its kind: one answer
        assert all(f in s.context for f in s.meta["supporting_facts"]) and len(s.meta["supporting_facts"]) == num_hops
        assert s.meta["supporting_facts"][-1].rstrip(".").endswith(s.turns[0].answers[0])


def test_retrieval_scores():
    context = "Intro. Ravi Oak was born in Lantern. Lantern is located in Falcon. Mia Elm was born in Cobalt."
    supporting = ["Ravi Oak was born in Lantern.", "Lantern is located in Falcon."]
    good = " Ravi Oak was born in Lantern.\nLantern is located in Falcon.\nAnswer: Falcon."
    assert alr2.alr2_answer(good, ["Falcon"]) == 1.0
    assert alr2.retrieval_scores(good, supporting, context) == {
        "retrieval_precision": 1.0,
        "retrieval_recall": 1.0,
        "hallucination_rate": 0.0,
        "num_retrieved": 2.0,
    }
    bad = " Ravi Oak was born in Lantern.\nLantern is located in Paris.\nMia Elm was born in Cobalt.\nAnswer: Paris"
    scores = alr2.retrieval_scores(bad, supporting, context)
    assert scores["retrieval_precision"] == pytest.approx(1 / 3) and scores["retrieval_recall"] == 0.5
    assert scores["hallucination_rate"] == pytest.approx(1 / 3) and alr2.alr2_answer(bad, ["Falcon"]) == 0.0
    assert alr2.retrieval_scores(" no answer", supporting, context)["hallucination_rate"] == 1.0
    sample = Sample("x", "multihop_facts", context, [Turn("\nQ", ["Falcon"])], {"supporting_facts": supporting})
    records = [{"sample_id": "x", "prediction": good, "answers": ["Falcon"]}]
    assert alr2.alr2_report(records, [sample]) == {"answer": 1.0, **alr2.retrieval_scores(good, supporting, context)}


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda t: longgenbench.long_generation(t, 10, 1), "too short"),
        (lambda t: longgenbench.long_generation(t, 500, 1, max_questions=0), "max_questions"),
        (lambda t: longproc.path_traversal(t, 3000, 1, num_steps=0), "num_steps"),
        (lambda t: longproc.path_traversal(t, 100, 1), "too short"),
        (lambda t: alr2.multihop_facts(t, 500, 1, num_hops=5), "num_hops"),
    ],
)
def test_bad_arguments(call, match, word_tok):
    with pytest.raises(ValueError, match=match):
        call(word_tok)


def test_kl_by_index_is_zero_for_full_and_positive_when_evicting():
    from tests.helpers.tiny_models import tiny_model
    from tests.helpers.tiny_tokenizer import tiny_tokenizer

    model, tok = tiny_model("llama_gqa", "sdpa"), tiny_tokenizer()
    (s,) = longgenbench.long_generation(tok, 500, 1, max_questions=3)
    answers = s.turns[0].answers
    assert len(answers) >= 2 and s.meta["num_questions"] == len(answers)
    assert longgenbench.parse_answers(longgenbench.gold_response(answers), len(answers)) == [int(a) for a in answers]
    full = longgenbench.kl_by_index(model, tok, s, "full")
    assert len(full) == len(answers) and max(full) < 1e-6
    small = longgenbench.kl_by_index(model, tok, s, "streaming", {"budget": 32})
    assert len(small) == len(answers) and min(small) > 0
