"""The rollout driver (`scheduling.drive_trees`): trees that grow at their own pace are the trees of the
level-synchronous rollout, in any completion order (issue 29)."""

import random
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_treepo import TreeSamplingParams, grow_trees
from trl_treepo.sampling import SegmentOutput
from trl_treepo.scheduling import LevelBatches, ThreadedStream, drive_trees
from trl_treepo.testing import ContinuingEngine, OutOfOrderEngine, ScriptedEngine
from trl_treepo.tree import prompt_seed

EOS = 0
TEXT = {0: "", 1: "a", 2: "\\boxed{", 3: "4", 4: "}", 5: "spam spam "}
PROMPTS = [[7, 7], [8], [9, 9, 9], [7, 8], [6]]


def decode(ids):
    return "".join(TEXT.get(t, "?") for t in ids)


def respond(request, branch, rng):
    """Random stops of every kind: budget transfer, answers, repetition, fallback."""
    roll, length = rng.random(), request.max_tokens
    if roll < 0.1:
        return [5] * length
    if roll < 0.25:
        return [2, 3, 4, EOS][:length]
    if roll < 0.45:
        return [rng.choice([1, 3]) for _ in range(rng.randrange(length))] + [EOS]
    return [rng.choice([1, 3]) for _ in range(length)]


def tree_of(rollout):
    return [
        [(leaf.nodes, leaf.token_ids, leaf.finish_reason, leaf.from_fallback, leaf.segment_ends) for leaf in leaves]
        for leaves in rollout.leaves
    ]


def params(**overrides):
    base = dict(width=6, segment_length=3, max_depth=4, initial_divergence_max=4, eos_token_ids=(EOS,), seed=5)
    base.update(overrides)
    return TreeSamplingParams(**base)


@settings(max_examples=60, deadline=None)
@given(order_seed=st.integers(0, 10_000), seed=st.integers(0, 1_000), policy=st.sampled_from(["random_cut", "restart"]))
def test_equal_engine_outputs_give_equal_trees_in_any_completion_order(order_seed, seed, policy):
    p = params(seed=seed, fallback_policy=policy)
    level = grow_trees(OutOfOrderEngine(respond, EOS, order_seed=None), PROMPTS, p, decode)
    scrambled_engine = OutOfOrderEngine(respond, EOS, order_seed=order_seed)
    scrambled = grow_trees(scrambled_engine, PROMPTS, p, decode)
    assert tree_of(scrambled) == tree_of(level)
    for name in ("requests", "branches", "decoded_tokens", "submitted_tokens", "leaf_tokens", "fallback_events"):
        assert getattr(scrambled.stats, name) == getattr(level.stats, name), name
    assert scrambled.stats.engine_calls == scrambled_engine.waits


def test_a_tree_does_not_depend_on_the_other_prompts_of_its_batch():
    """Each tree draws from its own seed: the same prompt index grows the same tree beside any other prompts."""
    p = params(seed=3)
    alone = grow_trees(OutOfOrderEngine(respond, EOS, order_seed=None), PROMPTS[:2], p, decode)
    beside_more = grow_trees(OutOfOrderEngine(respond, EOS, order_seed=1), PROMPTS, p, decode)
    strip = lambda leaves: [(leaf.token_ids, leaf.finish_reason) for leaf in leaves]  # noqa: E731
    assert [strip(leaves) for leaves in beside_more.leaves[:2]] == [strip(leaves) for leaves in alone.leaves]
    assert len({prompt_seed(3, index) for index in range(1000)}) == 1000


def test_node_ids_are_unique_across_trees_and_numbered_in_prompt_order():
    rollout = grow_trees(OutOfOrderEngine(respond, EOS, order_seed=2), PROMPTS, params(), decode)
    nodes_per_tree = [{node for leaf in leaves for node in leaf.nodes} for leaves in rollout.leaves]
    assert sum(len(nodes) for nodes in nodes_per_tree) == len(set().union(*nodes_per_tree))
    assert all(max(earlier) < min(later) for earlier, later in zip(nodes_per_tree, nodes_per_tree[1:]))


def test_a_plain_engine_is_driven_level_by_level():
    """One `generate` call per depth covering every live tree: the level-synchronous rollout."""
    engine = ScriptedEngine(lambda request, branch, rng: [1] * request.max_tokens, EOS)
    rollout = grow_trees(engine, PROMPTS, params(initial_divergence_max=None), decode)
    assert rollout.stats.engine_calls == len(engine.calls) == 4
    assert {request.max_tokens for call in engine.calls for request in call} == {3}
    assert [len(call) for call in engine.calls] == [5, 10, 20, 30]  # requests per level: 1, 2, 4, 6 paths per tree


class SlowFirstTree:
    """A thread-safe plain engine whose calls for the first prompt take longer than the others'."""

    def __init__(self):
        self.lock = threading.Lock()
        self.finished_order = []

    def generate(self, requests):
        first = requests[0].token_ids[0] == PROMPTS[0][0] and len(requests[0].token_ids) < 4
        time.sleep(0.05 if first else 0.0)
        with self.lock:
            self.finished_order.append(requests[0].token_ids[0])
        return [[SegmentOutput([1] * r.max_tokens, None, "length") for _ in range(r.num_branches)] for r in requests]


def test_threaded_stream_lets_fast_trees_run_ahead_of_a_slow_one():
    engine = SlowFirstTree()
    rollout = grow_trees(ThreadedStream(engine, max_concurrency=len(PROMPTS)), PROMPTS, params(), decode)
    assert [len(leaves) for leaves in rollout.leaves] == [6] * len(PROMPTS)
    # other trees finished levels while the first prompt's first level was still decoding
    assert engine.finished_order.index(PROMPTS[0][0]) > 1


def test_a_failing_group_stops_the_rollout_and_closes_the_stream():
    class Failing:
        def generate(self, requests):
            raise ConnectionError("server went away")

    stream = ThreadedStream(Failing(), max_concurrency=2)
    with pytest.raises(ConnectionError, match="server went away"):
        grow_trees(stream, PROMPTS, params(), decode)
    assert stream.pool is None and not stream.futures


def test_level_batches_reject_an_engine_that_drops_requests():
    class Dropping:
        def generate(self, requests):
            return [[SegmentOutput([1], None, "length")]]

    with pytest.raises(RuntimeError, match="one list of outputs per request"):
        drive_trees(LevelBatches(Dropping()), [FakeTree(), FakeTree()])


class FakeTree:
    finished = False

    def requests(self):
        from trl_treepo.sampling import SegmentRequest

        return [SegmentRequest([1], 1, 1)]

    def advance(self, outputs):
        self.finished = True


def test_randomness_is_drawn_per_prompt_not_from_a_shared_stream():
    """Root fork sizes come from each prompt's own generator (`initial_divergence_max` > min)."""
    p = params(initial_divergence=1, initial_divergence_max=6, seed=11)
    rollout = grow_trees(OutOfOrderEngine(respond, EOS, order_seed=4), PROMPTS, p, decode)
    expected = [random.Random(prompt_seed(11, index)).randint(1, 6) for index in range(len(PROMPTS))]
    first_forks = [len({leaf.nodes[0] for leaf in leaves if not leaf.from_fallback}) for leaves in rollout.leaves]
    assert all(fork <= want for fork, want in zip(first_forks, expected))
    assert len(set(expected)) > 1


# ------------------------------------------------------------------------- branches that decode past their segment


def next_token(context, salt):
    """Answers, EOS, repetition and plain text, as a deterministic function of the context (and a new branch's salt)."""
    import zlib

    if context[-1] == 2:
        return 3
    if context[-2:] == (2, 3):
        return 4
    if context[-1] == 4:
        return EOS
    roll = random.Random(zlib.crc32(repr((context, salt)).encode())).random()
    return 0 if roll < 0.06 else 2 if roll < 0.12 else 5 if roll < 0.2 else 3 if roll < 0.35 else 1


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 1_000), policy=st.sampled_from(["random_cut", "restart"]), barrier=st.booleans(),
       answer_stop=st.sampled_from(["boxed_and_eos", "boxed"]))  # fmt: skip
def test_a_first_child_that_continues_its_parents_request_gives_the_same_trees(seed, policy, barrier, answer_stop):
    """Equal engine outputs give equal trees whether each segment is its own request or the first child goes on in its
    parent's; what a stopped path decoded ahead is counted and its request released, and nothing is left running."""
    p = params(seed=seed, fallback_policy=policy, answer_stop=answer_stop, width=8, max_depth=5)
    per_segment = ContinuingEngine(next_token, EOS, continue_branches=False)
    reference = grow_trees(per_segment, PROMPTS, p, decode, barrier=barrier)
    continuing = ContinuingEngine(next_token, EOS)
    rollout = grow_trees(continuing, PROMPTS, p, decode, barrier=barrier)
    assert tree_of(rollout) == tree_of(reference)
    assert continuing.requests < per_segment.requests
    assert not continuing.running and not per_segment.running
    # every token the engine decoded is counted once: in a segment, or as decoded ahead for a path that stopped
    assert rollout.stats.decoded_tokens == continuing.decoded_tokens
    assert rollout.stats.decoded_tokens - reference.stats.decoded_tokens == continuing.discarded_tokens
    assert rollout.stats.engine_steps == continuing.steps


def test_the_level_timeline_accounts_for_every_engine_step():
    """On an engine that counts its steps, every tree level is timed: submitted, decoded, handed back; per tree a level
    is handed back when decoded, behind a barrier when the batch's last level is."""
    p = params(seed=2, width=8, max_depth=5)
    for barrier in (False, True):
        engine = ContinuingEngine(next_token, EOS)
        rollout = grow_trees(engine, PROMPTS, p, decode, barrier=barrier)
        levels = rollout.levels
        assert rollout.stats.engine_steps == engine.steps == max(level.returned for level in levels)
        assert all(level.submitted <= level.decoded <= level.returned for level in levels)
        assert sorted({level.tree for level in levels}) == list(range(len(PROMPTS)))
        waited = sum(level.returned - level.decoded for level in levels)
        assert (waited > 0) == barrier
