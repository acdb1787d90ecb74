"""Tensor parallelism over the GPUs of one node: one process per GPU.

The engine's process is rank 0, the driver: it schedules, builds every step's input arrays and
samples. `TPWorkers` starts ranks 1..tp-1, each of which loads its shard of every layer
(`layers/linear.py` slices the checkpoint by rank) and runs `ModelRunner.follow`: for each step the
driver sends the step's input arrays down a pipe, and every rank runs the same forward pass, meeting
in the all-reduces of the row-parallel layers and the all-gather of the LM head. Only the driver
samples. With async scheduling the driver broadcasts each step's sampled ids on the device, so the
workers fill the next step's input ids from them without a host round trip, as the driver does.

A worker that dies leaves its peers waiting in a collective forever, so the driver watches the
workers' processes and exits the engine's process when one dies unasked (Kubernetes restarts the
pod); the worker's own error is in the log above that.

On GPUs the NCCL group is never torn down: with the all-reduces captured in CUDA graphs,
destroy_process_group hung on an H200 pair (torch 2.11, NCCL 2.28), so the workers simply exit and
the group ends with the driver's process. One tensor-parallel engine per process on CUDA; on CPU
(gloo) the group is torn down and another can start.
"""
from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from kubeinfer.engine import cpu_threads
from kubeinfer.engine.config import EngineConfig
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.input_batch import InputBatch
from kubeinfer.engine.layers.linear import set_tp_group

logger = logging.getLogger(__name__)


@dataclass
class StepMessage:
    """What a worker needs to follow one step: the driver's input arrays, no request objects."""

    batch: InputBatch  # sample_reqs holds one None per sampling row
    holes: np.ndarray | None = None  # token indices whose ids are the previous step's samples...
    src: np.ndarray | None = None  # ...and the rows of those samples they come from
    broadcast: bool = False  # the driver broadcasts this step's sampled ids after sampling


def check_tensor_parallel(hf_config: Any, tp: int, device_type: str, num_gpus: int) -> None:
    """Refuse a --tensor-parallel-size the model or the machine cannot take, before any process
    starts, with what to do instead."""
    if tp == 1:
        return
    if device_type == "cuda" and num_gpus < tp:
        raise ConfigError(f"--tensor-parallel-size={tp} needs {tp} GPUs but {num_gpus} "
                          f"{'is' if num_gpus == 1 else 'are'} visible; ask for {tp} GPUs "
                          "(nvidia.com/gpu) or lower --tensor-parallel-size")
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    checks = [("num_attention_heads", heads, heads % tp == 0),
              ("num_key_value_heads", kv_heads, kv_heads % tp == 0 or tp % kv_heads == 0),
              ("intermediate_size", hf_config.intermediate_size, hf_config.intermediate_size % tp == 0)]
    for name, value, ok in checks:
        if not ok:
            fits = [d for d in range(1, 9) if heads % d == 0 and hf_config.intermediate_size % d == 0
                    and (kv_heads % d == 0 or d % kv_heads == 0)]
            raise ConfigError(f"--tensor-parallel-size={tp} does not divide the model's {name} "
                              f"({value}); use one of {fits}")


def init_distributed(rank: int, world_size: int, port: int, device: torch.device) -> None:
    """Join the tensor-parallel group: NCCL between GPUs, gloo on CPU (tests)."""
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(hours=1))
    set_tp_group(dist.group.WORLD)


def broadcast_from_driver(t: torch.Tensor) -> torch.Tensor:
    dist.broadcast(t, src=0)
    return t


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TPWorkers:
    """The driver's handle on ranks 1..tp-1: start them, send them work, stop them."""

    def __init__(self, config: EngineConfig, model_path: Path, device: torch.device):
        world = config.parallel.tensor_parallel_size
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
        init_distributed(0, world, port, device)
        logger.info("tensor parallel: %d ranks (%s), workers pid %s", world,
                    "NCCL" if device.type == "cuda" else "gloo", [p.pid for p in self.procs])

    def send(self, kind: str, payload: Any = None) -> None:
        for conn in self.conns:
            conn.send((kind, payload))

    def check_loaded(self) -> None:
        """Raise the first worker's loading error, once the driver's own model has loaded."""
        self.send("loaded")
        for rank, error in enumerate(self.gather(), start=1):
            if error is not None:
                raise ConfigError(f"tensor-parallel rank {rank} could not load the model: {error}")

    def gather(self) -> list[Any]:
        """Each worker's reply to the last message that asks for one."""
        return [conn.recv() for conn in self.conns]

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
                    os._exit(1)

    def shutdown(self) -> None:
        """Stop the workers; on CPU also leave the gloo group, so another engine can start later."""
        if self._stopping:
            return
        self._stopping = True
        for conn in self.conns:
            try:
                conn.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
        set_tp_group(None)
        if dist.is_initialized() and not self.nccl:
            dist.destroy_process_group()
        self._watcher.join(timeout=10)
        if self._watcher.is_alive():
            for proc in self.procs:
                proc.kill()
            self._watcher.join()


def _worker_main(config: EngineConfig, model_path: str, rank: int, world: int, port: int,
                 device_type: str, conn) -> None:
    from kubeinfer.engine import model_loader
    from kubeinfer.engine.model_runner import ModelRunner

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp{rank} %(levelname)s %(message)s")
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    cpu_threads.configure(device, world)
    code = 0
    try:
        init_distributed(rank, world, port, device)
        torch.manual_seed(config.model.seed)
        runner, error = None, None
        try:
            model, hf_config = model_loader.load_model(config.model, device, path=Path(model_path))
            dtype = next(model.parameters()).dtype
            max_model_len = model_loader.get_max_model_len(hf_config, config.model.max_model_len)
            runner = ModelRunner(config, model, hf_config, device, dtype, max_model_len)
        except Exception as e:  # reported by the driver, which stops every rank
            error = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
        kind, _ = conn.recv()
        if kind != "stop":
            conn.send(error)
            if runner is not None:
                runner.follow(conn)
            else:
                conn.recv()  # the driver's "stop"
    except (EOFError, KeyboardInterrupt):
        pass  # the driver went away
    except BaseException:
        logger.exception("tensor-parallel worker %d failed", rank)
        code = 1
    if device_type == "cuda":
        logging.shutdown()
        os._exit(code)  # leave the NCCL group without its teardown (see the module docstring)
    if dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(code)
