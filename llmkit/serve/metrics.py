"""Counters, gauges and histograms rendered in Prometheus' text exposition format (version 0.0.4).

Names follow vLLM's (`llmkit:num_requests_running`, `llmkit:time_to_first_token_seconds`, ...) so
dashboards built for it read these with the prefix changed. Updated by the scheduler thread, read by
the `/metrics` handler: every update and the rendering hold one lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1


class Metrics:
    """What the server exposes; gauges are read through callbacks when `/metrics` is scraped."""

    prefix = "llmkit:"

    def __init__(self):
        self.lock = threading.Lock()
        self.counters: dict[str, float] = {"prompt_tokens_total": 0, "generation_tokens_total": 0,
                                           "prefix_cache_queries_total": 0, "prefix_cache_hits_total": 0}
        self.finished: dict[str, int] = {}  # requests by finish reason (stop, length, abort, error)
        self.histograms = {"time_to_first_token_seconds": Histogram(), "inter_token_latency_seconds": Histogram(),
                           "e2e_request_latency_seconds": Histogram()}
        self.gauges: dict[str, Callable[[], float]] = {}
        self.help = {
            "prompt_tokens_total": "Prompt tokens processed.",
            "generation_tokens_total": "Tokens generated.",
            "prefix_cache_queries_total": "Prompt tokens looked up in the prefix cache.",
            "prefix_cache_hits_total": "Prompt tokens found in the prefix cache (hit rate: hits / queries).",
            "request_success_total": "Requests that ended, by finish reason.",
            "time_to_first_token_seconds": "Time from arrival to the first generated token.",
            "inter_token_latency_seconds": "Time between two consecutive generation steps of a request.",
            "e2e_request_latency_seconds": "Time from arrival to the last token.",
            "num_requests_running": "Requests in the running batch.",
            "num_requests_waiting": "Requests waiting for room in the batch.",
            "kv_cache_usage_perc": "Share of the KV-cache token budget in use (0 to 1).",
        }

    def add(self, name: str, value: float = 1) -> None:
        with self.lock:
            self.counters[name] += value

    def observe(self, name: str, value: float) -> None:
        with self.lock:
            self.histograms[name].observe(value)

    def finish(self, reason: str) -> None:
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def render(self) -> str:
        p, lines = self.prefix, []

        def head(name, kind):
            lines.append(f"# HELP {p}{name} {self.help.get(name, name)}")
            lines.append(f"# TYPE {p}{name} {kind}")

        with self.lock:
            for name, read in self.gauges.items():
                head(name, "gauge")
                lines.append(f"{p}{name} {float(read())}")
            for name, value in self.counters.items():
                head(name, "counter")
                lines.append(f"{p}{name} {float(value)}")
            head("request_success_total", "counter")
            for reason in sorted({"stop", "length", "abort", *self.finished}):
                lines.append(f'{p}request_success_total{{finished_reason="{reason}"}} {float(self.finished.get(reason, 0))}')
            for name, h in self.histograms.items():
                head(name, "histogram")
                for bound, count in zip(h.buckets, h.counts, strict=True):
                    lines.append(f'{p}{name}_bucket{{le="{bound}"}} {float(count)}')
                lines.append(f'{p}{name}_bucket{{le="+Inf"}} {float(h.count)}')
                lines.append(f"{p}{name}_sum {h.sum}")
                lines.append(f"{p}{name}_count {float(h.count)}")
        return "\n".join(lines) + "\n"
