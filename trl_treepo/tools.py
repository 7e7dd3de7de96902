"""Tool calls inside tree rollouts: GRPOTrainer's tool semantics as the sampler's `ToolRunner`.

TRL runs tools in `GRPOTrainer._tool_call_loop`, once per completion and turn. In a tree, a turn that ends with tool
calls ends its node; `ToolExecutor.run` executes the calls once for that node, and every leaf below it shares the
result. What a call returns, and what a failure looks like, is what TRL does:

- a call's result becomes a `{"role": "tool", "name": ..., "content": str(result)}` message, and the tool messages
  of a turn are tokenized by TRL's own `_get_tool_suffix_ids`;
- a tool that raises, is not found, or is not a function call gives `{"error": "..."}` as its result and counts as a
  failure; a malformed call is not a call at all (TRL's `parse_response` falls back to plain text), so the path ends;
- in addition, a call that runs longer than `timeout` seconds fails the same way (TRL has no limit).

As in TRL, a turn's sync tools run first, in call order, then its async tools; their results follow that order.

Environments (`environment_factory`) are stateful per path: before a path's calls run, it gets an instance of its
own (`environments.py`: forked, copied or replayed), so every node keeps the environment as it was after its own
calls, for all the paths that branch from it (fallback re-branching included).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .environments import (  # noqa: F401 (re-exported: where users of the tool API look for them)
    ENVIRONMENT_BRANCHING,
    BranchedEnvironments,
    EnvironmentBranchingError,
    EnvironmentState,
    environment_methods,
)
from .sampling import ToolTurn


class ToolTimeoutError(TimeoutError):
    """A tool call ran past `tree_tool_timeout`."""


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
        environment_branching: `"copy"` or `"replay"` (`environments.py`).
        async_loop: TRL's daemon event loop, for async tools.

    After the rollout, `environment_of(leaf)` is the instance a leaf's rewards see, and `close()` closes every
    instance made for the paths, once the step no longer needs them.
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
        self.prompts = list(prompts)
        self.parse = parse
        self.suffix_ids = suffix_ids
        self.timeout = timeout
        self.async_loop = async_loop
        self.environments = BranchedEnvironments(environment_branching, self._call_function)
        self.timeouts = 0  # calls that ran past `timeout`

    # ------------------------------------------------------------------------------------------------ ToolRunner

    def root_state(self, prompt_index: int) -> EnvironmentState | None:
        environment = self.prompts[prompt_index].environment
        return None if environment is None else self.environments.root(environment)

    def find_calls(self, prompt_index: int, context_ids: Sequence[int], turn_ids: Sequence[int]) -> dict | None:
        message = self.parse(list(turn_ids), list(context_ids), self.prompts[prompt_index].schema)
        return message if message.get("tool_calls") else None

    def run(self, prompt_index: int, state: EnvironmentState | None, message: dict) -> ToolTurn:
        prompt = self.prompts[prompt_index]
        instance = None if state is None else self.environments.working_instance(prompt, state)
        functions = {tool.__name__: tool for tool in prompt.tools}
        if instance is not None:
            functions.update({method.__name__: method for method in environment_methods(instance)})
        tool_messages, failures, executed = [], 0, []
        for tool_call in self._in_trls_order(message["tool_calls"], functions):
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
            state = self.environments.after_calls(state, instance, tuple(executed))
        return ToolTurn(
            token_ids=list(self.suffix_ids(tool_messages)),
            calls=len(message["tool_calls"]),
            failures=failures,
            state=state,
            record=TurnRecord(message, tool_messages),
        )

    # ------------------------------------------------------------------------------------------- after the rollout

    def environment_of(self, leaf):
        """The environment instance a leaf's rewards see (`get_reward`, the `environments` reward argument)."""
        state = leaf.tool_state
        return None if state is None else self.environments.instance_of(self.prompts[leaf.prompt_index], state)

    def close(self) -> None:
        self.environments.close()

    # ----------------------------------------------------------------------------------------------------- parts

    @staticmethod
    def _in_trls_order(tool_calls: list, functions: dict) -> list:
        """A turn's calls in the order TRL runs them and appends their results: sync calls (and calls that fail at
        once: unknown tools, non-function calls) in call order, then async calls in call order."""

        def is_async(tool_call):
            function = functions.get((tool_call.get("function") or {}).get("name"))
            return tool_call.get("type") == "function" and inspect.iscoroutinefunction(function)

        return [c for c in tool_calls if not is_async(c)] + [c for c in tool_calls if is_async(c)]

    def _call_function(self, function: Callable, arguments: dict):
        return call_with_timeout(function, arguments, self.timeout, self.async_loop)

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
            return name, self._call_function(functions[name], function["arguments"]), False
        except ToolTimeoutError as error:
            self.timeouts += 1
            return name, {"error": f"Tool {name} {error} (tree_tool_timeout)."}, True
        except Exception as error:
            return name, {"error": str(error)}, True
