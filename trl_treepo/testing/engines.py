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


