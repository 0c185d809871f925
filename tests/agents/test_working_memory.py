"""Working-memory policies: TME's path-built prompt, HiAgent's subgoal chunks."""

from __future__ import annotations

import pytest

from hf_longmem.agents.hiagent import HiAgentPolicy
from hf_longmem.agents.llm import FunctionLLM
from hf_longmem.agents.tme import TMEPolicy


def _form() -> TMEPolicy:
    """TME's form-filling case: fields under the form, a correction, a submit step that depends on the fields."""
    tree = TMEPolicy()
    tree.add("fill", "Help me fill out a form.")
    tree.add("name", "My name is John Doe.", parent="fill")
    tree.add("email", "My email is john@example.com.", parent="fill")
    tree.add("address", "My address is Market Street.", parent="fill")
    tree.add("name", "Sorry, to correct, my name is John Smith.")
    tree.add("submit", "Repeat my information, then submit.", parent="fill", dependencies=["name", "email"])
    return tree


def test_tme_prompt_is_the_active_path_plus_dependencies():
    tree = _form()
    contents = [m["content"] for m in tree.path_messages("email")]
    assert contents == ["Help me fill out a form.", "My email is john@example.com."]  # no other branch
    contents = [m["content"] for m in tree.path_messages("submit")]
    assert contents == [
        "Help me fill out a form.",
        "My name is John Doe.",
        "Sorry, to correct, my name is John Smith.",
        "My email is john@example.com.",
        "Repeat my information, then submit.",
    ]  # root once, dependencies in order, the address branch left out
    tree.reply("submit", "Submitted.")
    assert tree.prompt("submit").endswith("user: Repeat my information, then submit.\nassistant: Submitted.")
    with pytest.raises(ValueError, match="`parent`"):
        tree.add("x", "y", parent="missing")
    with pytest.raises(ValueError, match="`dependencies`"):
        tree.add("x", "y", dependencies=["missing"])


def test_tme_dependency_cycles_terminate_and_the_tree_round_trips(tmp_path):
    tree = TMEPolicy()
    tree.add("a", "step a")
    tree.add("b", "step b", parent="a")
    tree.add("a", "again a", dependencies=["b"])
    tree.add("b", "again b", dependencies=["a"])
    assert [m["content"] for m in tree.path_messages("b")] == ["step a", "again a", "step b", "again b"]
    tree.save(tmp_path / "tree.json")
    assert TMEPolicy.load(tmp_path / "tree.json").path_messages("b") == tree.path_messages("b")


def test_hiagent_keeps_the_current_subgoal_in_full_and_summarises_finished_ones():
    llm = FunctionLLM(lambda prompt, n: " found the key in the drawer ")
    memory = HiAgentPolicy(llm)
    memory.start_subgoal("find the key")
    memory.record("open drawer", "a key is inside")
    memory.record("take key", "you hold the key")
    memory.start_subgoal("open the door")  # finishes the first subgoal
    memory.record("go to door", "the door is locked")
    prompt = memory.prompt("leave the room")
    assert "Summary: found the key in the drawer" in prompt
    assert "open drawer" not in prompt and "Action: go to door\nObservation: the door is locked" in prompt
    assert "Action: open drawer" in llm.calls[0][0] and "subgoal 'find the key'" in llm.calls[0][0]
    memory.retrieve_trajectory(0)
    assert "Action: open drawer\nObservation: a key is inside" in memory.prompt("leave the room")
    assert "open drawer" not in memory.prompt("leave the room")  # re-expanded for one prompt only
    memory.finish_subgoal()
    with pytest.raises(ValueError, match="start_subgoal"):
        memory.record("x", "y")
    with pytest.raises(ValueError, match="`index`"):
        memory.retrieve_trajectory(5)
