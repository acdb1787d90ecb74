"""Runs the model runner on every rank: `collective_rpc(method, *args)` makes each rank call the
same `ModelRunner` method with the same plain-data arguments, so every collective inside meets its
peers in the same order and nothing is mirrored by hand (nano-vllm's `call`, vLLM's
`collective_rpc`).

One executor for every size. With one rank there are no processes: the call runs here. With
N = tensor x pipeline ranks the engine's process is rank 0: it starts ranks 1..N-1 (one process per
GPU, spawned; rank r is tensor rank r % tp of pipeline stage r // tp, parallel_state.py), writes (method, args) to each down a pipe and runs the method itself; the workers loop
running whatever arrives on their own runner. Each rank loads its shard of every layer (the layers'
weight loaders slice the checkpoint by rank, reading the group from `parallel_state.py`; a
pipeline stage builds only its layers, pipeline_stage.py). With pipeline stages the sampling rank is
tensor rank 0 of the last stage: `get_output` fetches its results from it (`pipeline_output`).

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
import multiprocessing as mp
import multiprocessing.connection
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
from kubeinfer.engine.parallel_state import destroy_parallel, init_parallel
from kubeinfer.engine.pipeline_parallel_check import check_pipeline_parallel
from kubeinfer.engine.scheduler_output import SchedulerOutput
from kubeinfer.engine.tensor_parallel_check import check_tensor_parallel

logger = logging.getLogger(__name__)


class Executor:
    """Rank 0's handle on the ranks: its own runner (`driver`) and, with N > 1, the workers."""

    def __init__(self, config: EngineConfig, model_path: Path, device: torch.device):
        self.workers: _Workers | None = None
        tp, self.pp = config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size
        if tp * self.pp > 1:
            from kubeinfer.engine import model_loader

            hf_config = model_loader.load_hf_config(model_path, config.model)
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
        collective; with several, every rank reads the step and the last stage's sampler answers."""
        if self.pp == 1:
            return self.driver.get_output(step)
        return self.collective_rpc("pipeline_output", step.index)[self.sampler_rank]

    def shutdown(self) -> None:
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Workers:
    """Ranks 1..tp-1: start them, send them calls, watch them, stop them."""

    def __init__(self, config: EngineConfig, model_path: Path, device: torch.device):
        par = config.parallel
        world = par.world_size
        if dist.is_initialized():
            raise ConfigError("a tensor-parallel engine already ran in this process and its NCCL "
                              "group cannot be torn down; start the next one in a new process")
        self.nccl = device.type == "cuda"
        port = _free_port()
        ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        self.conns: list[multiprocessing.connection.Connection] = []
        self.procs: list[mp.process.BaseProcess] = []
        self._stopping = False
        for rank in range(1, world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, name=f"kubeinfer-tp{rank}", daemon=True,
                               args=(config, str(model_path), rank, world, port, device.type, child))
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self._watcher = threading.Thread(target=self._watch, name="kubeinfer-tp-watch", daemon=True)
        self._watcher.start()
        init_parallel(0, par.tensor_parallel_size, par.pipeline_parallel_size,
                      f"tcp://127.0.0.1:{port}", device, layer_partition=par.pp_layer_partition)
        logger.info("parallel: %d ranks (tensor %d x pipeline %d, %s), workers pid %s", world,
                    par.tensor_parallel_size, par.pipeline_parallel_size,
                    "NCCL" if device.type == "cuda" else "gloo", [p.pid for p in self.procs])

    def send(self, msg: Any) -> None:
        for conn in self.conns:
            conn.send(msg)

    def gather(self) -> list[Any]:
        """Each worker's reply to the last call that asks for one."""
        return [conn.recv() for conn in self.conns]

    def check_loaded(self) -> None:
        """Raise the first worker's loading error, once rank 0's own model has loaded."""
        self.send("loaded")
        for rank, error in enumerate(self.gather(), start=1):
            if error is not None:
                raise ConfigError(f"tensor-parallel rank {rank} could not load the model: {error}")

    def _watch(self) -> None:
        """The only thread that reaps the workers (two threads joining one process race)."""
        sentinels = {p.sentinel: p for p in self.procs}
        while sentinels:
            for s in multiprocessing.connection.wait(list(sentinels)):
                proc = sentinels.pop(s)
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
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        destroy_parallel(tear_down=not self.nccl)
        self._watcher.join(timeout=10)
        if self._watcher.is_alive():
            for proc in self.procs:
                proc.kill()
            self._watcher.join()


def _worker_main(config: EngineConfig, model_path: str, rank: int, world: int, port: int,
                 device_type: str, conn) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp{rank} %(levelname)s %(message)s")
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    code = 0
    try:
        par = config.parallel
        init_parallel(rank, par.tensor_parallel_size, par.pipeline_parallel_size,
                      f"tcp://127.0.0.1:{port}", device, layer_partition=par.pp_layer_partition)
        runner, error = None, None
        try:
            runner = ModelRunner.load(config, Path(model_path), device)
        except Exception as e:  # reported by rank 0, which stops every rank
            error = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
        if conn.recv() == "loaded":
            conn.send(error)
            if runner is not None:
                _serve(runner, conn)
            else:
                conn.recv()  # rank 0's stop
    except (EOFError, KeyboardInterrupt):
        pass  # rank 0 went away
    except BaseException:
        logger.exception("tensor-parallel worker %d failed", rank)
        code = 1
    if device_type == "cuda":
        logging.shutdown()
        os._exit(code)  # leave the NCCL group without its teardown (see the module docstring)
    destroy_parallel(tear_down=True)
    raise SystemExit(code)


def _serve(runner: ModelRunner, conn) -> None:
    """A worker's loop: run each call on this rank's runner until rank 0 says stop (None)."""
    while (msg := conn.recv()) is not None:
        method, args, reply = msg
        result = getattr(runner, method)(*args)
        if reply:
            conn.send(result)
