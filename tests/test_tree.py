"""The tree sampler (paper §2, spec §2) driven by a scripted fake engine."""

from collections import Counter

import pytest

from trl_treepo.sampling import SegmentOutput, TreeSamplingParams
from trl_treepo.testing import ScriptedEngine
from trl_treepo.tree import (
    FinishReason,
    branching_budget,
    find_boxed_answers,
    grow_trees,
    has_repetition,
    split_budget,
)

EOS, FILL, BOX_OPEN, DIGIT, BOX_CLOSE, WORD = 0, 1, 2, 3, 4, 5
TEXT = {EOS: "", FILL: "a", BOX_OPEN: "\\boxed{", DIGIT: "7", BOX_CLOSE: "}", WORD: " lorem ipsum"}
PROMPT = [9, 9, 9]


def decode(ids):
    return "".join(TEXT.get(t, "?") for t in ids)


def params(**overrides):
    base = dict(width=8, segment_length=4, max_depth=5, branching_factor=2, eos_token_ids=(EOS,), seed=0)
    base.update(overrides)
    return TreeSamplingParams(**base)


def depth_of(request, prompt=PROMPT, segment_length=4):
    """Depth of the segment being requested (1 for the first segment)."""
    return (len(request.token_ids) - len(prompt)) // segment_length + 1


def never_stop(request, branch, rng):
    return [FILL] * request.max_tokens


def test_no_early_stop_grows_a_binary_tree_to_width():
    engine = ScriptedEngine(never_stop, eos_token_id=EOS)
    rollout = grow_trees(engine, [PROMPT], params(), decode)
    # live paths 2 -> 4 -> 8 -> 8 -> 8, all cut by the length limit at depth 5
    assert [sum(r.num_branches for r in call) for call in engine.calls] == [2, 4, 8, 8, 8]
    leaves = rollout.leaves[0]
    assert len(leaves) == 8
    assert all(leaf.finish_reason is FinishReason.LENGTH for leaf in leaves)
    assert all(len(leaf.token_ids) == 20 and leaf.token_ids[-1] != EOS for leaf in leaves)
    # depth-1 subtrees hold 4 leaves each, depth-2 subtrees 2, deeper nodes are single chains
    assert sorted(Counter(leaf.nodes[:1] for leaf in leaves).values()) == [4, 4]
    assert sorted(Counter(leaf.nodes[:2] for leaf in leaves).values()) == [2, 2, 2, 2]
    assert len({leaf.nodes[:3] for leaf in leaves}) == 8
    # children reuse their parent's request: one request per parent with num_branches = its children
    assert [r.num_branches for r in engine.calls[1]] == [2, 2]
    assert rollout.stats.decoded_tokens == 4 * (2 + 4 + 8 + 8 + 8)
    assert rollout.stats.leaf_tokens == 8 * 20
    assert rollout.stats.decoded_tokens < rollout.stats.leaf_tokens


def test_budget_transfer_gives_a_stopped_siblings_branches_to_the_survivor():
    def first_branch_stops(request, branch, rng):
        if depth_of(request) == 1 and branch == 0:
            return [FILL, EOS]
        return [FILL] * request.max_tokens

    engine = ScriptedEngine(first_branch_stops, eos_token_id=EOS)
    rollout = grow_trees(engine, [PROMPT], params(), decode)
    # 1 stopped + 1 live: T = max(1, min(8 - 1, 2 * (1 + 1))) = 4 children for the survivor
    assert [r.num_branches for r in engine.calls[1]] == [4]
    assert branching_budget(num_live=1, num_stopped_now=1, num_done=1, params=params()) == 4
    assert len(rollout.leaves[0]) == 8
    assert Counter(leaf.finish_reason for leaf in rollout.leaves[0]) == {FinishReason.EOS: 1, FinishReason.LENGTH: 7}


def test_budget_is_capped_by_the_leaves_still_owed_and_every_live_path_continues():
    p = params(width=8)
    assert branching_budget(num_live=6, num_stopped_now=0, num_done=1, params=p) == 7
    assert branching_budget(num_live=3, num_stopped_now=0, num_done=5, params=p) == 3
    assert branching_budget(num_live=2, num_stopped_now=2, num_done=6, params=p) == 2


def test_fixed_avg_split_gives_the_remainder_to_the_last_path():
    assert split_budget(7, [0.0, 0.0, 0.0], params()) == [2, 2, 3]
    assert split_budget(3, [0.0, 0.0, 0.0], params()) == [1, 1, 1]


@pytest.mark.parametrize("policy, favoured", [("low_prob", 0), ("high_prob", 2)])
def test_logprob_policies_favour_low_or_high_probability_paths(policy, favoured):
    p = params(divergence_policy=policy, divergence_temperature=0.5)
    counts = split_budget(8, [-3.0, -1.0, -0.1], p)
    assert sum(counts) == 8 and min(counts) >= 1
    assert counts.index(max(counts)) == favoured


def test_fallback_cuts_a_finished_leaf_at_a_segment_boundary_and_keeps_its_prefix_nodes():
    def all_stop_at_depth_two(request, branch, rng):
        if len(engine.calls) == 1:
            return [FILL] * request.max_tokens
        if len(engine.calls) == 2:
            return [FILL, EOS]  # the original tree: every path ends in its second segment
        return [WORD] * request.max_tokens  # everything grown after the fallback runs to the length limit

    p = params(width=8, seed=4)
    engine = ScriptedEngine(all_stop_at_depth_two, eos_token_id=EOS)
    rollout = grow_trees(engine, [PROMPT], p, decode)
    leaves = rollout.leaves[0]
    assert len(leaves) == 8
    originals = [leaf for leaf in leaves if not leaf.from_fallback]
    fallbacks = [leaf for leaf in leaves if leaf.from_fallback]
    assert len(originals) == 4 and len(fallbacks) == 4
    assert rollout.stats.fallback_events == 1 and rollout.stats.fallback_branches == 4
    original_nodes = {node for leaf in originals for node in leaf.nodes}
    kept_lengths = set()
    for leaf in fallbacks:
        kept = [node for node in leaf.nodes if node in original_nodes]
        assert len(kept) in (0, 1)  # cut at 0, or after the one full segment before the EOS segment
        assert leaf.nodes[: len(kept)] == tuple(kept)  # the kept prefix comes first: it joins those subgroups
        if kept:
            source = next(o for o in originals if o.nodes[0] == kept[0])
            assert leaf.token_ids[:4] == source.token_ids[:4]  # the shared segment, token for token
        assert leaf.token_ids[len(kept) * 4 :] == [WORD] * (20 - len(kept) * 4)
        kept_lengths.add(len(kept))
    assert 1 in kept_lengths  # this seed exercises a real truncation, not only restarts
    # the 4 owed leaves are requested as b = 2 copies of each of 2 cut candidates
    fallback_call = engine.calls[2]
    assert [r.num_branches for r in fallback_call] == [2, 2]


def test_all_paths_stopping_in_the_first_segment_restart_from_the_prompt_until_width_is_reached():
    engine = ScriptedEngine(lambda request, branch, rng: [EOS], eos_token_id=EOS)
    rollout = grow_trees(engine, [PROMPT, PROMPT + [1]], params(width=5), decode)
    for leaves in rollout.leaves:
        assert len(leaves) == 5
        assert all(leaf.token_ids == [EOS] and leaf.depth == 1 for leaf in leaves)
        assert all(leaf.finish_reason is FinishReason.EOS for leaf in leaves)
    # 2 first, then fallback rounds of the 3 still owed (cut at 0 = restart from the prompt)
    assert [sum(r.num_branches for r in call) for call in engine.calls] == [4, 6]
    assert len({leaf.nodes for leaf in rollout.leaves[0]}) == 5


def leaves_in_a_local_group(leaves):
    """Leaves that share some depth >= 1 ancestor with another leaf (more than the root group in their advantage)."""
    counts = Counter(leaf.nodes[:depth] for leaf in leaves for depth in range(1, leaf.depth))
    return sum(any(counts[leaf.nodes[:depth]] >= 2 for depth in range(1, leaf.depth)) for leaf in leaves)


@pytest.mark.parametrize(
    "policy, copies_per_level, in_local_groups",
    [
        # one restart of b = 2 copies; the 6 owed leaves are grown by branching: 2 -> 4 -> 6 live paths
        ("restart", [2, 2, 4, 6, 6, 6], 6),
        # each of the 2 candidates once, with b copies (cut at 0: they had one segment): 4 -> 6 live paths
        ("random_cut", [2, 4, 6, 6, 6, 6], 3),
    ],
)
def test_a_fallback_event_queues_b_copies_per_start_and_leaves_the_rest_as_branching_budget(
    policy, copies_per_level, in_local_groups
):
    """Released semantics (spec §2.5): an event uses each candidate once with min(b, owed) copies, or b restarts.

    Filling the whole owed width in one event would grow 6 independent chains, none with a local subgroup.
    """

    def first_level_stops(request, branch, rng):
        if len(engine.calls) == 1:
            return [FILL, EOS]  # the first segment of the original tree ends every path
        return [FILL] * request.max_tokens  # what grows after the fallback runs to the length limit

    engine = ScriptedEngine(first_level_stops, eos_token_id=EOS)
    rollout = grow_trees(engine, [PROMPT], params(width=8, fallback_policy=policy, seed=1), decode)
    leaves = rollout.leaves[0]
    assert len(leaves) == 8 and rollout.stats.fallback_events == 1
    assert [sum(r.num_branches for r in call) for call in engine.calls] == copies_per_level
    assert all(r.num_branches == 2 for r in engine.calls[1])
    regrown = [leaf for leaf in leaves if leaf.from_fallback]
    assert len(regrown) == 6
    assert leaves_in_a_local_group(regrown) == in_local_groups


def test_eos_only_segment_stops_the_path():
    """The released code's reverse search skips index 0 and keeps decoding past a lone EOS (spec §2.3)."""
    engine = ScriptedEngine(
        lambda request, branch, rng: [EOS] if depth_of(request) == 2 else [FILL] * 4, eos_token_id=EOS
    )
    rollout = grow_trees(engine, [PROMPT], params(width=4), decode)
    assert all(leaf.token_ids[-1] == EOS and leaf.depth == 2 for leaf in rollout.leaves[0])
    assert all(leaf.finish_reason is FinishReason.EOS for leaf in rollout.leaves[0])
    assert len(rollout.leaves[0]) == 4


def test_a_stop_string_ends_the_path_after_the_token_that_completes_it():
    engine = ScriptedEngine(lambda request, branch, rng: [FILL, DIGIT, FILL, FILL], eos_token_id=EOS)
    rollout = grow_trees(engine, [PROMPT], params(width=2, stop_strings=("a7",)), decode)
    assert all(leaf.token_ids == [FILL, DIGIT] for leaf in rollout.leaves[0])
    assert all(leaf.finish_reason is FinishReason.EOS for leaf in rollout.leaves[0])
    assert all(len(leaf.logprobs) == 2 for leaf in rollout.leaves[0])


def test_a_stop_string_that_spans_a_segment_boundary_ends_the_path():
    def respond(request, branch, rng):
        return [FILL, FILL, FILL, WORD] if depth_of(request) == 1 else [FILL] * request.max_tokens

    engine = ScriptedEngine(respond, eos_token_id=EOS)
    rollout = grow_trees(engine, [PROMPT], params(width=4, stop_strings=("nothing", "psuma")), decode)
    leaves = rollout.leaves[0]
    # "...ipsum" ends segment 1, "a" starts segment 2: the path stops one token into its second segment
    assert all(leaf.token_ids == [FILL, FILL, FILL, WORD, FILL] and leaf.depth == 2 for leaf in leaves)
    assert all(leaf.finish_reason is FinishReason.EOS for leaf in leaves)
    assert len(leaves) == 4  # stopped paths are finished leaves: the tree still reaches its width


def test_tokens_after_an_eos_inside_a_segment_are_dropped():
    engine = ScriptedEngine(lambda request, branch, rng: [FILL, EOS, FILL, FILL], eos_token_id=EOS)
    rollout = grow_trees(engine, [PROMPT], params(width=2), decode)
    assert all(leaf.token_ids == [FILL, EOS] for leaf in rollout.leaves[0])


def test_answer_with_eos_stops_as_answer_and_answer_without_eos_keeps_going_by_default():
    def answer_in_first_segment(request, branch, rng):
        if depth_of(request) == 1:
            return [BOX_OPEN, DIGIT, BOX_CLOSE, EOS] if branch == 0 else [BOX_OPEN, DIGIT, BOX_CLOSE, FILL]
        return [FILL] * 4

    rollout = grow_trees(ScriptedEngine(answer_in_first_segment), [PROMPT], params(width=2), decode)
    reasons = sorted(leaf.finish_reason.value for leaf in rollout.leaves[0])
    assert reasons == ["answer", "length"]


def test_boxed_rule_stops_on_a_complete_answer_even_across_a_segment_boundary():
    def split_answer(request, branch, rng):
        depth = depth_of(request)
        if depth == 1:
            return [FILL, FILL, BOX_OPEN, DIGIT]
        if depth == 2:
            return [DIGIT, BOX_CLOSE, FILL, FILL]
        return [FILL] * 4

    rollout = grow_trees(ScriptedEngine(split_answer), [PROMPT], params(width=2, answer_stop="boxed"), decode)
    assert all(leaf.finish_reason is FinishReason.ANSWER and leaf.depth == 2 for leaf in rollout.leaves[0])
    rollout = grow_trees(ScriptedEngine(split_answer), [PROMPT], params(width=2, answer_stop="none"), decode)
    assert all(leaf.finish_reason is FinishReason.LENGTH for leaf in rollout.leaves[0])


def test_repetition_stops_a_path_and_its_priority_decides_against_eos():
    p = params(width=2, segment_length=40, max_depth=2, repetition_window=8, repetition_min_count=3)
    looping = [WORD] * 39 + [EOS]
    rollout = grow_trees(ScriptedEngine(lambda r, b, g: looping), [PROMPT], p, decode)
    assert all(leaf.finish_reason is FinishReason.REPETITION for leaf in rollout.leaves[0])
    last = params(width=2, segment_length=40, max_depth=2, repetition_window=8, repetition_min_count=3,
                  repetition_priority="last")
    rollout = grow_trees(ScriptedEngine(lambda r, b, g: looping), [PROMPT], last, decode)
    assert all(leaf.finish_reason is FinishReason.EOS for leaf in rollout.leaves[0])
    rollout = grow_trees(ScriptedEngine(lambda r, b, g: [WORD] * 40), [PROMPT], last, decode)
    assert all(leaf.finish_reason is FinishReason.REPETITION and leaf.depth == 1 for leaf in rollout.leaves[0])


def test_text_helpers():
    assert find_boxed_answers("x \\boxed{\\frac{1}{\\sqrt{2}}} y \\boxed{3}") == [
        (2, 28, "\\frac{1}{\\sqrt{2}}"),
        (31, 40, "3"),
    ]
    assert find_boxed_answers("\\boxed{12") == []
    assert has_repetition("ab" * 20, window=4, min_count=8)
    assert not has_repetition("abcdefghij" * 2, window=4, min_count=3)


def test_random_initial_divergence_draws_per_prompt_within_range():
    engine = ScriptedEngine(lambda request, branch, rng: [EOS])
    p = params(width=16, initial_divergence=2, initial_divergence_max=8, fallback_policy="none", seed=1)
    grow_trees(engine, [PROMPT] * 40, p, decode)
    forks = [r.num_branches for r in engine.calls[0]]
    assert min(forks) >= 2 and max(forks) <= 8 and len(set(forks)) > 3


def test_without_fallback_a_prompt_may_end_short():
    engine = ScriptedEngine(lambda request, branch, rng: [EOS])
    rollout = grow_trees(engine, [PROMPT], params(width=6, fallback_policy="none"), decode)
    assert len(rollout.leaves[0]) == 2


def test_logprobs_are_concatenated_across_segments():
    engine = ScriptedEngine(never_stop, logprob=lambda token: -0.25)
    rollout = grow_trees(engine, [PROMPT], params(width=2, max_depth=3), decode)
    assert all(leaf.logprobs == [-0.25] * 12 for leaf in rollout.leaves[0])


def test_sampler_is_deterministic_under_a_seed_and_always_returns_width_leaves():
    def random_engine(seed):
        def respond(request, branch, rng):
            length = rng.randint(1, request.max_tokens)
            tokens = [rng.choice([FILL, WORD, DIGIT]) for _ in range(length)]
            return tokens[:-1] + [EOS] if rng.random() < 0.3 else [FILL] * request.max_tokens

        return ScriptedEngine(respond, seed=seed)

    for seed in range(20):
        p = params(width=6, seed=seed, initial_divergence=1, initial_divergence_max=4)
        first = grow_trees(random_engine(seed), [PROMPT, PROMPT + [3]], p, decode)
        second = grow_trees(random_engine(seed), [PROMPT, PROMPT + [3]], p, decode)
        assert [[(l.nodes, l.token_ids) for l in ls] for ls in first.leaves] == [
            [(l.nodes, l.token_ids) for l in ls] for ls in second.leaves
        ]
        for leaves in first.leaves:
            assert len(leaves) == 6
            for leaf in leaves:
                # non-final segments are full, and the node path has one id per segment
                assert len(leaf.token_ids) > (leaf.depth - 1) * 4
                assert len(leaf.token_ids) <= leaf.depth * 4


def test_engine_returning_the_wrong_number_of_branches_is_an_error():
    class ShortEngine:
        def generate(self, requests):
            return [[SegmentOutput([FILL], None, "length")] for _ in requests]

    with pytest.raises(RuntimeError, match="num_branches"):
        grow_trees(ShortEngine(), [PROMPT], params(), decode)


def test_invalid_params_are_rejected_with_the_field_name():
    with pytest.raises(ValueError, match="segment_length"):
        params(segment_length=0)
    with pytest.raises(ValueError, match="divergence_policy"):
        params(divergence_policy="widest")
    with pytest.raises(ValueError, match="max_response_length"):
        params(max_response_length=19)
    with pytest.raises(ValueError, match="Every prompt"):
        grow_trees(ScriptedEngine(never_stop), [[]], params(), decode)
