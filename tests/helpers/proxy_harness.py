"""Run the proxy in a background thread (own event loop) so sync clients like ``openai`` can
talk to it from the test thread, and helpers to watch processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import urllib.request
from typing import TYPE_CHECKING, Any

from llama_proc.proxy.app import create_app
from llama_proc.proxy.gate import run_proxy
from llama_proc.proxy.options import ProxyOptions
from llama_proc.proxy.pool import ServerPool

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from llama_proc.proxy.models_config import ModelsConfig
    from llama_proc.proxy.servers import ServerFactory


class ProxyThread:
    def __init__(
        self,
        models: ModelsConfig,
        factory: ServerFactory,
        *,
        max_servers: int = 2,
        idle_ttl: float | None = 0,
        queue_timeout: float = 120,
        options: ProxyOptions | None = None,
        pool_options: dict[str, Any] | None = None,
        memory_budget: int | None = None,
    ) -> None:
        self.models = models
        self.pool_options = pool_options or {}
        self.factory = factory
        self.max_servers = max_servers
        self.idle_ttl = idle_ttl
        self.queue_timeout = queue_timeout
        self.memory_budget = memory_budget
        self.options = options or ProxyOptions()
        self.base_url = ""
        self.pool: ServerPool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="proxy", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as err:  # noqa: BLE001 - surfaced by start()/stop()
            self._error = err
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.pool = ServerPool(
            self.factory,
            max_servers=self.max_servers,
            idle_ttl=self.idle_ttl,
            queue_timeout=self.queue_timeout,
            **self.pool_options,
            memory_budget=self.memory_budget,
        )
        app = create_app(self.models, self.pool, self.options)

        def ready(host: str, port: int) -> None:
            self.base_url = f"http://{host}:{port}"
            self._ready.set()

        await run_proxy(
            app, host="127.0.0.1", port=0, ready=ready, stop=self._stop, drain_timeout=10
        )

    def start(self) -> ProxyThread:
        self._thread.start()
        assert self._ready.wait(30), "proxy did not start"
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        assert not self._thread.is_alive(), "proxy did not stop"
        if self._error is not None:
            raise self._error

    def get_json(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.base_url + path, timeout=30) as resp:
            data: dict[str, Any] = json.loads(resp.read())
        return data

    def servers(self) -> list[dict[str, Any]]:
        servers: list[dict[str, Any]] = self.get_json("/servers")["data"]
        return servers


@contextlib.contextmanager
def running_proxy(*args: Any, **kwargs: Any) -> Iterator[ProxyThread]:
    proxy = ProxyThread(*args, **kwargs).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone (it no longer holds memory or ports).
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return bool(check())
