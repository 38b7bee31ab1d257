"""One connection pool per server for a whole run, on an event loop of its own.

Every backend that talks to a server (the steps of a run with the same ``base_url`` and key,
whatever their other options) shares one :class:`Endpoint`: one aiohttp session (keep-alive
connections reused across steps and batches), the thread its event loop runs in, and one
:class:`~factory.llm.ratelimit.RateLimiter` per model, so that the server's limits are paced
for all of them together. The endpoint closes when the last backend that uses it does.

Why aiohttp: measured against a local server that answers after 50 ms (``bench/openai_backend.py``),
a plain aiohttp loop sends 950 requests/s at 64 in flight and 2,700 at 256; httpx 0.29 sends
100 and 75 (its connection pool walks every connection on every request), the OpenAI SDK 550 and
510. Why a thread: steps are synchronous code, and a caller may already run an event loop (a
notebook); the loop here is never theirs.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
from collections.abc import Callable

from ..errors import BackendError
from .ratelimit import RateLimiter


class Endpoint:
    """A server's session, event loop and rate limiters, shared while any backend holds it."""

    _open: dict[tuple, "Endpoint"] = {}
    _lock = threading.Lock()

    def __init__(self, key: tuple, headers: dict):
        self.key = key
        self.headers = headers
        self.holders = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="factory-http", daemon=True)
        self.thread.start()
        self._session = None
        self.limiters: dict[str, RateLimiter] = {}

    @classmethod
    def hold(cls, base_url: str, headers: dict) -> "Endpoint":
        """The endpoint of ``base_url`` with these headers (the API key), opened on first use."""
        key = (base_url.rstrip("/"), tuple(sorted(headers.items())))
        with cls._lock:
            endpoint = cls._open.get(key)
            if endpoint is None:
                endpoint = cls._open[key] = Endpoint(key, headers)
            endpoint.holders += 1
            return endpoint

    def let_go(self, everyone: bool = False) -> None:
        """One holder is done; the last one (or ``everyone``, at exit) closes the session and stops the loop."""
        with self._lock:
            self.holders = 0 if everyone else self.holders - 1
            if self.holders > 0 or self._open.get(self.key) is not self:
                return
            self._open.pop(self.key, None)
        try:
            # Requests still in flight (a run stopped by an error or Ctrl-C) end here, before the
            # loop does, so that nothing is left waiting on a loop that is gone.
            asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(timeout=10)
        except Exception:  # noqa: BLE001 - closing a pool whose server went away
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
        self._session = None

    async def _shutdown(self) -> None:
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def run(self, coro):
        """Runs ``coro`` on the endpoint's loop and waits for it; Ctrl-C or an error cancels it there."""
        if self.loop.is_closed():
            coro.close()
            raise BackendError(f"the connection to {self.key[0]} was closed (the run is stopping)")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            while True:
                try:
                    return future.result(timeout=1.0)
                except concurrent.futures.TimeoutError:
                    if not self.loop.is_running():  # closed under a batch still waiting (the run stopped)
                        raise BackendError(f"the connection to {self.key[0]} was closed (the run is stopping)")
        except BaseException:
            if not self.loop.is_closed():
                future.cancel()  # stop what is still in flight
            raise

    def session(self):
        """The aiohttp session (made on the loop, on first use). Its own connection limit is off:
        the rate limiters decide how many requests are in flight."""
        if self._session is None:
            import aiohttp

            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, headers=self.headers,
                                                  timeout=aiohttp.ClientTimeout(total=None),
                                                  skip_auto_headers=("User-Agent",), raise_for_status=False)
        return self._session

    def limiter(self, model: str, make: Callable[[], RateLimiter], requests_per_minute: float | None = None,
                tokens_per_minute: float | None = None) -> RateLimiter:
        """The rate limiter of ``model`` on this server (limits are per model on hosted APIs); one that
        exists already takes in the limits stated here."""
        limiter = self.limiters.get(model)
        if limiter is None:
            limiter = self.limiters[model] = make()
        else:
            limiter.state(requests_per_minute, tokens_per_minute)
        return limiter


@atexit.register
def _close_all() -> None:
    """Sessions a caller never closed (a backend used outside a run) close quietly at exit."""
    for endpoint in list(Endpoint._open.values()):
        endpoint.let_go(everyone=True)
