"""Agentic trees: tool calls inside tree rollouts (multi-turn), from the pure sampler to the trainer.

The sampler is driven by a scripted engine and a scripted `ToolRunner`; the trainer by scripted segments through
the real `ToolExecutor`, TRL's tool parsing and suffix tokenisation, rewards and loss. tests/test_vllm.py and
`test_transformers_backend_grows_trees_through_real_tool_calls` run the same through real engines, with a tiny model
SFT-warmed to call the calculator.
"""

import threading
import time

import pytest
import torch
from test_trainer import tiny_args
from transformers import AutoTokenizer
from trl import GRPOTrainer

import trl_treepo.trainer.rollouts as rollouts_module
from trl_treepo import TreePOTrainer
from trl_treepo.sampling import ToolTurn, TreeSamplingParams
from trl_treepo.testing import ScriptedEngine, calculate, counting_calculator, make_tool_dataset
from trl_treepo.testing import final_answer_reward as final_answer
from trl_treepo.tools import EnvironmentBranchingError, ToolExecutor
from trl_treepo.tree import FinishReason, grow_trees

# ------------------------------------------------------------------------------------------ the pure sampler

EOS, FILL, CALL, RESULT, ANSWER = 0, 1, 2, 3, 4
PROMPT = [9, 9]


class ScriptedTools:
    """A `ToolRunner`: a turn holding CALL calls a tool; its result is `result_length` RESULT tokens.

    A path's state is the tuple of the run ids on its path, so the test can see which state each run started from.
    """

    def __init__(self, result_length=2):
        self.result_length = result_length
        self.runs = []  # (prompt index, state given)

    def root_state(self, prompt_index):
        return ()

    def find_calls(self, prompt_index, context_ids, turn_ids):
        return "call" if CALL in turn_ids else None

    def run(self, prompt_index, state, calls):
        self.runs.append((prompt_index, state))
        return ToolTurn([RESULT] * self.result_length, calls=1, failures=0, state=(*state, len(self.runs)))


def params(**overrides):
    base = dict(width=8, segment_length=4, max_depth=4, branching_factor=2, eos_token_ids=(EOS,), seed=0,
                answer_stop="none")  # fmt: skip
    base.update(overrides)
    return TreeSamplingParams(**base)


def calls_then_answers(request, branch, rng):
    """Turn 1 calls a tool in a short segment; after the result, one full segment, then an answer."""
    response = request.token_ids[len(PROMPT) :]
    if RESULT not in response:
        return [CALL, EOS]
    after = len(response) - (len(response) - response[::-1].index(RESULT))
    return [FILL] * 4 if after == 0 else [ANSWER, EOS]


def test_a_tool_call_ends_its_segment_runs_once_per_node_and_the_children_branch_after_the_result():
    tools = ScriptedTools()
    engine = ScriptedEngine(calls_then_answers, eos_token_id=EOS)
    rollout = grow_trees(engine, [PROMPT], params(), tools=tools)
    leaves = rollout.leaves[0]
    assert len(leaves) == 8
    # the root forks twice; each path calls once: 2 executions shared by 8 leaves (a sequential rollout runs 8)
    assert len(tools.runs) == 2 and rollout.stats.tool_calls == 2
    assert rollout.stats.sequential_tool_calls == 8
    for leaf in leaves:
        # segment 1 is the call turn plus its result; the children branched after it
        assert leaf.token_ids[:4] == [CALL, EOS, RESULT, RESULT]
        assert leaf.segment_ends[0] == 4
        assert leaf.tool_mask[:4] == [1, 1, 0, 0] and all(leaf.tool_mask[4:])
        assert len(leaf.tool_turns) == 1 and leaf.tool_turns[0][0] == 0
        assert leaf.finish_reason is FinishReason.EOS
    # the result is context, not policy output: never decoded, never counted as leaf (policy) tokens
    assert rollout.stats.leaf_tokens == sum(len(leaf.token_ids) - 2 for leaf in leaves)
    # every request after the call carries the result, so the children continue from it
    second_level = engine.calls[1]
    assert all(list(r.token_ids[-2:]) == [RESULT, RESULT] for r in second_level)
    assert sum(r.num_branches for r in second_level) == 4


def test_each_path_gets_the_tool_state_of_its_own_ancestors():
    def call_twice(request, branch, rng):
        response = request.token_ids[len(PROMPT) :]
        return [CALL, EOS] if response.count(RESULT) < 4 else [ANSWER, EOS]

    tools = ScriptedTools()
    rollout = grow_trees(ScriptedEngine(call_twice, eos_token_id=EOS), [PROMPT], params(), tools=tools)
    # level 1: 2 runs from the root state; level 2: 4 runs, each from its own parent's state
    assert [state for _, state in tools.runs[:2]] == [(), ()]
    assert sorted(state for _, state in tools.runs[2:]) == [(1,), (1,), (2,), (2,)]
    for leaf in rollout.leaves[0]:
        first, second = (turn.state for _, turn in leaf.tool_turns)
        assert second[:-1] == first and leaf.tool_state == second
        assert leaf.tool_calls == 2


def test_max_tool_turns_bounds_each_path():
    def always_call(request, branch, rng):
        return [CALL, EOS]

    tools = ScriptedTools()
    rollout = grow_trees(ScriptedEngine(always_call, eos_token_id=EOS), [PROMPT], params(max_tool_turns=1), tools=tools)
    leaves = rollout.leaves[0]
    assert len(leaves) == 8
    assert all(leaf.finish_reason is FinishReason.TOOL_LIMIT and len(leaf.tool_turns) == 1 for leaf in leaves)
    # the second turn's calls were not run: the leaf ends at that turn, as TRL's loop ends at its iteration cap
    assert all(leaf.token_ids[-2:] == [CALL, EOS] for leaf in leaves)
    no_turns = grow_trees(ScriptedEngine(always_call, eos_token_id=EOS), [PROMPT], params(max_tool_turns=0),
                          tools=ScriptedTools())  # fmt: skip
    assert all(leaf.tool_turns == () for leaf in no_turns.leaves[0]) and no_turns.stats.tool_calls == 0


def test_a_result_that_does_not_fit_ends_the_path_at_its_call():
    tools = ScriptedTools(result_length=20)  # more than max_response_length (16) leaves room for
    rollout = grow_trees(ScriptedEngine(calls_then_answers, eos_token_id=EOS), [PROMPT], params(), tools=tools)
    leaves = rollout.leaves[0]
    assert all(leaf.finish_reason is FinishReason.TOOL_LIMIT and leaf.token_ids == [CALL, EOS] for leaf in leaves)
    assert rollout.stats.tool_calls == len(tools.runs) > 0  # run and counted, as TRL counts it, then dropped
    assert all(leaf.tool_mask is None for leaf in leaves)
    # the result is dropped, but what the calls did to the path's environment stays, as in TRL
    assert sorted(leaf.tool_state for leaf in leaves) == [(run,) for run in range(1, len(tools.runs) + 1)]


def test_fallback_re_branches_after_a_tool_result_with_that_nodes_state():
    tools = ScriptedTools()
    answers = lambda request, branch, rng: [CALL, EOS] if RESULT not in request.token_ids else [ANSWER, EOS]
    rollout = grow_trees(ScriptedEngine(answers, eos_token_id=EOS), [PROMPT], params(width=4, initial_divergence=1),
                         tools=tools)  # fmt: skip
    leaves = rollout.leaves[0]
    # one call, two children answer at once, so fallback owes 2 more leaves
    assert len(leaves) == 4 and rollout.stats.fallback_events >= 1
    regrown = [leaf for leaf in leaves if leaf.from_fallback]
    assert regrown
    restarts = sum(1 for leaf in regrown if leaf.tool_turns[0][1] is not leaves[0].tool_turns[0][1])
    for leaf in regrown:
        assert leaf.token_ids[:4] == [CALL, EOS, RESULT, RESULT] and leaf.tool_mask[:4] == [1, 1, 0, 0]
        if leaf.tool_turns[0][1] is leaves[0].tool_turns[0][1]:  # cut after the tool node: its turn and state kept
            assert leaf.tool_state == (1,) and leaf.nodes[0] == leaves[0].nodes[0]
    # a cut after the tool node re-runs nothing; only a restart from the prompt calls again
    assert len(tools.runs) == 1 + restarts


def test_without_tools_segment_ends_are_full_segments():
    rollout = grow_trees(ScriptedEngine(lambda r, b, g: [FILL] * r.max_tokens, eos_token_id=EOS), [PROMPT], params())
    for leaf in rollout.leaves[0]:
        assert leaf.segment_ends == (4, 8, 12, 16) and leaf.tool_mask is None
        assert leaf.segment_bounds(4) == [(0, 4), (4, 8), (8, 12), (12, 16)]


# ------------------------------------------------------------------------------------------ the tool executor


def parse_by_name(ids, prefix, schema):
    """A stand-in for `parse_response`: token 7 means "call `calculate` on 3 + 4", 8 a call of a missing tool."""
    if 7 in ids:
        return {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculate", "arguments": {"expression": "3 + 4"}}}]}
    if 8 in ids:
        return {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "missing", "arguments": {}}}]}
    return {"role": "assistant", "content": "text"}


def suffix_of(tool_messages):
    return [100 + len(str(m["content"])) for m in tool_messages]


def executor(tool, timeout=None, **prompt_fields):
    from trl_treepo.tools import PromptTools

    return ToolExecutor([PromptTools([tool], [tool], **prompt_fields)], parse_by_name, suffix_of, timeout=timeout)


def test_tool_failures_are_reported_as_trl_reports_them():
    def calculate(expression: str) -> str:
        raise ValueError("bad expression")

    runner = executor(calculate)
    turn = runner.run(0, None, runner.find_calls(0, [], [7]))
    assert (turn.calls, turn.failures) == (1, 1)
    assert turn.record.tool_messages == [{"role": "tool", "name": "calculate", "content": "{'error': 'bad expression'}"}]
    turn = runner.run(0, None, runner.find_calls(0, [], [8]))
    assert turn.failures == 1 and turn.record.tool_messages[0]["content"] == "{'error': 'Tool missing not found.'}"
    assert runner.find_calls(0, [], [1, 2]) is None  # no call (a malformed one parses as text): the path ends


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_hanging_tool_is_bounded_by_the_timeout(kind):
    import asyncio

    release = threading.Event()

    def calculate(expression: str) -> str:
        release.wait(30)
        return "late"

    async def async_calculate(expression: str) -> str:
        await asyncio.sleep(30)
        return "late"

    async_calculate.__name__ = "calculate"
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    runner = executor(calculate if kind == "sync" else async_calculate, timeout=0.2)
    runner.async_loop = loop
    started = time.monotonic()
    turn = runner.run(0, None, runner.find_calls(0, [], [7]))
    release.set()
    loop.call_soon_threadsafe(loop.stop)
    assert time.monotonic() - started < 5
    assert turn.failures == 1 and "timed out after 0.2 s" in turn.record.tool_messages[0]["content"]
    assert runner.timeouts == 1


# --------------------------------------------------------------------------------------------- through the trainer

SEGMENT, DEPTH, WIDTH = 32, 3, 4


def call_text(expression):
    return f'<tool_call>\n{{"name": "calculate", "arguments": {{"expression": "{expression}"}}}}\n</tool_call>'


@pytest.fixture
def scripted_turns(tiny_model, monkeypatch):
    """Script the model's turns by the text it has seen: `install(respond)`, `respond(seen_text, branch) -> text`
    (EOS is appended). The tools, their parsing and everything after run for real."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def install(respond):
        def scripted_grow_trees(engine, roots, params, decode, tools=None):
            def segment(request, branch, rng):
                text = respond(tokenizer.decode(request.token_ids), branch)
                return tokenizer.encode(text, add_special_tokens=False) + [eos]

            return grow_trees(ScriptedEngine(segment, eos), roots, params, decode, tools)

        monkeypatch.setattr(rollouts_module, "grow_trees", scripted_grow_trees)

    return install, tokenizer


def tool_trainer(tiny_model, tmp_path, reward_funcs=final_answer, **kwargs):
    overrides = dict(num_generations=WIDTH, tree_segment_length=SEGMENT, tree_max_depth=DEPTH, max_steps=1,
                     tree_filter_zero_std_prompts=False, learning_rate=1e-3)  # fmt: skip
    overrides.update(kwargs.pop("args", {}))
    return TreePOTrainer(model=tiny_model, reward_funcs=reward_funcs, args=tiny_args(tmp_path, **overrides),
                         train_dataset=make_tool_dataset(16, seed=3), **kwargs)  # fmt: skip


def capture_batches(trainer):
    """(output, tree batch) of each step's advantage step, after it ran."""
    batches = []
    original = trainer._advantage_step.replace_advantages

    def spy(output, batch, paths, truncated):
        original(output, batch, paths, truncated)
        batches.append(({key: value for key, value in output.items()}, batch))

    trainer._advantage_step.replace_advantages = spy
    return batches


def test_trainer_runs_tools_once_per_node_masks_results_and_scores_whole_conversations(
    tiny_model, tmp_path, scripted_turns
):
    install, tokenizer = scripted_turns
    counted_calculate, executed = counting_calculator()

    def respond(seen, branch):
        if "<tool_response>" not in seen:
            return call_text("3 + 4")
        return "The final answer is \\boxed{7}." if branch == 0 else "It is \\boxed{8}."

    install(respond)
    seen = {}

    def final_answer_spy(completions, solution, **kwargs):
        seen["completions"] = completions
        return final_answer(completions, ["7"] * len(completions))

    trainer = tool_trainer(tiny_model, tmp_path, reward_funcs=final_answer_spy, tools=[counted_calculate])
    batches = capture_batches(trainer)
    trainer.train()
    output, batch = batches[0]
    completion_ids, tool_mask = output["completion_ids"], output["tool_mask"]
    log = trainer.state.log_history[0]
    rows = completion_ids.size(0)
    # 2 prompts, each forked twice at the root: 4 calls run, where sequential rollouts would run one per leaf (8)
    assert len(executed) == 4 == log["tree/tool_calls"]
    assert log["tree/sequential_tool_calls"] == rows == 8
    assert log["tree/tool_call_ratio"] == pytest.approx(0.5)
    assert log["tools/call_frequency"] == pytest.approx(4 / 8) and log["tools/failure_frequency"] == 0
    suffix = trainer._get_tool_suffix_ids([{"role": "tool", "name": "calculate", "content": "7"}])
    for row, leaf in enumerate(batch.row_leaves):
        ids = completion_ids[row].tolist()
        call_end = len(tokenizer.encode(call_text("3 + 4"), add_special_tokens=False)) + 1
        assert ids[call_end : call_end + len(suffix)] == suffix  # TRL's own tool-result tokens
        masked = (tool_mask[row][: len(leaf.token_ids)] == 0).nonzero().flatten().tolist()
        assert masked == list(range(call_end, call_end + len(suffix)))
    conversation = seen["completions"][0]
    assert [m["role"] for m in conversation] == ["assistant", "tool", "assistant"]
    assert conversation[0]["tool_calls"][0]["function"] == {"name": "calculate", "arguments": {"expression": "3 + 4"}}
    assert conversation[1]["content"] == "7"
    rewards = trainer._advantage_step.rewards_per_func[:, 0]
    assert sorted(rewards.tolist()) == [0.0] * 4 + [1.0] * 4  # scored on the last message, per leaf
    assert log["rewards/final_answer_spy/mean"] == pytest.approx(0.5)


class CounterEnv:
    """A stateful environment: `add` changes its total, `get_reward` reads it."""

    def __init__(self):
        self.total = 0

    def reset(self, **kwargs):
        self.total = 0

    def add(self, amount: int) -> str:
        """
        Adds to the running total.

        Args:
            amount: How much to add.
        """
        self.total += amount
        return str(self.total)

    def get_reward(self):
        return float(self.total)


def add_call(amount):
    return f'<tool_call>\n{{"name": "add", "arguments": {{"amount": {amount}}}}}\n</tool_call>'


def two_turn_env_script(seen, branch):
    """Turn 1 adds 1; after that, branch 0 adds 10 and the others answer; after a second result, answer."""
    results = seen.count("<tool_response>")
    if results == 0:
        return add_call(1)
    if results == 1 and branch == 0:
        return add_call(10)
    return "Done."


@pytest.mark.parametrize("branching", ["copy", "replay"])
def test_each_path_owns_its_environment(tiny_model, tmp_path, scripted_turns, branching):
    install, _ = scripted_turns
    install(two_turn_env_script)
    created = []

    def factory():
        created.append(CounterEnv())
        return created[-1]

    trainer = tool_trainer(tiny_model, tmp_path, reward_funcs=[], environment_factory=factory,
                           args=dict(tree_environment_branching=branching))  # fmt: skip
    batches = capture_batches(trainer)
    trainer.train()
    _, batch = batches[0]
    rewards = trainer._advantage_step.rewards_per_func[:, 0].tolist()  # CounterEnv.get_reward of each row's environment
    for leaf, reward in zip(batch.row_leaves, rewards):
        # a leaf's environment saw exactly the calls on its own path: 1, or 1 then 10
        assert reward == (11.0 if len(leaf.tool_turns) == 2 else 1.0)
    assert sorted(set(rewards)) == [1.0, 11.0]
    # TRL's pooled, reset instances are never mutated: every call ran on a path's own copy
    assert all(env.total == 0 for env in created[: len(trainer._environment_pool[None])])


class UncopyableEnv(CounterEnv):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()


def test_an_environment_that_cannot_be_copied_names_the_replay_option(tiny_model, tmp_path, scripted_turns):
    install, _ = scripted_turns
    install(two_turn_env_script)
    trainer = tool_trainer(tiny_model, tmp_path, reward_funcs=[], environment_factory=UncopyableEnv)
    with pytest.raises(EnvironmentBranchingError, match="tree_environment_branching='replay'"):
        trainer.train()


def test_environments_whose_reset_differs_per_rollout_are_refused(tiny_model, tmp_path, scripted_turns):
    install, _ = scripted_turns
    install(two_turn_env_script)
    counter = iter(range(10_000))

    class RandomStart(CounterEnv):
        def reset(self, **kwargs):
            super().reset()
            return f"Start at {next(counter)}."

    trainer = tool_trainer(tiny_model, tmp_path, reward_funcs=[], environment_factory=RandomStart)
    with pytest.raises(ValueError, match="reset\\(\\) returned different observations"):
        trainer.train()


@pytest.mark.parametrize("normalization", ["none", "batch_whiten"])
def test_tree_segment_advantages_follow_segments_cut_short_by_tool_calls(tiny_model, tmp_path, scripted_turns,
                                                                         normalization):  # fmt: skip
    install, _ = scripted_turns
    install(two_turn_env_script)
    trainer = tool_trainer(tiny_model, tmp_path, reward_funcs=[], environment_factory=CounterEnv,
                           args=dict(tree_advantage_estimator="tree_segment",
                                     tree_advantage_normalization=normalization))  # fmt: skip
    batches = capture_batches(trainer)
    trainer.train()
    output, batch = batches[0]
    advantages, policy = output["advantages"], (output["completion_mask"] * output["tool_mask"]).bool()
    for row, leaf in enumerate(batch.row_leaves):
        for start, end in leaf.segment_bounds(SEGMENT):  # one value per segment, changing only at its ends
            assert torch.unique(advantages[row, start:end][policy[row, start:end]]).numel() == 1
    assert (advantages[~policy] == 0).all()  # tool results carry no advantage
    if normalization == "batch_whiten":  # whitened over the policy's tokens only: tool results do not count
        trained = advantages[policy].double()
        assert trained.mean().item() == pytest.approx(0.0, abs=1e-6)
        assert trained.std().item() == pytest.approx(1.0, abs=1e-3)


def test_sequential_evaluation_keeps_trls_tool_loop(tiny_model, tmp_path, scripted_turns):
    install, _ = scripted_turns
    install(two_turn_env_script)
    trainer = tool_trainer(tiny_model, tmp_path, tools=[calculate], args=dict(tree_sampling=False))
    called = []
    original = GRPOTrainer._tool_call_loop

    def spy(self, *args):
        called.append(True)
        return original(self, *args)

    trainer._tool_call_loop = spy.__get__(trainer)
    trainer.train()
    assert called  # tree_sampling=False: GRPOTrainer's own loop ran


def test_tools_with_tensor_parallel_colocate_are_refused_before_vllm_starts(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="vllm_tensor_parallel_size > 1"):
        tool_trainer(tiny_model, tmp_path, tools=[calculate],
                     args=dict(use_vllm=True, vllm_mode="colocate", vllm_tensor_parallel_size=2))  # fmt: skip


# ------------------------------------------------------------------------------------------------ real engine


def test_transformers_backend_grows_trees_through_real_tool_calls(tool_model, tmp_path):
    tool, executed = counting_calculator()
    trainer = tool_trainer(tool_model, tmp_path, tools=[tool],
                           args=dict(num_generations=8, max_steps=2, tree_segment_length=32, tree_max_depth=6,
                                     max_tool_calling_iterations=3, learning_rate=1e-4))  # fmt: skip
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    # every call ran once (a call with wrong argument names fails before the function body runs)
    assert sum(entry["tree/tool_calls"] for entry in logs) >= len(executed) > 0
    for entry in logs:
        assert entry["tree/tool_calls"] <= entry["tree/sequential_tool_calls"]
    # sharing: over both steps, fewer executions than sequential rollouts of the same leaves would run
    assert sum(e["tree/tool_calls"] for e in logs) < sum(e["tree/sequential_tool_calls"] for e in logs)


def test_malformed_calls_end_the_path_and_async_tools_run_on_trls_event_loop(tiny_model, tmp_path, scripted_turns):
    install, _ = scripted_turns
    executed = []

    async def calculate(expression: str) -> str:
        """
        Evaluates one addition or subtraction of two integers.

        Args:
            expression: The operation to evaluate.
        """
        executed.append(expression)
        return str(eval(expression))  # a test tool on scripted input

    def respond(seen, branch):
        if "<tool_response>" in seen:
            return "The final answer is \\boxed{7}."
        if branch == 0:
            return '<tool_call>\n{"name": "calculate", "arguments": {</tool_call>'  # malformed: plain text to TRL
        return call_text("3 + 4")

    install(respond)
    seen = {}

    def reward(completions, **kwargs):
        seen["completions"] = completions
        return [0.0] * len(completions)

    trainer = tool_trainer(tiny_model, tmp_path, reward_funcs=reward, tools=[calculate])
    trainer.train()
    log = trainer.state.log_history[0]
    # each prompt forks twice at the root: branch 0 writes a malformed call (a leaf), branch 1 a real one
    assert executed == ["3 + 4", "3 + 4"] and log["tree/tool_calls"] == 2 and log["tools/failure_frequency"] == 0
    conversations = seen["completions"]
    malformed = [c for c in conversations if len(c) == 1]
    assert malformed and all("tool_call" not in c[0] or not c[0]["tool_calls"] for c in malformed)
    assert all(c[0]["content"].startswith("\n{") or "arguments" in c[0]["content"] for c in malformed)
    assert all([m["role"] for m in c] == ["assistant", "tool", "assistant"] for c in conversations if len(c) > 1)
