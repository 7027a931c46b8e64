"""The OTLP access logger (`logger_name: otlp`) on a real Envoy 1.40.0, received by a test
collector that decodes with the official opentelemetry-proto package (tests/otlp_receiver.py),
so our hand-written protobuf encoder is checked by an independent decoder."""
import re
import subprocess
import threading
import time

import pytest

from harness import Envoy, curl, free_port, h2load, hcm_listener, our_otlp_logger, poll_until
from otlp_receiver import OtlpReceiver

OK = {"match": {"path": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}
FAIL = {"match": {"prefix": "/fail"}, "direct_response": {"status": 503}}
GONE = {"match": {"prefix": "/gone"}, "direct_response": {"status": 404}}
ANY = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def logger_config(rx: OtlpReceiver, **extra) -> dict:
    cfg = {"endpoint": rx.endpoint, "protocol": "grpc" if rx.protocol == "grpc" else "http/protobuf",
           "body": "%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE%",
           "attributes": {"code": "%RESPONSE_CODE%", "path": "%REQ(:PATH)%", "rid": "%REQ(X-REQUEST-ID)%",
                          "ua": "%REQ(USER-AGENT)%", "http": {"method": "%REQ(:METHOD)%"}},
           "resource_attributes": {"service.name": "edge"},
           "flush_interval_ms": 200,
           "retry": {"initial_backoff_ms": 100, "max_backoff_ms": 1000, "max_elapsed_ms": 10000}}
    cfg.update(extra)
    return cfg


def otlp_envoy(tmp_path, cfg: dict, routes=None, env=None, concurrency: int = 1):
    port = free_port()
    listener = hcm_listener("front", port, routes or [FAIL, GONE, ANY], access_log=[our_otlp_logger(cfg)])
    return Envoy(tmp_path, {"listeners": [listener]}, env=env, concurrency=concurrency), port


def our_stats(e: Envoy) -> dict:
    return {k.removeprefix("obs.access_log.otlp."): v for k, v in e.stats("obs.access_log.otlp").items()}


def drained(e: Envoy, logged: int) -> dict:
    """Waits until all `logged` records are counted and accounted for; returns the counters."""
    def settled():
        s = our_stats(e)
        done = s["records_exported"] + s["records_dropped"] + s["records_failed"]
        return s if s["records_logged"] == logged and done == logged else None
    return poll_until(settled, timeout=30, what="exported + dropped + failed == logged")


@pytest.mark.parametrize("protocol,compression", [("grpc", "none"), ("grpc", "gzip"),
                                                  ("http", "none"), ("http", "gzip")])
def test_records_arrive_decoded(tmp_path, protocol, compression):
    with OtlpReceiver(protocol) as rx:
        cfg = logger_config(rx, compression=compression, headers={"authorization": "Bearer t0k3n"})
        e, port = otlp_envoy(tmp_path, cfg)
        with e:
            curl(f"http://127.0.0.1:{port}/", "-H", f"traceparent: {TRACEPARENT}", "-A", "obs-test")
            curl(f"http://127.0.0.1:{port}/fail")
            curl(f"http://127.0.0.1:{port}/gone", http2=True)
            recs = rx.wait_for(3)
            s = drained(e, 3)
        by_path = {r["attributes"]["path"]: r for r in recs}
        assert set(by_path) == {"/", "/fail", "/gone"}
        ok, fail, gone = by_path["/"], by_path["/fail"], by_path["/gone"]
        assert ok["body"] == "GET / 200"
        assert ok["attributes"]["code"] == "200" and ok["attributes"]["ua"] == "obs-test"
        assert ok["attributes"]["http"] == {"method": "GET"}
        assert (ok["severity_number"], ok["severity_text"]) == (9, "INFO")
        assert (fail["severity_number"], fail["severity_text"]) == (17, "ERROR")
        assert (gone["severity_number"], gone["severity_text"]) == (13, "WARN")
        assert ok["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736" and ok["span_id"] == "00f067aa0ba902b7"
        assert ok["flags"] == 1
        assert fail["trace_id"] == "" and fail["span_id"] == ""
        for r in recs:
            assert r["resource"] == {"service.name": "edge"}
            assert r["scope"] == "envoy-obs.access_log"
            assert r["observed_time_unix_nano"] >= r["time_unix_nano"] > 1.7e18
            assert len(r["attributes"]["rid"]) == 36, "x-request-id is a UUID"
        attempts = rx.attempts("logs")
        assert all(a.headers.get("authorization") == "Bearer t0k3n" for a in attempts)
        enc = "grpc-encoding" if protocol == "grpc" else "content-encoding"
        assert {a.headers.get(enc) for a in attempts} == ({"gzip"} if compression == "gzip" else {None})
        assert s["records_exported"] == 3 and s["records_failed"] == 0 and s["export_requests"] >= 1


def test_environment_variables_fill_in_what_config_leaves_out(tmp_path):
    with OtlpReceiver("http") as rx:
        cfg = logger_config(rx, resource_attributes={"deployment.environment": "from-config"})
        del cfg["endpoint"], cfg["protocol"]
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
               "OTEL_SERVICE_NAME": "edge-from-env", "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=acme%20corp",
               "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=from-env,team=platform"}
        e, port = otlp_envoy(tmp_path, cfg, env=env)
        with e:
            curl(f"http://127.0.0.1:{port}/")
            rec = rx.wait_for(1)[0]
        assert rec["resource"] == {"service.name": "edge-from-env", "deployment.environment": "from-config",
                                   "team": "platform"}
        assert rx.attempts()[0].headers.get("x-tenant") == "acme corp"


def test_unavailable_twice_then_ok_delivers_each_record_once(tmp_path):
    with OtlpReceiver("grpc") as rx:
        rx.fail_next(2, grpc_code="UNAVAILABLE")
        e, port = otlp_envoy(tmp_path, logger_config(rx, flush_interval_ms=1000))
        with e:
            for i in range(10):
                curl(f"http://127.0.0.1:{port}/", "-H", f"x-request-id: req-{i}")
            recs = rx.wait_for(10, timeout=20)
            s = drained(e, 10)
        ids = sorted(r["attributes"]["rid"] for r in recs)
        assert ids == sorted(f"req-{i}" for i in range(10)), "each record delivered exactly once"
        outcomes = [a.outcome for a in rx.attempts("logs")]
        assert outcomes[:2] == ["fail", "fail"] and outcomes[2] == "ok", outcomes
        assert s["export_retries"] >= 2 and s["records_exported"] == 10 and s["records_failed"] == 0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_zero_server_delay_keeps_the_backoff(tmp_path, protocol):
    """RetryInfo of 0 s (the OTLP spec's own example) and `Retry-After: 0` may not shorten the
    backoff: without it, retries would run back to back for all of max_elapsed_ms."""
    with OtlpReceiver(protocol) as rx:
        rx.fail_next(3, grpc_code="UNAVAILABLE", http_status=503, retry_after=0, retry_delay_s=0)
        cfg = logger_config(rx, retry={"initial_backoff_ms": 200, "max_backoff_ms": 400, "max_elapsed_ms": 10000})
        e, port = otlp_envoy(tmp_path, cfg)
        with e:
            curl(f"http://127.0.0.1:{port}/")
            rx.wait_for(1, timeout=15)
        times = [a.time for a in rx.attempts("logs")]
        assert len(times) == 4, times
        # Equal jitter: at least half of 200, 400, 400 ms.
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert all(g >= 0.09 for g in gaps) and sum(gaps) >= 0.45, gaps


def test_http_429_retry_after_is_honoured(tmp_path):
    with OtlpReceiver("http") as rx:
        rx.fail_next(1, http_status=429, retry_after=1)
        cfg = logger_config(rx, retry={"initial_backoff_ms": 50, "max_backoff_ms": 100, "max_elapsed_ms": 10000})
        e, port = otlp_envoy(tmp_path, cfg)
        with e:
            curl(f"http://127.0.0.1:{port}/")
            rx.wait_for(1, timeout=15)
            s = drained(e, 1)
        first, second = rx.attempts("logs")[:2]
        assert (first.outcome, first.http_status, second.outcome) == ("fail", 429, "ok")
        # Without Retry-After the backoff here is at most 100 ms.
        assert second.time - first.time >= 0.95, second.time - first.time
        assert s["export_retries"] == 1


def test_permanent_errors_and_partial_success_are_counted_not_retried(tmp_path):
    with OtlpReceiver("grpc") as rx:
        rx.fail_next(1, grpc_code="INVALID_ARGUMENT")
        e, port = otlp_envoy(tmp_path, logger_config(rx, flush_interval_ms=300))
        with e:
            curl(f"http://127.0.0.1:{port}/")
            rx.wait_attempts(1)
            poll_until(lambda: our_stats(e)["records_failed"] == 1, what="permanent failure counted")
            rx.partial_success(rejected=2, message="attribute too long")
            for _ in range(5):
                curl(f"http://127.0.0.1:{port}/")
            s = drained(e, 6)
        assert [a.outcome for a in rx.attempts("logs")] == ["fail", "partial"], "neither was retried"
        assert s["records_logged"] == 6
        assert (s["records_exported"], s["records_failed"], s["records_rejected"]) == (3, 3, 2)
        assert s["export_retries"] == 0 and s["export_failures"] == 1
        assert "collector rejected 2 of 5 records: attribute too long" in e.log()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_partial_success_that_rejects_nothing_is_logged_as_a_warning(tmp_path, protocol):
    """OTLP: `rejected_log_records` 0 with an `error_message` is the collector's warning."""
    with OtlpReceiver(protocol) as rx:
        rx.partial_success(rejected=0, message="field x is deprecated " + "y" * 5000)
        e, port = otlp_envoy(tmp_path, logger_config(rx, flush_interval_ms=300))
        with e:
            curl(f"http://127.0.0.1:{port}/")
            s = drained(e, 1)
            line = next((ln for ln in e.log().splitlines() if "with a warning: field x is deprecated" in ln), "")
        assert (s["records_exported"], s["records_failed"]) == (1, 0)
        assert "collector accepted all 1 records" in line and len(line) < 1000, line[:300]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_response_over_1_mib_is_a_delivery_not_a_retry(tmp_path, protocol):
    # We read at most 1 MiB of a response. A bigger one (here a partial success with a 2 MiB
    # message) still says the collector took the request: gRPC sends a response message only
    # for a call that succeeded. Retrying it (gRPC OUT_OF_RANGE is retryable) sent every
    # record again until the retry time ran out.
    with OtlpReceiver(protocol) as rx:
        rx.partial_success(rejected=0, message="x" * (2 << 20))
        e, port = otlp_envoy(tmp_path, logger_config(rx, flush_interval_ms=300))
        with e:
            for _ in range(3):
                curl(f"http://127.0.0.1:{port}/")
            s = drained(e, 3)
        assert [a.outcome for a in rx.attempts("logs")] == ["partial"]
        assert (s["records_exported"], s["records_failed"], s["export_retries"]) == (3, 0, 0)



def h2load_for(url: str, seconds: int, rps: int, clients: int = 4) -> subprocess.Popen:
    return subprocess.Popen(["h2load", "--h1", "-c", str(clients), "-t", "1", f"--rps={rps // clients}",
                             "-D", str(seconds), url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def h2load_succeeded(p: subprocess.Popen) -> tuple[int, int]:
    out = p.communicate(timeout=120)[0]
    m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", out)
    assert m, out
    return int(m.group(2)), int(m.group(3))


def test_collector_down_for_10s_under_load_accounts_for_every_record(tmp_path):
    with OtlpReceiver("grpc") as rx:
        # A small queue so the outage overflows it: drops, not unbounded memory.
        cfg = logger_config(rx, queue_capacity=1024, max_batch_size=256, timeout_ms=1000,
                            retry={"initial_backoff_ms": 100, "max_backoff_ms": 1000, "max_elapsed_ms": 3000})
        e, port = otlp_envoy(tmp_path, cfg)
        with e:
            load = h2load_for(f"http://127.0.0.1:{port}/", seconds=16, rps=400)
            time.sleep(2)
            rx.stop()
            time.sleep(10)
            rx.start()
            done, succeeded = h2load_succeeded(load)
            s = drained(e, succeeded)
        assert done == succeeded and succeeded > 3000, "Envoy served every request throughout the outage"
        assert s["records_logged"] == succeeded
        assert s["records_exported"] + s["records_dropped"] + s["records_failed"] == s["records_logged"]
        assert s["records_dropped"] > 0 and s["records_failed"] > 0, s
        unique = {r["attributes"]["rid"] for r in rx.log_records()}
        assert len(unique) == s["records_exported"], "the receiver's own count agrees"


def test_graceful_shutdown_delivers_every_queued_record(tmp_path):
    with OtlpReceiver("grpc") as rx:
        # A long flush interval: records are still queued when Envoy is told to quit.
        e, port = otlp_envoy(tmp_path, logger_config(rx, flush_interval_ms=30000, max_batch_size=10000))
        with e:
            h2load(f"http://127.0.0.1:{port}/", 3000, clients=8)
            assert rx.count() < 3000
            assert e.quit() == 0
        assert rx.count() == 3000
        assert len({r["attributes"]["rid"] for r in rx.log_records()}) == 3000


BAD = {
    "unknown protocol": ({"protocol": "carrier-pigeon"}, "field `protocol`"),
    "malformed endpoint": ({"endpoint": "ftp://localhost:4317"}, "field `endpoint`"),
    "http endpoint without a scheme": ({"protocol": "http/protobuf", "endpoint": "localhost:4318"}, "field `endpoint`"),
    "tls without https": ({"endpoint": "http://collector:4317", "tls": {}}, "field `tls`: needs an https:// endpoint"),
    "grpc endpoint with a path": ({"endpoint": "http://collector:4317/v1/logs"}, "without a path"),
    "negative batch size": ({"max_batch_size": -1}, "field `max_batch_size`"),
    "tiny request limit": ({"max_request_bytes": 10}, "field `max_request_bytes`"),
    "bad header name": ({"headers": {"bad header": "x"}}, "field `headers.bad header`"),
    "bad compression": ({"compression": "brotli"}, "field `compression`"),
    "bad retry": ({"retry": {"initial_backoff_ms": 0}}, "field `retry.initial_backoff_ms`"),
    "bad body operator": ({"body": "%NOPE%"}, "field `body`"),
    "unknown key": ({"endpoint": "http://127.0.0.1:4317", "bogus": True}, "field `bogus`"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_is_rejected_naming_the_field(tmp_path, case):
    cfg, needle = BAD[case]
    e, _ = otlp_envoy(tmp_path, cfg)
    p = e.run_to_exit()
    assert p.returncode == 1, f"accepted or crashed (rc={p.returncode}):\n{e.log()[-2000:]}"
    assert needle in e.log(), e.log()[-3000:]
    assert "panic" not in e.log()


def test_validate_mode_connects_nowhere(tmp_path):
    hits = []
    import socket
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]

    def accept():
        try:
            hits.append(srv.accept())
        except OSError:
            pass
    t = threading.Thread(target=accept)
    t.start()
    e, _ = otlp_envoy(tmp_path, {"endpoint": f"http://127.0.0.1:{port}"})
    p = e.run_to_exit(mode="validate")
    t.join()
    srv.close()
    assert p.returncode == 0, e.log()[-2000:]
    assert not hits
