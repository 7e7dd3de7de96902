"""Tool calls inside tree rollouts: GRPOTrainer's tool semantics as the sampler's `ToolRunner`.

TRL runs tools in `GRPOTrainer._tool_call_loop`, once per completion and turn. In a tree, a turn that ends with tool
calls ends its node; `ToolExecutor.run` executes the calls once for that node, and every leaf below it shares the
result. What a call returns, and what a failure looks like, is what TRL does:

- a call's result becomes a `{"role": "tool", "name": ..., "content": str(result)}` message, and the tool messages
  of a turn are tokenized by TRL's own `_get_tool_suffix_ids`;
- a tool that raises, is not found, or is not a function call gives `{"error": "..."}` as its result and counts as a
  failure; a malformed call is not a call at all (TRL's `parse_response` falls back to plain text), so the path ends;
- in addition, a call that runs longer than `timeout` seconds fails the same way (TRL has no limit).

Environments (`environment_factory`) are stateful per path: the runner never mutates an instance it handed out.
Before a path's calls run, its instance is deep-copied (`"copy"`) or rebuilt from the factory, reset and replayed
(`"replay"`), so every node keeps the environment as it was after its own calls, for all the paths that branch from
it (fallback re-branching included).
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .sampling import ToolTurn

ENVIRONMENT_BRANCHING = ("copy", "replay")


class ToolTimeoutError(TimeoutError):
    """A tool call ran past `tree_tool_timeout`."""


class EnvironmentBranchingError(RuntimeError):
    """An environment could not be given to a branching path; the message says what to set."""


@dataclass(frozen=True)
class EnvironmentState:
    """A path's environment: the instance, and the calls it has run since `reset` as (call, failed) (for `"replay"`)."""

    instance: object
    history: tuple = ()


@dataclass
class PromptTools:
    """The tools one prompt's tree may call, as TRL set them up for the example.

    Attributes:
        tools: standalone tools (functions, sync or async).
        schema: the tools the prompt was rendered with, for `parse_response` (TRL's per-prompt tool list).
        environment: the example's environment instance, already `reset` by TRL; None without `environment_factory`.
        factory: builds a new instance of that environment (`"replay"`).
        reset_kwargs: what TRL passed to `reset` (`"replay"`).
    """

    tools: list[Callable]
    schema: list
    environment: object = None
    factory: Callable | None = None
    reset_kwargs: dict = field(default_factory=dict)


@dataclass
class TurnRecord:
    """A turn that ran tools, as TRL's conversation has it: the assistant message and the tool messages."""

    assistant: dict
    tool_messages: list[dict]


def environment_methods(environment) -> list[Callable]:
    """An environment's tools, as TRL lists them: its public methods other than `reset` and `get_reward`."""
    return [
        getattr(environment, name)
        for name, _ in inspect.getmembers(type(environment), predicate=inspect.isfunction)
        if name not in ("reset", "get_reward") and not name.startswith("_")
    ]


def call_with_timeout(function: Callable, arguments: dict, timeout: float | None, async_loop=None):
    """`function(**arguments)`, failing with `ToolTimeoutError` after `timeout` seconds (None: no limit).

    Async tools run on `async_loop` (TRL's daemon event loop) and are cancelled on timeout. A sync tool runs in a
    daemon thread: Python cannot stop it, but the rollout goes on and the process can still exit.
    """
    if inspect.iscoroutinefunction(function):
        if async_loop is None:
            raise RuntimeError("An async tool needs TRL's event loop, which this trainer did not start.")
        future = asyncio.run_coroutine_threadsafe(function(**arguments), async_loop)
        try:
            return future.result(timeout=timeout)
        except TimeoutError as error:
            future.cancel()
            raise ToolTimeoutError(f"timed out after {timeout:g} s") from error
    if timeout is None:
        return function(**arguments)
    outcome = {}

    def target():
        try:
            outcome["result"] = function(**arguments)
        except BaseException as error:  # handed to the caller, which reports it as TRL does
            outcome["error"] = error

    worker = threading.Thread(target=target, name=f"tool-{getattr(function, '__name__', 'call')}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise ToolTimeoutError(f"timed out after {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class ToolExecutor:
    """The sampler's `ToolRunner` for one batch of prompts, with TRL's tool semantics.

    Args:
        prompts: one `PromptTools` per tree (prompt index).
        parse: `parse(ids, prefix, schema) -> message`, TRL's `parse_response` with the trainer's tokenizer.
        suffix_ids: `suffix_ids(tool_messages) -> token ids`, TRL's `_get_tool_suffix_ids`.
        timeout: seconds per call, or None.
        environment_branching: `"copy"` or `"replay"` (see the module docstring).
        async_loop: TRL's daemon event loop, for async tools.
    """

    def __init__(
        self,
        prompts: Sequence[PromptTools],
        parse: Callable,
        suffix_ids: Callable,
        *,
        timeout: float | None = None,
        environment_branching: str = "copy",
        async_loop=None,
    ):
        if environment_branching not in ENVIRONMENT_BRANCHING:
            raise ValueError(
                f"Unknown environment_branching {environment_branching!r}. Choose one of: "
                f"{', '.join(ENVIRONMENT_BRANCHING)}."
            )
        self.prompts = list(prompts)
        self.parse = parse
        self.suffix_ids = suffix_ids
        self.timeout = timeout
        self.environment_branching = environment_branching
        self.async_loop = async_loop
        self.timeouts = 0  # calls that ran past `timeout`

    # ------------------------------------------------------------------------------------------------ ToolRunner

    def root_state(self, prompt_index: int) -> EnvironmentState | None:
        environment = self.prompts[prompt_index].environment
        return None if environment is None else EnvironmentState(environment)

    def find_calls(self, prompt_index: int, context_ids: Sequence[int], turn_ids: Sequence[int]) -> dict | None:
        message = self.parse(list(turn_ids), list(context_ids), self.prompts[prompt_index].schema)
        return message if message.get("tool_calls") else None

    def run(self, prompt_index: int, state: EnvironmentState | None, message: dict) -> ToolTurn:
        prompt = self.prompts[prompt_index]
        state = None if state is None else self._branch(prompt, state)
        functions = {tool.__name__: tool for tool in prompt.tools}
        if state is not None:
            functions.update({method.__name__: method for method in environment_methods(state.instance)})
        tool_messages, failures, executed = [], 0, []
        for tool_call in message["tool_calls"]:
            name, result, failed = self._call(tool_call, functions)
            failures += failed
            if tool_call.get("type") == "function":
                executed.append((tool_call["function"], failed))
            content = result if isinstance(result, list) else str(result)
            if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image" for p in content):
                raise ValueError(
                    f"The tool '{name}' returned an image; tree rollouts are text-only. Return text from the tool, or "
                    "set tree_sampling=False to train vision-language tool use as GRPOTrainer does."
                )
            tool_messages.append({"role": "tool", "name": name, "content": content})
        if state is not None:
            state = EnvironmentState(state.instance, state.history + tuple(executed))
        return ToolTurn(
            token_ids=list(self.suffix_ids(tool_messages)),
            calls=len(message["tool_calls"]),
            failures=failures,
            state=state,
            record=TurnRecord(message, tool_messages),
        )

    # ----------------------------------------------------------------------------------------------------- parts

    def _call(self, tool_call: dict, functions: dict) -> tuple[str, object, bool]:
        """(name, result, failed) of one call, as `GRPOTrainer._tool_call_loop` reports it."""
        if tool_call.get("type") != "function":
            name = tool_call.get("name", "unknown")
            return name, {"error": f"Unsupported tool call type: {tool_call.get('type')}"}, True
        function = tool_call["function"]
        name = function["name"]
        try:
            if name not in functions:
                raise ValueError(f"Tool {name} not found.")
            return name, call_with_timeout(functions[name], function["arguments"], self.timeout, self.async_loop), False
        except ToolTimeoutError as error:
            self.timeouts += 1
            return name, {"error": f"Tool {name} {error} (tree_tool_timeout)."}, True
        except Exception as error:
            return name, {"error": str(error)}, True

    def _branch(self, prompt: PromptTools, state: EnvironmentState) -> EnvironmentState:
        """An instance of the path's environment that this path alone will mutate."""
        if self.environment_branching == "copy":
            try:
                return EnvironmentState(copy.deepcopy(state.instance), state.history)
            except Exception as error:
                raise EnvironmentBranchingError(
                    f"Tree rollouts give each branching path its own environment, but copy.deepcopy of "
                    f"{type(state.instance).__name__} raised {type(error).__name__}: {error}. Make the environment "
                    "copyable (define __deepcopy__), or set tree_environment_branching='replay' to rebuild it from "
                    "environment_factory and replay the path's tool calls."
                ) from error
        instance = prompt.factory()
        instance.reset(**prompt.reset_kwargs)
        methods = {method.__name__: method for method in environment_methods(instance)}
        for call, failed in state.history:
            if call["name"] not in methods:  # a standalone tool, or one TRL reported as "not found": no env state
                continue
            try:
                call_with_timeout(methods[call["name"]], call["arguments"], self.timeout, self.async_loop)
            except Exception as error:
                if not failed:  # the path saw it succeed: the rebuilt environment would silently differ
                    raise EnvironmentBranchingError(
                        f"Replaying {type(instance).__name__}.{call['name']}({call['arguments']}) to rebuild a "
                        f"branching path's environment raised {type(error).__name__}: {error}, where the original "
                        "call succeeded. tree_environment_branching='replay' needs a deterministic environment; use "
                        "'copy' (make it copyable) instead."
                    ) from error
        return EnvironmentState(instance, state.history)
