"""Model status events for ``GET /models/sse``, in llama-server's router shapes.

The pool has no change hook, so the statuses are polled (every :data:`POLL_INTERVAL` seconds,
only while someone listens) and each change becomes an event. Listeners are bounded
(:data:`MAX_SUBSCRIBERS`) and so is each one's queue (:data:`QUEUE_SIZE`): a client that reads
too slowly is dropped (its stream ends) rather than buffered for without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "MAX_SUBSCRIBERS",
    "POLL_INTERVAL",
    "QUEUE_SIZE",
    "ModelEvents",
    "Subscription",
    "status_events",
]

logger = logging.getLogger(__name__)

POLL_INTERVAL: Final = 0.1
"""Seconds between looks at the pool's state while a client listens."""
MAX_SUBSCRIBERS: Final = 64
"""Most ``GET /models/sse`` streams open at once; more are answered 503."""
QUEUE_SIZE: Final = 256
"""Events one listener may have unread before it is dropped."""

Statuses = dict[str, dict[str, Any]]
"""Model id -> its status object (``{"value": "loaded", ...}``)."""


def status_events(before: Statuses, after: Statuses) -> list[dict[str, Any]]:
    """The events that take listeners from ``before`` to ``after``, in llama-server's shapes.

    A model that starts loading gets ``model_status`` then ``status_change`` (as the router
    sends them); a download in progress ``download_progress``; any other change of status
    ``status_change``; a model no longer listed ``model_remove``.
    """
    events: list[dict[str, Any]] = []
    for model, status in after.items():
        old = before.get(model)
        if old == status:
            continue
        value = status["value"]
        data: dict[str, Any] = {"status": value}
        data.update({k: v for k, v in status.items() if k != "value"})
        if value == "downloading":
            events.append({"model": model, "event": "download_progress", "data": data})
            continue
        if value == "loading" and (old is None or old["value"] != "loading"):
            events.append({"model": model, "event": "model_status", "data": {"status": value}})
        events.append({"model": model, "event": "status_change", "data": data})
    events.extend(
        {"model": model, "event": "model_remove", "data": {}}
        for model in before
        if model not in after
    )
    return events


class Subscription:
    """One listener's bounded queue of events; None in it means the stream ends."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=size)
        self.dropped = False

    def offer(self, event: dict[str, Any]) -> bool:
        """Queue an event; False (and the stream ends) when the queue is full."""
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.end(dropped=True)
            return False
        return True

    def end(self, *, dropped: bool = False) -> None:
        """End the stream: what is still queued is dropped, the reader sees None next."""
        self.dropped = self.dropped or dropped
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class ModelEvents:
    """Turns polled model statuses into events for every listener.

    Args:
        statuses: the current status of every model (called on the event loop).
        interval: seconds between polls.
        max_subscribers: most listeners at once.
        queue_size: most unread events per listener.
    """

    def __init__(
        self,
        statuses: Callable[[], Statuses],
        *,
        interval: float = POLL_INTERVAL,
        max_subscribers: int = MAX_SUBSCRIBERS,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self._statuses = statuses
        self.interval = interval
        self.max_subscribers = max_subscribers
        self.queue_size = queue_size
        self._subscribers: set[Subscription] = set()
        self._last: Statuses = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.dropped = 0
        """Listeners dropped for reading too slowly."""

    @property
    def subscribers(self) -> int:
        """Listeners now."""
        return len(self._subscribers)

    def subscribe(self) -> Subscription | None:
        """A new listener, or None when there are :attr:`max_subscribers` already."""
        if self._closed or len(self._subscribers) >= self.max_subscribers:
            return None
        sub = Subscription(self.queue_size)
        self._subscribers.add(sub)
        if self._task is None or self._task.done():
            # The baseline is taken now: every change after subscribing is an event.
            self._last = self._statuses()
            self._task = asyncio.get_running_loop().create_task(self._poll())
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget a listener (its stream has ended)."""
        self._subscribers.discard(sub)

    def publish(self, event: dict[str, Any]) -> None:
        """Send one event to every listener, dropping those whose queue is full."""
        for sub in list(self._subscribers):
            if not sub.offer(event):
                self._subscribers.discard(sub)
                self.dropped += 1
                logger.info("a /models/sse client was dropped: it read too slowly")

    def poll_once(self) -> None:
        """Look at the statuses once and publish what changed."""
        now = self._statuses()
        for event in status_events(self._last, now):
            self.publish(event)
        self._last = now

    async def _poll(self) -> None:
        while self._subscribers and not self._closed:
            await asyncio.sleep(self.interval)
            try:
                self.poll_once()
            except Exception:
                logger.exception("model status poll failed")

    async def close(self) -> None:
        """End every stream and stop polling."""
        self._closed = True
        for sub in list(self._subscribers):
            sub.end()
        self._subscribers.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
