"""vLLM backend orchestration driven by fakes: sleep mode, tensor-parallel groups, server faults and timeouts."""

import os
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import requests
import torch.distributed as dist
import torch.multiprocessing as mp
from trl.import_utils import is_vllm_available

from trl_treepo import TreeSamplingParams
from trl_treepo.backends.vllm import (
    RolloutGroup,
    ServerRequestError,
    ServerSettings,
    VLLMServerEngine,
    colocate_rollout,
    server_rollout,
)
from trl_treepo.sampling import SegmentRequest
from trl_treepo.testing import free_port

needs_vllm = pytest.mark.skipif(not is_vllm_available(), reason="VLLMColocateEngine builds vllm.SamplingParams")


def _fake_token(prompt_ids, branch: int, position: int) -> int:
    return (sum(prompt_ids) + 7 * branch + position) % 50 + 10


class FakeLLMEngine:
    """vLLM's `LLMEngine` as the colocate engine drives it: one token per step for every request, each a function of
    its prompt, its branch (the last part of the request id) and its position, so every TP rank sees the same
    outputs. `calls` holds, per step, the prompts of the requests added before it."""

    def __init__(self):
        self.requests, self.calls, self.pending, self.steps = {}, [], [], 0

    def add_request(self, request_id, prompt, params):
        branch = int(request_id.rsplit("-", 1)[1])
        self.requests[request_id] = (prompt["prompt_token_ids"], branch, params.max_tokens, [])
        self.pending.append(prompt["prompt_token_ids"])

    def has_unfinished_requests(self):
        return bool(self.requests)

    def abort_request(self, request_ids):
        for request_id in request_ids:
            self.requests.pop(request_id, None)

    def step(self):
        if self.pending:
            self.calls.append(self.pending)
            self.pending = []
        self.steps += 1
        outputs = []
        for request_id, (ids, branch, max_tokens, generated) in list(self.requests.items()):
            token = _fake_token(ids, branch, len(generated))
            generated.append(token)
            finished = len(generated) == max_tokens
            completion = SimpleNamespace(token_ids=[token], logprobs=[{token: SimpleNamespace(logprob=-0.5)}],
                                         finish_reason="length" if finished else None)  # fmt: skip
            outputs.append(SimpleNamespace(request_id=request_id, finished=finished, outputs=[completion]))
            if finished:
                del self.requests[request_id]
        return outputs


class FakeLLM:
    def __init__(self):
        self.llm_engine, self.events = FakeLLMEngine(), []

    def wake_up(self, tags):
        self.events.append(("wake_up", tuple(tags)))

    def sleep(self, level):
        self.events.append(("sleep", level))


def fake_generation(tensor_parallel_size=1, tp_group=None, sleep_mode=False):
    generation = SimpleNamespace(
        llm=FakeLLM(),
        tensor_parallel_size=tensor_parallel_size,
        tp_group=tp_group,
        enable_sleep_mode=sleep_mode,
        _llm_weights_sleeping=sleep_mode,
        repetition_penalty=1.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=None,
        generation_kwargs={},
        syncs=0,
    )

    def sync_weights():
        generation.syncs += 1
        generation._llm_weights_sleeping = False
        generation.llm.events.append(("sync",))

    generation.sync_weights = sync_weights
    return generation


PARAMS = TreeSamplingParams(width=4, segment_length=3, max_depth=4, eos_token_ids=(0,), seed=7)


@needs_vllm
def test_sleep_mode_wakes_once_per_rollout_not_per_level():
    generation = fake_generation(sleep_mode=True)
    rollout = colocate_rollout(generation, [[1, 2, 3], [4, 5]], PARAMS, decode=None)
    # every path runs to the depth limit: one wait per level, and the steps of one full path
    assert rollout.stats.engine_calls == 4 and rollout.stats.engine_steps == generation.llm.llm_engine.steps == 12
    assert generation.llm.events == [("sync",), ("wake_up", ("kv_cache",)), ("sleep", 2)]
    assert generation._llm_weights_sleeping
    assert [len(leaves) for leaves in rollout.leaves] == [4, 4]


def _tensor_parallel_worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        generation = fake_generation(tensor_parallel_size=2, tp_group=dist.new_group([0, 1]))
        roots = [[100 + rank, 1], [200 + rank, 2]]
        rollout = colocate_rollout(generation, roots, PARAMS, decode=None)
        results[rank] = {
            "first_call": generation.llm.llm_engine.calls[0],
            "leaf_starts": [[leaf.token_ids[0] for leaf in leaves] for leaves in rollout.leaves],
            "decoded": rollout.stats.decoded_tokens,
        }
    finally:
        dist.destroy_process_group()


@needs_vllm
def test_tensor_parallel_ranks_gather_their_prompts_grow_the_same_trees_and_keep_their_share():
    results = mp.Manager().dict()
    mp.spawn(_tensor_parallel_worker, args=(free_port(), results), nprocs=2, join=True)
    everyone = [[100, 1], [200, 2], [101, 1], [201, 2]]
    assert results[0]["first_call"] == results[1]["first_call"] == [root for root in everyone for _ in range(2)]
    for rank in (0, 1):
        # the first token of every leaf depends only on its root (see FakeLLMEngine), so a rank's leaves show their
        # roots
        own_roots = everyone[2 * rank : 2 * rank + 2]
        expected = [{_fake_token(root, b, 0) for b in range(2)} for root in own_roots]
        assert [set(starts) for starts in results[rank]["leaf_starts"]] == expected
    assert results[0]["decoded"] > 0 and results[1]["decoded"] == 0  # the group's work is counted once


class SilentServer:
    """Accepts connections and never answers: a server that hangs mid-training."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.connections.append(self.socket.accept()[0])
            except OSError:
                return

    def close(self):
        self.socket.close()


def fake_client(url):
    return SimpleNamespace(base_url=url, session=requests.Session(), model="tiny")


def test_a_hanging_server_fails_the_level_after_the_timeout_instead_of_hanging():
    server = SilentServer()
    try:
        engine = VLLMServerEngine(fake_client(server.url), {"temperature": 1.0}, request_timeout=0.5, max_retries=1)
        started = time.monotonic()
        with pytest.raises(ServerRequestError, match="2 attempt") as error:
            engine.generate([SegmentRequest([1, 2, 3], num_branches=2, max_tokens=4)])
        assert time.monotonic() - started < 10
        assert server.url in str(error.value) and "tree_server_request_timeout" in str(error.value)
    finally:
        server.close()


def server_generation(url, rank=0, num_processes=1):
    return SimpleNamespace(
        accelerator=SimpleNamespace(is_main_process=rank == 0, process_index=rank, num_processes=num_processes),
        vllm_client=fake_client(url),
        repetition_penalty=1.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        generation_kwargs={},
    )


def test_a_dead_server_fails_the_rollout_with_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    generation = server_generation(url)
    group = RolloutGroup(generation.accelerator, timeout_seconds=5)
    with pytest.raises(ServerRequestError, match=url):
        server_rollout(generation, [[1, 2, 3]] * 4, 4, PARAMS, None, group, ServerSettings(request_timeout=2, max_retries=0))


def _failing_rollout_worker(rank, port, url, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        generation = server_generation(url, rank=rank, num_processes=2)
        group = RolloutGroup(generation.accelerator, timeout_seconds=60)
        started = time.monotonic()  # after start-up, which a loaded machine can make long
        try:
            server_rollout(generation, [[1, 2, 3]] * 4, 4, PARAMS, None, group, ServerSettings(request_timeout=2, max_retries=0))
            results[rank] = "no error"
        except ServerRequestError as error:
            results[rank] = str(error)
        results[f"seconds{rank}"] = time.monotonic() - started
    finally:
        dist.destroy_process_group()


def test_a_failed_rollout_on_the_main_process_reaches_every_process():
    url = f"http://127.0.0.1:{free_port()}"
    results = mp.Manager().dict()
    mp.spawn(_failing_rollout_worker, args=(free_port(), url, results), nprocs=2, join=True)
    assert max(results["seconds0"], results["seconds1"]) < 50  # well inside the group's 60 s timeout: nobody waited
    assert url in results[0] and url in results[1] and "main process failed" in results[1]


def _rollout_group_worker(rank, port, timeout, delay, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        group = RolloutGroup(SimpleNamespace(num_processes=2), timeout_seconds=timeout)
        gathered = group.gather([rank])
        if rank == 0:
            time.sleep(delay)  # the main process is busy growing trees
        try:
            results[rank] = ("ok", group.broadcast({"leaves": gathered} if rank == 0 else None))
        except RuntimeError as error:
            results[rank] = ("error", str(error)[:200])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("timeout, delay, waits", [(20.0, 3.0, True), (1.0, 4.0, False)])
def test_the_rollout_group_timeout_is_the_configured_one(timeout, delay, waits):
    results = mp.Manager().dict()
    mp.spawn(_rollout_group_worker, args=(free_port(), timeout, delay, results), nprocs=2, join=True)
    if waits:
        assert results[1] == ("ok", {"leaves": [[0], [1]]})
    else:
        assert results[1][0] == "error"
