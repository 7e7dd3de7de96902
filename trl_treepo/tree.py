"""TreePO's segment-tree rollout (paper §2; spec §2), free of TRL, torch and any particular engine.

Every prompt grows a tree whose nodes are fixed-length decoding segments (`PromptTree`). A level of a tree decodes
every live path of that tree at once; `scheduling.drive_trees` decides when each tree's level goes to the engine, and
a tree never waits for another. After each of its levels:

1. each new segment is classified (§2.3): repetition, answer, EOS, length — a stopped path becomes a leaf;
2. the prompt's surviving paths share a branching budget (§2.4, with "budget transfer" from paths that just
   stopped): ``T = max(|live|, min(w - |done|, b * (|stopped now| + |live|)))``;
3. a tree left with no live path and fewer than w leaves falls back (§2.5): it re-branches, b copies at a time,
   from random segment boundaries of leaves that ended with an answer or EOS; the width still owed stays branching
   budget, so the re-grown paths branch again.

Together these give every prompt exactly w leaves (unless fallback is off). Segment j of a leaf is
``token_ids[segment_ends[j-1]:segment_ends[j]]`` and its node id is ``nodes[j]``; without tools every non-final segment
is exactly `segment_length` tokens long.

With a `ToolRunner` (multi-turn rollouts, docs/algorithm.md §8), a segment also ends where a turn ends with tool calls:
the calls run once for that node, their result tokens are appended to it (masked out of the loss), and the path stays
live, so its children branch after the result.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

from .sampling import (
    SegmentEngine,
    SegmentOutput,
    SegmentRequest,
    StreamingSegmentEngine,
    ToolRunner,
    ToolTurn,
    TreeSamplingParams,
)
from .scheduling import DriveResult, LevelTiming, drive_trees

Decode = Callable[[Sequence[int]], str]


class FinishReason(str, Enum):
    """Why a path stopped (spec §2.3).

    The released code's MAX_OUTPUT_TOKENS and MAX_INFER_STEPS are one event here: live segments are always full, and
    `max_response_length = segment_length × max_depth`, so a path reaches d segments exactly when it reaches the
    token limit. With tools, tool results count towards the token limit, as in TRL's `max_completion_length`.
    """

    ANSWER = "answer"  # a complete \boxed{} answer (with EOS under `boxed_and_eos`)
    EOS = "eos"  # the sequence ended: EOS, a stop string, or another stop condition of the engine
    LENGTH = "length"  # d segments, i.e. `max_response_length` tokens
    REPETITION = "repetition"  # a repeated text window in the last segment
    TOOL_LIMIT = "tool_limit"  # the turn called tools that were not run: `max_tool_turns` reached, or no room for
    # the result within `max_response_length` (TRL ends such a completion at that turn too)


# Paper script's `soft_boxed_and_eos`: fallback only re-branches from trajectories that ended properly.
FALLBACK_ELIGIBLE = frozenset({FinishReason.ANSWER, FinishReason.EOS})


@dataclass
class Leaf:
    """One root→leaf trajectory: the completion of one TRL row.

    `nodes[j]` identifies the node of segment j; two leaves share their first j segments exactly when they share
    `nodes[:j]`. Node ids are unique within a rollout. With tools, `tool_mask` is 0 on tool-result tokens (TRL's
    `tool_mask`), `tool_turns` holds the turns that ran tools in order as (index of the segment that ran it, turn),
    and `tool_state` is the leaf's environment.
    """

    prompt_index: int
    nodes: tuple[int, ...]
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: FinishReason
    from_fallback: bool = False
    segment_ends: tuple[int, ...] | None = None  # end offset of each segment; None: full `segment_length` segments
    tool_mask: list[int] | None = None  # None: every token is the policy's
    tool_turns: tuple[tuple[int, ToolTurn], ...] = ()
    tool_state: object = None

    @property
    def path(self) -> tuple[int, ...]:
        """The prompt id followed by one node id per segment, as `compute_tree_advantages` expects."""
        return (self.prompt_index, *self.nodes)

    @property
    def depth(self) -> int:
        return len(self.nodes)

    def segment_bounds(self, segment_length: int) -> list[tuple[int, int]]:
        """(start, end) token offsets of each segment."""
        ends = self.segment_ends
        if ends is None:
            ends = [min((j + 1) * segment_length, len(self.token_ids)) for j in range(self.depth)]
        return list(zip((0, *ends[:-1]), ends))

    @property
    def policy_tokens(self) -> int:
        """Tokens the policy decoded (tool results excluded): what TRL trains on."""
        return len(self.token_ids) if self.tool_mask is None else sum(self.tool_mask)

    @property
    def tool_calls(self) -> int:
        """Tool calls on this leaf's path: what a sequential rollout of this trajectory would have executed."""
        return sum(turn.calls for _, turn in self.tool_turns)


@dataclass
class RolloutStats:
    """Work counters of one rollout. `decoded_tokens` is what the engine generated; `leaf_tokens` what TRL trains on."""

    engine_calls: int = 0  # waits on the engine: level by level one `generate` call per depth; per tree, more
    engine_steps: int = 0  # the engine's decoding steps, where it counts them (vLLM colocate, transformers), else 0
    requests: int = 0
    branches: int = 0
    decoded_tokens: int = 0  # every token the engine sampled, those decoded ahead for paths that then stopped included
    submitted_tokens: int = 0
    leaf_tokens: int = 0
    fallback_events: int = 0
    fallback_branches: int = 0
    tool_calls: int = 0  # executed, once per tree node
    tool_failures: int = 0
    sequential_tool_calls: int = 0  # summed over the leaves' paths: what sequential rollouts would have executed
    tool_replays: int = 0  # calls run again to rebuild environments ("replay"), counted by the tool runner's owner


@dataclass
class TreeRollout:
    leaves: list[list[Leaf]]  # per prompt, in finishing order
    stats: RolloutStats = field(default_factory=RolloutStats)
    levels: list[LevelTiming] = field(default_factory=list)  # each tree level on the engine's clock, if it has one

    def flat_leaves(self) -> list[Leaf]:
        return [leaf for prompt_leaves in self.leaves for leaf in prompt_leaves]

    def rows(self, width: int) -> list[tuple[Leaf, bool]]:
        """(leaf, padded) per completion row, `width` rows per prompt in prompt order (TRL's layout).

        A prompt that ended with fewer than `width` leaves (fallback off) repeats its leaves; the repeats are marked
        `padded`, and must not train.
        """
        return [
            (prompt_leaves[j % len(prompt_leaves)], j >= len(prompt_leaves))
            for prompt_leaves in self.leaves
            for j in range(width)
        ]


@dataclass
class _Path:
    prompt_index: int
    nodes: tuple[int, ...]
    token_ids: list[int]
    logprobs: list[float] | None
    text: str
    from_fallback: bool = False
    segment_ends: tuple[int, ...] = ()
    tool_mask: list[int] | None = None
    tool_turns: tuple[tuple[int, ToolTurn], ...] = ()  # (index of the segment that ran it, turn)
    tool_state: object = None
    stream: object = None  # the engine request still decoding past this path's last segment, if any

    def leaf(self, reason: FinishReason) -> Leaf:
        return Leaf(
            self.prompt_index,
            self.nodes,
            self.token_ids,
            self.logprobs,
            reason,
            self.from_fallback,
            self.segment_ends,
            self.tool_mask,
            self.tool_turns,
            self.tool_state,
        )

    def with_tool_turn(self, turn: ToolTurn, text: str) -> _Path:
        """This path with `turn`'s result appended to its last segment, where its children will branch."""
        added = len(turn.token_ids)
        mask = [1] * len(self.token_ids) if self.tool_mask is None else self.tool_mask
        return _Path(
            self.prompt_index,
            self.nodes,
            self.token_ids + list(turn.token_ids),
            None if self.logprobs is None else self.logprobs + [0.0] * added,  # TRL's value for tool tokens
            self.text + text,
            self.from_fallback,
            (*self.segment_ends[:-1], len(self.token_ids) + added),
            mask + [0] * added,
            (*self.tool_turns, (len(self.nodes) - 1, turn)),
            turn.state,
        )

    @property
    def turn_start(self) -> int:
        """Offset where the current assistant turn began: after the last tool result."""
        return self.segment_ends[self.tool_turns[-1][0]] if self.tool_turns else 0


# ------------------------------------------------------------------------------------------------ stop rules (§2.3)


def find_boxed_answers(text: str) -> list[tuple[int, int, str]]:
    """All complete `\\boxed{...}` spans as (start, end, content), with braces matched at any nesting depth.

    The released code's regex stops at two nesting levels (spec §8.10); a brace counter has no such limit.
    """
    spans = []
    start = text.find("\\boxed{")
    while start != -1:
        depth, position = 0, start + len("\\boxed")
        while position < len(text):
            if text[position] == "{":
                depth += 1
            elif text[position] == "}":
                depth -= 1
                if depth == 0:
                    break
            position += 1
        if depth != 0:
            break  # unclosed: nothing after it can be complete either
        spans.append((start, position + 1, text[start + len("\\boxed{") : position]))
        start = text.find("\\boxed{", position + 1)
    return spans


def has_repetition(text: str, window: int, min_count: int) -> bool:
    """True when some `window`-character substring occurs at least `min_count` times (overlaps counted)."""
    if window <= 0 or min_count <= 0 or len(text) < window + min_count - 1:
        return False
    counts = Counter(text[i : i + window] for i in range(len(text) - window + 1))
    return max(counts.values()) >= min_count


# How far back into the previous text a `boxed` stop looks, so that an answer split across a segment boundary is seen.
_BOXED_LOOKBACK_CHARS = 256


def classify_segment(
    path: _Path, segment: Sequence[int], segment_text: str, ended: bool, params: TreeSamplingParams
) -> FinishReason | None:
    """Stop reason of `path`, whose last segment is `segment`; `None` keeps it live. Spec §2.3 order.

    `ended` says the engine stopped the segment itself (EOS or another stop condition). The released code skips
    index 0 when it looks for EOS (spec §2.3); here an EOS-only segment stops the path like any other.
    """
    repetition = params.repetition_window > 0 and has_repetition(
        segment_text, params.repetition_window, params.repetition_min_count
    )
    if repetition and params.repetition_priority == "first":
        return FinishReason.REPETITION
    if params.answer_stop == "boxed_and_eos" and ended and find_boxed_answers(path.text):
        return FinishReason.ANSWER
    if params.answer_stop == "boxed" and segment_text:
        tail = path.text[-(len(segment_text) + _BOXED_LOOKBACK_CHARS) :]
        boundary = len(tail) - len(segment_text)
        if any(end > boundary for _, end, _ in find_boxed_answers(tail)):
            return FinishReason.ANSWER
    if ended:
        return FinishReason.EOS
    if len(path.token_ids) >= params.max_response_length:  # without tools: exactly when d segments are reached
        return FinishReason.LENGTH
    if repetition:
        return FinishReason.REPETITION
    return None


# -------------------------------------------------------------------------------------------- branching (§2.4)


def branching_budget(num_live: int, num_stopped_now: int, num_done: int, params: TreeSamplingParams) -> int:
    """Children for one prompt this step: ``max(|live|, min(w - |done|, b (|stopped now| + |live|)))``.

    Each path that stopped this step hands its b children to its surviving siblings ("budget transfer"); the cap
    keeps ``|done| + |live| <= w``, and every live path continues at least once.
    """
    cap = max(params.width - num_done, 0)
    return max(num_live, min(cap, params.branching_factor * (num_stopped_now + num_live)))


def split_budget(total: int, scores: Sequence[float], params: TreeSamplingParams) -> list[int]:
    """Children per live path, each at least 1, summing to `total`.

    `fixed_avg` (paper): an even split, the remainder to the last path. `low_prob` / `high_prob` (§4.4): weights
    ``softmax(∓(s - min s) / τ)`` over each path's last-segment mean log-prob s, rounded by largest remainder.
    """
    n = len(scores)
    if params.divergence_policy == "fixed_avg":
        counts = [total // n] * n
        counts[-1] += total - sum(counts)
        return counts
    sign = -1.0 if params.divergence_policy == "low_prob" else 1.0
    lowest = min(scores)
    exponents = [sign * (s - lowest) / params.divergence_temperature for s in scores]
    top = max(exponents)
    weights = [math.exp(x - top) for x in exponents]
    weights = [w / sum(weights) for w in weights]
    extra = total - n
    quotas = [extra * w for w in weights]
    counts = [1 + int(q) for q in quotas]
    by_remainder = sorted(range(n), key=lambda i: (-(quotas[i] - int(quotas[i])), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _last_segment_mean_logprob(path: _Path) -> float:
    if path.logprobs is None:
        raise ValueError(
            "The low_prob/high_prob divergence policies need sampling logprobs, but the engine returned none."
        )
    start = path.segment_ends[-2] if len(path.segment_ends) > 1 else 0
    last = path.logprobs[start:]
    if path.tool_mask is not None:  # a tool result is not the policy's
        last = [lp for lp, own in zip(last, path.tool_mask[start:]) if own]
    return sum(last) / max(len(last), 1)


# --------------------------------------------------------------------------------------------- fallback (§2.5)


def _fallback_branches(
    leaves: list[Leaf], remaining: int, params: TreeSamplingParams, rng: random.Random, decode: Decode, root_state
) -> list[tuple[_Path, int]]:
    """(start path, copies) pairs of one fallback event (spec §2.5), as the released sampler queues them.

    Candidates (policy `random_cut`) are the leaves that ended with an answer or EOS, in random order. Each is used
    once, cut at a uniform random segment boundary strictly before its end (0 included: a restart from the prompt),
    and gets ``min(b, still owed)`` copies. With no candidate, or policy `restart`, one start from the prompt gets
    ``min(b, still owed)`` copies. The event does not fill the whole width: what is still owed stays branching
    budget, so the re-grown paths branch again at the next segment boundaries and keep the local subgroups that
    the advantage compares within. The copies keep the leaf's node ids up to the cut, so they also join its
    ancestor subgroups, and the tool turns (results and environment state) of the kept segments. If they all stop
    early again, the next event takes the next candidates.
    """
    prompt_index = leaves[0].prompt_index
    candidates = []
    if params.fallback_policy == "random_cut":
        candidates = [leaf for leaf in leaves if leaf.finish_reason in FALLBACK_ELIGIBLE]
        rng.shuffle(candidates)
    if not candidates:
        restart = _Path(prompt_index, (), [], [], "", True, tool_state=root_state)
        return [(restart, min(params.branching_factor, remaining))]
    branches = []
    for leaf in candidates:
        if remaining == 0:
            break
        bounds = leaf.segment_bounds(params.segment_length)
        kept_segments = len(bounds) - rng.randint(1, len(bounds))
        cut = bounds[kept_segments - 1][1] if kept_segments else 0
        kept_ids = leaf.token_ids[:cut]
        kept_turns = tuple((j, turn) for j, turn in leaf.tool_turns if j < kept_segments)
        start = _Path(
            prompt_index,
            leaf.nodes[:kept_segments],
            kept_ids,
            None if leaf.logprobs is None else leaf.logprobs[:cut],
            decode(kept_ids) if kept_ids else "",
            True,
            tuple(end for _, end in bounds[:kept_segments]),
            None if leaf.tool_mask is None else leaf.tool_mask[:cut],
            kept_turns,
            kept_turns[-1][1].state if kept_turns else root_state,
        )
        copies = min(params.branching_factor, remaining)
        branches.append((start, copies))
        remaining -= copies
    return branches


# ------------------------------------------------------------------------------------------------- main loop (§2.1)


def _stop_string_cut(
    previous_text: str, segment: list[int], segment_text: str, stop_strings: Sequence[str], decode: Decode
) -> int | None:
    """Tokens of `segment` to keep when a stop string ends inside it (spanning the boundary or not), else None.

    Keeps the tokens up to the one that completes the earliest stop string, as vLLM does. "The text holds a stop
    string" only grows with the kept tokens, so the shortest such prefix is found by bisection.
    """
    overlap = max(len(stop) for stop in stop_strings) - 1  # characters of a stop string the last segment may hold
    lookback = previous_text[len(previous_text) - overlap :] if overlap else ""

    def stops(text: str) -> bool:
        return any(stop in lookback + text for stop in stop_strings)

    if not stops(segment_text):
        return None
    low, high = 1, len(segment)  # the shortest prefix that stops lies in [low, high]
    while low < high:
        middle = (low + high) // 2
        if stops(decode(segment[:middle])):
            high = middle
        else:
            low = middle + 1
    return low


def _trim_at_eos(output: SegmentOutput, eos_token_ids: frozenset[int], max_tokens: int) -> tuple[list, list, bool]:
    """The segment up to and including its first EOS, its logprobs, and whether the engine ended it."""
    ids, logprobs = list(output.token_ids), output.logprobs
    for position, token in enumerate(ids):
        if token in eos_token_ids:
            ids = ids[: position + 1]
            logprobs = None if logprobs is None else list(logprobs[: position + 1])
            return ids, logprobs, True
    ended = output.finish_reason == "stop" or len(ids) < max_tokens
    return ids, None if logprobs is None else list(logprobs), ended


def grow_trees(
    engine: SegmentEngine | StreamingSegmentEngine,
    prompts: Sequence[Sequence[int]],
    params: TreeSamplingParams,
    decode: Decode | None = None,
    tools: ToolRunner | None = None,
    barrier: bool = False,
) -> TreeRollout:
    """Grow one tree per prompt and return its leaves (exactly `params.width` per prompt unless fallback is off).

    `decode` turns token ids into text for the answer and repetition rules; without it, only EOS, length and
    depth stop a path. With `tools`, a turn that ends with tool calls runs them (once per node) and the path goes on
    after their result. Each tree's own choices are deterministic given `params.seed`, its prompt index, the engine's
    outputs for it and the tools' results: never on other trees, nor on the order in which the engine finishes.

    A `StreamingSegmentEngine` grows every tree at its own pace (`scheduling.drive_trees`), or level by level across
    the batch with `barrier`; a plain `SegmentEngine` decodes one batched call per level across all trees.
    """
    if not prompts:
        return TreeRollout(leaves=[])
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("Every prompt must hold at least one token; got an empty prompt.")
    decode = decode or _no_text
    trees = [
        PromptTree(index, prompt, params, decode, tools, tools.root_state(index) if tools is not None else None)
        for index, prompt in enumerate(prompts)
    ]
    return _collect(trees, drive_trees(engine, trees, barrier))


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The seed of one prompt's random draws: a tree never depends on the order in which other trees finish."""
    return (seed * 1_000_003 + prompt_index * 7_919 + 1) % 2**63


class PromptTree:
    """One prompt's tree between its levels: its leaves so far, its frontier, its node ids and its random draws.

    A level has two halves: `requests` decodes every frontier path's next segment (§2.1), and `advance` classifies
    the new segments (§2.3), then branches (§2.4) or falls back (§2.5). The tree's barrier is its own level: it
    branches once all of its level is decoded, whatever other trees are doing. Node ids are local to the tree
    (`_collect` makes them unique within the rollout).
    """

    def __init__(self, prompt_index: int, prompt, params: TreeSamplingParams, decode: Decode, tools, root_state):
        self.prompt_index, self.prompt, self.params, self.decode_text, self.tools = (
            prompt_index, prompt, params, decode, tools)  # fmt: skip
        self.root_state = root_state
        self.rng = random.Random(prompt_seed(params.seed, prompt_index))
        self.eos_token_ids = frozenset(params.eos_token_ids)
        self.stats = RolloutStats()
        self.done: list[Leaf] = []
        self.next_node = 0
        fork = min(params.width, self.rng.randint(*params.first_divergence_range))
        self.frontier: list[tuple[_Path, int]] = [(_Path(prompt_index, (), [], [], "", tool_state=root_state), fork)]
        self._requests: list[SegmentRequest] = []

    @property
    def finished(self) -> bool:
        return not self.frontier

    @property
    def in_fallback(self) -> bool:
        """Whether the tree's main paths have all stopped and it is re-growing from fallback branches (§2.5)."""
        return self.stats.fallback_events > 0

    def requests(self) -> list[SegmentRequest]:
        """The next level's requests: one per frontier path, `num_branches` = its children. A path whose engine
        request is still decoding has its first child continue it (`SegmentRequest.continues`): the child's segment
        is a sample of the same distribution as a new request's, without a new request."""
        params = self.params
        self._requests = []
        for path, copies in self.frontier:
            budget = params.max_response_length - len(path.token_ids)
            request = SegmentRequest(list(self.prompt) + path.token_ids, copies, min(params.segment_length, budget),
                                     path_budget=budget, continues=path.stream)  # fmt: skip
            self._requests.append(request)
        stats = self.stats
        stats.requests += len(self._requests)
        stats.branches += sum(r.num_branches for r in self._requests)
        stats.submitted_tokens += sum(len(r.token_ids) for r in self._requests)
        return self._requests

    def advance(self, outputs: Sequence[Sequence[SegmentOutput]]) -> None:
        """Take the decoded level (one list of `num_branches` outputs per request, in order) and branch."""
        requests = self._requests
        if len(outputs) != len(requests) or any(len(o) != r.num_branches for o, r in zip(outputs, requests)):
            raise RuntimeError(
                "The segment engine must return one list of `num_branches` outputs per request; got "
                f"{[len(o) for o in outputs]} for branches {[r.num_branches for r in requests]}."
            )
        live, stopped_now = [], 0
        for (parent, _), request, branch_outputs in zip(self.frontier, requests, outputs):
            for output in branch_outputs:
                child, reason = self._child(parent, request, output)
                if reason is None:
                    live.append(child)
                else:
                    self.done.append(child.leaf(reason))
                    stopped_now += 1
        self.frontier = self._branch(live, stopped_now)

    def _child(
        self, parent: _Path, request: SegmentRequest, output: SegmentOutput,
    ) -> tuple[_Path, FinishReason | None]:
        """`parent` extended by one decoded segment, and its stop reason (None: live)."""
        params, decode = self.params, self.decode_text
        self.stats.decoded_tokens += len(output.token_ids)
        segment, segment_logprobs, ended = _trim_at_eos(output, self.eos_token_ids, request.max_tokens)
        segment_text = decode(segment) if segment else ""
        if params.stop_strings and segment:
            keep = _stop_string_cut(parent.text, segment, segment_text, params.stop_strings, decode)
            if keep is not None:
                segment = segment[:keep]
                segment_logprobs = None if segment_logprobs is None else segment_logprobs[:keep]
                segment_text, ended = decode(segment), True
        child = _Path(
            parent.prompt_index,
            parent.nodes + (self.next_node,),
            parent.token_ids + segment,
            None if parent.logprobs is None or segment_logprobs is None else parent.logprobs + segment_logprobs,
            parent.text + segment_text,
            parent.from_fallback,
            (*parent.segment_ends, len(parent.token_ids) + len(segment)),
            None if parent.tool_mask is None else parent.tool_mask + [1] * len(segment),
            parent.tool_turns,
            parent.tool_state,
            output.stream,
        )
        self.next_node += 1
        reason = classify_segment(child, segment, segment_text, ended, params)
        if self.tools is not None and ended and reason in FALLBACK_ELIGIBLE:
            child, reason = _run_tool_turn(child, reason, self.prompt, params, self.tools, decode, self.stats)
        return child, reason

    def _branch(self, live: list[_Path], stopped_now: int) -> list[tuple[_Path, int]]:
        """The next level's frontier: the live paths with their share of the branching budget, or, with no live
        path and fewer than w leaves, a fallback event."""
        params, done = self.params, self.done
        if live:
            total = branching_budget(len(live), stopped_now, len(done), params)
            scores = [_last_segment_mean_logprob(p) for p in live] if params.needs_logprobs else [0.0] * len(live)
            return list(zip(live, split_budget(total, scores, params)))
        if len(done) < params.width and params.fallback_policy != "none":
            branches = _fallback_branches(done, params.width - len(done), params, self.rng, self.decode_text,
                                          self.root_state)  # fmt: skip
            self.stats.fallback_events += 1
            self.stats.fallback_branches += sum(copies for _, copies in branches)
            return branches
        return []


def _collect(trees: Sequence[PromptTree], driven: DriveResult) -> TreeRollout:
    """The rollout of finished trees: node ids made unique across trees (in prompt order), counters summed."""
    stats = RolloutStats(engine_calls=driven.waits, engine_steps=driven.engine_steps or 0)
    stats.decoded_tokens = driven.discarded_tokens
    leaves, offset = [], 0
    for tree in trees:
        for name, value in vars(tree.stats).items():
            if name not in ("engine_calls", "engine_steps"):
                setattr(stats, name, getattr(stats, name) + value)
        leaves.append([replace(leaf, nodes=tuple(offset + node for node in leaf.nodes)) for leaf in tree.done])
        offset += tree.next_node
    stats.leaf_tokens = sum(leaf.policy_tokens for prompt_leaves in leaves for leaf in prompt_leaves)
    stats.sequential_tool_calls = sum(leaf.tool_calls for prompt_leaves in leaves for leaf in prompt_leaves)
    return TreeRollout(leaves=leaves, stats=stats, levels=driven.levels)


def _run_tool_turn(
    path: _Path,
    reason: FinishReason,
    prompt: Sequence[int],
    params: TreeSamplingParams,
    tools: ToolRunner,
    decode: Decode,
    stats: RolloutStats,
) -> tuple[_Path, FinishReason | None]:
    """The path and its stop reason after its turn ended: `None` (live, after the tool result) when the turn called
    tools and they ran, `TOOL_LIMIT` when they could not, and `reason` unchanged when the turn called none."""
    start = path.turn_start
    calls = tools.find_calls(path.prompt_index, list(prompt) + path.token_ids[:start], path.token_ids[start:])
    if calls is None:
        return path, reason
    if params.max_tool_turns is not None and len(path.tool_turns) >= params.max_tool_turns:
        return path, FinishReason.TOOL_LIMIT
    turn = tools.run(path.prompt_index, path.tool_state, calls)
    stats.tool_calls += turn.calls
    stats.tool_failures += turn.failures
    # As TRL does, a result that leaves no room for the next turn is dropped and the path ends at its call; what the
    # calls did to the path's environment stays (TRL's environment keeps it too, and rewards read it).
    if len(path.token_ids) + len(turn.token_ids) >= params.max_response_length:
        return replace(path, tool_state=turn.state), FinishReason.TOOL_LIMIT
    return path.with_tool_turn(turn, decode(turn.token_ids) if turn.token_ids else ""), None


def _no_text(token_ids: Sequence[int]) -> str:
    return ""
