"""Each tree path owns its environment (agentic trees, docs/algorithm.md §8): how a branching path gets an instance
that no other path sees, and what is refused because it could not be isolated.

An `environment_factory` instance is stateful per path: a call on one branch must not show on a sibling, nor on TRL's
pooled instance of the example, which is the tree's root and is never mutated. `tree_environment_branching` picks how
a path that runs calls gets its own instance:

- `"copy"`: the parent's instance, forked. An environment that holds state outside Python (a temporary directory, a
  file, a subprocess, a socket, a remote session id) tells the trainer how to fork it by defining `fork()`, which
  returns a new instance with its own copy of that state. Without `fork()`, the instance is deep-copied, which only
  isolates Python objects: so an environment in which an open handle or an existing path is found is refused, with
  an error that says to define `fork()` (or to use `"replay"`).
- `"replay"`: a new instance from `environment_factory`, reset with the example, with the path's earlier calls
  replayed on it. The instance that ran a node's calls is kept for the first path that continues from that node, so
  along a chain each call runs once; only the other children of a branch point replay, and every replayed call is
  counted (`tree/tool_replays`).

Every instance made here is closed (its `close()` called, where it has one) when the step is done with it
(`BranchedEnvironments.close`). The instances TRL pooled are TRL's and are never closed here.
"""

from __future__ import annotations

import copy
import io
import logging
import mmap
import os
import socket
import sqlite3
import subprocess
import tempfile
import threading
import types
from dataclasses import dataclass

ENVIRONMENT_BRANCHING = ("copy", "replay")

logger = logging.getLogger(__name__)

# Objects whose state lives outside the Python object: a deep copy shares it instead of copying it.
_HANDLES = (io.IOBase, socket.socket, subprocess.Popen, tempfile.TemporaryDirectory, threading.Thread,
            sqlite3.Connection, mmap.mmap)  # fmt: skip
# Leaves of the object graph: nothing of an environment's state hides inside them.
_ATOMS = (int, float, complex, bool, bytes, type(None), type, types.ModuleType, types.FunctionType,
          types.BuiltinFunctionType, types.MethodType)  # fmt: skip


class EnvironmentBranchingError(RuntimeError):
    """An environment could not be given to a branching path; the message says what to set."""


@dataclass(frozen=True)
class EnvironmentState:
    """A node's environment: the calls run on it since `reset`, as (call, failed) in the order they ran, and, for
    `"copy"` (and the root), the instance as it stands after them, which is never mutated afterwards."""

    instance: object | None
    history: tuple = ()


def outside_state(instance, limit: int = 10_000) -> str | None:
    """Where `instance` holds state a deep copy would share (an open handle, or the path of an existing file or
    directory), as `attribute path: what`; None when its state is all Python objects. Looks at up to `limit` objects
    of its attribute graph."""
    stack, seen = [(type(instance).__name__, instance)], set()
    while stack and len(seen) < limit:
        where, value = stack.pop()
        if id(value) in seen or isinstance(value, _ATOMS):
            continue
        seen.add(id(value))
        if isinstance(value, _HANDLES):
            return f"{where} is a {type(value).__name__}"
        if isinstance(value, (str, os.PathLike)):
            path = os.fspath(value)
            if isinstance(path, str) and os.path.isabs(path) and os.path.exists(path):
                return f"{where} is the path {path!r}, which every copy would share"
            continue
        if isinstance(value, dict):
            stack += [(f"{where}[{key!r}]", item) for key, item in value.items()]
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack += [(f"{where}[{index}]", item) for index, item in enumerate(value)]
        else:
            attributes = dict(getattr(value, "__dict__", {}))
            for slot in getattr(type(value), "__slots__", ()):
                if hasattr(value, slot):
                    attributes[slot] = getattr(value, slot)
            stack += [(f"{where}.{name}", item) for name, item in attributes.items()]
    return None


def environment_methods(environment) -> list:
    """An environment's tools, as TRL lists them: its public methods other than `reset` and `get_reward`."""
    import inspect

    return [
        getattr(environment, name)
        for name, _ in inspect.getmembers(type(environment), predicate=inspect.isfunction)
        if name not in ("reset", "get_reward") and not name.startswith("_")
    ]


def _methods(instance) -> dict:
    return {method.__name__: method for method in environment_methods(instance)}


class BranchedEnvironments:
    """The instances of one rollout's paths, made with `strategy` ("copy" or "replay"), and closed by `close()`.

    `call(function, arguments)` runs one tool call (with the executor's timeout), for replays.
    """

    def __init__(self, strategy: str, call):
        if strategy not in ENVIRONMENT_BRANCHING:
            raise ValueError(
                f"Unknown environment_branching {strategy!r}. Choose one of: {', '.join(ENVIRONMENT_BRANCHING)}."
            )
        self.strategy, self._call = strategy, call
        self.replayed_calls = 0  # calls run again to rebuild an instance ("replay")
        self._created: list = []  # every instance made here, to close
        self._spares: dict[int, tuple] = {}  # id(state) -> (state, its unclaimed instance), "replay"
        self._leaf_instances: dict[int, tuple] = {}  # id(state) -> (state, the instance leaves with it see)

    def root(self, instance) -> EnvironmentState:
        return EnvironmentState(instance)

    def working_instance(self, prompt, state: EnvironmentState):
        """An instance in `state` that the caller alone will mutate."""
        if self.strategy == "copy":
            return self._fork(state.instance)
        spare = self._spares.pop(id(state), None)
        return spare[1] if spare is not None else self._rebuild(prompt, state.history)

    def after_calls(self, state: EnvironmentState, instance, executed: tuple) -> EnvironmentState:
        """The state of the node whose calls `executed` just ran on `instance` (from `working_instance(state)`)."""
        if self.strategy == "copy":
            return EnvironmentState(instance, state.history + executed)
        after = EnvironmentState(None, state.history + executed)
        self._spares[id(after)] = (after, instance)  # for the first path that continues from this node
        return after

    def instance_of(self, prompt, state: EnvironmentState):
        """The instance that the leaves whose last tool node is `state`'s see (rewards, `get_reward`)."""
        if state.instance is not None:
            return state.instance
        if id(state) not in self._leaf_instances:
            spare = self._spares.pop(id(state), None)
            instance = spare[1] if spare is not None else self._rebuild(prompt, state.history)
            self._leaf_instances[id(state)] = (state, instance)
        return self._leaf_instances[id(state)][1]

    def close(self) -> None:
        """Close every instance made for this rollout's paths (TRL's pooled instances are left alone)."""
        created, self._created = self._created, []
        self._spares.clear()
        self._leaf_instances.clear()
        for instance in created:
            close = getattr(instance, "close", None)
            if callable(close):
                try:
                    close()
                except Exception as error:  # a failing close must not take the training step down
                    logger.warning(f"Closing a branched {type(instance).__name__} raised {type(error).__name__}: "
                                   f"{error}")  # fmt: skip

    # ------------------------------------------------------------------------------------------------------- parts

    def _fork(self, instance):
        name = type(instance).__name__
        if callable(getattr(instance, "fork", None)):
            forked = instance.fork()
            if forked is instance or forked is None:
                raise EnvironmentBranchingError(f"{name}.fork() must return a new instance, not {forked!r}.")
        else:
            found = outside_state(instance)
            if found is not None:
                raise EnvironmentBranchingError(
                    f"Tree rollouts give each branching path its own environment, but {name} holds state outside "
                    f"Python ({found}): copy.deepcopy would leave it shared between sibling paths and with TRL's "
                    f"pooled instance. Define {name}.fork() returning a new instance with its own copy of that state "
                    "(if the state is read-only, `return copy.deepcopy(self)` will do), or set "
                    "tree_environment_branching='replay' to build each path's instance with environment_factory."
                )
            try:
                forked = copy.deepcopy(instance)
            except Exception as error:
                raise EnvironmentBranchingError(
                    f"Tree rollouts give each branching path its own environment, but copy.deepcopy of {name} raised "
                    f"{type(error).__name__}: {error}. Define {name}.fork() (or __deepcopy__), or set "
                    "tree_environment_branching='replay' to rebuild it from environment_factory and replay the path's "
                    "tool calls."
                ) from error
        self._created.append(forked)
        return forked

    def _rebuild(self, prompt, history: tuple):
        """A new instance from the factory, reset with the example, with `history` replayed on it."""
        instance = prompt.factory()
        self._created.append(instance)
        instance.reset(**prompt.reset_kwargs)
        methods = _methods(instance)
        for call, failed in history:
            if call["name"] not in methods:  # a standalone tool, or one TRL reported as "not found": no env state
                continue
            self.replayed_calls += 1
            try:
                self._call(methods[call["name"]], call["arguments"])
            except Exception as error:
                if not failed:  # the path saw it succeed: the rebuilt environment would silently differ
                    raise EnvironmentBranchingError(
                        f"Replaying {type(instance).__name__}.{call['name']}({call['arguments']}) to rebuild a "
                        f"branching path's environment raised {type(error).__name__}: {error}, where the original "
                        "call succeeded. tree_environment_branching='replay' needs a deterministic environment; use "
                        "'copy' (with a fork() method) instead."
                    ) from error
        return instance
