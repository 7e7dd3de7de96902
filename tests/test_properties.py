"""Invariants of the tree sampler over random engine behaviour (hypothesis).

The engine ends segments at random positions with EOS, writes answers and repetitive text, and so drives budget
transfer, every stop rule and fallback. Whatever it does:

- every prompt gets exactly `width` leaves (fallback on);
- leaves that share a node-path prefix share those segments token for token;
- every non-final segment has the full segment length;
- no token is lost or duplicated: each leaf is exactly the engine's outputs along its path, and the completion rows
  hold each leaf once.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from trl_treepo import TreeSamplingParams, grow_trees
from trl_treepo.testing import ScriptedEngine

EOS = 0
TEXT = {0: "", 1: "a", 2: "\\boxed{", 3: "4", 4: "}", 5: "spam spam "}


def decode(ids):
    return "".join(TEXT.get(t, "?") for t in ids)


class RecordingEngine(ScriptedEngine):
    """Remembers every (context, segment) it produced, to check leaves against."""

    def __init__(self, respond, seed):
        super().__init__(respond, eos_token_id=EOS, seed=seed)
        self.produced = set()

    def generate(self, requests):
        outputs = super().generate(requests)
        for request, branches in zip(requests, outputs):
            for output in branches:
                self.produced.add((tuple(request.token_ids), tuple(output.token_ids)))
        return outputs


def random_engine(seed, eos_rate, answer_rate, repeat_rate):
    def respond(request, branch, rng):
        roll = rng.random()
        length = request.max_tokens
        if roll < repeat_rate:
            return [5] * length
        if roll < repeat_rate + answer_rate:
            return ([1] * length + [2, 3, 4, EOS])[-length:] if rng.random() < 0.5 else [2, 3, 4] + [1] * length
        if roll < repeat_rate + answer_rate + eos_rate:
            return [rng.choice([1, 3]) for _ in range(rng.randrange(length))] + [EOS]
        return [rng.choice([1, 3]) for _ in range(length)]

    return RecordingEngine(respond, seed)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    width=st.integers(1, 9),
    branching=st.integers(1, 3),
    segment_length=st.integers(1, 5),
    depth=st.integers(1, 5),
    first=st.integers(1, 4),
    first_extra=st.integers(0, 3),
    num_prompts=st.integers(1, 3),
    eos_rate=st.floats(0, 0.9),
    answer_rate=st.floats(0, 0.5),
    repeat_rate=st.floats(0, 0.3),
    fallback=st.sampled_from(["random_cut", "restart"]),
    answer_stop=st.sampled_from(["boxed_and_eos", "boxed", "none"]),
    priority=st.sampled_from(["first", "last"]),
)
def test_tree_invariants(seed, width, branching, segment_length, depth, first, first_extra, num_prompts, eos_rate,
                         answer_rate, repeat_rate, fallback, answer_stop, priority):
    params = TreeSamplingParams(
        width=width, segment_length=segment_length, max_depth=depth, branching_factor=branching,
        initial_divergence=first, initial_divergence_max=first + first_extra, fallback_policy=fallback,
        answer_stop=answer_stop, repetition_window=4, repetition_min_count=3, repetition_priority=priority,
        eos_token_ids=(EOS,), seed=seed,
    )  # fmt: skip
    prompts = [[7, 7, p] for p in range(num_prompts)]
    engine = random_engine(seed, eos_rate, answer_rate, repeat_rate)
    rollout = grow_trees(engine, prompts, params, decode)

    assert [len(leaves) for leaves in rollout.leaves] == [width] * num_prompts
    for prompt_index, leaves in enumerate(rollout.leaves):
        prompt = prompts[prompt_index]
        for leaf in leaves:
            assert leaf.prompt_index == prompt_index
            assert 1 <= leaf.depth <= depth
            # non-final segments are full; the final one holds 1..l tokens
            assert (leaf.depth - 1) * segment_length < len(leaf.token_ids) <= leaf.depth * segment_length
            assert EOS not in leaf.token_ids[:-1]
            # each segment is exactly an engine output for exactly the context before it
            for j in range(leaf.depth):
                context = tuple(prompt + leaf.token_ids[: j * segment_length])
                segment = tuple(leaf.token_ids[j * segment_length : (j + 1) * segment_length])
                assert any(
                    ctx == context and out[: len(segment)] == segment and (len(out) == len(segment) or segment[-1] == EOS)
                    for ctx, out in engine.produced
                )
        # a shared node prefix means shared tokens
        for a in leaves:
            for b in leaves:
                shared = 0
                while shared < min(a.depth, b.depth) and a.nodes[shared] == b.nodes[shared]:
                    shared += 1
                assert a.token_ids[: shared * segment_length] == b.token_ids[: shared * segment_length]
        assert len({leaf.nodes for leaf in leaves}) == width  # node paths are unique per leaf

    rows = rollout.rows(width)
    assert len(rows) == num_prompts * width and not any(padded for _, padded in rows)
    assert [id(leaf) for leaf, _ in rows] == [id(leaf) for leaves in rollout.leaves for leaf in leaves]
    assert rollout.stats.leaf_tokens == sum(len(leaf.token_ids) for leaf, _ in rows)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), width=st.integers(2, 8), eos_rate=st.floats(0.2, 1.0))
def test_without_fallback_rows_pad_short_prompts_with_marked_repeats(seed, width, eos_rate):
    params = TreeSamplingParams(width=width, segment_length=2, max_depth=3, fallback_policy="none",
                                eos_token_ids=(EOS,), seed=seed)
    rollout = grow_trees(random_engine(seed, eos_rate, 0.0, 0.0), [[7, 7]], params, decode)
    leaves = rollout.leaves[0]
    assert 1 <= len(leaves) <= width
    rows = rollout.rows(width)
    assert [padded for _, padded in rows] == [False] * len(leaves) + [True] * (width - len(leaves))


CALL, RESULT = 6, 8


class RandomTools:
    """A `ToolRunner`: a turn holding CALL calls a tool whose result is 1–3 RESULT tokens. A state is the tuple of run
    ids on the path."""

    def __init__(self, seed):
        import random

        self.rng, self.runs = random.Random(seed), 0

    def root_state(self, prompt_index):
        return ()

    def find_calls(self, prompt_index, context_ids, turn_ids):
        return "call" if CALL in turn_ids else None

    def run(self, prompt_index, state, calls):
        from trl_treepo.sampling import ToolTurn

        self.runs += 1
        return ToolTurn([RESULT] * self.rng.randint(1, 3), calls=1, failures=0, state=(*state, self.runs))


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    width=st.integers(1, 8),
    branching=st.integers(1, 3),
    segment_length=st.integers(2, 6),
    depth=st.integers(1, 5),
    call_rate=st.floats(0, 0.9),
    eos_rate=st.floats(0, 0.6),
    max_turns=st.sampled_from([None, 0, 1, 3]),
    fallback=st.sampled_from(["random_cut", "restart"]),
)
def test_tree_invariants_with_tool_calls(seed, width, branching, segment_length, depth, call_rate, eos_rate, max_turns,
                                         fallback):
    params = TreeSamplingParams(width=width, segment_length=segment_length, max_depth=depth, branching_factor=branching,
                                fallback_policy=fallback, answer_stop="none", repetition_window=0, eos_token_ids=(EOS,),
                                seed=seed, max_tool_turns=max_turns)  # fmt: skip

    def respond(request, branch, rng):
        roll, length = rng.random(), request.max_tokens
        if roll < call_rate:
            return [1] * rng.randrange(min(length, 3)) + [CALL, EOS]
        if roll < call_rate + eos_rate:
            return [1] * rng.randrange(length) + [EOS]
        return [1] * length

    prompts = [[7, 7]]
    engine = RecordingEngine(respond, seed)
    tools = RandomTools(seed)
    rollout = grow_trees(engine, prompts, params, decode, tools)
    leaves = rollout.leaves[0]

    assert len(leaves) == width  # exactly w leaves, with budget transfer and fallback through tool calls
    for leaf in leaves:
        ends = leaf.segment_ends
        assert len(ends) == leaf.depth and ends[-1] == len(leaf.token_ids) <= params.max_response_length
        mask = leaf.tool_mask or [1] * len(leaf.token_ids)
        assert [t == RESULT for t in leaf.token_ids] == [m == 0 for m in mask]  # exactly the results are masked
        assert max_turns is None or len(leaf.tool_turns) <= max_turns
        for k, (segment, turn) in enumerate(leaf.tool_turns):
            assert mask[ends[segment] - 1] == 0  # a tool turn's result ends its segment: children branch after it
            assert turn.state[:-1] == (leaf.tool_turns[k - 1][1].state if k else ())  # its ancestors' state
        for j, (start, end) in enumerate(leaf.segment_bounds(segment_length)):
            own = [t for t, m in zip(leaf.token_ids[start:end], mask[start:end]) if m]
            context = tuple(prompts[0] + leaf.token_ids[:start])
            assert any(ctx == context and out[: len(own)] == tuple(own) for ctx, out in engine.produced)
    for a in leaves:  # a shared node prefix means shared tokens, tool results included
        for b in leaves:
            shared = 0
            while shared < min(a.depth, b.depth) and a.nodes[shared] == b.nodes[shared]:
                shared += 1
            if shared:
                assert a.segment_ends[shared - 1] == b.segment_ends[shared - 1]
                assert a.token_ids[: a.segment_ends[shared - 1]] == b.token_ids[: b.segment_ends[shared - 1]]
    # every run call either lies on some leaf's path (shared by at least one) or was dropped at the token limit
    dropped = sum(leaf.finish_reason.value == "tool_limit" for leaf in leaves) if max_turns is None else None
    if dropped is not None:
        assert rollout.stats.tool_calls - dropped <= rollout.stats.sequential_tool_calls
    assert rollout.stats.tool_calls == tools.runs
