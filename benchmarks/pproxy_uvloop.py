"""Run pproxy on uvloop: ``python benchmarks/pproxy_uvloop.py PPROXY-ARGS...``.

pproxy (2.7.9) switches to uvloop by itself when it is installed: its main()
calls ``uvloop.install()`` and prints "Using uvloop", then calls
``asyncio.get_event_loop()``. The uvloop installed here (0.23) ships a policy
whose get_event_loop() raises instead of creating a loop, so plain ``pproxy``
dies at startup. This launcher makes ``uvloop.install()`` also set a new
uvloop loop as the current one, prints that loop's type, and then runs
pproxy's own main() unchanged.
"""

import asyncio

import uvloop
from pproxy.server import main


def install() -> None:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    print(f"event loop: {type(loop).__module__}.{type(loop).__qualname__}", flush=True)


if __name__ == "__main__":
    uvloop.install = install
    main()
