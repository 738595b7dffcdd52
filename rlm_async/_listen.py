"""How the engine's own HTTP servers (the simulator, ``rlm-async serve``) listen.

``LISTEN_BACKLOG`` is the accept-queue length asked of ``listen(2)``: 4,096, Linux's default ``somaxconn``
since kernel 5.4 (the kernel caps any larger request at ``net.core.somaxconn``). aiohttp's default is 128.
A fan-out that opens more connections at once than the queue holds while the event loop is busy has the
overflow's SYNs dropped, and each dropped client waits out TCP's 1 s initial retransmission timeout
(RFC 6298): at C = 256 that stalled a 0.55 s benchmark run to 1.16 s (``benchmarks/wall_spread.py``
counts the overflows).
"""

from __future__ import annotations

__all__ = ["LISTEN_BACKLOG"]

LISTEN_BACKLOG = 4096
