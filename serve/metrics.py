"""
A replica's Prometheus metrics, named as vLLM names them (with the `nanochat:` prefix in place of `vllm:`), so the
dashboards and alerts people have for vLLM read them unchanged:

    nanochat:num_requests_running / num_requests_waiting      gauges, from the scheduler
    nanochat:kv_cache_usage_perc                              fraction of KV blocks in use (0..1)
    nanochat:prefix_cache_queries_total / prefix_cache_hits_total   prompt tokens looked up / found cached
    nanochat:prompt_tokens_total / generation_tokens_total
    nanochat:request_success_total{finished_reason}
    nanochat:time_to_first_token_seconds, inter_token_latency_seconds,
    nanochat:request_time_per_output_token_seconds, e2e_request_latency_seconds   histograms
plus the HTTP front's own: nanochat:http_requests_total{route,status}, nanochat:http_errors_total{route,status}
and nanochat:open_websockets.

With several replicas, /metrics shows them all: each replica's series with a `replica` label (merge_replicas).
"""
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5)


class SchedulerCollector:
    """Counters and gauges read from the scheduler when scraped (it keeps the counts; nothing is counted twice)."""

    def __init__(self, scheduler, open_sockets):
        self.scheduler, self.open_sockets = scheduler, open_sockets

    def collect(self):
        s = self.scheduler.snapshot()
        yield GaugeMetricFamily("nanochat:num_requests_running", "requests in the batch (prefilling or decoding)",
                                value=s["active"])
        yield GaugeMetricFamily("nanochat:num_requests_waiting", "requests waiting for a batch row or KV memory",
                                value=s["waiting"])
        yield GaugeMetricFamily("nanochat:kv_cache_usage_perc", "fraction of KV-cache blocks in use (1 = full)",
                                value=s["kv_usage"])
        yield CounterMetricFamily("nanochat:prefix_cache_queries", "prompt tokens looked up in the prefix cache",
                                  value=s["prompt_tokens"])
        yield CounterMetricFamily("nanochat:prefix_cache_hits", "prompt tokens found in the prefix cache",
                                  value=s["prefix_hit_tokens"])
        yield CounterMetricFamily("nanochat:prompt_tokens", "prompt tokens of admitted requests",
                                  value=s["prompt_tokens"])
        yield CounterMetricFamily("nanochat:generation_tokens", "tokens generated", value=s["tokens"])
        yield GaugeMetricFamily("nanochat:open_websockets", "WebSockets open on this replica",
                                value=self.open_sockets())


class ServeMetrics:
    def __init__(self, scheduler, open_sockets):
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter("nanochat:http_requests", "HTTP requests and WebSocket turns",
                                     ["route", "status"], registry=r)
        self.http_errors = Counter("nanochat:http_errors", "requests answered with an error", ["route", "status"],
                                   registry=r)
        self.success = Counter("nanochat:request_success", "finished generations", ["finished_reason"], registry=r)
        self.ttft = Histogram("nanochat:time_to_first_token_seconds", "submit to first text", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("nanochat:inter_token_latency_seconds", "time between streamed tokens", registry=r,
                             buckets=TOKEN_BUCKETS)
        self.tpot = Histogram("nanochat:request_time_per_output_token_seconds",
                              "per request: (end - first token) / (tokens - 1)", registry=r, buckets=TOKEN_BUCKETS)
        self.e2e = Histogram("nanochat:e2e_request_latency_seconds", "submit to the last token", registry=r,
                             buckets=LATENCY_BUCKETS)
        r.register(SchedulerCollector(scheduler, open_sockets))

    def route(self, route, status):
        self.http_requests.labels(route, str(status)).inc()
        if status >= 400:
            self.http_errors.labels(route, str(status)).inc()

    def timer(self, submitted_at):
        return RequestTimer(self, submitted_at)

    def text(self):
        return generate_latest(self.registry).decode()


def merge_replicas(texts):
    """{replica id: its Prometheus text} -> one exposition in which every series carries a `replica` label."""
    families = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            merged.samples += [Sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
                               for s in family.samples]

    class Merged:
        def collect(self):
            return list(families.values())
    registry = CollectorRegistry()
    registry.register(Merged())
    return generate_latest(registry)


class RequestTimer:
    """Observes one request's latencies from its events."""

    def __init__(self, metrics, submitted_at):
        self.m, self.submitted_at, self.first, self.last = metrics, submitted_at, None, None

    def observe(self, event):
        now = time.monotonic()
        if "text" in event:
            if self.first is None:
                self.first = now
                self.m.ttft.observe(now - self.submitted_at)
            else:
                self.m.itl.observe((now - self.last) / max(event["tokens"], 1))
            self.last = now
        elif event.get("done"):
            self.m.success.labels(event["finish_reason"]).inc()
            self.m.e2e.observe(now - self.submitted_at)
            n = event["completion_tokens"]
            if self.first is not None and n > 1:
                self.m.tpot.observe((now - self.first) / (n - 1))
