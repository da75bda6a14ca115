"""/metrics through prometheus_client, with the names users know from vLLM (`vllm:` → `ptp:`).

The front end observes what it sees (tokens, latencies, finished requests); each replica reports
its scheduler's state with every step (running, waiting, KV blocks, preemptions, finished
requests), which becomes a gauge labelled by replica.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   20.0, 40.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    def __init__(self, replicas: int):
        self.registry = r = CollectorRegistry()
        labels = ("replica",)
        self.running = Gauge("ptp:num_requests_running", "Sequences in the running batch.", labels, registry=r)
        self.waiting = Gauge("ptp:num_requests_waiting", "Sequences waiting for KV blocks or a slot.", labels,
                             registry=r)
        self.kv_usage = Gauge("ptp:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", labels,
                              registry=r)
        self.preemptions = Gauge("ptp:num_preemptions", "Sequences preempted for lack of KV blocks since start.",
                                 labels, registry=r)
        self.replica_finished = Gauge("ptp:replica_requests_finished", "Requests the replica itself has finished.",
                                      labels, registry=r)
        self.prefix_queries = Gauge("ptp:prefix_cache_queries", "Prompt tokens looked up in the prefix cache since "
                                    "start.", labels, registry=r)
        self.prefix_hits = Gauge("ptp:prefix_cache_hits", "Prompt tokens found in the prefix cache since start.",
                                 labels, registry=r)
        self.prompt_tokens = Counter("ptp:prompt_tokens", "Prompt tokens of admitted requests.", labels, registry=r)
        self.generation_tokens = Counter("ptp:generation_tokens", "Tokens generated.", labels, registry=r)
        self.requests = Counter("ptp:request_success", "Finished requests by finish reason.",
                                ("replica", "finished_reason"), registry=r)
        self.ttft = Histogram("ptp:time_to_first_token_seconds", "From arrival to the first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("ptp:inter_token_latency_seconds", "Between consecutive tokens of a sequence.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("ptp:e2e_request_latency_seconds", "From arrival to the last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        for i in range(replicas):  # every series exists from the start, at zero
            self.running.labels(str(i))
            self.waiting.labels(str(i))
            self.kv_usage.labels(str(i))
            self.preemptions.labels(str(i))
            self.replica_finished.labels(str(i))
            self.prefix_queries.labels(str(i))
            self.prefix_hits.labels(str(i))
            self.prompt_tokens.labels(str(i))
            self.generation_tokens.labels(str(i))

    def load(self, replica: int, load) -> None:
        r = str(replica)
        self.running.labels(r).set(load.running)
        self.waiting.labels(r).set(load.waiting)
        self.kv_usage.labels(r).set(load.kv_blocks_used / max(1, load.kv_blocks))
        self.preemptions.labels(r).set(load.preemptions)
        self.replica_finished.labels(r).set(load.finished)
        self.prefix_queries.labels(r).set(load.prefix_query_tokens)
        self.prefix_hits.labels(r).set(load.prefix_hit_tokens)

    def finished(self, replica: int, reason: str | None, seconds: float) -> None:
        self.requests.labels(str(replica), reason or "abort").inc()
        self.e2e.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
