"""tests/conftest.py's MPFuture patch: a DHT future completed while its event loop is idle (pytest-asyncio's session
loop between tests) no longer runs that loop on hivemind's thread; the loop sets the future's event when it runs."""

from __future__ import annotations

import asyncio
import threading

from hivemind.utils import mpfuture


def test_a_future_completed_while_its_loop_is_idle_does_not_run_that_loop_on_another_thread():
    loop = asyncio.new_event_loop()
    try:
        async def make() -> mpfuture.MPFuture:
            return mpfuture.MPFuture()

        future = loop.run_until_complete(make())  # bound to `loop`, which is idle from here on
        ran_on: list[int] = []
        loop.call_soon(lambda: ran_on.append(threading.get_ident()))
        setter = threading.Thread(target=future.set_result, args=(7,))
        setter.start()
        setter.join(10)
        assert ran_on == []  # hivemind alone would have run `loop` (and this callback) on the setter's thread
        assert loop.run_until_complete(asyncio.wait_for(future, 10)) == 7
        assert ran_on == [threading.get_ident()]
    finally:
        loop.close()
