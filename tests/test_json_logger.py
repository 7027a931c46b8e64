"""The JSON logger under hostile input, load, a tiny queue, log rotation and validate mode,
against a real Envoy 1.40.0."""
import json
import os
import socket
import threading
import time


from harness import (Envoy, count_lines, curl, direct_response_listener, free_port, h2load, hcm_listener,
                     our_json_logger, poll_until, read_json_lines, route, static_cluster)


def proxy(tmp_path, logger_config, concurrency=2, **hcm_extra):
    front, up = free_port(), free_port()
    res = {"listeners": [hcm_listener("front", front, [route("/", "backend")],
                                      access_log=[our_json_logger(logger_config)], **hcm_extra),
                         direct_response_listener("up", up)],
           "clusters": [static_cluster("backend", up)]}
    return Envoy(tmp_path, res, concurrency=concurrency), f"http://127.0.0.1:{front}", front


def raw_request(port: int, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    return b"".join(chunks)


HOSTILE = [
    b"invalid utf8 \xff\xfe\xc3 end",
    b"control \x01\x02\x1b[31m chars \x7f",
    b'quotes " and "" and \\" backslashes \\ \\\\',
    b"tab\tinside",
    b'json injection ", "evil": "yes',
    b"\xe2\x80\xa8 line separator and emoji \xf0\x9f\x98\x80",
    b"V" * (60 * 1024),
]


def test_hostile_header_values_give_valid_json(tmp_path):
    log = tmp_path / "a.log"
    fmt = {"evil": "%REQ(X-EVIL)%", "ua": "%REQ(USER-AGENT)%", "path": "%REQ(:PATH)%",
           "mixed": "<%REQ(X-EVIL)%|%REQ(:PATH)%>", "code": "%RESPONSE_CODE%", "short": "%REQ(X-EVIL):7%"}
    envoy, _, port = proxy(tmp_path, {"path": str(log), "json_format": fmt, "flush_interval_ms": 50},
                           max_request_headers_kb=128)
    with envoy as e:
        for v in HOSTILE:
            req = b"GET /ok?q=\"\\ HTTP/1.1\r\nHost: x\r\nUser-Agent: " + v[:100] + b"\r\nX-Evil: " + v + \
                  b"\r\nConnection: close\r\n\r\n"
            assert raw_request(port, req).startswith(b"HTTP/1.1 ")
        poll_until(lambda: count_lines(log) == len(HOSTILE), what="one line per request")
        e.quit()
    recs = read_json_lines(log)  # raises on any invalid line
    assert len(recs) == len(HOSTILE)
    served = [r for r in recs if r["code"] == 200]
    assert len(served) >= 5, recs
    big = [r for r in recs if r["evil"] and len(r["evil"]) == 60 * 1024]
    assert len(big) == 1 and big[0]["short"] == "VVVVVVV"
    quoted = [r for r in recs if r["evil"] and r["evil"].startswith("quotes")]
    assert quoted and quoted[0]["evil"] == HOSTILE[2].decode()
    injected = [r for r in recs if r["evil"] and r["evil"].startswith("json injection")]
    # The injected `", "evil": "yes` stays inside the value: no key beyond the format's own.
    assert injected and set(injected[0]) == set(fmt) and injected[0]["code"] == 200


def test_nothing_lost_20000_requests_then_quitquitquit(tmp_path):
    log = tmp_path / "a.log"
    envoy, url, _ = proxy(tmp_path, {"path": str(log)})
    with envoy as e:
        out = h2load(url + "/ok", 20_000)
        assert "20000 succeeded" in out, out
        assert e.quit() == 0
    # No wait for a flush interval: shutdown itself must drain every queue.
    assert count_lines(log) == 20_000
    assert len(read_json_lines(log)) == 20_000


def test_tiny_queue_burst_lines_plus_dropped_equals_served(tmp_path):
    log = tmp_path / "a.log"
    envoy, url, _ = proxy(tmp_path, {"path": str(log), "queue_capacity": 2, "flush_interval_ms": 500})
    with envoy as e:
        h2load(url + "/ok", 6000, clients=16)
        served = e.stats("downstream_rq_completed")["http.ingress.downstream_rq_completed"]
        assert served == 6000

        def settled():
            s = e.stats("access_log")
            logged, written = s["obs.access_log.json.records_logged"], s["obs.access_log.json.records_written"]
            dropped = s["obs.access_log.json.records_dropped"]
            return logged == served and written + dropped == logged and count_lines(log) == written and s
        s = poll_until(settled, timeout=15, what="counters to settle")
        assert s["obs.access_log.json.write_errors"] == 0
        print(f"tiny queue: served={served} written={s['obs.access_log.json.records_written']} "
              f"dropped={s['obs.access_log.json.records_dropped']}")
        e.quit()
    assert count_lines(log) + s["obs.access_log.json.records_dropped"] == served


def test_counters_and_filter(tmp_path):
    log = tmp_path / "a.log"
    cfg = {"path": str(log), "flush_interval_ms": 50,
           "filter": {"or": [{"status_code": {"ge": 400}}, {"sample": 0.0}]}}
    front, up = free_port(), free_port()
    res = {"listeners": [hcm_listener("front", front, [route("/ok", "backend")], access_log=[our_json_logger(cfg)]),
                         direct_response_listener("up", up)],
           "clusters": [static_cluster("backend", up)]}
    with Envoy(tmp_path, res) as e:
        for _ in range(5):
            curl(f"http://127.0.0.1:{front}/ok")
        for _ in range(3):
            curl(f"http://127.0.0.1:{front}/missing")
        poll_until(lambda: e.stats("access_log").get("obs.access_log.json.records_written") == 3, what="3 written")
        s = e.stats("access_log")
        assert s["obs.access_log.json.records_filtered"] == 5
        assert s["obs.access_log.json.records_logged"] == 3
        e.quit()
    assert [r["response_code"] for r in read_json_lines(log)] == [404] * 3


def test_rotation_reopens_and_loses_nothing(tmp_path):
    log = tmp_path / "a.log"
    rotated = tmp_path / "a.log.1"
    envoy, url, _ = proxy(tmp_path, {"path": str(log), "flush_interval_ms": 100})
    sent = 0
    with envoy as e:
        for _ in range(50):
            curl(url + "/ok")
            sent += 1
        poll_until(lambda: count_lines(log) == 50, what="first 50 lines")
        os.rename(log, rotated)
        t0 = time.monotonic()
        while not log.exists() and time.monotonic() - t0 < 10:
            curl(url + "/ok")
            sent += 1
            time.sleep(0.02)
        reopened_after = time.monotonic() - t0
        assert log.exists(), "logger never reopened the rotated path"
        for _ in range(50):
            curl(url + "/ok")
            sent += 1
        assert e.quit() == 0
    print(f"rotation: reopened after {reopened_after:.2f}s, {sent} requests")
    assert reopened_after < 3.0
    assert count_lines(log) >= 50
    assert len(read_json_lines(rotated)) + len(read_json_lines(log)) == sent


def test_validate_mode_checks_config_but_opens_nothing(tmp_path):
    log = tmp_path / "never.log"
    envoy, _, _ = proxy(tmp_path, {"path": str(log)})
    p = envoy.run_to_exit(mode="validate")
    assert p.returncode == 0, envoy.log()[-2000:]
    assert not log.exists()
    bad, _, _ = proxy(tmp_path / "bad", {"path": str(log), "json_format": {"x": "%NOPE%"}})
    p = bad.run_to_exit(mode="validate")
    assert p.returncode != 0 and "NOPE" in bad.log()


def test_stdout_that_is_a_socket(tmp_path):
    """Under systemd, Envoy's stdout is the journal's socket, which open("/dev/stdout") cannot
    reopen (ENXIO). `path: /dev/stdout` writes to Envoy's own descriptor, as Envoy's file logger
    does: the config loads and the lines arrive on the socket."""
    ours, envoys = socket.socketpair()
    port = free_port()
    lst = direct_response_listener("front", port)
    lst["filter_chains"][0]["filters"][0]["typed_config"]["access_log"] = [our_json_logger({
        "path": "/dev/stdout", "flush_interval_ms": 50, "json_format": {"code": "%RESPONSE_CODE%", "p": "%REQ(:PATH)%"}})]
    try:
        with Envoy(tmp_path, {"listeners": [lst]}, stdout=envoys.fileno()) as e:
            envoys.close()
            assert curl(f"http://127.0.0.1:{port}/via-socket").stdout == "200"
            ours.settimeout(10)
            got = b""
            while b"/via-socket" not in got:
                chunk = ours.recv(65536)
                assert chunk, e.log()[-2000:]
                got += chunk
    finally:
        ours.close()
    line = next(x for x in got.splitlines() if b"/via-socket" in x)
    assert json.loads(line) == {"code": 200, "p": "/via-socket"}


def test_a_stdout_pipe_nobody_reads_costs_counted_drops_and_a_bounded_shutdown(tmp_path):
    """Envoy's stdout a pipe whose reader stalled (a hung log shipper), written by two logger
    configs (two listeners, sharing the pipe's write lock): no flush thread sits in a write(2) or
    on that lock for good. Both configs' counters keep moving while they wait (records logged,
    and the drops once the queue is full), Envoy keeps serving, and shutdown ends by the drain
    deadline with no thread left behind."""
    rd, wr = os.pipe()
    ports = [free_port(), free_port()]
    listeners = []
    for i, (port, cap) in enumerate(zip(ports, (64, 8192))):
        lst = direct_response_listener(f"l{i}", port)
        lst["filter_chains"][0]["filters"][0]["typed_config"]["access_log"] = [our_json_logger({
            "path": "/dev/stdout", "queue_capacity": cap, "flush_interval_ms": 50, "stat_prefix": f"p{i}",
            "json_format": {"p": "%REQ(:PATH)%", "pad": "x" * 1500}})]
        listeners.append(lst)
    n = 400
    try:
        e = Envoy(tmp_path, {"listeners": listeners}, stdout=wr)
        with e:
            os.close(wr)
            for i in range(n):
                for port in ports:
                    assert curl(f"http://127.0.0.1:{port}/r{i}").stdout == "200"

            def counts():
                st = e.stats("obs.access_log")
                c = [{k.rsplit(".", 1)[1]: v for k, v in st.items() if f".p{i}." in k} for i in (0, 1)]
                return c if all(x["records_logged"] == n for x in c) else None
            c = poll_until(counts, timeout=5, what="records_logged of both configs while their writes wait")
            assert c[0]["records_dropped"] > 0 and c[0]["queue_depth"] > 0, c
            t0 = time.monotonic()
            e.quit()
            took = time.monotonic() - t0
            log = e.log()
    finally:
        os.close(rd)
    # Each config drains for at most its 5 s budget, one after the other (Envoy destroys them
    # in turn); none is left behind.
    assert took < 14, took
    assert "did not stop within" not in log, log[-2000:]


def test_listeners_sharing_a_stdout_pipe_never_split_lines(tmp_path):
    """Two listeners, each with its own logger config on `/dev/stdout`, with Envoy's stdout a
    pipe (Docker, Kubernetes): the two flush threads write drains far larger than a pipe takes
    at once, and still no line is split or interleaved with the other's."""
    rd, wr = os.pipe()
    pad = "x" * 2000
    ports = [free_port(), free_port()]
    listeners = []
    for i, port in enumerate(ports):
        lst = direct_response_listener(f"l{i}", port)
        lst["filter_chains"][0]["filters"][0]["typed_config"]["access_log"] = [our_json_logger({
            "path": "/dev/stdout", "json_format": {"l": i, "p": "%REQ(:PATH)%", "pad": pad}})]
        listeners.append(lst)
    got = bytearray()

    def read():
        with os.fdopen(rd, "rb") as f:
            while chunk := f.read1(16384):
                got.extend(chunk)
                time.sleep(0.0005)

    reader = threading.Thread(target=read)
    reader.start()
    n = 6000
    try:
        with Envoy(tmp_path, {"listeners": listeners}, stdout=wr) as e:
            os.close(wr)
            loads = [threading.Thread(target=h2load, args=(f"http://127.0.0.1:{p}/r{i}", n), kwargs={"clients": 4})
                     for i, p in enumerate(ports)]
            for t in loads:
                t.start()
            for t in loads:
                t.join()
            poll_until(lambda: got.count(b"\n") >= 2 * n, timeout=30, what="every line on the pipe")
            # Both configs share the `json` prefix, so one queue_depth gauge: each moves only its
            # own share of it (they overwrote each other), and drained it is 0, not off by one's.
            poll_until(lambda: e.stats("access_log").get("obs.access_log.json.queue_depth") == 0, timeout=10,
                       what="the shared queue_depth back at 0")
            log = e.log()
    finally:
        reader.join(timeout=30)
    lines = bytes(got).splitlines()
    assert len(lines) == 2 * n, log[-2000:]
    recs = [json.loads(x) for x in lines]
    assert all(r["pad"] == pad and r["p"] == f"/r{r['l']}" for r in recs)
    assert sorted(sum(1 for r in recs if r["l"] == i) for i in (0, 1)) == [n, n]
