"""The plain objects that cross the sampler ↔ engine boundary, in the spirit of vLLM's `SamplingParams`.

`TreeSamplingParams` carries every knob of TreePO's tree rollout (paper §2, spec §2). Engines receive plain
`SegmentRequest`s (token ids, number of branches, max tokens) and return plain `SegmentOutput`s (token ids,
logprobs, finish reason). Nothing here knows about TRL, torch or any engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

DIVERGENCE_POLICIES = ("fixed_avg", "low_prob", "high_prob")
FALLBACK_POLICIES = ("random_cut", "restart", "none")
ANSWER_STOP_RULES = ("boxed_and_eos", "boxed", "none")
REPETITION_PRIORITIES = ("first", "last")


@dataclass(frozen=True)
class TreeSamplingParams:
    """Knobs of one tree rollout. Paper names and defaults are given per field; see `TreePOConfig` for the long form.

    Attributes:
        width: w, the number of leaves (trajectories) grown per prompt. TRL's `num_generations`. Paper: 16.
        segment_length: l, tokens decoded per node. Paper: 512.
        max_depth: d, maximum number of segments per trajectory. Paper: 14.
        branching_factor: b, copies made of every continuing path per step. Paper: 2.
        max_response_length: token cap of a trajectory. Must equal `segment_length * max_depth`.
        initial_divergence: paths a root starts with. `None` means b ("Fixed Init Divergence").
        initial_divergence_max: when set, the root fork is drawn uniformly per prompt from
            `[initial_divergence, initial_divergence_max]` ("More Init Divergence", paper: 2..8).
        divergence_policy: how a prompt's branching budget is split over its live paths: `fixed_avg` (paper),
            `low_prob` or `high_prob` (§4.4 "Low/High Prob Encourage": softmax over last-segment mean log-prob).
        divergence_temperature: softmax temperature of the log-prob policies. Paper §4.4: 2.0.
        fallback_policy: `random_cut` (paper: re-branch at a random segment boundary of a leaf that ended with an
            answer or EOS), `restart` (re-branch from the prompt), or `none` (prompts may end with fewer leaves).
        answer_stop: `boxed_and_eos` (paper script: a `\\boxed{}` answer and EOS), `boxed` (stop as soon as the
            response holds a complete `\\boxed{}` answer) or `none`. EOS always stops a path.
        repetition_window: characters per repetition window. Paper code: 32. 0 disables the check.
        repetition_min_count: a window seen this many times in one segment stops the path. Paper code: 8.
        repetition_priority: `first` checks repetition before answer/EOS (the paper script's intent), `last` after
            the length and depth checks (what the released code actually ran).
        eos_token_ids: token ids that end a trajectory.
        stop_strings: texts that end a trajectory where they appear, also across a segment boundary (vLLM's `stop`,
            transformers' `stop_strings`). The path keeps the tokens up to the one that completes the string, and
            finishes like an EOS. Needs the sampler's `decode`.
        seed: seed of the sampler's own random choices (root fork sizes, fallback picks and cuts).
        max_tool_turns: tool-calling turns one path may run (TRL's `max_tool_calling_iterations`); `None` means no
            limit. Only read when the rollout is given a `ToolRunner`.
    """

    width: int
    segment_length: int
    max_depth: int
    branching_factor: int = 2
    max_response_length: int | None = None
    initial_divergence: int | None = None
    initial_divergence_max: int | None = None
    divergence_policy: str = "fixed_avg"
    divergence_temperature: float = 2.0
    fallback_policy: str = "random_cut"
    answer_stop: str = "boxed_and_eos"
    repetition_window: int = 32
    repetition_min_count: int = 8
    repetition_priority: str = "first"
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    stop_strings: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0
    max_tool_turns: int | None = None

    def __post_init__(self):
        for name in ("width", "segment_length", "max_depth", "branching_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TreeSamplingParams.{name} must be a positive integer, got {getattr(self, name)}.")
        if self.max_response_length is None:
            object.__setattr__(self, "max_response_length", self.segment_length * self.max_depth)
        if self.max_response_length != self.segment_length * self.max_depth:
            raise ValueError(
                f"max_response_length ({self.max_response_length}) must equal segment_length × max_depth "
                f"({self.segment_length} × {self.max_depth} = {self.segment_length * self.max_depth})."
            )
        _check_choice("divergence_policy", self.divergence_policy, DIVERGENCE_POLICIES)
        _check_choice("fallback_policy", self.fallback_policy, FALLBACK_POLICIES)
        _check_choice("answer_stop", self.answer_stop, ANSWER_STOP_RULES)
        _check_choice("repetition_priority", self.repetition_priority, REPETITION_PRIORITIES)
        first = self.first_divergence_range
        if first[0] < 1 or first[1] < first[0]:
            raise ValueError(
                f"The initial divergence range must satisfy 1 <= min <= max, got {first[0]}..{first[1]}."
            )
        if self.divergence_temperature <= 0:
            raise ValueError(f"divergence_temperature must be positive, got {self.divergence_temperature}.")
        if self.repetition_window < 0 or self.repetition_min_count < 0:
            raise ValueError("repetition_window and repetition_min_count must be >= 0 (0 disables the check).")
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if any(not isinstance(stop, str) or not stop for stop in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}.")
        if self.max_tool_turns is not None and self.max_tool_turns < 0:
            raise ValueError(f"max_tool_turns must be >= 0 or None (no limit), got {self.max_tool_turns}.")

    @property
    def first_divergence_range(self) -> tuple[int, int]:
        low = self.branching_factor if self.initial_divergence is None else self.initial_divergence
        high = low if self.initial_divergence_max is None else self.initial_divergence_max
        return low, high

    @property
    def needs_logprobs(self) -> bool:
        return self.divergence_policy != "fixed_avg"


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}. Choose one of: {', '.join(choices)}.")


@dataclass(frozen=True)
class SegmentRequest:
    """Decode `num_branches` independent continuations of `token_ids` (prompt + response so far), `max_tokens` each.

    `path_budget` is what the path may still decode in all, this segment included (`max_tokens` when unset). An engine
    that keeps a branch decoding past its segment (`SegmentOutput.stream`) decodes at most that many. `continues`
    names such a running branch whose tokens past the last segment are this request's first branch: the first child
    of a path that was not cut goes on decoding in its parent's engine request instead of starting a new one.
    """

    token_ids: Sequence[int]
    num_branches: int
    max_tokens: int
    path_budget: int | None = None
    continues: object = None  # a `SegmentOutput.stream` of the previous level, or None


@dataclass
class SegmentOutput:
    """One decoded continuation. `finish_reason` is `"stop"` (EOS or a stop condition) or `"length"` (max_tokens).

    `stream` is set when the engine keeps decoding this branch past the segment: a handle that the next level's
    request for the path's first child passes back as `SegmentRequest.continues`. A handle that no request continues
    is released (`StreamingSegmentEngine.release`), and the engine stops decoding it.
    """

    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: Literal["stop", "length"]
    stream: object = None


class SegmentEngine(Protocol):
    """What the tree sampler needs from a backend: one batched call, here for one level of every live tree.

    `generate` returns, for every request in order, a list of `num_branches` outputs.
    """

    def generate(self, requests: Sequence[SegmentRequest]) -> list[list[SegmentOutput]]: ...


class StreamingSegmentEngine(Protocol):
    """A backend that decodes groups of requests as they come, so that each tree waits only for its own level.

    `submit` queues one tree level (a group of requests) and returns a ticket at once; `wait` blocks until at least
    one queued group is fully decoded and returns `(ticket, outputs)` for every group that is, `outputs` in the
    group's request order as `SegmentEngine.generate` gives them. Groups may finish in any order. `close` drops
    whatever is still queued (a rollout that failed midway must not leave requests in the engine).

    An engine whose outputs carry `stream` handles also has `release(streams)`: stop decoding branches that no
    request will continue (their paths stopped). An engine that counts its decoding steps has an int `steps`.
    """

    def submit(self, requests: Sequence[SegmentRequest]) -> int: ...

    def wait(self) -> list[tuple[int, list[list[SegmentOutput]]]]: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------ tool calls


@dataclass
class ToolTurn:
    """What running the tool calls of one assistant turn gave a path.

    Attributes:
        token_ids: the tokens appended after the turn (tool responses and the next turn's header). They are context,
            not policy output: the path's tool mask is 0 on them, and they never count as decoded tokens.
        calls: tool calls executed (failures included).
        failures: calls that raised, timed out, named no known tool or were not function calls.
        state: the path's tool state after the calls (its environment instance); the runner never mutates a state
            it handed out, so a node's state stays valid for every path that branches from it.
        record: whatever the runner needs later to describe the turn (for TRL, the parsed messages).
    """

    token_ids: list[int]
    calls: int
    failures: int
    state: object = None
    record: object = None


class ToolRunner(Protocol):
    """What the tree sampler needs to grow trees through tool calls (multi-turn rollouts).

    A path whose segment ends its turn (EOS or a stop condition) asks `find_calls` whether the turn called tools. If
    it did, `run` executes the calls once, for the node, and the result tokens are appended to that node: every leaf
    below shares one execution, and the children branch after the result.
    """

    def root_state(self, prompt_index: int) -> object:
        """The tool state (environment) a prompt's tree starts from; `None` for stateless tools."""
        ...

    def find_calls(self, prompt_index: int, context_ids: Sequence[int], turn_ids: Sequence[int]) -> object | None:
        """The tool calls of the turn `turn_ids` (which follows `context_ids`: prompt and earlier turns), or None."""
        ...

    def run(self, prompt_index: int, state: object, calls: object) -> ToolTurn:
        """Execute `calls` on a path whose tool state is `state`, without mutating `state`."""
        ...
