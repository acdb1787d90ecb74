"""The last stage's results pushed to rank 0 (pipeline_results.py): in launch order, at once,
without waiting for rank 0 to ask; steps read out of order are an error, not a wrong answer."""
import multiprocessing
import threading
from types import SimpleNamespace

import pytest

from kubeinfer.engine.outputs import ModelRunnerOutput
from kubeinfer.engine.pipeline_results import ResultPusher, ResultReceiver


def _pair(read):
    recv_end, send_end = multiprocessing.Pipe(duplex=False)
    return ResultPusher(send_end, read), ResultReceiver(recv_end)


def test_results_arrive_in_launch_order_before_they_are_asked_for():
    def read(step):
        return ModelRunnerOutput(sampled={f"r{step.index}": 100 + step.index})

    pusher, receiver = _pair(read)
    for i in range(4):
        pusher.put(SimpleNamespace(index=i))
    # all four were sent by the thread, though nobody asked: the pipe holds them
    assert receiver._conn.poll(timeout=10)
    assert [receiver.get(i).sampled for i in range(4)] == [{f"r{i}": 100 + i} for i in range(4)]


def test_read_waits_for_the_step_only():
    """The pusher's read of step 1 is held; step 0's results are on their way regardless."""
    release = threading.Event()

    def read(step):
        if step.index == 1:
            release.wait(timeout=30)
        return ModelRunnerOutput(sampled={"r": step.index})

    pusher, receiver = _pair(read)
    pusher.put(SimpleNamespace(index=0))
    pusher.put(SimpleNamespace(index=1))
    assert receiver.get(0).sampled == {"r": 0}
    release.set()
    assert receiver.get(1).sampled == {"r": 1}


def test_reading_a_step_already_passed_is_an_error():
    pusher, receiver = _pair(lambda step: ModelRunnerOutput())
    pusher.put(SimpleNamespace(index=3))
    with pytest.raises(RuntimeError, match="out of launch order"):
        receiver.get(2)


def test_older_unread_steps_are_skipped():
    pusher, receiver = _pair(lambda step: ModelRunnerOutput(sampled={"r": step.index}))
    for i in range(3):
        pusher.put(SimpleNamespace(index=i))
    assert receiver.get(2).sampled == {"r": 2}
