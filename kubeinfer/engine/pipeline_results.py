"""The last stage's results on their way back to rank 0, pushed as soon as each step's are ready.

With pipeline stages the sampling rank (tensor rank 0 of the last stage) holds each step's
sampled ids until rank 0 reads them. Asking for them down the worker's call pipe
(`pipeline_output`) queues the question behind the calls already sent: the launch of the next
step, which the sampling rank runs first. On a CPU that launch is the whole stage's compute, and
on a GPU it is the host's launch of the stage (its receive, the forward, the sampler), so rank 0
waited for step k + 1 to reach the last stage before it could read step k and schedule step k + 2:
the stages took turns instead of overlapping.

So a worker on rank 0's node that samples gets a second, one-way pipe (worker_process.py): its
`ResultPusher` thread waits for each launched step's results in launch order (the step's CUDA
event; nothing on a CPU) and sends (step index, ModelRunnerOutput) at once, while the worker's
main thread goes on launching the next step; rank 0's `ResultReceiver` takes them in the same
order. A sampling rank on another node keeps answering `pipeline_output` (its calls are relayed,
node_relay.py). If the thread fails, the worker's process exits, which stops the engine (the
executor's watcher) instead of leaving rank 0 waiting for results that never come.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any

import torch

from kubeinfer.engine.outputs import ModelRunnerOutput

logger = logging.getLogger(__name__)


class ResultPusher:
    """The sampling rank's side: `put` each launched step (in launch order); a thread reads its
    results (`read(step)`, the runner's `get_output`) and sends them to rank 0."""

    def __init__(self, conn, read, device: torch.device | None = None):
        self._conn = conn
        self._read = read
        self._device = device
        self._steps: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kubeinfer-pp-results", daemon=True)
        self._thread.start()

    def put(self, step: Any) -> None:
        self._steps.put(step)

    def _run(self) -> None:
        try:
            if self._device is not None and self._device.type == "cuda":
                # a thread starts on GPU 0: waiting for an event from there would create a CUDA
                # context on rank 0's GPU (hundreds of MiB of its memory)
                torch.cuda.set_device(self._device)
            while True:
                step = self._steps.get()
                self._conn.send((step.index, self._read(step)))
        except (BrokenPipeError, EOFError, OSError):
            pass  # rank 0 went away: the worker's own loop ends too
        except BaseException:
            logger.exception("the sampling rank could not hand a step's results back; it stops, "
                             "and the engine with it")
            logging.shutdown()
            os._exit(1)


class ResultReceiver:
    """Rank 0's side: each step's results, in launch order."""

    def __init__(self, conn):
        self._conn = conn

    def get(self, index: int) -> ModelRunnerOutput:
        """The results of launched step `index`; older steps' are dropped on the way (the
        engine reads every step, in order, so there are none)."""
        while True:
            got, output = self._conn.recv()
            if got == index:
                return output
            if got > index:
                raise RuntimeError(f"step {index}'s results were expected, step {got}'s came: "
                                   "the steps were read out of launch order")

    def close(self) -> None:
        self._conn.close()
