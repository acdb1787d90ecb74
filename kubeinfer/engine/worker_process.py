"""A worker rank's process: start it, and what it runs (load this rank's shard, then run each
call that arrives down its pipe on its own runner until told to stop).

Rank 0's executor starts the workers of its own node; on a worker node (`--headless`,
node_relay.py) the node's process starts its ranks the same way and relays the calls to them.
Rank r uses GPU r % (ranks per node) of its node.

How a rank's process starts: on CUDA it is spawned (a fresh interpreter: a forked child cannot
use CUDA). On CPU it is forked from multiprocessing's fork server, which imports torch,
transformers' config classes and this module once per engine process and freezes its heap
(fork_server_preload.py): a spawned rank spends ~3 s of CPU importing them before it loads its
shard, which on a small machine with several ranks (or engines started one after another) is most
of the start-up. The fork server never runs a torch op (no OpenMP pool, no threads to lose in the
fork) and lives as long as the engine's process. Its children would inherit its environment as it
was when it started, so each rank is handed rank 0's environment as it is now.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
from pathlib import Path

import torch

from kubeinfer.engine import cpu_threads
from kubeinfer.engine.config import EngineConfig
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.model_runner import ModelRunner
from kubeinfer.engine.parallel_state import destroy_parallel, init_parallel
from kubeinfer.engine.pipeline_results import ResultPusher

logger = logging.getLogger(__name__)


def spawn_workers(config: EngineConfig, model_path: Path, ranks: range, init_method: str,
                  device_type: str, results_rank: int | None = None
                  ) -> tuple[list[multiprocessing.connection.Connection],
                             list[mp.process.BaseProcess],
                             multiprocessing.connection.Connection | None]:
    """Start one process per rank in `ranks`; their pipes and processes, in rank order, and the
    receiving end of `results_rank`'s results pipe (pipeline_results.py) when it is among them."""
    ctx = _process_context(device_type)
    env = dict(os.environ)
    conns, procs, results = [], [], None
    for rank in ranks:
        parent, child = ctx.Pipe()
        results_child = None
        if rank == results_rank:
            results, results_child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=worker_main, name=f"kubeinfer-tp{rank}", daemon=True,
                           args=(config, str(model_path), rank, init_method, device_type, child,
                                 results_child, env))
        proc.start()
        child.close()
        if results_child is not None:
            results_child.close()
        conns.append(parent)
        procs.append(proc)
    return conns, procs, results


# what a CPU rank needs before it loads its shard, imported once by the fork server
_FORKSERVER_PRELOAD = ["kubeinfer.engine.fork_server_preload"]


def _process_context(device_type: str) -> mp.context.BaseContext:
    """How this node's ranks start (module docstring): spawned on CUDA, forked from the fork
    server on CPU."""
    if device_type == "cuda":
        return mp.get_context("spawn")  # CUDA cannot be used in a forked child
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)  # no effect once the server runs
    return ctx


def worker_main(config: EngineConfig, model_path: str, rank: int, init_method: str,
                device_type: str, conn, results_conn=None, env: dict | None = None) -> None:
    if env is not None:  # rank 0's environment as it is now (the fork server's may be older)
        os.environ.clear()
        os.environ.update(env)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp{rank} %(levelname)s %(message)s")
    par = config.parallel
    per_node = par.world_size // par.nnodes
    device = torch.device("cuda", rank % per_node) if device_type == "cuda" else torch.device("cpu")
    cpu_threads.configure(device, per_node)
    code = 0
    try:
        init_parallel(rank, par.tensor_parallel_size, par.pipeline_parallel_size, init_method,
                      device, layer_partition=par.pp_layer_partition,
                      custom_all_reduce=par.tries_custom_all_reduce)
        runner, error = None, None
        try:
            runner = ModelRunner.load(config, Path(model_path), device)
        except Exception as e:  # reported by rank 0, which stops every rank
            error = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
        if conn.recv() == "loaded":
            conn.send(error)
            if runner is not None:
                if results_conn is not None and runner.is_sampler:
                    # each step's results go to rank 0 as soon as they are ready
                    runner.result_sink = ResultPusher(results_conn, runner.get_output, device)
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
        os._exit(code)  # leave the NCCL group without its teardown (see executor.py)
    destroy_parallel(tear_down=True)
    raise SystemExit(code)


def _serve(runner: ModelRunner, conn) -> None:
    """A worker's loop: run each call on this rank's runner until rank 0 says stop (None)."""
    while (msg := conn.recv()) is not None:
        method, args, reply = msg
        result = getattr(runner, method)(*args)
        if reply:
            conn.send(result)
