"""A scripted `SegmentEngine`, for driving the tree sampler (and the trainer's rollouts) without a model."""

from __future__ import annotations

class ScriptedEngine:
    """A `SegmentEngine` whose outputs come from a script, for driving the tree sampler without a model.

    `respond(request, branch, rng)` returns the token ids of one branch (cut to `request.max_tokens`). A branch
    that ends with `eos_token_id` finishes with `"stop"`, otherwise with `"length"`. Each token's logprob is
    `logprob(token)`. Every call's requests are kept in `calls`.
    """

    def __init__(self, respond, eos_token_id: int = 0, seed: int = 0, logprob=lambda token: -1.0):
        import random

        self.respond = respond
        self.eos_token_id = eos_token_id
        self.logprob = logprob
        self.rng = random.Random(seed)
        self.calls = []

    def generate(self, requests):
        from ..sampling import SegmentOutput

        self.calls.append(list(requests))
        outputs = []
        for request in requests:
            branches = []
            for branch in range(request.num_branches):
                ids = list(self.respond(request, branch, self.rng))[: request.max_tokens]
                reason = "stop" if ids and ids[-1] == self.eos_token_id else "length"
                branches.append(SegmentOutput(ids, [self.logprob(t) for t in ids], reason))
            outputs.append(branches)
        return outputs




class OutOfOrderEngine:
    """A `StreamingSegmentEngine` that finishes the groups it holds in a scrambled order, a few at a time.

    Each branch's tokens are `respond(request, branch, rng)` with `rng` seeded from the request's token ids and the
    branch index alone, so equal requests always get equal outputs, whatever was submitted before them. Each `wait`
    finishes a random non-empty subset of the pending groups (drawn from `order_seed`) in random order: a tree's
    rollout must not depend on which other tree finished first. With `order_seed=None` every `wait` finishes every
    pending group in submission order: the level-synchronous rollout. `waits` counts the calls to `wait`.
    """

    def __init__(self, respond, eos_token_id: int = 0, order_seed: int | None = 0, logprob=lambda token: -1.0):
        import random

        self.script = ScriptedEngine(respond, eos_token_id, logprob=logprob)
        self.order = None if order_seed is None else random.Random(order_seed)
        self.pending: dict[int, list] = {}
        self.next_ticket = 0
        self.waits = 0

    def submit(self, requests) -> int:
        self.next_ticket += 1
        self.pending[self.next_ticket] = list(requests)
        return self.next_ticket

    def wait(self):
        import random
        import zlib

        self.waits += 1
        tickets = list(self.pending)
        if self.order is not None:
            self.order.shuffle(tickets)
            tickets = tickets[: self.order.randint(1, len(tickets))]
        finished = []
        for ticket in tickets:
            outputs = []
            for request in self.pending.pop(ticket):
                seed = zlib.crc32(repr((list(request.token_ids), request.max_tokens)).encode())
                self.script.rng = random.Random(seed)
                outputs += self.script.generate([request])
            finished.append((ticket, outputs))
        return finished

    def close(self) -> None:
        self.pending = {}
