"""The rollout driver: when each tree's next level goes to the engine (paper §2.1, "tree-based rollout").

It knows nothing of the tree's rules, only that a tree asks for a level of requests, takes the decoded level back,
and is then finished or asks for the next one. Every decision that needs a barrier (branching budget, fallback) is
per prompt, so a tree waits for its own level and never for another tree's:

- on a `StreamingSegmentEngine` (vLLM colocate at request granularity, the server with concurrent requests), each
  tree submits its next level as soon as its own is decoded, and the engine's batch stays full across depths;
  with `barrier=True` it is held back until every tree's level is decoded (the level-synchronous schedule);
- on a plain `SegmentEngine`, `LevelBatches` gathers every tree's pending level into one `generate` call: the
  level-synchronous rollout (one call per depth, a barrier across the batch), which the transformers backend needs.

An engine may keep a branch decoding past its segment (`SegmentOutput.stream`), so that the path's first child goes
on in the same engine request; the driver releases every such branch that the tree does not continue (its path
stopped, or the tree finished). All of these give the same trees for the same engine outputs, in any completion
order.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from typing import Protocol

from .sampling import SegmentEngine, SegmentOutput, SegmentRequest, StreamingSegmentEngine


class GrowingTree(Protocol):
    finished: bool
    in_fallback: bool  # re-growing from fallback branches after its main paths stopped

    def requests(self) -> list[SegmentRequest]: ...

    def advance(self, outputs: Sequence[Sequence[SegmentOutput]]) -> None: ...


@dataclass
class LevelTiming:
    """One tree level on the engine's clock (decoding steps): submitted, fully decoded, handed back to its tree."""

    tree: int
    fallback: bool
    submitted: int
    decoded: int
    returned: int
    longest_segment: int  # tokens of the level's longest segment: its decoding steps at one token per step


@dataclass
class DriveResult:
    """What driving the trees cost: waits on the engine, its decoding steps, and each level's timing (when the engine
    counts its steps)."""

    waits: int = 0
    engine_steps: int | None = None
    discarded_tokens: int = 0  # decoded past a segment for a path that then stopped (engines that continue branches)
    levels: list[LevelTiming] = field(default_factory=list)


def drive_trees(
    engine: SegmentEngine | StreamingSegmentEngine, trees: Sequence[GrowingTree], barrier: bool = False
) -> DriveResult:
    """Grow every tree to the end. A streaming engine grows each tree at its own pace, or level by level across the
    batch with `barrier`; a plain engine level by level, one `generate` call per depth."""
    stream = engine if is_streaming(engine) else LevelBatches(engine)
    clock = lambda: getattr(stream, "steps", None)  # noqa: E731
    started, discarded_before = clock(), getattr(stream, "discarded_tokens", 0)
    result = DriveResult()
    waiting: dict[int, tuple[int, int | None]] = {}  # ticket -> (tree index, submitted at)
    held: list[tuple[int, list, int | None]] = []  # decoded groups a barrier holds: (ticket, outputs, decoded at)

    def submit(index: int) -> list[SegmentRequest]:
        requests = trees[index].requests()
        waiting[stream.submit(requests)] = (index, clock())
        return requests

    try:
        for index, tree in enumerate(trees):
            if not tree.finished:
                submit(index)
        while waiting:
            finished = stream.wait()
            result.waits += 1
            held += [(ticket, outputs, clock()) for ticket, outputs in finished]
            if barrier and len(held) < len(waiting):
                continue
            ready, held = held, []
            for ticket, outputs, decoded in ready:
                index, submitted = waiting.pop(ticket)
                tree = trees[index]
                if started is not None:
                    longest = max((len(o.token_ids) for group in outputs for o in group), default=0)
                    result.levels.append(
                        LevelTiming(index, tree.in_fallback, submitted - started, decoded - started, clock() - started,
                                    longest)  # fmt: skip
                    )
                tree.advance(outputs)
                _release_uncontinued(stream, outputs, [] if tree.finished else submit(index))
    finally:
        stream.close()
    if started is not None:
        result.engine_steps = clock() - started
    result.discarded_tokens = getattr(stream, "discarded_tokens", 0) - discarded_before
    return result


def _release_uncontinued(stream, outputs, next_requests) -> None:
    """Release the branches an engine kept decoding whose paths the tree does not continue."""
    continued = {id(r.continues) for r in next_requests if r.continues is not None}
    dropped = [o.stream for group in outputs for o in group if o.stream is not None and id(o.stream) not in continued]
    if dropped:
        stream.release(dropped)


def is_streaming(engine) -> bool:
    return all(callable(getattr(engine, name, None)) for name in ("submit", "wait", "close"))


class LevelBatches:
    """A plain `SegmentEngine` as a `StreamingSegmentEngine`: `wait` decodes every pending group in one call."""

    def __init__(self, engine: SegmentEngine):
        self.engine = engine
        self.pending: list[tuple[int, list[SegmentRequest]]] = []
        self.next_ticket = 0

    @property
    def steps(self) -> int | None:
        """The engine's decoding steps so far, if it counts them."""
        return getattr(self.engine, "steps", None)

    def submit(self, requests: Sequence[SegmentRequest]) -> int:
        self.next_ticket += 1
        self.pending.append((self.next_ticket, list(requests)))
        return self.next_ticket

    def wait(self) -> list[tuple[int, list[list[SegmentOutput]]]]:
        batch, self.pending = self.pending, []
        outputs = self.engine.generate([request for _, requests in batch for request in requests])
        if len(outputs) != sum(len(requests) for _, requests in batch):
            raise RuntimeError(
                f"The segment engine must return one list of outputs per request; got {len(outputs)} for "
                f"{sum(len(requests) for _, requests in batch)} requests."
            )
        finished, start = [], 0
        for ticket, requests in batch:
            finished.append((ticket, outputs[start : start + len(requests)]))
            start += len(requests)
        return finished

    def close(self) -> None:
        self.pending = []


class ThreadedStream:
    """A thread-safe plain `SegmentEngine` as a `StreamingSegmentEngine`: each group is its own `generate` call, at
    most `max_concurrency` in flight (for a server that batches concurrent requests, such as `vllm serve`)."""

    def __init__(self, engine: SegmentEngine, max_concurrency: int):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}.")
        self.engine, self.max_concurrency = engine, max_concurrency
        self.pool: ThreadPoolExecutor | None = None
        self.futures: dict = {}
        self.next_ticket = 0

    def submit(self, requests: Sequence[SegmentRequest]) -> int:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="treepo-level")
        self.next_ticket += 1
        self.futures[self.pool.submit(self.engine.generate, list(requests))] = self.next_ticket
        return self.next_ticket

    def wait(self) -> list[tuple[int, list[list[SegmentOutput]]]]:
        done, _ = wait_for(list(self.futures), return_when=FIRST_COMPLETED)
        # In submission order, so that which group is handed back first does not depend on thread timing.
        finished = sorted(done, key=self.futures.__getitem__)
        return [(self.futures.pop(future), future.result()) for future in finished]

    def close(self) -> None:
        """Cancel the groups not yet sent and let go of the threads (a group already sent runs to its end)."""
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
        self.futures = {}
