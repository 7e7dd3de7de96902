"""TreePO's segment-tree rollout (paper §2; spec §2), free of TRL, torch and any particular engine.

Every prompt grows a tree whose nodes are fixed-length decoding segments. Decoding is level-synchronous: one
`engine.generate` call per level covers every live path of every prompt. After each level:

1. each new segment is classified (§2.3): repetition, answer, EOS, length — a stopped path becomes a leaf;
2. each prompt's surviving paths share a branching budget (§2.4, with "budget transfer" from paths that just
   stopped): ``T = max(|live|, min(w - |done|, b * (|stopped now| + |live|)))``;
3. a prompt left with no live path and fewer than w leaves falls back (§2.5): it re-branches, b copies at a time,
   from random segment boundaries of leaves that ended with an answer or EOS; the width still owed stays branching
   budget, so the re-grown paths branch again.

Together these give every prompt exactly w leaves (unless fallback is off). Non-final segments are exactly
`segment_length` tokens long, so segment j of a leaf is ``token_ids[j*l:(j+1)*l]`` and its node id is ``nodes[j]``.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from .sampling import SegmentEngine, SegmentOutput, SegmentRequest, TreeSamplingParams

Decode = Callable[[Sequence[int]], str]


class FinishReason(str, Enum):
    """Why a path stopped (spec §2.3).

    The released code's MAX_OUTPUT_TOKENS and MAX_INFER_STEPS are one event here: live segments are always full, and
    `max_response_length = segment_length × max_depth`, so a path reaches d segments exactly when it reaches the
    token limit.
    """

    ANSWER = "answer"  # a complete \boxed{} answer (with EOS under `boxed_and_eos`)
    EOS = "eos"  # the sequence ended: EOS, a stop string, or another stop condition of the engine
    LENGTH = "length"  # d segments, i.e. `max_response_length` tokens
    REPETITION = "repetition"  # a repeated text window in the last segment


# Paper script's `soft_boxed_and_eos`: fallback only re-branches from trajectories that ended properly.
FALLBACK_ELIGIBLE = frozenset({FinishReason.ANSWER, FinishReason.EOS})


@dataclass
class Leaf:
    """One root→leaf trajectory: the completion of one TRL row.

    `nodes[j]` identifies the node of segment j; two leaves share their first j segments exactly when they share
    `nodes[:j]`. Node ids are unique within a rollout.
    """

    prompt_index: int
    nodes: tuple[int, ...]
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: FinishReason
    from_fallback: bool = False

    @property
    def path(self) -> tuple[int, ...]:
        """The prompt id followed by one node id per segment, as `compute_tree_advantages` expects."""
        return (self.prompt_index, *self.nodes)

    @property
    def depth(self) -> int:
        return len(self.nodes)


@dataclass
class RolloutStats:
    """Work counters of one rollout. `decoded_tokens` is what the engine generated; `leaf_tokens` what TRL trains on."""

    engine_calls: int = 0
    requests: int = 0
    branches: int = 0
    decoded_tokens: int = 0
    submitted_tokens: int = 0
    leaf_tokens: int = 0
    fallback_events: int = 0
    fallback_branches: int = 0


@dataclass
class TreeRollout:
    leaves: list[list[Leaf]]  # per prompt, in finishing order
    stats: RolloutStats = field(default_factory=RolloutStats)

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
    if len(path.nodes) >= params.max_depth:
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


def _last_segment_mean_logprob(path: _Path, segment_length: int) -> float:
    if path.logprobs is None:
        raise ValueError(
            "The low_prob/high_prob divergence policies need sampling logprobs, but the engine returned none."
        )
    start = (len(path.nodes) - 1) * segment_length
    last = path.logprobs[start:]
    return sum(last) / max(len(last), 1)


# --------------------------------------------------------------------------------------------- fallback (§2.5)


def _fallback_branches(
    leaves: list[Leaf], remaining: int, params: TreeSamplingParams, rng: random.Random, decode: Decode
) -> list[tuple[_Path, int]]:
    """(start path, copies) pairs of one fallback event (spec §2.5), as the released sampler queues them.

    Candidates (policy `random_cut`) are the leaves that ended with an answer or EOS, in random order. Each is used
    once, cut at a uniform random segment boundary strictly before its end (0 included: a restart from the prompt),
    and gets ``min(b, still owed)`` copies. With no candidate, or policy `restart`, one start from the prompt gets
    ``min(b, still owed)`` copies. The event does not fill the whole width: what is still owed stays branching
    budget, so the re-grown paths branch again at the next segment boundaries and keep the local subgroups that
    the advantage compares within. The copies keep the leaf's node ids up to the cut, so they also join its
    ancestor subgroups. If they all stop early again, the next event takes the next candidates.
    """
    prompt_index = leaves[0].prompt_index
    candidates = []
    if params.fallback_policy == "random_cut":
        candidates = [leaf for leaf in leaves if leaf.finish_reason in FALLBACK_ELIGIBLE]
        rng.shuffle(candidates)
    if not candidates:
        return [(_Path(prompt_index, (), [], [], "", True), min(params.branching_factor, remaining))]
    branches = []
    for leaf in candidates:
        if remaining == 0:
            break
        num_segments = math.ceil(len(leaf.token_ids) / params.segment_length)
        kept_segments = num_segments - rng.randint(1, num_segments)
        cut = kept_segments * params.segment_length
        kept_ids = leaf.token_ids[:cut]
        start = _Path(
            prompt_index,
            leaf.nodes[:kept_segments],
            kept_ids,
            None if leaf.logprobs is None else leaf.logprobs[:cut],
            decode(kept_ids) if kept_ids else "",
            True,
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
    engine: SegmentEngine,
    prompts: Sequence[Sequence[int]],
    params: TreeSamplingParams,
    decode: Decode | None = None,
) -> TreeRollout:
    """Grow one tree per prompt and return its leaves (exactly `params.width` per prompt unless fallback is off).

    `decode` turns token ids into text for the answer and repetition rules; without it, only EOS, length and
    depth stop a path. The sampler's own choices are deterministic given `params.seed` and the engine's outputs.
    """
    if not prompts:
        return TreeRollout(leaves=[])
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("Every prompt must hold at least one token; got an empty prompt.")
    decode = decode or _no_text
    rng = random.Random(params.seed)
    eos_token_ids = frozenset(params.eos_token_ids)
    stats = RolloutStats()
    done: list[list[Leaf]] = [[] for _ in prompts]
    next_node = 0

    frontier: list[tuple[_Path, int]] = []
    for prompt_index in range(len(prompts)):
        fork = min(params.width, rng.randint(*params.first_divergence_range))
        frontier.append((_Path(prompt_index, (), [], [], ""), fork))

    while frontier:
        requests = []
        for path, copies in frontier:
            max_tokens = min(params.segment_length, params.max_response_length - len(path.token_ids))
            requests.append(SegmentRequest(list(prompts[path.prompt_index]) + path.token_ids, copies, max_tokens))
        outputs = engine.generate(requests)
        if len(outputs) != len(requests) or any(len(o) != r.num_branches for o, r in zip(outputs, requests)):
            raise RuntimeError(
                "The segment engine must return one list of `num_branches` outputs per request; got "
                f"{[len(o) for o in outputs]} for branches {[r.num_branches for r in requests]}."
            )
        stats.engine_calls += 1
        stats.requests += len(requests)
        stats.branches += sum(r.num_branches for r in requests)
        stats.submitted_tokens += sum(len(r.token_ids) for r in requests)

        live: dict[int, list[_Path]] = {}
        stopped_now = Counter()
        for (parent, _), request, branch_outputs in zip(frontier, requests, outputs):
            for output in branch_outputs:
                stats.decoded_tokens += len(output.token_ids)
                segment, segment_logprobs, ended = _trim_at_eos(output, eos_token_ids, request.max_tokens)
                segment_text = decode(segment) if segment else ""
                if params.stop_strings and segment:
                    keep = _stop_string_cut(parent.text, segment, segment_text, params.stop_strings, decode)
                    if keep is not None:
                        segment = segment[:keep]
                        segment_logprobs = None if segment_logprobs is None else segment_logprobs[:keep]
                        segment_text, ended = decode(segment), True
                child = _Path(
                    parent.prompt_index,
                    parent.nodes + (next_node,),
                    parent.token_ids + segment,
                    None
                    if parent.logprobs is None or segment_logprobs is None
                    else parent.logprobs + segment_logprobs,
                    parent.text + segment_text,
                    parent.from_fallback,
                )
                next_node += 1
                reason = classify_segment(child, segment, segment_text, ended, params)
                if reason is None:
                    live.setdefault(child.prompt_index, []).append(child)
                else:
                    done[child.prompt_index].append(
                        Leaf(
                            child.prompt_index,
                            child.nodes,
                            child.token_ids,
                            child.logprobs,
                            reason,
                            child.from_fallback,
                        )
                    )
                    stopped_now[child.prompt_index] += 1

        frontier = []
        for prompt_index in range(len(prompts)):
            paths = live.get(prompt_index, [])
            if paths:
                total = branching_budget(len(paths), stopped_now[prompt_index], len(done[prompt_index]), params)
                scores = (
                    [_last_segment_mean_logprob(p, params.segment_length) for p in paths]
                    if params.needs_logprobs
                    else [0.0] * len(paths)
                )
                frontier.extend(zip(paths, split_budget(total, scores, params)))
            elif len(done[prompt_index]) < params.width and params.fallback_policy != "none":
                remaining = params.width - len(done[prompt_index])
                branches = _fallback_branches(done[prompt_index], remaining, params, rng, decode)
                stats.fallback_events += 1
                stats.fallback_branches += sum(copies for _, copies in branches)
                frontier.extend(branches)

    stats.leaf_tokens = sum(len(leaf.token_ids) for leaves in done for leaf in leaves)
    return TreeRollout(leaves=done, stats=stats)


def _no_text(token_ids: Sequence[int]) -> str:
    return ""
