"""The OTLP stats sink (`sink_name: otlp`) on a real Envoy 1.40.0 next to Envoy's built-in
`envoy.stat_sinks.open_telemetry`, both exporting the same flushes to test collectors that decode
with the official opentelemetry-proto package.

Per flush, the two exports must carry the same metrics: names, attributes, kinds (sum / gauge /
histogram), temporality, monotonicity and values, for cumulative and for delta counters and
histograms. Deliberate differences (asserted): start_time_unix_nano, which the built-in sends in
microseconds (so it reads as 1970) and ours in nanoseconds; the scope name; and ours splits a
flush into several requests past `max_batch_size` points.

One difference the ABI forces: Envoy's sinks send only stats flagged "used", a flag the 1.40
dynamic-module ABI does not expose. Ours sends counters that ever counted, histograms with
samples and every gauge. So a gauge only ours sends must be 0 (never set), and a stat only the
built-in sends must be a counter that was "used" without counting (value 0)."""
import time
import urllib.request

import pytest

from harness import Envoy, curl, direct_response_listener, free_port, h2load, hcm_listener, poll_until, route, static_cluster
from otlp_receiver import OtlpReceiver, h2_cluster
from test_stats_sink import our_sink


def builtin_sink(deltas: bool) -> dict:
    return {"name": "envoy.stat_sinks.open_telemetry", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.stat_sinks.open_telemetry.v3.SinkConfig",
        "grpc_service": {"envoy_grpc": {"cluster_name": "otlp"}},
        "report_counters_as_deltas": deltas, "report_histograms_as_deltas": deltas}}


def key(p: dict) -> tuple:
    return (p["name"], tuple(sorted(p["attributes"].items())))


def comparable(p: dict) -> dict:
    d = {k: p[k] for k in ("type", "value", "is_monotonic", "aggregation_temporality", "count", "sum",
                           "bucket_counts", "explicit_bounds") if k in p}
    return d


# Stats that change between the two sinks' views of one flush. The snapshot holds the counters
# and gauges themselves, read when each sink runs: the built-in runs first and its export moves
# the stats of its own gRPC cluster ("otlp") and of Envoy's async client before ours reads them.
# Our own health gauges are set during our flush.
OWN = ("obs_sink.",)


def perturbed(k: tuple) -> bool:
    attrs = dict(k[1])
    return attrs.get("envoy.cluster_name") == "otlp" or attrs.get("envoy.http_conn_manager_prefix") == "async-client"


@pytest.mark.parametrize("deltas", [False, True])
def test_same_metrics_as_the_builtin_open_telemetry_sink(tmp_path, deltas):
    front, up = free_port(), free_port()
    with OtlpReceiver("grpc") as theirs, OtlpReceiver("grpc") as mine:
        ours = our_sink({"endpoint": mine.endpoint, "report_counters_as_deltas": deltas,
                         "report_histograms_as_deltas": deltas}, name="otlp")
        res = {"listeners": [hcm_listener("front", front, [route("/", "backend")]), direct_response_listener("up", up)],
               "clusters": [static_cluster("backend", up), h2_cluster("otlp", theirs.port)]}
        boot = {"stats_sinks": [builtin_sink(deltas), ours], "stats_flush_interval": "1s"}
        with Envoy(tmp_path, res, extra_bootstrap=boot) as e:
            h2load(f"http://127.0.0.1:{front}/x", 300, clients=4)
            curl(f"http://127.0.0.1:{front}/x")
            poll_until(lambda: len(theirs.received("metrics")) >= 4 and len(mine.received("metrics")) >= 4,
                       timeout=20, what="4 flushes from both sinks")
            gauges = e.stats("obs_sink.otlp")
        a_reqs, b_reqs = theirs.requests("metrics"), mine.requests("metrics")
    from otlp_receiver import flatten_metrics
    compared = 0
    # Pair the exports of one flush (the same snapshot) by their time stamps (1 s apart per flush).
    def stamp(req):
        return flatten_metrics([req])[0]["time_unix_nano"]
    pairs = [(ra, rb) for rb in b_reqs[1:] for ra in a_reqs if abs(stamp(ra) - stamp(rb)) < 300_000_000]
    assert len(pairs) >= 3, "three flushes seen by both sinks"
    for ra, rb in pairs[:3]:
        a = {key(p): p for p in flatten_metrics([ra])}
        b = {key(p): p for p in flatten_metrics([rb])}
        only_ours = [k for k in set(b) - set(a) if not (b[k]["type"] == "gauge" and b[k]["value"] == 0) and not perturbed(k)]
        only_theirs = [k for k in set(a) - set(b) if not (a[k]["type"] == "sum" and a[k]["value"] == 0) and not perturbed(k)]
        assert not only_ours and not only_theirs, (only_ours[:5], only_theirs[:5])
        assert len(set(a) & set(b)) >= 0.9 * len(a)
        diffs = [(k, comparable(a[k]), comparable(b[k])) for k in set(a) & set(b)
                 if comparable(a[k]) != comparable(b[k]) and not k[0].startswith(OWN) and not perturbed(k)]
        assert not diffs, "\n".join(map(str, diffs[:10]))
        compared += len(a)
        for p in b.values():
            assert p["time_unix_nano"] > 1.7e18
            if p["type"] in ("sum", "histogram"):
                assert p["start_time_unix_nano"] > 1.7e18, "start times in nanoseconds, not 1970"
            assert p["scope"] == "envoy-obs.stats_sink"
        temporality = {p["aggregation_temporality"] for p in b.values() if p["type"] == "sum"}
        assert temporality == {1 if deltas else 2}
    assert compared > 200, compared
    assert deltas or any(k[0] == "cluster.upstream_rq_total" and ("envoy.cluster_name", "backend") in k[1] for k in a)
    assert any(p["type"] == "histogram" and p["count"] > 0 for p in b.values()) or deltas
    assert gauges["obs_sink.otlp.exports_ok"] >= 3 and gauges["obs_sink.otlp.exports_failed"] == 0


@pytest.mark.parametrize("deltas", [False, True])
def test_counters_reset_by_the_admin(tmp_path, deltas):
    """`POST /reset_counters` between flushes. Cumulative: the counter that went down gets a new
    start time after the last reported point (OTLP metrics data model: state lost, new fixed
    start); the others keep theirs. Delta: more requests after the reset than before still count
    in full, since Envoy's own latched increase is used (the difference to the last export
    would say 10 of 60)."""
    from otlp_receiver import flatten_metrics
    front, up = free_port(), free_port()
    with OtlpReceiver("grpc") as rx:
        ours = our_sink({"endpoint": rx.endpoint, "report_counters_as_deltas": deltas}, name="otlp")
        res = {"listeners": [hcm_listener("front", front, [route("/", "backend")]), direct_response_listener("up", up)],
               "clusters": [static_cluster("backend", up)]}
        name, attrs = "cluster.upstream_rq_total", {"envoy.cluster_name": "backend"}

        def points():
            return [p for p in flatten_metrics(rx.requests("metrics")) if p["name"] == name and p["attributes"] == attrs]

        with Envoy(tmp_path, res, extra_bootstrap={"stats_sinks": [ours], "stats_flush_interval": "1s"}) as e:
            h2load(f"http://127.0.0.1:{front}/x", 50, clients=2)
            poll_until(lambda: sum(p["value"] for p in points()) == 50 if deltas else
                       any(p["value"] == 50 for p in points()), timeout=15, what="50 requests exported")
            before = points()
            e.admin("/reset_counters", method="POST")
            h2load(f"http://127.0.0.1:{front}/x", 60, clients=2)
            poll_until(lambda: sum(p["value"] for p in points()) == 110 if deltas else
                       points()[-1]["value"] == 60, timeout=15, what="60 more requests exported")
            after = points()[len(before):]
    if deltas:
        assert sum(p["value"] for p in after) == 60, after
    else:
        # The first point after the reset (60, or fewer if the requests spanned two flushes:
        # Envoy counted more since its last flush than the value rose) and every later one
        # start after the last point before the reset; all before it share one start.
        seq = before + after
        i = next(i for i, p in enumerate(seq) if p["value"] != 50)
        assert seq[i - 1]["value"] == 50
        assert all(p["start_time_unix_nano"] >= seq[i - 1]["time_unix_nano"] for p in seq[i:]), seq[i - 1:]
        assert len({p["start_time_unix_nano"] for p in seq[:i]}) == 1


def test_collector_down_then_back_while_the_prometheus_endpoint_keeps_answering(tmp_path):
    front, up, mport = free_port(), free_port(), free_port()
    with OtlpReceiver("grpc") as rx:
        ours = our_sink({"endpoint": rx.endpoint, "timeout_ms": 500,
                         "retry": {"initial_backoff_ms": 100, "max_backoff_ms": 200, "max_elapsed_ms": 600}}, name="otlp")
        prom = our_sink({"address": f"127.0.0.1:{mport}"})
        res = {"listeners": [hcm_listener("front", front, [route("/", "backend")]), direct_response_listener("up", up)],
               "clusters": [static_cluster("backend", up)]}
        with Envoy(tmp_path, res, extra_bootstrap={"stats_sinks": [ours, prom], "stats_flush_interval": "1s"}) as e:
            rx.wait_for(1, "metrics", timeout=10)
            rx.stop()
            failed = poll_until(lambda: e.stats("obs_sink.otlp")["obs_sink.otlp.exports_failed"] or None, timeout=15,
                                what="failed exports counted while the collector is down")
            assert curl(f"http://127.0.0.1:{front}/x").stdout == "200", "Envoy serves while the collector is down"
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                assert r.status == 200 and b"envoy_obs_sink_otlp_exports_failed" in r.read()
            rx.start()
            before = rx.count("metrics")
            poll_until(lambda: rx.count("metrics") > before, timeout=15, what="exports resume")
            assert failed >= 1
            poll_until(lambda: e.stats("obs_sink.otlp")["obs_sink.otlp.exports_ok"] >= 2, timeout=10,
                       what="exports counted ok again")


@pytest.mark.parametrize("cfg,needle", [
    ({"protocol": "carrier-pigeon"}, "field `protocol`"),
    ({"endpoint": "ftp://x"}, "field `endpoint`"),
    ({"report_counters_as_deltas": "sometimes"}, "field `report_counters_as_deltas`"),
    ({"bogus": 1}, "field `bogus`"),
])
def test_bad_config_is_rejected(tmp_path, cfg, needle):
    res = {"listeners": [hcm_listener("front", free_port(), [route("/", "backend")])],
           "clusters": [static_cluster("backend", free_port())]}
    e = Envoy(tmp_path, res, extra_bootstrap={"stats_sinks": [our_sink(cfg, name="otlp")]})
    p = e.run_to_exit()
    assert p.returncode == 1 and needle in e.log(), e.log()[-2000:]
