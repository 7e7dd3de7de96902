"""The agentic case (`--tools`): calculator problems rolled out as GRPOTrainer's tool loop does (every completion runs
its own calls, turn by turn) against a tree through tool calls (docs/algorithm.md §8), where a call runs once per
node; the same tool executor, with TRL's semantics, serves both."""

from __future__ import annotations

import time

from ..sampling import SegmentRequest, TreeSamplingParams
from .harness import RunResult, trim_at_eos


def run_sequential_with_tools(engine, prompts, params: TreeSamplingParams, tools) -> RunResult:
    """GRPOTrainer's tool loop: `width` completions per prompt; each turn that ends with tool calls runs them, appends
    the result and generates the next turn, until no call is left or `max_tool_turns` turns ran (one engine call per
    iteration, over every completion still going)."""
    eos = frozenset(params.eos_token_ids)
    started = time.perf_counter()
    rows = [prompt_index for prompt_index in range(len(prompts)) for _ in range(params.width)]
    completions = [[] for _ in rows]
    policy_tokens = [0] * len(rows)
    states = [tools.root_state(prompt_index) for prompt_index in rows]
    turns = [0] * len(rows)
    decoded = calls = engine_calls = requests = 0
    active = list(range(len(rows)))
    while active:
        budget = [params.max_response_length - len(completions[row]) for row in active]
        outputs = engine.generate(
            [SegmentRequest(list(prompts[rows[row]]) + completions[row], 1, left) for row, left in zip(active, budget)]
        )
        engine_calls, requests = engine_calls + 1, requests + len(active)
        still_going = []
        for row, (output,) in zip(active, outputs):
            decoded += len(output.token_ids)
            turn_ids = trim_at_eos(output.token_ids, eos)
            context = list(prompts[rows[row]]) + completions[row]
            completions[row] += turn_ids
            policy_tokens[row] += len(turn_ids)
            if not turn_ids or turn_ids[-1] not in eos:
                continue  # the length limit cut it
            found = tools.find_calls(rows[row], context, turn_ids)
            if found is None or (params.max_tool_turns is not None and turns[row] >= params.max_tool_turns):
                continue
            turn = tools.run(rows[row], states[row], found)
            calls += turn.calls
            if len(completions[row]) + len(turn.token_ids) >= params.max_response_length:
                continue
            completions[row] += turn.token_ids
            states[row], turns[row] = turn.state, turns[row] + 1
            still_going.append(row)
        active = still_going
    wall = time.perf_counter() - started
    return RunResult(
        wall_s=wall,
        trajectories=len(rows),
        leaf_tokens=sum(policy_tokens),
        decoded_tokens=decoded,
        engine_calls=engine_calls,
        requests=requests,
        early_stop_ratio=sum(len(c) < params.max_response_length for c in completions) / len(rows),
        tool_calls=calls,
        path_tool_calls=calls,
    )



def tool_prompts(args, tokenizer):
    """The agentic case's prompts (rendered with the calculator tool) and a `ToolExecutor` with TRL's semantics."""
    import functools
    import types

    from trl import GRPOTrainer
    from trl.chat_template_utils import add_response_schema, parse_response

    from ..testing import calculate, make_tool_dataset
    from ..tools import PromptTools, ToolExecutor

    @functools.wraps(calculate)
    def slow_calculate(expression: str) -> str:
        time.sleep(args.tool_latency)
        return calculate(expression)

    tokenizer = add_response_schema(tokenizer)  # as GRPOTrainer sets it up for tool parsing
    rows = make_tool_dataset(args.prompts, seed=args.seed + 1000)
    prompts = [
        tokenizer.apply_chat_template(row["prompt"], tools=[calculate], add_generation_prompt=True, tokenize=True,
                                      return_dict=False)  # fmt: skip
        for row in rows
    ]
    # GRPOTrainer's own tokenisation of tool results, bound to this tokenizer (it reads no other trainer state).
    trainer_view = types.SimpleNamespace(processing_class=tokenizer, _tokenizer=tokenizer, chat_template=None,
                                         chat_template_kwargs={}, _is_vlm=False)  # fmt: skip

    def suffix_ids(tool_messages):
        return GRPOTrainer._get_tool_suffix_ids(trainer_view, tool_messages)

    def parse(ids, prefix, schema):
        return parse_response(tokenizer, ids, prefix=prefix, tools=schema)

    executor = ToolExecutor([PromptTools([slow_calculate], [calculate]) for _ in prompts], parse, suffix_ids)
    return prompts, executor


