"""Multi-node without Ray (vLLM's multiprocessing multi-node flags): how node 0 reaches the ranks
of the other nodes.

`kubeinfer serve --nnodes N --node-rank R --master-addr A --master-port P`: every node runs
world / N ranks; node 0 runs the engine (rank 0) and the API server, nodes 1..N-1 run `--headless`
(`run_headless`): no server, only their workers. torch.distributed meets at A:P (rank 0 holds the
store); the executor's calls travel on a connection to A:P+1 (`NodeListener` on node 0), which each
worker node relays down its local workers' pipes, sending their replies back as one list. A
second connection per node only watches: it carries a worker's death (or ends with the node), so
node 0 stops rather than waiting in a collective. Nodes that have not joined within
--rendezvous-timeout seconds are a ConfigError on node 0 and a non-zero exit on a worker node.
The connections are authenticated with $KUBEINFER_NODE_SECRET (a default when unset: set it on
every node of a network that others share).
"""
from __future__ import annotations

import logging
import multiprocessing.connection
import os
import queue
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from kubeinfer.engine.config import EngineConfig, ParallelConfig
from kubeinfer.engine.errors import ConfigError
from kubeinfer.engine.worker_process import spawn_workers

logger = logging.getLogger(__name__)

NODE_SECRET_ENV = "KUBEINFER_NODE_SECRET"


def _authkey() -> bytes:
    return ("kubeinfer-nodes:" + os.environ.get(NODE_SECRET_ENV, "")).encode()


def warn_default_secret() -> bool:
    """Log a warning when the node connections use the built-in key (anyone who can reach
    master-port + 1 could then drive this engine's ranks). True when it warned."""
    if os.environ.get(NODE_SECRET_ENV):
        return False
    logger.warning("$%s is not set: the node connections use the built-in default key; set it to "
                   "the same random value on every node (the Kubernetes operator does)",
                   NODE_SECRET_ENV)
    return True


def _shape(par: ParallelConfig) -> tuple[int, int, int]:
    return par.tensor_parallel_size, par.pipeline_parallel_size, par.nnodes


def init_method(par: ParallelConfig) -> str:
    return f"tcp://{par.master_addr}:{par.master_port}"


class WorkerNode:
    """Node 0's handle on one worker node: its call connection and its watch connection."""

    def __init__(self, node_rank: int, calls: Connection, watch: Connection):
        self.node_rank, self.calls, self.watch = node_rank, calls, watch


def accept_worker_nodes(config: EngineConfig) -> list[WorkerNode]:
    """Wait for every worker node to connect to master-port + 1 (two connections each), send it
    the engine's config, and return them by node rank. ConfigError naming the nodes missing after
    --rendezvous-timeout seconds, or one started with other sizes."""
    par = config.parallel
    warn_default_secret()
    expected = 2 * (par.nnodes - 1)
    listener = Listener(("0.0.0.0", par.master_port + 1), authkey=_authkey())
    arrived: queue.Queue = queue.Queue()

    def accept() -> None:
        while True:
            try:
                conn = listener.accept()
                arrived.put((conn, conn.recv()))
            except (OSError, EOFError, multiprocessing.AuthenticationError):
                if listener_closed.is_set():
                    return
    listener_closed = threading.Event()
    threading.Thread(target=accept, name="kubeinfer-node-accept", daemon=True).start()
    deadline = time.monotonic() + par.rendezvous_timeout
    by_node: dict[int, dict[str, Connection]] = {}
    try:
        while sum(len(v) for v in by_node.values()) < expected:
            try:
                left = max(0.0, deadline - time.monotonic())
                conn, (node_rank, kind, shape) = arrived.get(timeout=left)
            except queue.Empty:
                missing = [r for r in range(1, par.nnodes) if len(by_node.get(r, {})) < 2]
                raise ConfigError(
                    f"worker node(s) {missing} did not join within {par.rendezvous_timeout} s: "
                    "start "
                    f"`kubeinfer serve MODEL --headless --nnodes {par.nnodes} --node-rank R "
                    f"--master-addr {par.master_addr} --master-port {par.master_port}` (with the "
                    "same parallel sizes) on each, or raise --rendezvous-timeout") from None
            if shape != _shape(par) or not 1 <= node_rank < par.nnodes:
                error = (f"node {node_rank} was started with tensor x pipeline x nodes {shape} but "
                         f"node 0 with {_shape(par)}; start every node with the same sizes")
                conn.send(error)
                raise ConfigError(error)
            conn.send(None)
            by_node.setdefault(node_rank, {})[kind] = conn
    finally:
        listener_closed.set()
        listener.close()
    nodes = [WorkerNode(r, by_node[r]["calls"], by_node[r]["watch"]) for r in sorted(by_node)]
    for node in nodes:
        node.calls.send(config)
    return nodes


def _connect(par: ParallelConfig, kind: str, deadline: float) -> Connection:
    address = (par.master_addr, par.master_port + 1)
    while True:
        try:
            conn = Client(address, authkey=_authkey())
            break
        except (ConnectionRefusedError, ConnectionResetError, OSError):
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"node 0 did not answer at {address[0]}:{address[1]} within "
                    f"{par.rendezvous_timeout} s: start node 0 (`kubeinfer serve` with --node-rank "
                    "0) and check --master-addr and --master-port (node 0 listens on "
                    "master-port and master-port + 1)") from None
            time.sleep(0.2)
    conn.send((par.node_rank, kind, _shape(par)))
    error = conn.recv()
    if error is not None:
        raise ConfigError(error)
    return conn


def run_headless(par: ParallelConfig, resolve_path, device_type: str) -> int:
    """A worker node: join node 0, start this node's ranks, relay node 0's calls to them until it
    says stop. Returns the exit status (0 when node 0 stopped it)."""
    deadline = time.monotonic() + par.rendezvous_timeout
    warn_default_secret()
    calls = _connect(par, "calls", deadline)
    watch = _connect(par, "watch", deadline)
    config: EngineConfig = calls.recv()
    model_path: Path = resolve_path(config)
    per_node = par.world_size // par.nnodes
    first = par.node_rank * per_node
    conns, procs, _ = spawn_workers(config, model_path, range(first, first + per_node),
                                    init_method(par), device_type)
    logger.info("node %d of %d: ranks %d..%d started, pid %s", par.node_rank, par.nnodes, first,
                first + per_node - 1, [p.pid for p in procs])
    stopping = threading.Event()
    threading.Thread(target=_watch_local, args=(procs, watch, stopping), daemon=True,
                     name="kubeinfer-node-watch").start()
    try:
        while (msg := calls.recv()) is not None:
            for conn in conns:
                conn.send(msg)
            if msg == "loaded" or msg[2]:  # a call that asks for replies
                calls.send([conn.recv() for conn in conns])
    except EOFError:
        logger.error("node 0 went away; this node's workers stop")
        for proc in procs:
            proc.kill()
        return 1
    stopping.set()
    for conn in conns:
        conn.send(None)
    for proc in procs:
        proc.join(timeout=30)
    return 0


def _watch_local(procs, watch: Connection, stopping: threading.Event) -> None:
    """Tell node 0 when a local worker dies unasked, then end this node."""
    sentinels = {p.sentinel: p for p in procs}
    while sentinels:
        for s in multiprocessing.connection.wait(list(sentinels)):
            proc = sentinels.pop(s)
            proc.join()
            if not stopping.is_set():
                message = f"worker {proc.name} exited with code {proc.exitcode}"
                logger.critical("%s; this node stops", message)
                try:
                    watch.send(message)
                except OSError:
                    pass
                logging.shutdown()
                os._exit(1)


def describe_watch_message(node: WorkerNode) -> str:
    """What a readable watch connection says: a worker's death, or the node's end."""
    try:
        return f"node {node.node_rank}: {node.watch.recv()}"
    except (EOFError, OSError):
        return f"node {node.node_rank} went away"


def send_all(nodes: list[WorkerNode], msg: Any) -> None:
    for node in nodes:
        node.calls.send(msg)
