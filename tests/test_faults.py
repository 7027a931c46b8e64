"""Fault suite (`make faults`, also part of `make test`): misbehaving collectors, file faults and
shutdown under steady load, against a real Envoy 1.40.0. For every fault: Envoy keeps serving,
`exported + dropped + failed == produced` exactly (checked against what the receiver or file
actually got), memory stays within the queue bound, and the module recovers.

Each test appends its figures to .work/faults.json; `make faults` prints them as the table the
README quotes (scripts/faults_table.py)."""
import json
import pathlib
import signal
import socket
import subprocess
import threading
import time

import pytest

from harness import ROOT, Envoy, curl, free_port, hcm_listener, our_json_logger, our_otlp_logger, poll_until
from otlp_receiver import OtlpReceiver

OK = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}
FIGURES = ROOT / ".work" / "faults.json"


def record(fault: str, **figures) -> None:
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    rows[fault] = figures
    FIGURES.write_text(json.dumps(rows, indent=1))


def rss_kb(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def load(url: str, seconds: float, rps: int = 400) -> subprocess.Popen:
    return subprocess.Popen(["h2load", "--h1", "-c", "4", "-t", "1", f"--rps={rps // 4}", "-D", str(int(seconds)), url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def served(p: subprocess.Popen) -> int:
    import re
    out = p.communicate(timeout=120)[0]
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    assert m and m.group(1) == m.group(2), out
    return int(m.group(2))


def otlp_stats(e: Envoy) -> dict:
    return {k.removeprefix("obs.access_log.otlp."): v for k, v in e.stats("obs.access_log.otlp").items()}


def settled(e: Envoy, n: int) -> dict:
    def ok():
        s = otlp_stats(e)
        return s if s["records_logged"] == n and s["records_exported"] + s["records_dropped"] + s["records_failed"] == n else None
    return poll_until(ok, timeout=40, what="every record accounted for")


class BadCollector:
    """A TCP server that misbehaves: `hang` (accept, read, never answer), `close` (accept and
    close at once), `garbage` (answer HTTP 200 with a non-protobuf body)."""

    def __init__(self, mode: str):
        self.mode, self.sock = mode, socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port, self.conns, self.stop = self.sock.getsockname()[1], [], False
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            if self.mode == "close":
                c.close()
            elif self.mode == "hang":
                self.conns.append(c)
            else:
                threading.Thread(target=self.garbage, args=(c,), daemon=True).start()

    @staticmethod
    def garbage(c):
        try:
            c.settimeout(5)
            while True:
                data = c.recv(65536)
                if not data:
                    return
                if b"\r\n\r\n" in data:
                    body = b"\xff\x00 this is not protobuf"
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: "
                              + str(len(body)).encode() + b"\r\n\r\n" + body)
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self.stop = True
        self.sock.close()
        for c in self.conns:
            c.close()


def otlp_envoy(tmp_path, endpoint: str, protocol: str = "grpc", **extra):
    port = free_port()
    cfg = {"endpoint": endpoint, "protocol": protocol, "body": "%REQ(X-REQUEST-ID)%", "queue_capacity": 2048,
           "timeout_ms": 500, "retry": {"initial_backoff_ms": 100, "max_backoff_ms": 400, "max_elapsed_ms": 1500}}
    cfg.update(extra)
    return Envoy(tmp_path, {"listeners": [hcm_listener("front", port, [OK], access_log=[our_otlp_logger(cfg)])]}), port


@pytest.mark.parametrize("mode,protocol", [("hang", "grpc"), ("close", "grpc"), ("close", "http/protobuf"),
                                           ("garbage", "http/protobuf")])
def test_misbehaving_collector(tmp_path, mode, protocol):
    bad = BadCollector(mode)
    try:
        e, port = otlp_envoy(tmp_path, f"http://127.0.0.1:{bad.port}", protocol)
        with e:
            rss0 = rss_kb(e.proc.pid)
            n = served(load(f"http://127.0.0.1:{port}/", 6))
            rss1 = rss_kb(e.proc.pid)
            s = settled(e, n)
            assert curl(f"http://127.0.0.1:{port}/").stdout == "200"
    finally:
        bad.close()
    if mode == "garbage":
        # A 200 with an undecodable body is a delivery (OTLP: success = 2xx); nothing lost.
        assert s["records_exported"] == n, s
    else:
        assert s["records_exported"] == 0 and s["records_failed"] + s["records_dropped"] == n, s
    bound_kb = 2048 * 2 * 1 + 8 * 1024  # queue_capacity records x ~1 KiB per worker slot (2 slots), + slack
    assert rss1 - rss0 < bound_kb, (rss0, rss1)
    record(f"OTLP log collector {mode} ({protocol})", produced=n, exported=s["records_exported"],
           dropped=s["records_dropped"], failed=s["records_failed"], rss_growth_kb=rss1 - rss0)


@pytest.mark.parametrize("mode", ["refused", "hang"])
def test_counters_move_while_an_export_retries(tmp_path, mode):
    """A dead collector holds the flush thread in one export's retries (30 s by default): the
    counters and the warning must not wait for that export to give up."""
    bad = BadCollector("hang") if mode == "hang" else None
    dead = bad.port if bad else free_port()
    try:
        e, port = otlp_envoy(tmp_path, f"http://127.0.0.1:{dead}", flush_interval_ms=100, timeout_ms=20_000,
                             retry={"initial_backoff_ms": 500, "max_backoff_ms": 5_000, "max_elapsed_ms": 60_000})
        with e:
            curl(f"http://127.0.0.1:{port}/")
            time.sleep(0.5)  # that record's export is now under way (and stuck)
            for _ in range(5):
                curl(f"http://127.0.0.1:{port}/")
            t0 = time.monotonic()
            s = poll_until(lambda: (lambda s: s if s["records_logged"] == 6 else None)(otlp_stats(e)), timeout=5,
                           what="records_logged during the stuck export")
            took = time.monotonic() - t0
            assert s["records_exported"] + s["records_failed"] == 0, s
            if mode == "refused":
                poll_until(lambda: otlp_stats(e)["export_retries"] >= 1, timeout=5, what="retries counted as they start")
                poll_until(lambda: "retrying" in e.log(), timeout=5, what="the retry warning")
    finally:
        if bad:
            bad.close()
    assert took < 3, took


def test_collector_dead_then_back_recovers_within_backoff(tmp_path):
    with OtlpReceiver("grpc") as rx:
        e, port = otlp_envoy(tmp_path, rx.endpoint, flush_interval_ms=200)
        with e:
            rx.stop()
            n1 = served(load(f"http://127.0.0.1:{port}/", 4))
            rx.start()
            t0 = time.monotonic()
            curl(f"http://127.0.0.1:{port}/", "-H", "x-request-id: after-recovery")
            poll_until(lambda: any(r["body"] == "after-recovery" for r in rx.log_records()), timeout=10,
                       what="first record after recovery")
            recovery = time.monotonic() - t0
            s = settled(e, n1 + 1)
        got = len({r["body"] for r in rx.log_records()})
    assert got == s["records_exported"]
    assert recovery < 0.2 + 0.4 + 1.0, recovery  # flush interval + max backoff + slack
    record("OTLP log collector dead, then back", produced=n1 + 1, exported=s["records_exported"],
           dropped=s["records_dropped"], failed=s["records_failed"], recovery_s=round(recovery, 2))


def test_log_file_unwritable_then_fixed(tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    path = d / "a.log"
    port = free_port()
    lg = our_json_logger({"path": str(path), "flush_interval_ms": 100})
    e = Envoy(tmp_path, {"listeners": [hcm_listener("front", port, [OK], access_log=[lg])]})
    with e:
        curl(f"http://127.0.0.1:{port}/before")
        poll_until(lambda: path.exists() and path.read_text().count("\n") == 1, what="first line")
        # The file is removed and its path becomes a directory: reopening fails (even as root).
        path.unlink()
        path.mkdir()
        try:
            for _ in range(5):
                curl(f"http://127.0.0.1:{port}/during")
            poll_until(lambda: e.stats("obs.access_log")["obs.access_log.json.write_errors"] >= 1, timeout=10,
                       what="write errors counted")
        finally:
            path.rmdir()
        t0 = time.monotonic()
        curl(f"http://127.0.0.1:{port}/after")
        poll_until(lambda: path.exists() and "/after" in path.read_text(), timeout=10, what="recovered")
        recovery = time.monotonic() - t0
        st = e.stats("obs.access_log")
    produced = st["obs.access_log.json.records_logged"]
    written = st["obs.access_log.json.records_written"]
    errors = st["obs.access_log.json.write_errors"]
    assert produced == 7 and written + errors + st["obs.access_log.json.records_dropped"] == produced, st
    record("JSON log file removed and its path unusable, then fixed", produced=produced, exported=written,
           dropped=st["obs.access_log.json.records_dropped"], failed=errors, recovery_s=round(recovery, 2))


def test_sigterm_under_load_loses_nothing(tmp_path):
    port = free_port()
    path = tmp_path / "a.log"
    lg = our_json_logger({"path": str(path), "flush_interval_ms": 30000})
    e = Envoy(tmp_path, {"listeners": [hcm_listener("front", port, [OK], access_log=[lg])]})
    e.start()
    try:
        n = served(load(f"http://127.0.0.1:{port}/", 3, rps=2000))
        e.proc.send_signal(signal.SIGTERM)
        e.proc.wait(30)
    finally:
        e.__exit__(None, None, None)
    lines = path.read_text().count("\n")
    assert lines == n, (lines, n)
    record("SIGTERM under load (JSON log, 30 s flush interval)", produced=n, exported=lines, dropped=0, failed=0)


@pytest.mark.parametrize("writers", [1, 2])
def test_disk_full(tmp_path, writers):
    """The log's filesystem fills up: writes fail and are counted, no line is split, Envoy serves.
    With two loggers appending to the same file, neither cuts the other's lines when it removes
    the torn end of a failed write."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        port = free_port()
        path = mnt / "a.log"
        prefixes = ["json", "second"][:writers]
        lgs = [our_json_logger({"path": str(path), "flush_interval_ms": 100, "stat_prefix": p}) for p in prefixes]
        e = Envoy(tmp_path, {"listeners": [hcm_listener("front", port, [OK], access_log=lgs)]})
        with e:
            n = served(load(f"http://127.0.0.1:{port}/" + "p" * 200, 4, rps=1000))
            assert curl(f"http://127.0.0.1:{port}/").stdout == "200"
            n += 1

            def st():
                s = e.stats("obs.access_log")
                c = {k: sum(s[f"obs.access_log.{p}.{k}"] for p in prefixes)
                     for k in ("records_logged", "records_written", "write_errors", "records_dropped")}
                done = c["records_logged"] == n * writers and \
                    c["records_written"] + c["write_errors"] + c["records_dropped"] == n * writers
                return c if done else None
            c = poll_until(st, timeout=20, what="accounted")
            log = e.log()
        lines = [json.loads(line) for line in path.read_bytes().splitlines()]
        assert len(lines) == c["records_written"], (len(lines), c)
        assert c["write_errors"] > 0, "the disk did fill up"
        # The counter says how many; Envoy's log says why.
        assert f"writing to {path} failed: No space left on device" in log, log[-3000:]
        record("JSON log disk full (256 KiB tmpfs" + (", two loggers on one file)" if writers > 1 else ")"),
               produced=n * writers, exported=len(lines), dropped=c["records_dropped"], failed=c["write_errors"])
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def lds_envoy(tmp_path: pathlib.Path, listener: dict, concurrency: int = 2):
    """An Envoy (2 workers, 1 s drain) whose one listener comes from a file-based LDS; returns it
    and `publish(resources)`, which replaces the LDS file atomically."""
    listener["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener"
    lds = tmp_path / "lds.json"

    def publish(resources):
        tmp = tmp_path / "lds.tmp"
        tmp.write_text(json.dumps({"resources": resources}))
        tmp.rename(lds)
    publish([listener])
    boot = {"node": {"id": "faults", "cluster": "faults"},
            "dynamic_resources": {"lds_config": {"path_config_source": {"path": str(lds)},
                                                 "resource_api_version": "V3"}}}
    e = Envoy(tmp_path, {}, extra_bootstrap=boot, concurrency=concurrency)
    base = e.command
    e.command = lambda mode=None: base(mode) + ["--drain-time-s", "1", "--drain-strategy", "immediate"]
    return e, publish


def threads_named(pid: int, name: str) -> int:
    n = 0
    for t in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            n += (t / "comm").read_text().strip() == name
        except OSError:
            pass
    return n


def test_listener_removed_through_lds_while_requests_are_in_flight(tmp_path):
    """A file-based LDS update removes the listener under load: its per-worker loggers and the
    logger config are torn down while records are in flight; every served request is logged."""
    port = free_port()
    path = tmp_path / "a.log"
    listener = hcm_listener("dyn", port, [OK], access_log=[our_json_logger({"path": str(path), "flush_interval_ms": 5000})])
    e, publish = lds_envoy(tmp_path, listener)
    with e:
        poll_until(lambda: "dyn" in e.admin("/listeners"), what="listener from LDS")
        p = load(f"http://127.0.0.1:{port}/", 4, rps=800)
        time.sleep(2)
        rss0 = rss_kb(e.proc.pid)
        publish([])
        out = p.communicate(timeout=60)[0]
        poll_until(lambda: "dyn" not in e.admin("/listeners"), timeout=15, what="listener removed")
        import re
        m = re.search(r"requests: \d+ total, (\d+) started, (\d+) done, (\d+) succeeded", out)
        started, succeeded = int(m.group(1)), int(m.group(3))
        # The logger config is destroyed after the drain: its flush thread wrote everything.
        lines = poll_until(lambda: (n := path.read_bytes().count(b"\n")) >= succeeded and n, timeout=20,
                           what="every served request logged after teardown")
        assert e.admin("/ready").strip() == "LIVE"
        rss1 = rss_kb(e.proc.pid)
    records = [json.loads(x) for x in path.read_bytes().splitlines()]
    assert succeeded <= len(records) <= started, (succeeded, len(records), started)
    record("Listener removed by LDS under load (JSON log)", produced=len(records), exported=len(records), dropped=0,
           failed=0, rss_growth_kb=rss1 - rss0)


def test_config_removed_while_its_exporter_waits_on_a_hung_collector(tmp_path):
    """LDS removes a listener whose OTLP logger is in the middle of an export to a collector that
    never answers (10 s per attempt, retries for 30 s by default). Envoy destroys the logger
    config on the worker that drops the last per-thread logger: that worker must not wait for
    the export — another listener on the same (only) worker keeps answering at once. The export
    is cut short at the 5 s shutdown deadline and the flush thread ends: no thread is left
    behind, nothing calls into the freed config later, and Envoy carries on."""
    bad = BadCollector("hang")
    try:
        port, probe_port = free_port(), free_port()
        logger = our_otlp_logger({"endpoint": f"http://127.0.0.1:{bad.port}", "flush_interval_ms": 100})
        e, publish = lds_envoy(tmp_path, hcm_listener("dyn", port, [OK], access_log=[logger]), concurrency=1)
        probe = hcm_listener("probe", probe_port, [OK])
        probe["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener"
        with e:
            poll_until(lambda: "dyn" in e.admin("/listeners"), what="listener from LDS")
            n = served(load(f"http://127.0.0.1:{port}/", 1, rps=200))
            # The first export is under way and hangs (the collector accepted and stays silent).
            poll_until(lambda: bad.conns or None, timeout=10, what="the exporter connected")
            assert threads_named(e.proc.pid, "obs-otlp-logs") == 1
            t0 = time.monotonic()
            publish([probe])
            slowest = 0.0
            while threads_named(e.proc.pid, "obs-otlp-logs"):
                assert time.monotonic() - t0 < 15, "the flush thread did not end"
                r0 = time.monotonic()
                try:
                    curl(f"http://127.0.0.1:{probe_port}/")
                    slowest = max(slowest, time.monotonic() - r0)
                except subprocess.CalledProcessError:
                    pass  # the probe listener is not up yet
                time.sleep(0.02)
            took = time.monotonic() - t0
            assert "dyn" not in e.admin("/listeners")
            assert e.proc.poll() is None and e.admin("/ready").strip() == "LIVE"
            log = e.log()
    finally:
        bad.close()
    # 1 s drain, then at most the 5 s shutdown deadline (+ scheduling slack); without the
    # deadline the thread stayed in its export for the whole retry window (30 s).
    assert n > 0 and took < 8.5, (n, took)
    assert slowest < 1.0, f"the worker stalled for {slowest:.1f} s"
    assert "did not stop within" not in log


@pytest.mark.parametrize("mode", ["hang", "close"])
def test_tracer_with_a_misbehaving_collector(tmp_path, mode):
    from harness import hcm_tracing, our_tracer
    bad = BadCollector(mode)
    try:
        port = free_port()
        cfg = {"endpoint": f"http://127.0.0.1:{bad.port}", "queue_capacity": 2048, "timeout_ms": 500,
               "retry": {"initial_backoff_ms": 100, "max_backoff_ms": 400, "max_elapsed_ms": 1500}}
        lst = hcm_listener("front", port, [OK], tracing=hcm_tracing(our_tracer(cfg)))
        e = Envoy(tmp_path, {"listeners": [lst]})
        with e:
            rss0 = rss_kb(e.proc.pid)
            n = served(load(f"http://127.0.0.1:{port}/", 6))
            rss1 = rss_kb(e.proc.pid)

            def st():
                s = {k.removeprefix("obs.tracer.otel."): v for k, v in e.stats("obs.tracer.otel").items()}
                return s if s["spans_sampled"] == n and s["spans_exported"] + s["spans_dropped"] + s["spans_failed"] == n \
                    else None
            s = poll_until(st, timeout=40, what="every span accounted for")
            assert curl(f"http://127.0.0.1:{port}/").stdout == "200"
    finally:
        bad.close()
    assert s["spans_exported"] == 0 and rss1 - rss0 < 2048 * 4 + 8 * 1024
    record(f"Tracer collector {mode} (grpc)", produced=n, exported=s["spans_exported"], dropped=s["spans_dropped"],
           failed=s["spans_failed"], rss_growth_kb=rss1 - rss0)


def test_metrics_sinks_with_a_hanging_collector(tmp_path):
    """The OTLP metrics sink stalls on a collector that never answers; the Prometheus endpoint of
    the same Envoy keeps answering and the main thread is not held up."""
    from test_stats_sink import our_sink, scrape
    bad = BadCollector("hang")
    try:
        port, mport = free_port(), free_port()
        sinks = [our_sink({"endpoint": f"http://127.0.0.1:{bad.port}", "timeout_ms": 500,
                           "retry": {"initial_backoff_ms": 100, "max_backoff_ms": 200, "max_elapsed_ms": 600}}, name="otlp"),
                 our_sink({"address": f"127.0.0.1:{mport}"})]
        e = Envoy(tmp_path, {"listeners": [hcm_listener("front", port, [OK])]},
                  extra_bootstrap={"stats_sinks": sinks, "stats_flush_interval": "1s"})
        with e:
            rss0 = rss_kb(e.proc.pid)
            n = served(load(f"http://127.0.0.1:{port}/", 5))
            codes = [scrape(mport)[0] for _ in range(5)]
            failed = poll_until(lambda: e.stats("obs_sink.otlp")["obs_sink.otlp.exports_failed"] or None, timeout=10,
                                what="failed exports counted")
            t0 = time.monotonic()
            e.admin("/ready")
            admin_ms = (time.monotonic() - t0) * 1000
            rss1 = rss_kb(e.proc.pid)
    finally:
        bad.close()
    assert codes == [200] * 5 and admin_ms < 500, (codes, admin_ms)
    del n
    record("OTLP metrics collector hang, counted in snapshots (Prometheus endpoint answered 5/5)", produced=failed,
           exported=0, dropped=0, failed=failed, rss_growth_kb=rss1 - rss0)


def keepalive(port: int, requests) -> list[bytes]:
    """Sends raw HTTP/1.1 requests one after another on one keep-alive connection (bytes no
    HTTP client would send); returns each reply, read up to the upstream's "ok\\n" body."""
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for req in requests:
            s.sendall(req)
            reply = b""
            while not reply.endswith(b"ok\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
            replies.append(reply)
    return replies


def test_hostile_traffic_http2_many_streams_and_distinct_values(tmp_path):
    """HTTP/2 with 100 concurrent streams per connection and 10,000 distinct header values,
    some invalid UTF-8: every line valid JSON, none lost."""
    port = free_port()
    path = tmp_path / "a.log"
    lg = our_json_logger({"path": str(path), "flush_interval_ms": 100,
                          "json_format": {"id": "%REQ(X-ID)%", "ua": "%REQ(USER-AGENT)%", "p": "%REQ(:PATH)%"}})
    e = Envoy(tmp_path, {"listeners": [hcm_listener("front", port, [OK], access_log=[lg])]})
    with e:
        out = subprocess.run(["h2load", "-n", "20000", "-c", "4", "-m", "100", "-t", "1",
                              f"http://127.0.0.1:{port}/h2"], capture_output=True, text=True, timeout=120).stdout
        import re
        h2 = int(re.search(r"(\d+) succeeded", out).group(1))
        # 10,000 distinct values (with bytes that are not UTF-8) over raw HTTP/1.1 keep-alive.
        replies = keepalive(port, (b"GET /v HTTP/1.1\r\nHost: x\r\nX-Id: v" + str(i).encode() + b"\xff\xfe\"\\\r\n\r\n"
                                   for i in range(10_000)))
        ok = sum(r.startswith(b"HTTP/1.1 200") for r in replies)
        n = h2 + ok
        poll_until(lambda: path.read_bytes().count(b"\n") >= n, timeout=30, what="all lines")
    recs = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert len(recs) == n and h2 == 20000 and ok == 10_000, (len(recs), h2, ok)
    assert len({r["id"] for r in recs if r["p"] == "/v"}) == 10_000
    record("Hostile traffic: HTTP/2 x100 streams + 10k distinct invalid-UTF-8 values (JSON log)", produced=n,
           exported=len(recs), dropped=0, failed=0)


def test_hostile_values_never_cost_a_batch_at_a_strict_collector(tmp_path):
    """Invalid UTF-8 in headers that become OTLP log attributes and span tags (control bytes
    Envoy itself rejects with a 400): the official protobuf decoder, strict about UTF-8 in
    strings, accepts every batch."""
    from harness import hcm_tracing, our_tracer
    with OtlpReceiver("grpc") as rx:
        port = free_port()
        logger = our_otlp_logger({"endpoint": rx.endpoint, "flush_interval_ms": 200, "body": "%REQ(X-EVIL)%",
                                  "attributes": {"evil": "%REQ(X-EVIL)%", "n": "%REQ(X-N)%"}})
        tracing = hcm_tracing(our_tracer({"endpoint": rx.endpoint, "flush_interval_ms": 200}),
                              custom_tags=[{"tag": "evil", "request_header": {"name": "x-evil"}}])
        e = Envoy(tmp_path, {"listeners": [hcm_listener("front", port, [OK], access_log=[logger], tracing=tracing)]})
        with e:
            keepalive(port, (b"GET /e HTTP/1.1\r\nHost: x\r\nX-N: " + str(i).encode()
                             + b"\r\nX-Evil: \xff\xfe\xc3(\"\\" + bytes([0x80 + i % 64]) + b"\r\n\r\n" for i in range(500)))
            logs = rx.wait_for(500, "logs", timeout=20)
            spans = rx.wait_for(500, "traces", timeout=20)
            assert not [a for a in rx.attempts() if a.outcome != "ok"], "every batch accepted"
    assert len({r["attributes"]["n"] for r in logs}) == 500
    assert all("\ufffd" in r["attributes"]["evil"] for r in logs) and all("\ufffd" in s["attributes"]["evil"] for s in spans)
    record("Hostile values to a strict OTLP collector (logs + spans)", produced=1000, exported=len(logs) + len(spans),
           dropped=0, failed=0)
