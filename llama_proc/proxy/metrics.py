"""Prometheus metrics for the proxy: its own series, per-model series and each server's, relabelled.

The series live in a :mod:`prometheus_client` registry. :class:`PoolMetrics` holds what the pool
records (loads, load time, queue wait, evictions, restarts, requests and refusals, each labelled
with the model); :class:`ProxyMetrics` adds the HTTP side (requests by endpoint, time to first
token, upstream errors) and gauges read from the pool at scrape time. Upstream llama-server
metrics (``llamacpp:*``, served with ``--metrics``) are merged family by family with ``server``
and ``model`` labels added, so one scrape of the proxy covers every server behind it.

The text is rendered here rather than by ``prometheus_client.generate_latest`` so that label
order stays as declared, integral values print as integers (as llama-server prints its own) and
the ``_created`` series stay out of an exposition meant to be merged with llama-server's.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping, Sequence

    from prometheus_client.metrics_core import Metric

__all__ = [
    "LOAD_BUCKETS",
    "OVERHEAD_BUCKETS",
    "REQUEST_BUCKETS",
    "PoolMetrics",
    "PoolView",
    "ProxyMetrics",
    "Series",
    "merge_upstream",
    "render",
]

REQUEST_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                          5.0, 10.0, 30.0, 60.0, 120.0, 300.0)  # fmt: skip
"""Histogram buckets (seconds) for request-sized durations: queue wait, first token, requests."""
OVERHEAD_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005,
                            0.01, 0.025, 0.05, 0.1, 0.25, 1.0)  # fmt: skip
"""Histogram buckets (seconds) for the proxy's own time per request: sub-millisecond first."""
LOAD_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""Histogram buckets (seconds) for server load times."""
_SAMPLE_RE: Final = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+(.+)$")
_SKIPPED_SUFFIXES: Final = ("_created",)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class Series:
    """A :mod:`prometheus_client` metric addressed with positional label values.

    Children are cached per label tuple, so the hot path (one ``inc`` per request) is a dict
    lookup instead of ``labels()``'s validation and lock.
    """

    __slots__ = ("_children", "metric")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def _child(self, labels: tuple[str, ...]) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self.metric.labels(*labels) if labels else self.metric
            self._children[labels] = child
        return child

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        """Add ``amount`` (a gauge may go down with a negative amount)."""
        self._child(labels).inc(amount)

    def set(self, *labels: str, value: float) -> None:
        """Set a gauge."""
        self._child(labels).set(value)

    def observe(self, value: float, *labels: str) -> None:
        """Record one histogram observation."""
        self._child(labels).observe(value)

    def value(self, *labels: str) -> float:
        """Current value of a counter or gauge (0 if never touched); for tests and reports."""
        for sample in self.metric.collect()[0].samples:
            if sample.name.endswith(_SKIPPED_SUFFIXES):
                continue
            if tuple(sample.labels.values()) == labels:
                return float(sample.value)
        return 0.0

    def count(self, *labels: str) -> int:
        """Number of observations of a histogram for ``labels``."""
        for sample in self.metric.collect()[0].samples:
            if sample.name.endswith("_count") and tuple(sample.labels.values()) == labels:
                return int(sample.value)
        return 0


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> Series:
    return Series(Counter(name, doc, labels, registry=None))


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Series:
    return Series(Gauge(name, doc, labels, registry=None))


def _histogram(name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]) -> Series:
    return Series(Histogram(name, doc, labels, buckets=buckets, registry=None))


class PoolMetrics:
    """Per-model series the pool records as things happen."""

    def __init__(self) -> None:
        self.requests = _counter(
            "llama_proc_model_requests", "Requests handed a server, by model.", ("model",)
        )
        self.rejected = _counter(
            "llama_proc_model_rejected_requests",
            "Requests refused before reaching a server: queue_full, too_large, busy (no slot in "
            "time).",
            ("model", "reason"),
        )
        self.queue_wait = _histogram(
            "llama_proc_model_queue_wait_seconds",
            "Time a request waited for its server (load included), by model.",
            ("model",),
            REQUEST_BUCKETS,
        )
        self.loads = _counter(
            "llama_proc_model_loads", "Servers started (loaded) successfully, by model.", ("model",)
        )
        self.load_failures = _counter(
            "llama_proc_model_load_failures", "Server starts that failed, by model.", ("model",)
        )
        self.load_seconds = _histogram(
            "llama_proc_model_load_seconds",
            "Time from starting a server to its first answer, by model.",
            ("model",),
            LOAD_BUCKETS,
        )
        self.evictions = _counter(
            "llama_proc_model_evictions",
            "Servers stopped to make room (lru, memory), for idleness (idle) or by hand (manual).",
            ("model", "reason"),
        )
        self.restarts = _counter(
            "llama_proc_model_restarts",
            "Unhealthy servers replaced: crash (process died), wedge (stopped answering a probe), "
            "stall (stopped mid-stream).",
            ("model", "reason"),
        )

    def series(self) -> tuple[Series, ...]:
        """Every series, in exposition order."""
        return (
            self.requests,
            self.rejected,
            self.queue_wait,
            self.loads,
            self.load_failures,
            self.load_seconds,
            self.evictions,
            self.restarts,
        )


class PoolView(Protocol):
    """What the scrape-time collector reads from the pool."""

    max_servers: int
    stats: dict[str, int]

    def gauges(self) -> Iterable[tuple[str, Mapping[str, str], float]]:
        """(metric suffix, labels, value) for each scrape-time gauge sample."""


_POOL_GAUGES: Final = {
    "servers": ("llama_proc_pool_servers", "Servers in the pool by state.", ("state",)),
    "server_active": (
        "llama_proc_pool_server_active_requests",
        "Requests running on each server.",
        ("server", "model"),
    ),
    "queued": (
        "llama_proc_model_queued_requests",
        "Requests waiting for a server, by model.",
        ("model",),
    ),
    "memory_reserved": (
        "llama_proc_pool_memory_reserved_bytes",
        "Estimated memory of the servers up or starting.",
        (),
    ),
    "memory_budget": (
        "llama_proc_pool_memory_budget_bytes",
        "Memory the pool may give its servers (0 = no budget).",
        (),
    ),
    "device_budget": (
        "llama_proc_pool_device_budget_bytes",
        "Memory the pool may give its servers on each GPU.",
        ("device",),
    ),
    "device_reserved": (
        "llama_proc_pool_device_reserved_bytes",
        "Memory the servers up or starting claim on each GPU (measured where NVML answers).",
        ("device",),
    ),
    "model_running": (
        "llama_proc_model_running_requests",
        "Requests running on a server, by model.",
        ("model",),
    ),
    "total_queued": (
        "llama_proc_queued_requests",
        "Requests waiting for a server, all models (an endpoint picker's queue depth).",
        (),
    ),
    "total_running": (
        "llama_proc_running_requests",
        "Requests running on a server, all models.",
        (),
    ),
    "kv_cache_usage": (
        "llama_proc_kv_cache_usage_ratio",
        (
            "KV cache in use, 0 to 1, over all servers: tokens held where /slots reports them, "
            "else busy slots over slots (an endpoint picker's KV cache utilisation)."
        ),
        (),
    ),
    **{
        key: (f"llama_proc_server_{name}", doc, ("server", "model"))
        for key, name, doc in (
            ("server_running", "running_requests", "Requests running on each server."),
            ("server_queued", "queued_requests", "Requests waiting for each server."),
            ("server_slots_used", "slots_used", "Slots of each server serving a request."),
            ("server_slots_total", "slots_total", "Slots of each server."),
            ("server_kv_total", "kv_cache_tokens_total", "KV cache size in tokens (/slots)."),
            ("server_kv_used", "kv_cache_used_tokens", "Tokens in the KV cache (/slots)."),
            ("server_load_seconds", "load_seconds", "How long each server's last load took."),
            (
                "server_memory_estimate",
                "memory_estimate_bytes",
                "Each server's memory by estimate (GGUF header).",
            ),
        )
    },
    "server_memory": (
        "llama_proc_server_memory_bytes",
        "Memory each server holds as measured: device=host (PSS) or CUDA<N> (NVML).",
        ("server", "model", "device"),
    ),
}


class _PoolCollector:
    """Reads the pool's state and totals at scrape time.

    A custom collector is ``prometheus_client``'s idiom for values kept elsewhere.
    """

    def __init__(self, pool: PoolView) -> None:
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        pool = self._pool
        families = {
            key: GaugeMetricFamily(name, doc, labels=list(labels))
            for key, (name, doc, labels) in _POOL_GAUGES.items()
        }
        for key, labels, value in pool.gauges():
            families[key].add_metric(list(labels.values()), value)
        events = CounterMetricFamily(
            "llama_proc_pool_events",
            "Server lifecycle events so far: starts, start_failures, crashes, wedges, stalls, "
            "evictions_lru, evictions_memory, evictions_idle, evictions_manual.",
            labels=["event"],
        )
        for event, count in pool.stats.items():
            events.add_metric([event], count)
        max_servers = GaugeMetricFamily(
            "llama_proc_pool_max_servers",
            "Most servers allowed up at once (--max-servers).",
            value=pool.max_servers,
        )
        yield from (*families.values(), events, max_servers)


class ProxyMetrics:
    """The proxy's registry: its HTTP series, the pool's series and the pool's state.

    Args:
        pool: the pool whose :class:`PoolMetrics` and state are exported; None for the HTTP
            series alone.
    """

    def __init__(self, pool: Any = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = _counter(
            "llama_proc_proxy_requests",
            "Requests answered by the proxy, by endpoint and HTTP status.",
            ("endpoint", "code"),
        )
        self.duration = _histogram(
            "llama_proc_proxy_request_duration_seconds",
            "Time from request to the end of the response, by endpoint.",
            ("endpoint",),
            REQUEST_BUCKETS,
        )
        self.first_byte = _histogram(
            "llama_proc_proxy_upstream_first_byte_seconds",
            "Time from forwarding a request to its first response byte from llama-server.",
            ("model",),
            REQUEST_BUCKETS,
        )
        self.ttft = _histogram(
            "llama_proc_model_time_to_first_token_seconds",
            "Streamed requests: time from the request's arrival (queue and load included) to the "
            "first event from llama-server, by model.",
            ("model",),
            REQUEST_BUCKETS,
        )
        self.overhead = _histogram(
            "llama_proc_proxy_overhead_seconds",
            "Time a forwarded request spent in the proxy itself up to its first response byte: "
            "routing, checks, forwarding and event-loop waits, with the waits for the client's "
            "body, a model download, the pool and llama-server left out; by model.",
            ("model",),
            OVERHEAD_BUCKETS,
        )
        self.in_flight = _gauge(
            "llama_proc_proxy_requests_in_flight", "Requests being served right now."
        )
        self.upstream_errors = _counter(
            "llama_proc_proxy_upstream_errors",
            "Forwarded requests that failed: timeout, stall, connection, crash, wedge (the "
            "pool stopped the unresponsive server under it).",
            ("model", "kind"),
        )
        self.disconnects = _counter(
            "llama_proc_proxy_client_disconnects",
            "Requests whose client went away before the response ended (upstream cancelled).",
            ("model",),
        )
        self.scrape_errors = _gauge(
            "llama_proc_upstream_scrape_errors",
            "Servers whose /metrics could not be read during this scrape.",
        )
        own = (
            self.requests,
            self.duration,
            self.first_byte,
            self.ttft,
            self.overhead,
            self.in_flight,
            self.upstream_errors,
            self.disconnects,
            self.scrape_errors,
        )
        for series in own:
            self.registry.register(series.metric)
        if pool is not None:
            for series in pool.metrics.series():
                self.registry.register(series.metric)
            self.registry.register(_PoolCollector(pool))
        self.in_flight.set(value=0)
        self.scrape_errors.set(value=0)

    def render(self) -> str:
        """The registry in Prometheus text format 0.0.4."""
        return render(self.registry)


def render(registry: CollectorRegistry) -> str:
    """Render a registry as Prometheus text (format 0.0.4).

    Label order is kept as declared, integral values print as integers and ``_created``
    samples are left out.
    """
    out: list[str] = []
    for family in registry.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        kind = "untyped" if family.type == "unknown" else family.type
        out.append(f"# HELP {name} {family.documentation.replace(chr(92), chr(92) * 2)}")
        out.append(f"# TYPE {name} {kind}")
        for sample in family.samples:
            if sample.name.endswith(_SKIPPED_SUFFIXES):
                continue
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sample.labels.items())
            out.append(f"{sample.name}{{{labels}}} {_num(sample.value)}" if labels
                       else f"{sample.name} {_num(sample.value)}")  # fmt: skip
    return "\n".join(out) + "\n"


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
