"""The rollout driver: when each tree's next level goes to the engine (paper §2.1, "tree-based rollout").

It knows nothing of the tree's rules, only that a tree asks for a level of requests, takes the decoded level back,
and is then finished or asks for the next one. Every decision that needs a barrier (branching budget, fallback) is
per prompt, so a tree waits for its own level and never for another tree's:

- on a `StreamingSegmentEngine` (vLLM colocate at request granularity, the server with concurrent requests), each
  tree submits its next level as soon as its own is decoded, and the engine's batch stays full across depths;
- on a plain `SegmentEngine`, `LevelBatches` gathers every tree's pending level into one `generate` call: the
  level-synchronous rollout (one call per depth, a barrier across the batch), which the transformers backend needs.

Both give the same trees for the same engine outputs, in any completion order.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import Protocol

from .sampling import SegmentEngine, SegmentOutput, SegmentRequest, StreamingSegmentEngine


class GrowingTree(Protocol):
    finished: bool

    def requests(self) -> list[SegmentRequest]: ...

    def advance(self, outputs: Sequence[Sequence[SegmentOutput]]) -> None: ...


def drive_trees(engine: SegmentEngine | StreamingSegmentEngine, trees: Sequence[GrowingTree]) -> int:
    """Grow every tree to the end; returns how many times the driver waited on the engine (level-synchronous: one
    `generate` call per level)."""
    stream = engine if is_streaming(engine) else LevelBatches(engine)
    waiting: dict[int, GrowingTree] = {}
    waits = 0
    try:
        for tree in trees:
            if not tree.finished:
                waiting[stream.submit(tree.requests())] = tree
        while waiting:
            finished = stream.wait()
            waits += 1
            for ticket, outputs in finished:
                tree = waiting.pop(ticket)
                tree.advance(outputs)
                if not tree.finished:
                    waiting[stream.submit(tree.requests())] = tree
    finally:
        stream.close()
    return waits


def is_streaming(engine) -> bool:
    return all(callable(getattr(engine, name, None)) for name in ("submit", "wait", "close"))


class LevelBatches:
    """A plain `SegmentEngine` as a `StreamingSegmentEngine`: `wait` decodes every pending group in one call."""

    def __init__(self, engine: SegmentEngine):
        self.engine = engine
        self.pending: list[tuple[int, list[SegmentRequest]]] = []
        self.next_ticket = 0

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
