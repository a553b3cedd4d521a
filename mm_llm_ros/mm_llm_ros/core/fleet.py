"""Fleet mode: one llm_node (one model copy, one request engine) serving several robots.

Each robot is a namespace (`robots: [robot1, robot2]`) with its own inputs: the latest embedding per source and
the latest perception context per kind, kept in a `Robot`'s own two stores. A question asked on a robot's /ask is
answered from that robot's stores only (the engine reads the stores the job carries, `AskEngine.submit(robot=)`),
while the questions of every robot share the one batch.

The single-robot node is the same code with one `Robot` whose namespace is '' (the node's own, relative names), so
an empty `robots` list keeps the topics, services and answers of a node without fleet mode.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from mm_llm_ros.core.embedding_store import ModalityStore
from mm_llm_ros.core.errors import ConfigError

# One or more ROS name tokens separated by '/', optionally absolute ('/site_a/robot1'); no '~', no substitutions.
_NAMESPACE = re.compile(r'/?[A-Za-z][A-Za-z0-9_]*(/[A-Za-z][A-Za-z0-9_]*)*')
OWN_NAMESPACE = ''


def robot_namespaces(names: Iterable[str]) -> tuple[str, ...]:
    """The robots a node serves, validated: ('',) (the node's own namespace) for an empty list.

    Raises ConfigError naming the bad entry: an empty or malformed namespace, or one listed twice (two robots would
    share topics, and so each other's data).
    """
    names = [str(n).strip() for n in names]
    for name in names:
        if not _NAMESPACE.fullmatch(name) or '__' in name or name.endswith('_'):
            raise ConfigError(f"robots: '{name}' is not a robot namespace (ROS name tokens of letters, digits and "
                             "'_' separated by '/', e.g. robot1 or site_a/robot1)")
    normalised = [n.strip('/') for n in names]
    repeated = sorted({n for n in normalised if normalised.count(n) > 1})
    if repeated:
        raise ConfigError(f"robots: '{repeated[0]}' is listed twice")
    return tuple(names) or (OWN_NAMESPACE,)


@dataclass(eq=False)  # compared and hashed by identity: two robots are never "equal"
class Robot:
    """One robot served by llm_node: its namespace and its own inputs."""
    namespace: str = OWN_NAMESPACE
    store: ModalityStore = field(default_factory=ModalityStore)     # embeddings, by source
    contexts: ModalityStore = field(default_factory=ModalityStore)  # perception context, by kind
    dropped_embeddings: int = 0
    described_generation: int = 0  # `generation` at the last published scene description

    def topic(self, name: str) -> str:
        """A relative topic, service or action name of this robot ('ask' -> 'robot1/ask'; unchanged for '')."""
        return f"{self.namespace.rstrip('/')}/{name}" if self.namespace else name

    @property
    def label(self) -> str:
        return self.namespace.strip('/') or 'own namespace'

    @property
    def generation(self) -> int:
        """Bumps whenever an embedding or a context arrives ("anything new since the last description?")."""
        return self.store.generation + self.contexts.generation

    def ages(self) -> dict[str, float]:
        return self.store.ages() | self.contexts.ages()
