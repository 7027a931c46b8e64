"""Parity: Envoy's built-in OpenTelemetry access logger (envoy.access_loggers.open_telemetry,
gRPC through an Envoy cluster) and ours (`logger_name: otlp`), attached to the same
HttpConnectionManager, log the same traffic to two test collectors. Records are matched by
x-request-id and must have the same body, the same attribute keys, values and types, the same
resource attributes we both set, and the same time_unix_nano.

Stated tolerance: time_unix_nano within 1 µs (Envoy's has microsecond resolution, ours
nanosecond). Nothing else is time-dependent: both loggers read the same stream info.

Deliberate differences (improvements), each asserted below:
- observed_time_unix_nano, severity_number/severity_text and the scope name are set by ours;
  the built-in leaves them empty.
- trace_id/span_id: the built-in takes them from Envoy's active span and sends nothing without
  a tracer; the 1.40 ABI gives access loggers no span, so ours reads the request's
  `traceparent` header (as Envoy's router left it) and so correlates logs with the client's
  trace even when Envoy itself does not trace.
- Envoy's four built-in labels (log_name, zone_name, cluster_name, node_name) come from the
  bootstrap node, which the ABI does not expose; ours adds `log_name` when configured and takes
  the rest from `resource_attributes` / OTEL_RESOURCE_ATTRIBUTES.
"""
from harness import (Envoy, curl, direct_response_listener, free_port, hcm_listener, our_otlp_logger, route,
                     static_cluster)
from otlp_receiver import OtlpReceiver, builtin_otel_access_logger, h2_cluster

ATTRIBUTES = {
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "authority": "%REQ(:AUTHORITY)%",
    "ua": "%REQ(USER-AGENT)%",
    "long": "%REQ(X-LONG):10%",
    "rep": "%REQ(X-REP)%",
    "missing": "%REQ(X-NOPE)%",
    "resp_ct": "%RESP(CONTENT-TYPE)%",
    "proto": "%PROTOCOL%",
    "code": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "flags": "%RESPONSE_FLAGS%",
    "brx": "%BYTES_RECEIVED%",
    "btx": "%BYTES_SENT%",
    "dur": "%DURATION%",
    "route": "%ROUTE_NAME%",
    "cluster": "%UPSTREAM_CLUSTER%",
    "uhost": "%UPSTREAM_HOST%",
    "dra": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "start": "%START_TIME%",
    "mixed": "code=%RESPONSE_CODE% missing=%REQ(X-NOPE)% flags=%RESPONSE_FLAGS%",
    "literal": "fixed text",
}
BODY = "%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS%"
RESOURCE = {"service.name": "edge-proxy", "deployment.environment": "test"}


def test_same_records_as_builtin_open_telemetry_logger(tmp_path):
    front, up, dead = free_port(), free_port(), free_port()
    with OtlpReceiver("grpc") as theirs, OtlpReceiver("grpc") as mine:
        builtin = builtin_otel_access_logger(cluster="otlp", attributes=ATTRIBUTES, body=BODY,
                                             resource_attributes=RESOURCE, buffer_flush_interval="0.2s")
        ours = our_otlp_logger({"endpoint": mine.endpoint, "body": BODY, "attributes": ATTRIBUTES,
                                "resource_attributes": RESOURCE, "log_name": "otel_als", "flush_interval_ms": 200})
        res = {"listeners": [hcm_listener("front", front, [route("/ok", "backend", name="r_ok"),
                                                           route("/dead", "dead", name="r_dead")],
                                          access_log=[builtin, ours]),
                             direct_response_listener("up", up)],
               "clusters": [static_cluster("backend", up), static_cluster("dead", dead), h2_cluster("otlp", theirs.port)]}
        base = f"http://127.0.0.1:{front}"
        tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        with Envoy(tmp_path, res, concurrency=2) as e:
            codes = [
                curl(f"{base}/ok", "-H", "x-rep: a", "-H", "x-rep: b", "-A", "parity-agent/1.0").stdout,
                curl(f"{base}/ok", "-H", "x-long: " + "L" * 300, "-H", f"traceparent: {tp}").stdout,
                curl(f"{base}/nope").stdout,
                curl(f"{base}/dead").stdout,
                curl(f"{base}/ok", "-d", "a request body").stdout,
                curl(f"{base}/ok?q=1", http2=True).stdout,
                curl(f"{base}/ok", "-d", "h2 body", "-H", "x-rep: one", "-H", "x-rep: two", http2=True).stdout,
                curl(f"{base}/nope", http2=True).stdout,
            ]
            assert codes == ["200", "200", "404", "503", "200", "200", "200", "404"]
            a_recs, b_recs = theirs.wait_for(len(codes)), mine.wait_for(len(codes))
            assert e.quit() == 0
    a = {r["attributes"]["request_id"]: r for r in a_recs}
    b = {r["attributes"]["request_id"]: r for r in b_recs}
    assert len(a) == len(codes) and a.keys() == b.keys()
    for rid, x in a.items():
        y = b[rid]
        assert x["body"] == y["body"] and type(x["body"]) is str, (rid, x["body"], y["body"])
        assert x["attributes"] == y["attributes"], (rid, x["attributes"], y["attributes"])
        for k, v in x["attributes"].items():
            assert type(v) is type(y["attributes"][k]) is str, (rid, k)
        assert abs(x["time_unix_nano"] - y["time_unix_nano"]) < 1000, rid
        # The resource attributes we both set; Envoy adds its node labels.
        assert {k: x["resource"][k] for k in [*RESOURCE, "log_name"]} == y["resource"]
        # Improvements over the built-in.
        assert x["observed_time_unix_nano"] == 0 and y["observed_time_unix_nano"] >= y["time_unix_nano"]
        assert x["severity_number"] == 0 and y["severity_number"] in (9, 13, 17)
        assert x["scope"] == "" and y["scope"] == "envoy-obs.access_log"
        assert x["trace_id"] == ""
        traced = x["attributes"]["long"] == "L" * 10
        assert y["trace_id"] == ("4bf92f3577b34da6a3ce929d0e0e4736" if traced else ""), rid
    # The traffic covered what the issue asks for.
    recs = [r["attributes"] for r in a.values()]
    assert {r["code"] for r in recs} == {"200", "404", "503"}
    assert {r["proto"] for r in recs} == {"HTTP/1.1", "HTTP/2"}
    assert any(r["brx"] != "0" for r in recs) and any(r["long"] == "L" * 10 for r in recs)
    assert any(r["rep"] == "a" for r in recs) and any(r["flags"] == "UF" for r in recs)
    assert all(r["missing"] == "-" for r in recs)
    assert len(ATTRIBUTES) >= 15
