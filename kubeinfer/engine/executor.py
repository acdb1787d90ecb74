"""Runs the model runner on every rank: `collective_rpc(method, *args)` makes each rank call the
same `ModelRunner` method with the same plain-data arguments, so every collective inside meets its
peers in the same order and nothing is mirrored by hand (nano-vllm's `call`, vLLM's
`collective_rpc`).

One executor for every size. With one rank there are no processes: the call runs here. With
N = tensor x pipeline ranks the engine's process is rank 0: it starts ranks 1..N-1 (one process per
GPU, spawned, worker_process.py; rank r is tensor rank r % tp of pipeline stage r // tp,
parallel_state.py; those of other nodes through node_relay.py), writes (method, args) to each down
a pipe and runs the method itself; the workers loop running whatever arrives on their own runner. Each rank loads its shard of every layer (the layers'
weight loaders slice the checkpoint by rank, reading the group from `parallel_state.py`; a
pipeline stage builds only its layers, pipeline_stage.py). With pipeline stages the sampling rank is
tensor rank 0 of the last stage: it pushes each step's results to rank 0 down a pipe of their own
as soon as they are ready (pipeline_results.py), so reading a step waits for that step only, never
for the launch of the steps after it; a sampling rank on another node is asked instead
(`pipeline_output` down its pipe, relayed to its whole node).

A worker that fails to load reports its error, which the engine raises as a ConfigError. A worker
that dies later leaves its peers waiting in a collective forever, so a watcher thread exits the
engine's process when one dies unasked (Kubernetes restarts the pod); the worker's own error is in
the log above that. A worker that raises in a method logs it and exits, which is the same case.

On GPUs the NCCL group is never torn down: with the all-reduces captured in CUDA graphs,
destroy_process_group hung on an H200 pair (torch 2.11, NCCL 2.28), so the workers simply exit and
the group ends with the engine's process. One tensor-parallel engine per process on CUDA; on CPU
(gloo) the group is torn down and another can start.
"""
from __future__ import annotations

import logging
import multiprocessing.connection
import multiprocessing.process
import os
import socket
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kubeinfer.engine.config import EngineConfig
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.model_runner import ModelRunner, PendingStep
from kubeinfer.engine.outputs import ModelRunnerOutput
from kubeinfer.engine.node_relay import (accept_worker_nodes, describe_watch_message, init_method,
                                         send_all)
from kubeinfer.engine.parallel_state import destroy_parallel, init_parallel, pp_size, tp_size
from kubeinfer.engine.pipeline_parallel_check import check_pipeline_parallel
from kubeinfer.engine.pipeline_results import ResultReceiver
from kubeinfer.engine.scheduler_output import SchedulerOutput
from kubeinfer.engine.tensor_parallel_check import check_tensor_parallel
from kubeinfer.engine.worker_process import spawn_workers

logger = logging.getLogger(__name__)


class Executor:
    """Rank 0's handle on the ranks: its own runner (`driver`) and, with N > 1, the workers."""

    def __init__(self, config: EngineConfig, model_path: Path, device: torch.device):
        self.workers: _Workers | None = None
        tp, self.pp = config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size
        if config.parallel.node_rank != 0:
            raise ConfigError(f"node rank {config.parallel.node_rank} is a worker node: it runs "
                              "`kubeinfer serve MODEL --headless ...`, not an engine")
        if tp * self.pp == 1 and (tp_size() > 1 or pp_size() > 1):
            # its layers would be built as a shard of the running engine's and wait for its peers
            raise ConfigError("a tensor- or pipeline-parallel engine is running in this process; "
                              "shut it down (engine.shutdown()) before starting another engine")
        if tp * self.pp > 1:
            from kubeinfer.engine.loader.hf_config import load_hf_config

            hf_config = load_hf_config(model_path, config.model)
            check_pipeline_parallel(hf_config, config, device.type, torch.cuda.device_count())
            check_tensor_parallel(hf_config, tp, device.type, torch.cuda.device_count())
            self.workers = _Workers(config, model_path, device)
        self.sampler_rank = (self.pp - 1) * tp  # tensor rank 0 of the last stage
        try:
            self.driver = ModelRunner.load(config, model_path, device)
            if self.workers is not None:
                self.workers.check_loaded()
        except BaseException:
            self.shutdown()
            raise

    def collective_rpc(self, method: str, *args: Any, reply: bool = True) -> list[Any]:
        """Run `ModelRunner.<method>(*args)` on every rank; the results by rank (rank 0's only
        when not `reply`: a step's launch waits for no worker)."""
        if self.workers is not None:
            self.workers.send((method, args, reply))
        result = getattr(self.driver, method)(*args)
        if not reply or self.workers is None:
            return [result]
        return [result, *self.workers.gather()]

    def execute_model(self, out: SchedulerOutput) -> PendingStep:
        """Launch a step on every rank; rank 0's handle on it."""
        return self.collective_rpc("execute_model", out, reply=False)[0]

    def get_output(self, step: PendingStep) -> ModelRunnerOutput:
        """A launched step's results. With one stage rank 0 samples and reading them is no
        collective; with several, the last stage's sampler answers (no other rank takes part)."""
        if self.pp == 1:
            return self.driver.get_output(step)
        if self.workers.results is not None:  # pushed as soon as they were ready
            return self.workers.results.get(step.index)
        return self.workers.call(self.sampler_rank, "pipeline_output", step.index)

    def shutdown(self) -> None:
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Workers:
    """Ranks 1..world-1: start this node's, reach the other nodes' (node_relay.py), send them
    calls, watch them, stop them."""

    def __init__(self, config: EngineConfig, model_path: Path, device: torch.device):
        par = config.parallel
        if dist.is_initialized():
            raise ConfigError("a tensor-parallel engine already ran in this process and its NCCL "
                              "group cannot be torn down; start the next one in a new process")
        self.nccl = device.type == "cuda"
        method = init_method(par) if par.nnodes > 1 else f"tcp://127.0.0.1:{_free_port()}"
        self._stopping = False
        # the sampling rank (tensor rank 0 of the last stage) pushes each step's results down
        # a pipe of their own when it is on this node (pipeline_results.py)
        local = range(1, par.world_size // par.nnodes)
        sampler = (par.pipeline_parallel_size - 1) * par.tensor_parallel_size
        self.conns, self.procs, results = spawn_workers(
            config, model_path, local, method, device.type,
            results_rank=sampler if par.pipeline_parallel_size > 1 else None)
        self.results = ResultReceiver(results) if results is not None else None
        self.nodes = []
        try:
            if par.nnodes > 1:
                self.nodes = accept_worker_nodes(config)
        except BaseException:
            for proc in self.procs:
                proc.kill()
            raise
        self._watcher = threading.Thread(target=self._watch, name="kubeinfer-tp-watch", daemon=True)
        self._watcher.start()
        init_parallel(0, par.tensor_parallel_size, par.pipeline_parallel_size, method, device,
                      layer_partition=par.pp_layer_partition,
                      custom_all_reduce=par.tries_custom_all_reduce)
        logger.info("tensor parallel: %d ranks x pipeline parallel: %d stages (%d ranks on %d "
                    "node(s), %s), local workers pid %s", par.tensor_parallel_size,
                    par.pipeline_parallel_size, par.world_size, par.nnodes,
                    "NCCL" if device.type == "cuda" else "gloo", [p.pid for p in self.procs])

    def send(self, msg: Any) -> None:
        for conn in self.conns:
            conn.send(msg)
        send_all(self.nodes, msg)

    def call(self, rank: int, method: str, *args: Any) -> Any:
        """Run `ModelRunner.<method>(*args)` on one rank and return its result: down its pipe
        when it is this node's; a rank of another node gets it through its node's relay, as all
        of that node's ranks do (the others answer their part, e.g. `pipeline_output`'s None)."""
        if rank <= len(self.conns):
            conn = self.conns[rank - 1]
            conn.send((method, args, True))
            return conn.recv()
        self.send((method, args, True))
        return self.gather()[rank - 1]

    def gather(self) -> list[Any]:
        """Each worker's reply to the last call that asks for one, by rank."""
        replies = [conn.recv() for conn in self.conns]
        for node in self.nodes:
            replies += node.calls.recv()
        return replies

    def check_loaded(self) -> None:
        """Raise the first worker's loading error, once rank 0's own model has loaded."""
        self.send("loaded")
        for rank, error in enumerate(self.gather(), start=1):
            if error is not None:
                raise ConfigError(f"tensor-parallel rank {rank} could not load the model: {error}")

    def _watch(self) -> None:
        """The only thread that reaps the workers (two threads joining one process race)."""
        sentinels: dict[Any, Any] = {p.sentinel: p for p in self.procs}
        sentinels.update({node.watch: node for node in self.nodes})
        while sentinels:
            for s in multiprocessing.connection.wait(list(sentinels)):
                proc = sentinels.pop(s)
                if not isinstance(proc, multiprocessing.process.BaseProcess):
                    message = describe_watch_message(proc)
                    if not self._stopping:
                        logger.critical("%s; the other ranks cannot go on without it, so the "
                                        "engine stops", message)
                        logging.shutdown()
                        os._exit(1)
                    continue
                proc.join()  # reap it, so exitcode is set
                if not self._stopping:
                    logger.critical("tensor-parallel worker %s exited with code %s; the other ranks "
                                    "cannot go on without it, so the engine stops (see the worker's "
                                    "error above)", proc.name, proc.exitcode)
                    logging.shutdown()
                    os._exit(1)

    def shutdown(self) -> None:
        """Stop the workers; on CPU also leave the gloo group, so another engine can start later."""
        if self._stopping:
            return
        self._stopping = True
        for conn in [*self.conns, *(node.calls for node in self.nodes)]:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        if self.results is not None:
            self.results.close()
        destroy_parallel(tear_down=not self.nccl)
        self._watcher.join(timeout=10)
        if self._watcher.is_alive():
            for proc in self.procs:
                proc.kill()
            self._watcher.join()
