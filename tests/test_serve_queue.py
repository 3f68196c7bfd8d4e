"""flava serve's model queue: one model call at a time, in arrival order, callers waiting on the
event loop with a deadline, the worker threads left to the rest of the server."""

import asyncio
import threading
import time

import pytest
from starlette.concurrency import run_in_threadpool

from flava.serve.guard import CLIENT_LEFT, ApiError, ClientGone, ModelQueue


def test_callers_wait_in_order_without_holding_worker_threads():
    async def main():
        queue, ran, running = ModelQueue(timeout=10), [], []
        gate = threading.Event()

        def model(i):
            running.append(i)
            assert len(running) == 1, running  # one call at a time
            if i == 0:
                gate.wait(10)
            ran.append(i)
            running.remove(i)
            return i

        first = asyncio.create_task(queue.call(model, 0))
        await asyncio.sleep(0.05)
        # More waiting callers than the worker pool has threads (40): the pool still serves others.
        waiting = [asyncio.create_task(queue.call(model, i)) for i in range(1, 61)]
        await asyncio.sleep(0.05)
        assert await asyncio.wait_for(run_in_threadpool(lambda: "a search"), 2) == "a search"
        gate.set()
        assert await asyncio.gather(first, *waiting) == list(range(61))
        assert ran == list(range(61))

    asyncio.run(main())


def test_a_caller_past_its_deadline_gets_503_and_one_gone_gives_up_its_place():
    async def main():
        queue, ran = ModelQueue(timeout=0.3), []
        gate = threading.Event()

        def model(i):
            if i == 0:
                gate.wait(10)
            ran.append(i)
            return i

        first = asyncio.create_task(queue.call(model, 0))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(queue.call(model, 1))
        late = asyncio.create_task(queue.call(model, 2))
        await asyncio.sleep(0.05)
        gone.cancel()  # the client went away
        t = time.monotonic()
        with pytest.raises(ApiError) as refused:
            await late
        assert refused.value.status == 503 and "waited 0.3 s" in refused.value.message
        assert 0.15 < time.monotonic() - t < 2
        with pytest.raises(asyncio.CancelledError):
            await gone
        gate.set()
        assert await first == 0
        # The model is free again, and the next caller is served at once.
        assert await asyncio.wait_for(queue.call(model, 3), 2) == 3
        assert ran == [0, 3]

    asyncio.run(main())


def test_a_call_whose_caller_went_away_ends_before_the_next_starts():
    async def main():
        queue, events = ModelQueue(timeout=10), []
        gate = threading.Event()

        def model(i):
            events.append(f"start {i}")
            if i == 0:
                gate.wait(10)
            events.append(f"end {i}")
            return i

        first = asyncio.create_task(queue.call(model, 0))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(queue.call(model, 1))
        await asyncio.sleep(0.05)
        first.cancel()  # its thread cannot be stopped: the model stays busy until it returns
        await asyncio.sleep(0.1)
        assert events == ["start 0"]
        gate.set()
        assert await second == 1
        assert events == ["start 0", "end 0", "start 1", "end 1"]

    asyncio.run(main())


def test_a_caller_whose_client_left_gives_up_its_place_and_one_that_cannot_tell_keeps_it():
    async def main():
        queue, ran = ModelQueue(timeout=10), []
        gate, hung_up = threading.Event(), asyncio.Event()

        def model(i):
            if i == 0:
                gate.wait(10)
            ran.append(i)
            return i

        async def leaves():  # as Guard's: returns when the client disconnects
            await hung_up.wait()

        async def cannot_tell():
            raise RuntimeError("the server's receive failed")

        async def caller(i, left):
            CLIENT_LEFT.set(left)  # each task its own context, as each request's
            return await queue.call(model, i)

        first = asyncio.create_task(queue.call(model, 0))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(caller(1, leaves))
        kept = asyncio.create_task(caller(2, cannot_tell))
        await asyncio.sleep(0.05)
        assert queue.waiting == 2
        hung_up.set()
        with pytest.raises(ClientGone):
            await gone
        assert queue.waiting == 1  # given up at once, while the model is still busy
        gate.set()
        assert await first == 0 and await kept == 2 and ran == [0, 2]

    asyncio.run(main())
