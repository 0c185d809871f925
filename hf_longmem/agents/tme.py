"""TME, the Task Memory Engine (Ye, 2025, "Task Memory Engine: Spatial Memory for Robust Multi-Step LLM Agents";
biubiutomato/TME-Agent): working memory for a multi-step task as a tree of steps.

Each node (a step or sub-task) keeps the messages said about it, its parent and the steps it depends on. The prompt
for a node is built from the *active path* instead of the linear history: the messages of its ancestors (root first),
then, for each dependency, that step's own ancestors and messages, then the node's messages; each node appears once.
A correction of one field therefore reaches exactly the steps that use it, and unrelated branches stay out of the
prompt. This follows the v1 algorithm (``examples/formfilling_TEM.py``: ``extract_parentAndDependencyPrompt``),
re-implemented (the upstream code is under a non-commercial licence and is not copied); the v2 graph extensions
(intent classification, input splitting) are not implemented.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from hf_longmem.files import atomic_write_text

__all__ = ["TMEPolicy", "TaskNode"]


@dataclass
class TaskNode:
    """One step: its ``name``, ``parent`` (``None``: a root), ``dependencies`` and ``messages`` (role/content)."""

    name: str
    parent: str | None = None
    dependencies: list[str] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)
    children: list[str] = field(default_factory=list)


class TMEPolicy:
    """A task memory tree whose root-to-node path (plus dependencies) builds each step's prompt."""

    def __init__(self):
        self.nodes: dict[str, TaskNode] = {}

    def _node(self, name: Any, argument: str = "node") -> TaskNode:
        if not isinstance(name, str) or name not in self.nodes:
            raise ValueError(f"`{argument}` {name!r} is not a node of the task tree")
        return self.nodes[name]

    def add(
        self,
        node: str,
        content: str,
        *,
        parent: str | None = None,
        dependencies: list[str] | None = None,
        role: str = "user",
    ) -> TaskNode:
        """Adds ``content`` to step ``node`` (created under ``parent`` on first use); ``dependencies`` (steps that
        must exist) replace the node's dependencies when given."""
        if not isinstance(node, str) or not node:
            raise ValueError(f"`node` must be a non-empty string, got {node!r}")
        if not isinstance(content, str):
            raise ValueError(f"`content` must be a string, got {type(content).__name__}")
        if node not in self.nodes:
            if parent is not None:
                self._node(parent, "parent").children.append(node)
            self.nodes[node] = TaskNode(node, parent)
        if dependencies is not None:
            for dep in dependencies:
                self._node(dep, "dependencies")
            self.nodes[node].dependencies = list(dependencies)
        self.nodes[node].messages.append({"role": role, "content": content})
        return self.nodes[node]

    def reply(self, node: str, content: str) -> None:
        """Records the assistant's reply on step ``node``."""
        self._node(node).messages.append({"role": "assistant", "content": content})

    def _collect(self, node: TaskNode, seen: set[str], out: list[dict[str, str]]) -> None:
        chain = []
        current: TaskNode | None = node
        while current is not None:
            if current.name not in seen:
                chain.insert(0, current)
                seen.add(current.name)
            current = self.nodes.get(current.parent) if current.parent else None
        for ancestor in chain:
            if ancestor is not node:
                out.extend(ancestor.messages)
        for dep in node.dependencies:
            if dep not in seen:
                self._collect(self.nodes[dep], seen, out)
        out.extend(node.messages)

    def path_messages(self, node: str) -> list[dict[str, str]]:
        """The messages of the active path of ``node``: ancestors (root first), dependencies, then its own."""
        out: list[dict[str, str]] = []
        self._collect(self._node(node), set(), out)
        return out

    def prompt(self, node: str) -> str:
        """:meth:`path_messages` rendered one ``role: content`` line each."""
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.path_messages(node))

    def to_dict(self) -> dict[str, Any]:
        return {name: vars(n) for name, n in self.nodes.items()}

    def save(self, path: str | os.PathLike) -> None:
        """Writes the tree as JSON, atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> TMEPolicy:
        """Reads a tree written by :meth:`save` (JSON only)."""
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        tree = cls()
        for name, node in data.items():
            tree.nodes[name] = TaskNode(**node)
        return tree
