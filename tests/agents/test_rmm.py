"""RMMPolicy: the reranker's REINFORCE update rule, citation rewards, prospective reflection (add / merge)."""

from __future__ import annotations

import pytest
import torch

from hf_longmem.agents import MemoryStore
from hf_longmem.agents.llm import FunctionLLM
from hf_longmem.agents.rmm import (
    CitationReranker,
    RMMPolicy,
    bracket_citations,
    overlap_citations,
    parse_update_actions,
)


def test_update_rule_equals_the_closed_form_reinforce_gradient():
    """``W += eta * sum_i (R_i - b) grad log p_i`` with ``p = softmax((s + g) / tau)``, ``s_j = m'_j . q'``:
    ``d log p_i / d s_j = (delta_ij - p_j) / tau``, ``ds_j/dW_q = m'_j q^T``, ``ds_j/dW_m = q' m_j^T``."""
    torch.manual_seed(0)
    dim, k, tau, eta, b = 6, 5, 0.7, 0.05, 0.5
    rr = CitationReranker(dim, temperature=tau, learning_rate=eta, baseline=b)
    rr.w_q = 0.1 * torch.randn(dim, dim)
    rr.w_m = 0.1 * torch.randn(dim, dim)
    w_q0, w_m0 = rr.w_q.clone(), rr.w_m.clone()
    q, m, noise = torch.randn(dim), torch.randn(k, dim), torch.randn(k)
    chosen, rewards = [3, 1], [1.0, -1.0]

    qp = q + w_q0 @ q
    mp = m + m @ w_m0.T
    p = torch.softmax((mp @ qp + noise) / tau, dim=0)
    ds = torch.zeros(k)  # sum_i (R_i - b) d log p_i / d s
    for i, r in zip(chosen, rewards):
        ds += (r - b) * (torch.nn.functional.one_hot(torch.tensor(i), k).float() - p) / tau
    grad_q = torch.einsum("j,jd,e->de", ds, mp, q)
    grad_m = torch.einsum("j,d,je->de", ds, qp, m)

    rr.update(q, m, noise, chosen, rewards)
    torch.testing.assert_close(rr.w_q, w_q0 + eta * grad_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rr.w_m, w_m0 + eta * grad_m, rtol=1e-5, atol=1e-6)
    assert rr.updates == 1


def test_rewards_move_scores_toward_cited_memories():
    torch.manual_seed(1)
    rr = CitationReranker(8, learning_rate=0.5, baseline=0.0)
    q, m = torch.randn(8), torch.randn(4, 8)
    before = rr.scores(q, m)
    noise = torch.zeros(4)
    rr.update(q, m, noise, [2], [1.0])
    rr.update(q, m, noise, [0], [-1.0])
    after = rr.scores(q, m)
    p_before, p_after = torch.softmax(before / 0.5, 0), torch.softmax(after / 0.5, 0)
    assert p_after[2] > p_before[2] and p_after[0] < p_before[0]
    with pytest.raises(ValueError, match="rewards"):
        rr.update(q, m, noise, [1, 2], [1.0])


def test_untrained_reranker_is_the_embedders_cosine_and_save_load(tmp_path):
    rr = CitationReranker(4)
    q, m = torch.tensor([1.0, 0, 0, 0]), torch.eye(4)
    chosen, noise = rr.select(q, m, 2, explore=False)
    assert chosen.tolist()[0] == 0 and torch.equal(noise, torch.zeros(4))
    rr.w_q += 1.0
    rr.save(tmp_path / "rr.safetensors")
    other = CitationReranker(4)
    other.load(tmp_path / "rr.safetensors")
    assert torch.equal(other.w_q, rr.w_q)
    with pytest.raises(ValueError, match="expected"):
        CitationReranker(3).load(tmp_path / "rr.safetensors")


def test_citations():
    assert bracket_citations("Lisbon [0, 2] and [7]", ["a", "b", "c"]) == {0, 2}
    assert overlap_citations("It is 48213.", ["tiger: key 48213", "lion: key 1111"]) == {0}


def test_online_learning_uncited_memories_sink_until_the_cited_one_leads():
    """Deterministic selection (no Gumbel noise): the shown memory is rewarded -1 while the answer cannot cite it;
    the reranker walks down the list until the memory holding the answer is shown, then keeps it first (+1)."""
    store = MemoryStore()
    for i in range(6):
        store.add(f"user{i} has code {(i + 3) * 7919 % 100000:05d}", session_id=f"s{i}", timestamp=i)
        store.add(f"what is the code of user{i} asked the guard", session_id=f"d{i}", timestamp=i)
    policy = RMMPolicy(candidates=12, explore=False, learning_rate=0.1, prior_weight=0.0)
    query, code = "what is the code of user2", f"{5 * 7919 % 100000:05d}"
    trace = []
    for _ in range(20):
        (shown,) = policy.retrieve(store, query, 1, now=100)
        answer = code if code in shown.text else "no idea"
        policy.after_answer(store, query, [shown], answer, now=100)
        trace.append(answer == code)
    assert not trace[0] and trace.index(True) < 10 and all(trace[trace.index(True) :])
    assert policy.reranker.updates == 20 and policy.rewards == [1.0 if t else -1.0 for t in trace]


def test_prospective_reflection_adds_then_merges_by_supersede():
    replies = iter(
        [
            '{"extracted_memories": [{"summary": "User lives in Lisbon.", "reference": [0]}]}',
            '{"extracted_memories": [{"summary": "User moved to Porto.", "reference": [1]}]}',
            "Merge(0, User lived in Lisbon and moved to Porto.)",
            "NO_TRAIT",
        ]
    )
    llm = FunctionLLM(lambda prompt, n: next(replies))
    store, policy = MemoryStore(), RMMPolicy(llm)
    turns = [{"role": "user", "content": "I live in Lisbon"}, {"role": "assistant", "content": "Nice"}]
    (first,) = policy.reflect_session(store, turns, session_id="s1", timestamp=1)
    assert "SPEAKER_2: I live in Lisbon" in llm.calls[0][0]
    (merged,) = policy.reflect_session(store, turns, session_id="s2", timestamp=2)
    assert merged == first and "Existing memories:\n0. User lives in Lisbon." in llm.calls[2][0]
    assert store.get(first).text == "User lived in Lisbon and moved to Porto."
    assert store.get(first, as_of=1.5).text == "User lives in Lisbon."
    assert policy.reflect_session(store, turns, session_id="s3", timestamp=3) == []
    assert parse_update_actions("Add()\nMerge(1, a)\nMerge(1, b)") == (True, [(1, "b")])
    with pytest.raises(ValueError, match="llm"):
        RMMPolicy().reflect_session(store, turns, session_id="s", timestamp=1)
