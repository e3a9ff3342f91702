"""Prometheus text-format metrics without a client library (counters, gauges, histograms).

Updated from the event loop only, so no locks are needed.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Counter:
    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self.values: dict[tuple, float] = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(k)} {_num(v)}" for k, v in sorted(self.values.items())]
        return lines


class Gauge:
    def __init__(self, name: str, help: str, fn):
        self.name, self.help, self.fn = name, help, fn

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_num(self.fn())}"]


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip((*self.buckets, math.inf), self.counts, strict=True):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {cumulative}')
        lines += [f"{self.name}_sum {_num(self.sum)}", f"{self.name}_count {self.count}"]
        return lines


class ServiceMetrics:
    """The service's metrics; ``render()`` gives the ``/metrics`` body."""

    def __init__(self, queue_images=lambda: 0, ready=lambda: False):
        self.requests = Counter("icthp_requests_total", "HTTP requests by endpoint and status code.")
        self.images = Counter("icthp_images_total", "Images scored.")
        self.latency = Histogram("icthp_request_duration_seconds", "Latency of /v1/score requests.",
                                 LATENCY_BUCKETS)
        self.batch_size = Histogram("icthp_batch_size", "Images per model forward.", BATCH_BUCKETS)
        self.batch_seconds = Histogram("icthp_batch_duration_seconds", "Time of one model forward.",
                                       LATENCY_BUCKETS)
        self.gauges = [
            Gauge("icthp_queue_images", "Images admitted and not yet scored.", queue_images),
            Gauge("icthp_ready", "1 when the models are loaded.", lambda: 1 if ready() else 0),
        ]

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.images, self.latency, self.batch_size, self.batch_seconds,
                       *self.gauges):
            lines += metric.render()
        return "\n".join(lines) + "\n"
