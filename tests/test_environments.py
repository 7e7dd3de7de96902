"""Each tree path owns its environment: state outside Python is forked or refused, replay runs each call once along a
chain and counts what it replays, every instance made for the paths is closed, and a turn's results come in TRL's
order."""

import asyncio
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from trl_treepo.environments import EnvironmentBranchingError, outside_state
from trl_treepo.sampling import TreeSamplingParams
from trl_treepo.testing import ScriptedEngine
from trl_treepo.tools import PromptTools, ToolExecutor
from trl_treepo.tree import grow_trees

EOS, RESULT, ANSWER, WRITE_A, WRITE_B, READ = 0, 3, 4, 20, 21, 22
PROMPT = [9, 9]


class FileEnv:
    """An environment whose state is a temporary directory: what a code sandbox looks like."""

    made = []

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="treepo-env-")
        self.closed = False
        FileEnv.made.append(self)

    def reset(self, **kwargs):
        for path in Path(self.directory).iterdir():
            path.unlink()

    def write(self, name: str, text: str) -> str:
        """
        Writes a file.

        Args:
            name: The file name.
            text: What to write.
        """
        (Path(self.directory) / name).write_text(text)
        return "written"

    def read(self, name: str) -> str:
        """
        Reads a file.

        Args:
            name: The file name.
        """
        path = Path(self.directory) / name
        return path.read_text() if path.exists() else "missing"

    def close(self):
        shutil.rmtree(self.directory, ignore_errors=True)
        self.closed = True


class ForkableFileEnv(FileEnv):
    def fork(self):
        forked = type(self)()
        shutil.copytree(self.directory, forked.directory, dirs_exist_ok=True)
        return forked


def call(tool, **arguments):
    return {"type": "function", "function": {"name": tool, "arguments": arguments}}


def parse(ids, prefix, schema):
    """Token WRITE_A / WRITE_B writes "A" / "B" to file f, READ reads it back."""
    calls = {WRITE_A: call("write", name="f", text="A"), WRITE_B: call("write", name="f", text="B"),
             READ: call("read", name="f")}  # fmt: skip
    found = [calls[token] for token in ids if token in calls]
    return {"role": "assistant", "content": "", "tool_calls": found} if found else {"role": "assistant", "content": ""}


def write_then_read(request, branch, rng):
    """Turn 1: branch 0 writes "A", branch 1 writes "B" (to the same file name); turn 2 reads it; then answer."""
    results = request.token_ids.count(RESULT)
    if results == 0:
        return [WRITE_A if branch == 0 else WRITE_B, EOS]
    return [READ, EOS] if results == 1 else [ANSWER, EOS]


def rollout(environment, branching, respond=write_then_read, **params):
    executor = ToolExecutor([PromptTools([], [], environment, type(environment), {})], parse, lambda m: [RESULT],
                            environment_branching=branching)  # fmt: skip
    settings = dict(width=2, segment_length=4, max_depth=4, initial_divergence=2, eos_token_ids=(EOS,), seed=0,
                    answer_stop="none")  # fmt: skip
    settings.update(params)
    result = grow_trees(ScriptedEngine(respond, eos_token_id=EOS), [PROMPT], TreeSamplingParams(**settings),
                        tools=executor)  # fmt: skip
    return executor, result.leaves[0]


def reads(leaf):
    """What each of the leaf's read calls returned."""
    return [message["content"] for _, turn in leaf.tool_turns for message in turn.record.tool_messages
            if message["name"] == "read"]  # fmt: skip


@pytest.fixture(autouse=True)
def clean_up():
    FileEnv.made = []
    yield
    for environment in FileEnv.made:
        environment.close()


def test_state_outside_python_is_found_in_the_attribute_graph():
    environment = FileEnv()
    assert "FileEnv.directory is the path" in outside_state(environment)
    with open(__file__) as handle:
        holder = type("Holder", (), {})()
        holder.files = {"log": [handle]}
        assert "Holder.files['log'][0] is a TextIOWrapper" in outside_state(holder)
    plain = type("Plain", (), {})()
    plain.total, plain.notes, plain.relative = 3, ["a", "b"], "some/relative/name"
    assert outside_state(plain) is None


def test_copying_an_environment_with_outside_state_is_refused_with_what_to_do():
    with pytest.raises(EnvironmentBranchingError, match=r"holds state outside Python.*Define FileEnv.fork\(\)"):
        rollout(FileEnv(), "copy")


@pytest.mark.parametrize("environment, branching", [(ForkableFileEnv, "copy"), (FileEnv, "replay")])
def test_siblings_see_only_their_own_writes_and_every_instance_made_is_closed(environment, branching):
    root = environment()
    executor, leaves = rollout(root, branching)
    assert sorted(reads(leaf)[0] for leaf in leaves) == ["A", "B"]
    for leaf in leaves:
        written = leaf.tool_turns[0][1].record.assistant["tool_calls"][0]["function"]["arguments"]["text"]
        assert reads(leaf) == [written]  # never the sibling's text
        assert executor.environment_of(leaf).read("f") == written  # what its rewards see
    assert root.read("f") == "missing"  # TRL's pooled instance is never touched
    made = [env for env in FileEnv.made if env is not root]
    executor.close()
    assert made and all(env.closed and not Path(env.directory).exists() for env in made)
    assert not root.closed


def test_replay_runs_each_call_once_along_a_chain_and_counts_what_it_replays():
    def chain(request, branch, rng):
        results = request.token_ids.count(RESULT)
        return [[WRITE_A, EOS], [READ, EOS], [READ, EOS]][results] if results < 3 else [ANSWER, EOS]

    executor, leaves = rollout(FileEnv(), "replay", respond=chain, width=1, initial_divergence=1, max_depth=5)
    assert [reads(leaf) for leaf in leaves] == [["A", "A"]]
    assert executor.environments.replayed_calls == 0  # each node's instance went on to its only child

    def branch_after_write(request, branch, rng):
        results = request.token_ids.count(RESULT)
        return [[WRITE_A, EOS], [READ, EOS]][results] if results < 2 else [ANSWER, EOS]

    executor, leaves = rollout(FileEnv(), "replay", respond=branch_after_write, width=2, initial_divergence=1)
    assert [reads(leaf) for leaf in leaves] == [["A"], ["A"]]
    # two children of the write node read: the first takes its instance, the second replays the write once
    assert executor.environments.replayed_calls == 1


def test_a_turns_results_come_in_trls_order_sync_calls_first():
    order = []

    def first(x: int) -> str:
        order.append("sync")
        return "sync result"

    async def second(x: int) -> str:
        order.append("async")
        return "async result"

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    message = {"role": "assistant", "content": "", "tool_calls": [call("second", x=1), call("first", x=2)]}
    executor = ToolExecutor([PromptTools([first, second], [first, second])], parse, lambda m: [RESULT],
                            async_loop=loop)  # fmt: skip
    turn = executor.run(0, None, message)
    loop.call_soon_threadsafe(loop.stop)
    assert [m["content"] for m in turn.record.tool_messages] == ["sync result", "async result"]
    assert order == ["sync", "async"]
