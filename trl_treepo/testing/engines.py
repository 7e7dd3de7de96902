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


class _TokenBranch:
    """One branch of `ContinuingEngine`: its context, the tokens it decoded, and the segment it is awaited for."""

    def __init__(self, context, budget: int, salt: int):
        self.context, self.budget, self.salt = context, budget, salt
        self.new, self.handed, self.done, self.slot = [], 0, False, None


class ContinuingEngine:
    """A `StreamingSegmentEngine` that decodes token by token and keeps each branch going past its segment, as the
    vLLM colocate engine does (`SegmentOutput.stream`, `SegmentRequest.continues`).

    Token `t` of a branch is `next_token(context, salt)`, `context` being the prompt and every token before it; `salt`
    is the branch's index within its request for a new branch's first token, and 0 for every other token. A first
    child that continues its parent's request therefore gets exactly the tokens a new request would give it, so the
    trees must be the same with and without `continue_branches`. Each `wait` is one decoding step: every running
    branch decodes one token, a branch stops after `eos_token_id` or at its budget, and a group is handed back once
    all of its segments are decoded. `steps`, `requests`, `decoded_tokens` and `discarded_tokens` count the work.
    """

    def __init__(self, next_token, eos_token_id: int = 0, continue_branches: bool = True):
        self.next_token, self.eos_token_id, self.continue_branches = next_token, eos_token_id, continue_branches
        self.steps = self.requests = self.decoded_tokens = self.discarded_tokens = self.next_ticket = 0
        self.running: list[_TokenBranch] = []  # branches still decoding or holding tokens
        self.groups: dict[int, list] = {}
        self.released: list[_TokenBranch] = []

    def submit(self, requests) -> int:
        self.next_ticket += 1
        group = self.groups[self.next_ticket] = [[None] * r.num_branches for r in requests]
        for index, request in enumerate(requests):
            for branch_index in range(request.num_branches):
                if branch_index == 0 and request.continues is not None:
                    branch = request.continues
                    if not any(branch is held for held in self.running):
                        raise AssertionError("a released or finished branch was continued")
                else:
                    budget = request.path_budget if self.continue_branches else request.max_tokens
                    branch = _TokenBranch(list(request.token_ids), budget, branch_index)
                    self.running.append(branch)
                    self.requests += 1
                branch.slot = (group, index, branch_index, request.max_tokens)
        return self.next_ticket

    def wait(self):
        while True:
            for branch in list(self.running):
                self._hand_out(branch)
            finished = [t for t, g in self.groups.items() if all(o is not None for outputs in g for o in outputs)]
            if finished:
                return [(ticket, self.groups.pop(ticket)) for ticket in finished]
            if all(branch.done for branch in self.running):
                raise RuntimeError("every branch finished, but a group is still missing outputs")
            self.steps += 1
            for branch in self.running:
                if not branch.done:
                    token = self.next_token(tuple(branch.context + branch.new), 0 if branch.new else branch.salt)
                    branch.new.append(token)
                    self.decoded_tokens += 1
                    branch.done = token == self.eos_token_id or len(branch.new) == branch.budget

    def _hand_out(self, branch: _TokenBranch) -> None:
        from ..sampling import SegmentOutput

        if branch.slot is None:
            return
        group, index, branch_index, max_tokens = branch.slot
        available = len(branch.new) - branch.handed
        if available < max_tokens and not branch.done:
            return
        start, end = branch.handed, branch.handed + min(max_tokens, available)
        branch.handed, branch.slot = end, None
        exhausted = branch.done and end == len(branch.new)
        ids = branch.new[start:end]
        reason = "stop" if exhausted and ids and ids[-1] == self.eos_token_id else "length"
        group[index][branch_index] = SegmentOutput(ids, [-1.0] * len(ids), reason, None if exhausted else branch)
        if exhausted:
            self._drop(branch)

    def _drop(self, branch: _TokenBranch) -> None:
        self.running = [held for held in self.running if held is not branch]

    def release(self, streams) -> None:
        for branch in streams:
            self._drop(branch)
            self.released.append(branch)
            self.discarded_tokens += len(branch.new) - branch.handed

    def close(self) -> None:
        self.running, self.groups = [], {}
