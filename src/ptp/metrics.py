"""Prometheus text-format metrics, written by hand (counters, gauges, histograms; no client library)."""
from __future__ import annotations

import bisect
import threading


class Metric:
    kind = ""

    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self.lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(Metric):
    kind = "counter"

    def __init__(self, name, help, labels: tuple[str, ...] = ()):
        super().__init__(name, help)
        self.label_names, self.values = labels, {}

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = tuple(labels.get(n, "") for n in self.label_names)
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        lines = self.header()
        items = sorted(self.values.items())
        if not items and not self.label_names:
            items = [((), 0.0)]
        for key, value in items:
            labels = ",".join(f'{n}="{v}"' for n, v in zip(self.label_names, key))
            lines.append(f"{self.name}{{{labels}}} {value}" if labels else f"{self.name} {value}")
        return lines


class Gauge(Metric):
    kind = "gauge"

    def __init__(self, name, help, read):
        super().__init__(name, help)
        self.read = read

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {float(self.read())}"]


class Histogram(Metric):
    kind = "histogram"

    def __init__(self, name, help, buckets: list[float]):
        super().__init__(name, help)
        self.buckets = sorted(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        with self.lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value

    def render(self) -> list[str]:
        lines, total = self.header(), 0
        for bound, count in zip(self.buckets + [float("inf")], self.counts):
            total += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{self.name}_bucket{{le="{le}"}} {total}')
        return lines + [f"{self.name}_sum {self.sum}", f"{self.name}_count {total}"]


LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0]


class EngineMetrics:
    def __init__(self, engine):
        sched = engine.scheduler
        self.prompt_tokens = Counter("ptp_prompt_tokens_total", "Prompt tokens of admitted requests.")
        self.generation_tokens = Counter("ptp_generation_tokens_total", "Tokens generated.")
        self.requests = Counter("ptp_requests_total", "Finished requests by finish reason.", ("finish_reason",))
        self.ttft = Histogram("ptp_time_to_first_token_seconds", "From arrival to the first token.", LATENCY_BUCKETS)
        self.itl = Histogram("ptp_inter_token_latency_seconds", "Between consecutive tokens of a sequence.", LATENCY_BUCKETS)
        self.e2e = Histogram("ptp_e2e_request_latency_seconds", "From arrival to the last token.", LATENCY_BUCKETS)
        self.all = [
            Gauge("ptp_num_requests_running", "Sequences in the running batch.", lambda: len(sched.running)),
            Gauge("ptp_num_requests_waiting", "Sequences waiting for KV blocks or a slot.", lambda: len(sched.waiting)),
            Gauge("ptp_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", lambda: sched.kv_usage),
            Gauge("ptp_kv_cache_capacity_tokens", "Token slots in the KV cache.", lambda: engine.kv_capacity_tokens),
            Gauge("ptp_num_preemptions_total", "Sequences preempted for lack of KV blocks.", lambda: sched.num_preemptions),
            self.prompt_tokens, self.generation_tokens, self.requests, self.ttft, self.itl, self.e2e,
        ]

    def render(self) -> str:
        return "\n".join(line for m in self.all for line in m.render()) + "\n"
