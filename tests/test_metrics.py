"""serve/metrics.py: vLLM's metric names, request timing, and one exposition across replicas."""
from prometheus_client.parser import text_string_to_metric_families

from serve.metrics import ServeMetrics, merge_replicas


class FakeScheduler:
    def __init__(self, **stats):
        self.stats = {**dict(active=1, waiting=2, kv_usage=0.25, prefix_hit_tokens=64,
                             prompt_tokens=100, tokens=40), **stats}

    def snapshot(self):
        return self.stats


def samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_names_and_values_as_vllm_has_them():
    m = ServeMetrics(FakeScheduler(), lambda: 3)
    timer = m.timer(submitted_at=0.0)
    for event in ({"text": "a", "tokens": 1}, {"text": "b", "tokens": 2},
                  {"done": True, "finish_reason": "stop", "completion_tokens": 3}):
        timer.observe(event)
    m.route("/chat", 200)
    m.route("/chat", 503)
    got = samples(m.text())
    assert got[("nanochat:num_requests_running", ())] == 1 and got[("nanochat:num_requests_waiting", ())] == 2
    assert got[("nanochat:kv_cache_usage_perc", ())] == 0.25
    assert got[("nanochat:prefix_cache_queries_total", ())] == 100
    assert got[("nanochat:prefix_cache_hits_total", ())] == 64
    assert got[("nanochat:prompt_tokens_total", ())] == 100 and got[("nanochat:generation_tokens_total", ())] == 40
    assert got[("nanochat:open_websockets", ())] == 3
    assert got[("nanochat:request_success_total", (("finished_reason", "stop"),))] == 1
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_time_per_output_token_seconds"):
        assert got[(f"nanochat:{name}_count", ())] == 1
    assert got[("nanochat:inter_token_latency_seconds_count", ())] == 1  # one gap, after the first text
    assert got[("nanochat:http_requests_total", (("route", "/chat"), ("status", "503")))] == 1
    assert got[("nanochat:http_errors_total", (("route", "/chat"), ("status", "503")))] == 1
    assert ("nanochat:http_errors_total", (("route", "/chat"), ("status", "200"))) not in got


def test_replicas_merge_into_one_exposition_with_a_replica_label():
    a, b = ServeMetrics(FakeScheduler(), lambda: 0), ServeMetrics(FakeScheduler(active=5), lambda: 1)
    a.route("/chat", 200)
    b.route("/v1/chat/completions", 200)
    text = merge_replicas({"r1": a.text(), "r2": b.text()}).decode()
    got = samples(text)
    assert got[("nanochat:num_requests_running", (("replica", "r1"),))] == 1
    assert got[("nanochat:num_requests_running", (("replica", "r2"),))] == 5
    assert got[("nanochat:http_requests_total", (("replica", "r2"), ("route", "/v1/chat/completions"),
                                                 ("status", "200")))] == 1
    # one HELP and one TYPE line per metric, as Prometheus requires
    types = [line for line in text.splitlines() if line.startswith("# TYPE nanochat:num_requests_running ")]
    assert len(types) == 1
