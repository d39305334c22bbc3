"""Prometheus text exposition for the proxy: its own metrics plus each server's, relabelled.

A deliberately small implementation (counters, gauges, histograms with labels) so the proxy
needs no metrics library. Upstream llama-server metrics (``llamacpp:*``, served with
``--metrics``) are merged family by family with ``server`` and ``model`` labels added, so one
scrape of the proxy covers every server behind it.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "Counter",
    "Gauge",
    "Histogram",
    "ProxyMetrics",
    "Registry",
    "merge_upstream",
]

DEFAULT_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                          60.0, 120.0, 300.0)  # fmt: skip
_SAMPLE_RE: Final = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+(.+)$")

Kind = Literal["counter", "gauge", "histogram"]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


class _Metric:
    kind: Kind = "gauge"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)

    def header(self) -> list[str]:
        """The HELP and TYPE lines."""
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:
        """The sample lines."""
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count, per label set."""

    kind: Kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        """Add ``amount`` to the series for ``labels`` (one value per label name)."""
        self._values[labels] = self._values.get(labels, 0.0) + amount

    def set_total(self, *labels: str, value: float) -> None:
        """Mirror a total kept elsewhere (it must only grow)."""
        self._values[labels] = value

    def value(self, *labels: str) -> float:
        """The current value for ``labels`` (0 if never incremented)."""
        return self._values.get(labels, 0.0)

    def lines(self) -> list[str]:  # noqa: D102 - see _Metric
        return [
            f"{self.name}{_labels(self.labelnames, k)} {_num(v)}"
            for k, v in sorted(self._values.items())
        ]


class Gauge(Counter):
    """A value that goes up and down, per label set."""

    kind: Kind = "gauge"

    def set(self, *labels: str, value: float) -> None:
        """Set the series for ``labels``."""
        self._values[labels] = value

    def clear(self) -> None:
        """Drop every series (for gauges rebuilt at scrape time)."""
        self._values.clear()


class Histogram(_Metric):
    """Observations counted into cumulative buckets, per label set."""

    kind: Kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[tuple[str, ...], list[float]] = {}

    def observe(self, value: float, *labels: str) -> None:
        """Record one observation (seconds, bytes, ...)."""
        series = self._series.get(labels)
        if series is None:
            # Per-bucket counts, then +Inf count and sum.
            series = self._series[labels] = [0.0] * (len(self.buckets) + 2)
        series[bisect_left(self.buckets, value)] += 1
        series[-1] += value

    def count(self, *labels: str) -> int:
        """How many observations were made for ``labels``."""
        series = self._series.get(labels)
        return 0 if series is None else int(sum(series[:-1]))

    def lines(self) -> list[str]:  # noqa: D102 - see _Metric
        out: list[str] = []
        for key, series in sorted(self._series.items()):
            running = 0.0
            for bound, n in zip((*self.buckets, math.inf), series[:-1], strict=True):
                running += n
                le = f'le="{_num(bound)}"'
                out.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {_num(running)}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_num(series[-1])}")
            out.append(f"{self.name}_count{_labels(self.labelnames, key)} {_num(running)}")
        return out


class Registry:
    """An ordered set of metrics rendered together."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> None:
        """Register a metric; it renders in registration order."""
        self._metrics.append(metric)

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        out: list[str] = []
        for metric in self._metrics:
            out.extend(metric.header())
            out.extend(metric.lines())
        return "\n".join(out) + "\n"


class ProxyMetrics:
    """The proxy's own metrics."""

    def __init__(self) -> None:
        self.registry = Registry()
        self.requests = Counter(
            "llama_proc_proxy_requests_total",
            "Requests answered by the proxy, by endpoint and HTTP status.",
            ("endpoint", "code"),
        )
        self.duration = Histogram(
            "llama_proc_proxy_request_duration_seconds",
            "Time from request to the end of the response, by endpoint.",
            ("endpoint",),
        )
        self.first_byte = Histogram(
            "llama_proc_proxy_upstream_first_byte_seconds",
            "Time from forwarding a request to its first response byte from llama-server.",
            ("model",),
        )
        self.in_flight = Gauge(
            "llama_proc_proxy_requests_in_flight", "Requests being served right now."
        )
        self.upstream_errors = Counter(
            "llama_proc_proxy_upstream_errors_total",
            "Forwarded requests that failed: timeout, stall, connection, crash.",
            ("model", "kind"),
        )
        self.disconnects = Counter(
            "llama_proc_proxy_client_disconnects_total",
            "Requests whose client went away before the response ended (upstream cancelled).",
            ("model",),
        )
        self.pool_events = Counter(
            "llama_proc_pool_events_total",
            "Server lifecycle events: start, start_failure, crash, eviction_lru, eviction_idle, "
            "eviction_manual.",
            ("event",),
        )
        self.servers = Gauge("llama_proc_pool_servers", "Servers in the pool by state.", ("state",))
        self.server_active = Gauge(
            "llama_proc_pool_server_active_requests",
            "Requests running on each server.",
            ("server", "model"),
        )
        self.max_servers = Gauge(
            "llama_proc_pool_max_servers", "Most servers allowed up at once (--max-servers)."
        )
        self.scrape_errors = Gauge(
            "llama_proc_upstream_scrape_errors",
            "Servers whose /metrics could not be read during this scrape.",
        )
        for metric in (
            self.requests,
            self.duration,
            self.first_byte,
            self.in_flight,
            self.upstream_errors,
            self.disconnects,
            self.pool_events,
            self.servers,
            self.server_active,
            self.max_servers,
            self.scrape_errors,
        ):
            self.registry.add(metric)
        self.in_flight.set(value=0)


def merge_upstream(parts: Iterable[tuple[Mapping[str, str], str]]) -> str:
    """Merge several Prometheus expositions, adding labels to every sample.

    Args:
        parts: (labels to add, exposition text) per server.

    Returns:
        One exposition: each family's HELP/TYPE once, then its samples from every server.
    """
    order: list[str] = []
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for labels, text in parts:
        extra = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        family = ""
        for raw in text.splitlines():
            line = raw.strip()
            if not line:
                continue
            if line.startswith("#"):
                fields = line.split(None, 3)
                if len(fields) >= 3 and fields[1] in ("HELP", "TYPE"):
                    family = fields[2]
                    if family not in headers:
                        order.append(family)
                        headers[family] = []
                        samples[family] = []
                    if not any(h.split(None, 2)[1] == fields[1] for h in headers[family]):
                        headers[family].append(line)
                continue
            match = _SAMPLE_RE.match(line)
            if match is None:
                continue
            name, existing, rest = match.groups()
            if not family or not name.startswith(family):
                family = name
                if family not in samples:
                    order.append(family)
                    headers[family] = []
                    samples[family] = []
            if existing and existing != "{}":
                merged = "{" + extra + ("," if extra else "") + existing[1:]
            else:
                merged = "{" + extra + "}" if extra else ""
            samples[family].append(f"{name}{merged} {rest}")
    out: list[str] = []
    for family in order:
        out.extend(headers[family])
        out.extend(samples[family])
    return "\n".join(out) + ("\n" if out else "")
