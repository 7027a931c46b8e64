"""The OTLP test receiver (tests/otlp_receiver.py) proven against senders that are not ours:
Envoy 1.40's built-in OpenTelemetry access logger (gRPC and OTLP/HTTP), tracer and stats sink,
and hand-built requests from grpcio and urllib."""
import gzip
import socket
import time
import urllib.error
import urllib.request

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from harness import (Envoy, curl, direct_response_listener, free_port, h2load, hcm_listener, poll_until, route,
                     static_cluster)
from otlp_receiver import (OtlpReceiver, anyvalue_kind, anyvalue_to_py, builtin_otel_access_logger, h2_cluster)

NODE = {"node": {"id": "node-1", "cluster": "edge-cluster", "locality": {"zone": "zone-a"}}}
ATTRS = {"response_code": "%RESPONSE_CODE%", "method": "%REQ(:METHOD)%", "duration": "%DURATION%",
         "bytes_received": "%BYTES_RECEIVED%", "upstream_host": "%UPSTREAM_HOST%", "protocol": "%PROTOCOL%",
         "response_flags": "%RESPONSE_FLAGS%", "user_agent": "%REQ(USER-AGENT)%", "start_time": "%START_TIME%",
         "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%", "request_id": "%REQ(X-REQUEST-ID)%",
         "resp_content_type": "%RESP(CONTENT-TYPE)%", "upstream_cluster": "%UPSTREAM_CLUSTER%",
         "route_name": "%ROUTE_NAME%", "path": "%REQ(:PATH)%", "bytes_sent": "%BYTES_SENT%",
         "response_code_details": "%RESPONSE_CODE_DETAILS%", "start_ns": "%START_TIME(%s%9f)%",
         "missing_header": "%REQ(X-MISSING)%", "empty_header": "%REQ(X-EMPTY)%",
         "mixed": "code=%RESPONSE_CODE% missing=%REQ(X-MISSING)%"}
RESOURCE = {"service.name": "edge-proxy", "deployment.environment": "test"}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
LOGS_EXPORT = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"


def proxy(tmp_path, access_log, clusters=(), extra_bootstrap=None, **hcm_extra):
    """front listener: /ok -> a real upstream (200), /down -> a closed port (503), else 404."""
    front, up, dead = free_port(), free_port(), free_port()
    res = {"listeners": [hcm_listener("front", front, [route("/ok", "backend", name="ok_route"),
                                                       route("/down", "dead", name="down_route")],
                                      access_log=access_log, **hcm_extra),
                         direct_response_listener("up", up)],
           "clusters": [static_cluster("backend", up), static_cluster("dead", dead), *clusters]}
    return Envoy(tmp_path, res, extra_bootstrap=dict(NODE, **(extra_bootstrap or {}))), f"http://127.0.0.1:{front}"


def otel_stats(envoy) -> dict:
    return {k.rpartition(".")[2]: v for k, v in envoy.stats("open_telemetry_access_log").items()}


def sample_logs_request(n=3, body="hello") -> logs_service_pb2.ExportLogsServiceRequest:
    req = logs_service_pb2.ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    kv = rl.resource.attributes.add(key="service.name")
    kv.value.string_value = "hand-built"
    sl = rl.scope_logs.add()
    sl.scope.name = "test-scope"
    for i in range(n):
        lr = sl.log_records.add(time_unix_nano=1_700_000_000_000_000_000 + i, severity_number=9, severity_text="INFO",
                                trace_id=bytes(range(16)), span_id=bytes(range(8)), flags=1)
        lr.body.string_value = f"{body} {i}"
        lr.attributes.add(key="i").value.int_value = i
        lr.attributes.add(key="ratio").value.double_value = 0.5
        lr.attributes.add(key="ok").value.bool_value = True
        lr.attributes.add(key="raw").value.bytes_value = b"\x00\xff"
        arr = lr.attributes.add(key="arr").value.array_value
        arr.values.add().string_value = "a"
        arr.values.add().int_value = 2
        kvl = lr.attributes.add(key="kv").value.kvlist_value
        kvl.values.add(key="nested").value.string_value = "x"
    return req


def post(url, body: bytes, gzip_it=False, content_type="application/x-protobuf", headers=None):
    h = {"Content-Type": content_type, **(headers or {})}
    if gzip_it:
        body = gzip.compress(body)
        h["Content-Encoding"] = "gzip"
    req = urllib.request.Request(url, data=body, headers=h, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# ----------------------------------------------------------------------------- Envoy's built-in logger

@pytest.mark.parametrize("transport", ["common_config", "grpc_service"])
def test_builtin_otel_access_logger_over_grpc(tmp_path, transport):
    with OtlpReceiver("grpc") as rx:
        logger = builtin_otel_access_logger(attributes=ATTRS, resource_attributes=RESOURCE, transport=transport,
                                            buffer_flush_interval="0.2s")
        envoy, url = proxy(tmp_path, [logger], clusters=[h2_cluster("otlp", rx.port)])
        with envoy as e:
            t0 = time.time_ns()
            assert curl(url + "/ok?x=1", "-H", "x-request-id: r-ok", "-H", "x-empty;").stdout == "200"
            assert curl(url + "/nope", "-H", "x-request-id: r-404").stdout == "404"
            assert curl(url + "/down", "-H", "x-request-id: r-503").stdout == "503"
            assert curl(url + "/ok", "-H", "x-request-id: r-tp", "-H", f"traceparent: {TRACEPARENT}").stdout == "200"
            t1 = time.time_ns()
            recs = rx.wait_for(4)
            poll_until(lambda: otel_stats(e).get("logs_written") == 4, what="logs_written == 4")
        assert len(recs) == 4
        by_id = {r["attributes"]["request_id"]: r for r in recs}
        assert set(by_id) == {"r-ok", "r-404", "r-503", "r-tp"}

        # Resource: Envoy's own labels (from the bootstrap node), then resource_attributes.
        for r in recs:
            assert r["resource"] == {"log_name": "otel_als", "zone_name": "zone-a", "cluster_name": "edge-cluster",
                                     "node_name": "node-1", **RESOURCE}
            assert (r["scope"], r["scope_version"]) == ("", "")
            assert (r["severity_number"], r["severity_text"], r["observed_time_unix_nano"]) == (0, "", 0)
            assert (r["trace_id"], r["span_id"], r["flags"], r["dropped_attributes_count"]) == ("", "", 0, 0)
            # time_unix_nano is the request start time.
            assert t0 - 10**6 <= r["time_unix_nano"] <= t1 and r["time_unix_nano"] == int(r["attributes"]["start_ns"])
            # Every attribute (even a number such as %RESPONSE_CODE%) arrives as a string_value.
            kinds = {anyvalue_kind(kv.value) for kv in r["_record"].attributes}
            assert kinds == {"string_value"}, kinds
            assert set(r["attributes"]) == set(ATTRS)
            assert r["attributes"]["missing_header"] == "-"
            assert r["attributes"]["method"] == "GET" and r["attributes"]["protocol"] == "HTTP/1.1"
            assert r["attributes"]["user_agent"].startswith("curl/")
            assert r["attributes"]["downstream_remote_address"].startswith("127.0.0.1:")
            assert int(r["attributes"]["duration"]) >= 0 and r["attributes"]["bytes_received"] == "0"
            assert r["attributes"]["start_time"].endswith("Z")

        ok, nf, down, tp = by_id["r-ok"], by_id["r-404"], by_id["r-503"], by_id["r-tp"]
        assert ok["body"] == "GET /ok?x=1 200" and nf["body"] == "GET /nope 404" and down["body"] == "GET /down 503"
        assert ok["attributes"]["empty_header"] == "" and nf["attributes"]["empty_header"] == "-"
        a = ok["attributes"]
        assert (a["response_code"], a["response_flags"], a["upstream_cluster"], a["route_name"], a["path"],
                a["bytes_sent"], a["resp_content_type"], a["response_code_details"]) == \
            ("200", "-", "backend", "ok_route", "/ok?x=1", "6", "text/plain", "via_upstream")
        assert a["upstream_host"].startswith("127.0.0.1:") and a["mixed"] == "code=200 missing=-"
        a = nf["attributes"]
        assert (a["response_code"], a["response_flags"], a["upstream_host"], a["upstream_cluster"], a["route_name"],
                a["resp_content_type"], a["response_code_details"]) == \
            ("404", "NR", "-", "-", "-", "-", "route_not_found")
        a = down["attributes"]
        assert (a["response_code"], a["response_flags"], a["upstream_cluster"], a["route_name"]) == \
            ("503", "UF", "dead", "down_route")
        assert a["response_code_details"].startswith("upstream_reset_before_response_started")
        # No tracer configured: an incoming traceparent does not fill trace_id / span_id.
        assert tp["trace_id"] == "" and tp["span_id"] == ""

        # The export requests themselves: unary gRPC, uncompressed, one resource / one scope.
        got = rx.received("logs")
        assert got and all(g.headers[":path"] == LOGS_EXPORT and g.headers["content-type"] == "application/grpc"
                           and g.encoding is None and "grpc-encoding" not in g.headers for g in got)
        for g in got:
            assert len(g.request.resource_logs) == 1 and len(g.request.resource_logs[0].scope_logs) == 1
            assert g.body_size == g.uncompressed_size == g.request.ByteSize()
        assert [a.outcome for a in rx.attempts()] == ["ok"] * len(got)


def test_builtin_otel_access_logger_over_http(tmp_path):
    """1.40's built-in logger has `http_service` (OTLP/HTTP): exercise the HTTP receiver through it,
    with an auth header, a scripted 503 (no retry: counted in logs_dropped) and a partial success."""
    with OtlpReceiver("http") as rx:
        logger = builtin_otel_access_logger(cluster="otlp_http", attributes=ATTRS, resource_attributes=RESOURCE,
                                            transport="http_service", http_uri=rx.url("logs"), log_name="http_als",
                                            http_headers={"authorization": "Bearer s3cret"},
                                            buffer_flush_interval="0.2s")
        envoy, url = proxy(tmp_path, [logger], clusters=[static_cluster("otlp_http", rx.port)])
        with envoy as e:
            assert curl(url + "/ok", "-H", "x-request-id: h-ok").stdout == "200"
            assert curl(url + "/nope", "-H", "x-request-id: h-404").stdout == "404"
            recs = rx.wait_for(2)
            by_id = {r["attributes"]["request_id"]: r for r in recs}
            assert by_id["h-ok"]["body"] == "GET /ok 200" and by_id["h-404"]["attributes"]["response_flags"] == "NR"
            assert recs[0]["resource"]["log_name"] == "http_als" and recs[0]["resource"]["node_name"] == "node-1"
            first = rx.received("logs")[0]
            assert first.headers["authorization"] == "Bearer s3cret"
            assert first.headers["content-type"] == "application/x-protobuf"
            assert first.headers["user-agent"].startswith("OTel-OTLP-Exporter-Envoy/")
            assert first.encoding is None and first.body_size == first.request.ByteSize()

            n_attempts = len(rx.attempts())
            rx.fail_next(1, http_status=503, retry_after=1)
            assert curl(url + "/ok", "-H", "x-request-id: h-fail").stdout == "200"
            poll_until(lambda: otel_stats(e).get("logs_dropped") == 1, what="logs_dropped == 1")
            assert [(a.outcome, a.http_status) for a in rx.attempts()][n_attempts:] == [("fail", 503)]

            rx.partial_success(rejected=1, message="one bad record")
            assert curl(url + "/ok", "-H", "x-request-id: h-partial").stdout == "200"
            rx.wait_for(3)
            poll_until(lambda: otel_stats(e).get("logs_written") == 3, what="logs_written == 3")
        assert [a.outcome for a in rx.attempts()][-1] == "partial"
        assert "h-fail" not in {r["attributes"]["request_id"] for r in rx.log_records()}


def test_builtin_logger_drops_while_collector_down_and_recovers_on_same_port(tmp_path):
    with OtlpReceiver("grpc") as rx:
        port = rx.port
        logger = builtin_otel_access_logger(attributes={"id": "%REQ(X-REQUEST-ID)%"}, buffer_flush_interval="0.2s")
        envoy, url = proxy(tmp_path, [logger], clusters=[h2_cluster("otlp", rx.port)])
        with envoy as e:
            assert curl(url + "/ok", "-H", "x-request-id: before").stdout == "200"
            rx.wait_for(1)
            rx.stop()
            for i in range(3):
                curl(url + "/ok", "-H", f"x-request-id: down-{i}")
            poll_until(lambda: otel_stats(e).get("logs_dropped") == 3, what="logs_dropped == 3")
            rx.start()
            assert rx.port == port
            assert curl(url + "/ok", "-H", "x-request-id: after").stdout == "200"
            recs = rx.wait_for(2)
            time.sleep(0.5)  # a lost batch re-sent late would show up here
            assert [r["attributes"]["id"] for r in rx.log_records()] == ["before", "after"]
            assert otel_stats(e)["logs_written"] == 2
        assert len(recs) == 2


def test_builtin_logger_batches_at_16k(tmp_path):
    """Default buffer_size_bytes is 16 KiB: with ~640-byte records a batch holds ~26 of them."""
    with OtlpReceiver("grpc") as rx:
        logger = builtin_otel_access_logger(attributes=ATTRS, resource_attributes=RESOURCE)
        envoy, url = proxy(tmp_path, [logger], clusters=[h2_cluster("otlp", rx.port)])
        with envoy:
            h2load(url + "/ok", 200, clients=4)
            rx.wait_for(200)
        got = rx.received("logs")
        sizes = [g.items for g in got]
        assert sum(sizes) == 200 and len(got) >= 5, sizes
        # A batch is sent once it passes 16384 bytes (so by at most one record); the 1 s flush timer
        # sends the rest (and may cut a batch short on a slow machine).
        assert all(g.body_size < 16384 + 1024 for g in got), [g.body_size for g in got]
        assert sum(g.body_size > 16384 for g in got) >= 4, [g.body_size for g in got]


def test_builtin_tracer_ids_reach_log_records_spans_and_metrics(tmp_path):
    """With Envoy's OpenTelemetry tracer on, log records carry the active span's ids; the same
    receiver decodes the tracer's spans and the OpenTelemetry stats sink's metrics."""
    with OtlpReceiver("grpc") as rx:
        tracing = {"provider": {"name": "envoy.tracers.opentelemetry", "typed_config": {
            "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
            "grpc_service": {"envoy_grpc": {"cluster_name": "otlp"}, "timeout": "1s"}, "service_name": "edge-svc"}}}
        boot = {"layered_runtime": {"layers": [{"name": "static", "static_layer": {
                    "tracing.opentelemetry.min_flush_spans": 1}}]},
                "stats_flush_interval": "0.5s",
                "stats_sinks": [{"name": "envoy.stat_sinks.open_telemetry", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.stat_sinks.open_telemetry.v3.SinkConfig",
                    "grpc_service": {"envoy_grpc": {"cluster_name": "otlp"}}}}]}
        logger = builtin_otel_access_logger(attributes={"tag": "%REQ(X-TAG)%"}, buffer_flush_interval="0.2s")
        envoy, url = proxy(tmp_path, [logger], clusters=[h2_cluster("otlp", rx.port)], extra_bootstrap=boot,
                           tracing=tracing)
        with envoy:
            curl(url + "/ok", "-H", f"traceparent: {TRACEPARENT}", "-H", "x-tag: with-parent")
            curl(url + "/ok", "-H", "x-tag: fresh")
            recs = {r["attributes"]["tag"]: r for r in rx.wait_for(2)}
            spans = rx.wait_for(2, "traces")
            points = poll_until(lambda: [m for m in rx.metrics() if m["name"] == "cluster.upstream_rq_total"
                                         and m["attributes"].get("envoy.cluster_name") == "backend"
                                         and m["value"] == 2], what="upstream_rq_total == 2 for backend")
        wp, fresh = recs["with-parent"], recs["fresh"]
        assert wp["trace_id"] == TRACEPARENT.split("-")[1]
        assert len(fresh["trace_id"]) == 32 and fresh["trace_id"] != wp["trace_id"]
        assert wp["flags"] == 0 and fresh["flags"] == 0
        by_span = {s["span_id"]: s for s in spans}
        assert by_span[wp["span_id"]]["parent_span_id"] == TRACEPARENT.split("-")[2]
        assert by_span[wp["span_id"]]["trace_id"] == wp["trace_id"]
        assert by_span[fresh["span_id"]]["parent_span_id"] == ""
        s = by_span[wp["span_id"]]
        assert s["kind"] == 2 and s["resource"]["service.name"] == "edge-svc" and s["scope"] == "envoy"
        assert s["attributes"]["http.status_code"] == "200" and s["end_time_unix_nano"] >= s["start_time_unix_nano"]
        assert rx.received("traces")[0].headers["user-agent"].startswith("OTel-OTLP-Exporter-Envoy/")
        p = points[-1]
        assert p["type"] == "sum" and p["is_monotonic"] and isinstance(p["value"], int)
        hist = [m for m in rx.metrics() if m["type"] == "histogram"]
        assert hist and all(len(h["bucket_counts"]) == len(h["explicit_bounds"]) + 1 for h in hist)


# ----------------------------------------------------------------------------- hand-built senders

def test_http_receiver_plain_and_gzip_all_signals():
    with OtlpReceiver("http") as rx:
        req = sample_logs_request(3)
        status, headers, body = post(rx.url("logs"), req.SerializeToString(), headers={"Authorization": "k"})
        assert status == 200 and headers["Content-Type"] == "application/x-protobuf"
        logs_service_pb2.ExportLogsServiceResponse.FromString(body)
        status, _, _ = post(rx.url("logs"), sample_logs_request(2, "zipped").SerializeToString(), gzip_it=True)
        assert status == 200
        assert rx.count("logs") == 5
        plain, zipped = rx.received("logs")
        assert plain.encoding is None and plain.headers["authorization"] == "k"
        assert plain.body_size == plain.uncompressed_size == req.ByteSize()
        assert zipped.encoding == "gzip" and zipped.headers["content-encoding"] == "gzip"
        assert zipped.body_size != zipped.uncompressed_size
        recs = rx.log_records()
        assert [r["body"] for r in recs] == ["hello 0", "hello 1", "hello 2", "zipped 0", "zipped 1"]
        r = recs[1]
        assert r["resource"] == {"service.name": "hand-built"} and r["scope"] == "test-scope"
        assert r["attributes"] == {"i": 1, "ratio": 0.5, "ok": True, "raw": b"\x00\xff", "arr": ["a", 2],
                                   "kv": {"nested": "x"}}
        assert (r["trace_id"], r["span_id"], r["flags"]) == (bytes(range(16)).hex(), bytes(range(8)).hex(), 1)
        assert (r["severity_number"], r["severity_text"], r["time_unix_nano"]) == (9, "INFO", 1_700_000_000_000_000_001)

        tr = trace_service_pb2.ExportTraceServiceRequest()
        sp = tr.resource_spans.add().scope_spans.add().spans.add(name="op", kind=3, trace_id=b"\x01" * 16,
                                                                   span_id=b"\x02" * 8, start_time_unix_nano=5,
                                                                   end_time_unix_nano=9)
        sp.status.code = 2
        sp.events.add(name="ev", time_unix_nano=7)
        assert post(rx.url("traces"), tr.SerializeToString(), gzip_it=True)[0] == 200
        mr = metrics_service_pb2.ExportMetricsServiceRequest()
        m = mr.resource_metrics.add().scope_metrics.add().metrics.add(name="reqs")
        m.sum.is_monotonic = True
        m.sum.aggregation_temporality = 2
        m.sum.data_points.add(as_int=42, time_unix_nano=11).attributes.add(key="k").value.string_value = "v"
        g = mr.resource_metrics[0].scope_metrics[0].metrics.add(name="temp")
        g.gauge.data_points.add(as_double=1.5)
        assert post(rx.url("metrics"), mr.SerializeToString())[0] == 200
        s = rx.wait_for(1, "traces")[0]
        assert (s["name"], s["kind"], s["status"]["code"], s["events"][0]["name"]) == ("op", 3, 2, "ev")
        assert s["trace_id"] == "01" * 16 and s["parent_span_id"] == ""
        pts = {p["name"]: p for p in rx.wait_for(2, "metrics")}
        assert pts["reqs"]["value"] == 42 and isinstance(pts["reqs"]["value"], int) and pts["reqs"]["attributes"] == {"k": "v"}
        assert pts["temp"]["type"] == "gauge" and pts["temp"]["value"] == 1.5

        # Rejections are not recorded as attempts.
        assert post(rx.endpoint + "/v1/nope", b"")[0] == 404
        assert post(rx.url("logs"), b"{}", content_type="application/json")[0] == 415
        assert post(rx.url("logs"), b"\xff\xff\xff")[0] == 400
        assert len(rx.attempts()) == 4


def test_grpc_receiver_accepts_gzip_and_shows_metadata():
    with OtlpReceiver("grpc") as rx, grpc.insecure_channel(f"127.0.0.1:{rx.port}") as ch:
        stub = logs_service_pb2_grpc.LogsServiceStub(ch)
        big = sample_logs_request(50, "compressible " * 20)
        stub.Export(big, compression=grpc.Compression.Gzip, metadata=[("authorization", "Bearer t")], timeout=5)
        stub.Export(sample_logs_request(1), timeout=5)
        zipped, plain = rx.received("logs")
        assert zipped.encoding == "gzip" and zipped.headers["grpc-encoding"] == "gzip"
        assert zipped.headers["authorization"] == "Bearer t" and zipped.headers[":path"] == LOGS_EXPORT
        assert zipped.uncompressed_size == big.ByteSize() and zipped.body_size < big.ByteSize() / 5
        assert plain.encoding is None and "grpc-encoding" not in plain.headers
        assert plain.body_size == plain.uncompressed_size
        assert all("x-otlp-receiver-stream" not in r.headers for r in (zipped, plain))
        assert rx.count("logs") == 51 and rx.log_records()[0]["body"].startswith("compressible")


def test_grpc_unavailable_twice_then_ok_with_retry_info():
    with OtlpReceiver("grpc") as rx, grpc.insecure_channel(f"127.0.0.1:{rx.port}") as ch:
        stub = logs_service_pb2_grpc.LogsServiceStub(ch)
        rx.fail_next(2, grpc_code=grpc.StatusCode.UNAVAILABLE, retry_delay_s=0.25)
        outcomes = []
        for _ in range(3):
            try:
                stub.Export(sample_logs_request(1), timeout=5)
                outcomes.append("OK")
            except grpc.RpcError as e:
                outcomes.append(e.code().name)
                details = dict(e.trailing_metadata())["grpc-status-details-bin"]
                st = status_pb2.Status.FromString(details)
                assert st.code == grpc.StatusCode.UNAVAILABLE.value[0]
                info = error_details_pb2.RetryInfo()
                assert st.details[0].Unpack(info)
                time.sleep(info.retry_delay.ToNanoseconds() / 1e9)
        assert outcomes == ["UNAVAILABLE", "UNAVAILABLE", "OK"]
        att = rx.attempts()
        assert [(a.outcome, a.grpc_code) for a in att] == [("fail", "UNAVAILABLE"), ("fail", "UNAVAILABLE"), ("ok", "OK")]
        assert all(b.time - a.time >= 0.25 for a, b in zip(att, att[1:]))
        assert rx.count("logs") == 1 and len(rx.received("logs")) == 1

        rx.fail_next(1, grpc_code="RESOURCE_EXHAUSTED")  # no RetryInfo unless asked for
        with pytest.raises(grpc.RpcError) as ei:
            stub.Export(sample_logs_request(1), timeout=5)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "grpc-status-details-bin" not in dict(ei.value.trailing_metadata() or ())


def test_http_429_with_retry_after_then_ok():
    with OtlpReceiver("http") as rx:
        rx.fail_next(1, http_status=429, retry_after=2)
        status, headers, body = post(rx.url("logs"), sample_logs_request(1).SerializeToString())
        assert status == 429 and headers["Retry-After"] == "2"
        assert status_pb2.Status.FromString(body).message == "scripted failure"
        assert post(rx.url("logs"), sample_logs_request(1).SerializeToString())[0] == 200
        assert [(a.outcome, a.http_status) for a in rx.attempts()] == [("fail", 429), ("ok", 200)]
        assert rx.count("logs") == 1


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_partial_success(protocol):
    with OtlpReceiver(protocol) as rx:
        rx.partial_success(rejected=2, message="two dropped")
        data = sample_logs_request(3)
        if protocol == "grpc":
            with grpc.insecure_channel(f"127.0.0.1:{rx.port}") as ch:
                stub = logs_service_pb2_grpc.LogsServiceStub(ch)
                first, second = stub.Export(data, timeout=5), stub.Export(data, timeout=5)
        else:
            first, second = (logs_service_pb2.ExportLogsServiceResponse.FromString(
                post(rx.url("logs"), data.SerializeToString())[2]) for _ in range(2))
        assert first.partial_success.rejected_log_records == 2
        assert first.partial_success.error_message == "two dropped"
        assert not second.HasField("partial_success")
        assert [a.outcome for a in rx.attempts()] == ["partial", "ok"] and rx.count("logs") == 6


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_stop_and_restart_on_the_same_port(protocol):
    rx = OtlpReceiver(protocol).start()
    try:
        port = rx.port
        send = _sender(rx)
        send()
        rx.stop()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        rx.start()
        assert rx.port == port and rx.endpoint == f"http://127.0.0.1:{port}"
        send()
        assert rx.count("logs") == 2
    finally:
        rx.stop()


def _sender(rx):
    if rx.protocol == "http":
        return lambda: post(rx.url("logs"), sample_logs_request(1).SerializeToString())
    ch = grpc.insecure_channel(f"127.0.0.1:{rx.port}")
    stub = logs_service_pb2_grpc.LogsServiceStub(ch)
    return lambda: stub.Export(sample_logs_request(1), timeout=5, wait_for_ready=True)


def test_anyvalue_to_py_keeps_types_apart():
    from opentelemetry.proto.common.v1 import common_pb2 as c
    assert anyvalue_to_py(c.AnyValue(string_value="1")) == "1"
    assert type(anyvalue_to_py(c.AnyValue(int_value=1))) is int
    assert type(anyvalue_to_py(c.AnyValue(double_value=1.0))) is float
    assert anyvalue_to_py(c.AnyValue(bool_value=False)) is False
    assert anyvalue_to_py(c.AnyValue(bytes_value=b"1")) == b"1"
    assert anyvalue_to_py(c.AnyValue()) is None
    v = c.AnyValue()
    v.kvlist_value.values.add(key="a").value.array_value.values.add().int_value = 3
    assert anyvalue_to_py(v) == {"a": [3]}

