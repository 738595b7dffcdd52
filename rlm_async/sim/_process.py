"""Run the simulator in a child process, so that the server does not share the engine's CPU core."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection

import aiohttp
import anyio

from .._errors import ConfigError
from ._server import SimConfig, SimServer, SimStats

__all__ = ["RemoteSim", "sim_process"]


class RemoteSim:
    """A simulator in another process: its ``base_url`` and its ``/stats``."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    async def stats(self) -> SimStats:
        """What the server saw, read from its ``/stats`` endpoint."""
        async with aiohttp.ClientSession() as http, http.get(self.base_url.removesuffix("/v1") + "/stats") as resp:
            data = await resp.json()
        # Only the fields this SimStats has: a newer server may report more.
        return SimStats(**{k: v for k, v in data.items() if k in SimStats.__dataclass_fields__})


@contextlib.asynccontextmanager
async def sim_process(
    config: SimConfig, *, host: str = "127.0.0.1", start_timeout_s: float = 60.0
) -> AsyncIterator[RemoteSim]:
    """Serve ``config`` from a child process on ``host`` (a free port) for the ``async with`` block.

    The child is a fresh interpreter (``spawn``): a script that calls this at import time needs the usual
    ``if __name__ == "__main__":`` guard. It stops when the block ends, and is killed if it does not stop
    within 10 s. Only the default responder is available across the process boundary.

    Raises:
        ConfigError: the child did not report its address within ``start_timeout_s`` seconds.
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_child_main, args=(config, host, child), name="rlm-async-sim", daemon=True)
    process.start()
    child.close()
    try:
        ready = await anyio.to_thread.run_sync(parent.poll, start_timeout_s)
        if not ready:
            raise ConfigError(f"the simulator process did not start within {start_timeout_s:g} s")
        yield RemoteSim(parent.recv())
    finally:
        with contextlib.suppress(OSError):
            parent.send("stop")
        await anyio.to_thread.run_sync(process.join, 10.0)
        if process.is_alive():
            process.kill()
            await anyio.to_thread.run_sync(process.join, 5.0)
        parent.close()


def _child_main(config: SimConfig, host: str, conn: Connection) -> None:
    asyncio.run(_serve_until_told(config, host, conn))


async def _serve_until_told(config: SimConfig, host: str, conn: Connection) -> None:
    async with SimServer(config) as server:
        if host != "127.0.0.1":
            await server.stop()
            await server.start(host, 0)
        # The startup heap (the tokenizer's tables, aiohttp, the app) never becomes garbage; left in the
        # collector's reach, each full collection walked it: 55 ms here, landing inside whichever benchmark
        # run's burst of new connections came next (a 0.55 s run at C = 256 took 0.60-0.61 s). Frozen, a full
        # collection takes about 4 ms. This process is the simulator's own, so freezing affects nobody else.
        gc.collect()
        gc.freeze()
        conn.send(server.base_url)
        with contextlib.suppress(EOFError, OSError):  # the parent went away: stop too
            await asyncio.to_thread(conn.recv)
