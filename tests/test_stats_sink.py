"""The Prometheus stats sink (`sink_name: prometheus`) on a real Envoy 1.40.0: name-for-name
and value-for-value against Envoy's own admin `/stats/prometheus`, accepted by `promtool` and
scraped by a real Prometheus server.

Stated tolerance for the admin comparison: the admin counts its own request in stats of the
admin listener and HCM (`envoy_http_conn_manager_prefix="admin"`, `envoy_listener_admin_*`),
and our sink's own gauges change between our flush and the admin's render; those values are
excluded. Every other counter, gauge and histogram value must be equal: traffic has stopped and
one more flush has happened before the comparison."""
import gzip
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from harness import (ENVOY_BIN, STATS_SINK_SO, Envoy, curl, direct_response_listener, free_port, h2load, hcm_listener,
                     our_json_logger, poll_until, route, static_cluster)


def our_sink(config: dict, name: str = "prometheus") -> dict:
    return {"name": "envoy.stat_sinks.dynamic_modules", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.stat_sinks.dynamic_modules.v3.DynamicModuleStatsSink",
        "dynamic_module_config": {"module": {"local": {"filename": str(STATS_SINK_SO)}}},
        "sink_name": name,
        "sink_config": {"@type": "type.googleapis.com/google.protobuf.Struct", "value": config}}}


def sink_envoy(tmp_path, sink_config: dict, clusters: int = 1, flush: str = "1s"):
    """Envoy with our sink, a front listener routing to `clusters` clusters (all to one
    upstream) and the JSON logger (so module stats are in the output too)."""
    front, up = free_port(), free_port()
    routes = [route(f"/c{i}/", f"c{i}") for i in range(clusters)]
    res = {"listeners": [hcm_listener("front", front, routes, access_log=[our_json_logger({"path": str(tmp_path / "a.log")})]),
                         direct_response_listener("up", up)],
           "clusters": [static_cluster(f"c{i}", up) for i in range(clusters)]}
    boot = {"stats_sinks": [our_sink(sink_config)], "stats_flush_interval": flush}
    return Envoy(tmp_path, res, extra_bootstrap=boot), front


def summary_family(key: str, s: dict[str, str]) -> str | None:
    """The summary a series belongs to (its quantile, _sum or _count line), else None."""
    name = key.split("{", 1)[0]
    for base in (name, name.removesuffix("_sum"), name.removesuffix("_count")):
        if any(k.startswith(base + "{") and "quantile=" in k for k in s):
            return base
    return None


def series(text: str) -> dict[str, str]:
    """`name{labels}` -> value, for every sample line."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            assert key not in out, f"duplicate series {key}"
            out[key] = value
    return out


def scrape(port: int, path: str = "/metrics", headers: dict | None = None, method: str = "GET"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {}, method=method)
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, dict(r.headers), r.read()


def flushed_twice(e: Envoy, flush_s: float = 1.0) -> None:
    """Traffic has stopped: wait for two more sink flushes (our `flushes` gauge), so the
    snapshot the endpoint serves is current."""
    def count():
        return e.stats("obs_sink.prometheus.flushes").get("obs_sink.prometheus.flushes", 0)
    start = count()
    poll_until(lambda: count() >= start + 2, timeout=10 * flush_s, what="two more stats flushes")


SELF = re.compile(r'envoy_http_conn_manager_prefix="admin"|^envoy_listener_admin_|^envoy_obs_sink_')


def compare_with_admin(e: Envoy, port: int, flush_s: float = 1.0) -> tuple[dict, dict]:
    flushed_twice(e, flush_s)
    ours_text, admin_text = scrape(port)[2].decode(), e.admin("/stats/prometheus")
    ours, admin = series(ours_text), series(admin_text)
    # The same families and types, laid out as the admin does (1.40: no blank lines).
    types = [{line for line in t.splitlines() if line.startswith("#")} for t in (ours_text, admin_text)]
    assert types[0] == types[1], (sorted(types[0] ^ types[1])[:10])
    assert ours_text.count("\n\n") == admin_text.count("\n\n"), (ours_text.count("\n\n"), admin_text.count("\n\n"))
    assert set(ours) == set(admin), (f"only admin: {sorted(set(admin) - set(ours))[:10]}; "
                                     f"only ours: {sorted(set(ours) - set(admin))[:10]}")
    diffs = [(k, admin[k], ours[k]) for k in admin if admin[k] != ours[k] and not SELF.search(k)]
    assert not diffs, diffs[:20]
    return ours, admin


def test_same_series_and_values_as_the_admin_endpoint(tmp_path):
    e, front = sink_envoy(tmp_path, {"address": f"127.0.0.1:{(port := free_port())}"})
    with e:
        for path in ("/c0/a", "/c0/b", "/nope"):
            curl(f"http://127.0.0.1:{front}{path}")
        h2load(f"http://127.0.0.1:{front}/c0/load", 500, clients=4)
        ours, _ = compare_with_admin(e, port)
    assert any(k.startswith("envoy_cluster_upstream_rq_total{") for k in ours)
    assert any("_bucket{" in k and 'le="+Inf"' in k for k in ours), "histograms"
    assert any(k.startswith("envoy_obs_access_log_json_records_logged") for k in ours), "module stats"


def test_500_clusters_match_the_admin_endpoint(tmp_path):
    e, front = sink_envoy(tmp_path, {"address": f"127.0.0.1:{(port := free_port())}"}, clusters=500, flush="2s")
    with e:
        curl(f"http://127.0.0.1:{front}/c7/x")
        ours, _ = compare_with_admin(e, port, flush_s=2.0)
    assert len(ours) > 75_000, len(ours)


def test_promtool_accepts_the_output_and_prometheus_scrapes_every_series(tmp_path):
    promtool, prom = shutil.which("promtool"), shutil.which("prometheus")
    assert promtool and prom, "scripts/setup.sh installs Debian's prometheus package"
    e, front = sink_envoy(tmp_path, {"address": f"127.0.0.1:{(port := free_port())}"})
    with e:
        for _ in range(5):
            curl(f"http://127.0.0.1:{front}/c0/x")
        flushed_twice(e)
        body = scrape(port)[2]
        check = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
        out = check.stdout.decode() + check.stderr.decode()
        # Exit 3 = lint advice only (Envoy's names lack HELP text and `_total` suffixes, exactly
        # as the admin endpoint's do); 1 = a parse error.
        problems = [line for line in out.splitlines() if line.startswith("error") or "parsing error" in line]
        assert check.returncode in (0, 3) and not problems, out[-3000:]
        prom_port = free_port()
        (tmp_path / "prometheus.yml").write_text(json.dumps({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "envoy", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]}))
        p = subprocess.Popen([prom, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                              f"--web.listen-address=127.0.0.1:{prom_port}"],
                             stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
        try:
            def query(q):
                url = f"http://127.0.0.1:{prom_port}/api/v1/query?query={urllib.request.quote(q)}"
                try:
                    with urllib.request.urlopen(url, timeout=5) as r:
                        return json.loads(r.read())["data"]["result"]
                except (OSError, ValueError, KeyError):
                    return None
            poll_until(lambda: (r := query('up{job="envoy"}')) and r[0]["value"][1] == "1", timeout=60,
                       what="Prometheus target up")
            ours = len(series(scrape(port)[2].decode()))
            ingested = poll_until(lambda: (r := query('count({job="envoy",__name__!~"up|scrape_.*"})'))
                                  and int(r[0]["value"][1]) or None, timeout=30, what="series ingested")
            assert ingested == ours, (ingested, ours)
        finally:
            p.terminate()
            p.wait(10)


def test_http_behaviour(tmp_path):
    e, front = sink_envoy(tmp_path, {"address": f"127.0.0.1:{(port := free_port())}", "path": "/prom"})
    with e:
        curl(f"http://127.0.0.1:{front}/c0/x")
        flushed_twice(e)
        status, headers, body = scrape(port, "/prom")
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        status, headers, zbody = scrape(port, "/prom", {"Accept-Encoding": "gzip"})
        assert headers.get("Content-Encoding") == "gzip" and gzip.decompress(zbody).count(b"\n") == body.count(b"\n")
        status, headers, head = scrape(port, "/prom", method="HEAD")
        assert status == 200 and head == b"" and int(headers["Content-Length"]) > 0
        for method, path, code in [("POST", "/prom", 405), ("DELETE", "/prom", 405), ("GET", "/metrics", 404)]:
            with pytest.raises(urllib.error.HTTPError) as err:
                scrape(port, path, method=method)
            assert err.value.code == code
        # A client that connects and says nothing does not block the next scrape for long.
        idle = socket.create_connection(("127.0.0.1", port))
        t0 = time.monotonic()
        assert scrape(port, "/prom")[0] == 200
        idle.close()
        assert time.monotonic() - t0 < 6
        # Health gauges are published at the next stats flush.
        poll_until(lambda: (g := e.stats("obs_sink"))["obs_sink.prometheus.series"] > 100
                   and g["obs_sink.prometheus.scrapes_served"] >= 3, timeout=5, what="health gauges")


def test_endpoint_answers_under_load(tmp_path):
    e, front = sink_envoy(tmp_path, {"address": f"127.0.0.1:{(port := free_port())}"})
    with e:
        load = subprocess.Popen(["h2load", "--h1", "-D", "6", "-c", "8", "-t", "1", f"http://127.0.0.1:{front}/c0/x"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            flushed_twice(e)
            assert load.poll() is None, "the load is still running while we scrape"
            codes = [scrape(port)[0] for _ in range(10)]
        finally:
            load.wait(120)
        assert codes == [200] * 10


def test_options_filter_used_only_text_readouts_summary(tmp_path):
    e, front = sink_envoy(tmp_path, {"address": f"127.0.0.1:{(port := free_port())}", "filter": "^cluster\\.",
                                     "used_only": True, "histogram_emit_mode": "summary"})
    with e:
        curl(f"http://127.0.0.1:{front}/c0/x")
        flushed_twice(e)
        text = scrape(port)[2].decode()
    s = series(text)
    assert s and all(k.startswith("envoy_cluster_") for k in s), list(s)[:5]
    # Summaries cover the last flush interval (idle here), so their _sum and _count may be 0.
    zeros = [k for k, v in s.items() if v == "0" and summary_family(k, s) is None]
    assert not zeros, f"used_only drops zero counters and gauges: {zeros[:5]}"
    assert "# TYPE envoy_cluster_upstream_rq_time summary" in text
    assert any('quantile="0.99"' in k for k in s)


def test_summaries_cover_the_last_flush_interval_like_the_admin(tmp_path):
    """histogram_emit_mode: summary follows the admin's ?histogram_buckets=summary, which covers
    the last flush interval: after traffic and two idle flushes both print every _count and
    _sum as 0 (and nan quantiles), while the cumulative histograms still hold the samples."""
    e, front = sink_envoy(tmp_path, {"address": f"127.0.0.1:{(port := free_port())}", "histogram_emit_mode": "summary"})
    with e:
        h2load(f"http://127.0.0.1:{front}/c0/load", 200, clients=4)
        flushed_twice(e)
        ours = series(scrape(port)[2].decode())
        admin = series(e.admin("/stats/prometheus?histogram_buckets=summary"))
        cumulative = series(e.admin("/stats/prometheus"))

    def tails(s):
        return {k: v for k, v in s.items() if "quantile=" not in k and summary_family(k, s) and not SELF.search(k)}
    assert tails(ours) == tails(admin), sorted(set(tails(ours).items()) ^ set(tails(admin).items()))[:10]
    assert tails(ours) and set(tails(ours).values()) == {"0"}
    rq = [k for k in tails(ours) if k.startswith("envoy_cluster_upstream_rq_time_count{")]
    assert rq and all(int(cumulative[k]) > 0 for k in rq), "the samples are there, outside the interval"
    assert all(v == "nan" for k, v in ours.items() if "quantile=" in k and not SELF.search(k))


def test_text_readouts_like_the_admin(tmp_path):
    """A listener set from a file-based LDS makes `listener_manager.lds.version_text` a text
    readout holding the file's version_info: ours renders it exactly as the admin's
    `/stats/prometheus?text_readouts` (Envoy 1.40 prints such gauges with the value 0)."""
    lds = tmp_path / "lds.json"
    lds.write_text(json.dumps({"version_info": "v42", "resources": []}))
    port = free_port()
    boot = {"node": {"id": "sink", "cluster": "sink"}, "stats_flush_interval": "1s",
            "stats_sinks": [our_sink({"address": f"127.0.0.1:{port}", "text_readouts": True})],
            "dynamic_resources": {"lds_config": {"path_config_source": {"path": str(lds)}, "resource_api_version": "V3"}}}
    e = Envoy(tmp_path, {}, extra_bootstrap=boot)
    with e:
        flushed_twice(e)
        admin = e.admin("/stats/prometheus?text_readouts=true")
        ours = scrape(port)[2].decode()

    def lines(text):
        return [x for x in text.splitlines() if "lds_version_text" in x]
    want = lines(admin)
    assert want == ['# TYPE envoy_listener_manager_lds_version_text gauge',
                    'envoy_listener_manager_lds_version_text{text_value="v42"} 0'], want
    assert lines(ours) == want


BAD = {
    "port in use": ({"address": "127.0.0.1:{busy}"}, "field `address`: cannot listen"),
    "bad address": ({"address": "not-an-address"}, "field `address`"),
    "bad regex": ({"filter": "(unclosed"}, "field `filter`: bad regex"),
    "unknown mode": ({"histogram_emit_mode": "sketch"}, "field `histogram_emit_mode`"),
    "unknown key": ({"bogus": 1}, "field `bogus`"),
    "bad path": ({"path": "metrics"}, "field `path`"),
    "two auth methods": ({"bearer_token": "t", "basic_auth": {"username": "u", "password": "p"}}, "field `basic_auth`"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_is_rejected_naming_the_field(tmp_path, case):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    cfg, needle = BAD[case]
    cfg = {k: (v.format(busy=busy.getsockname()[1]) if isinstance(v, str) else v) for k, v in cfg.items()}
    e, _ = sink_envoy(tmp_path, cfg)
    p = e.run_to_exit()
    busy.close()
    assert p.returncode == 1, e.log()[-2000:]
    assert needle in e.log(), e.log()[-3000:]


def raw(port: int, data: bytes, timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_endpoint_hardening(tmp_path):
    """Slow clients cannot starve scrapes; malformed requests get 400/431; auth when configured."""
    e, front = sink_envoy(tmp_path, {"address": f"127.0.0.1:{(port := free_port())}", "bearer_token": "s3cret"})
    with e:
        curl(f"http://127.0.0.1:{front}/c0/x")
        flushed_twice(e)
        # Slowloris: clients that trickle a request byte by byte hold at most their own thread.
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        for s in slow:
            s.sendall(b"GET /met")
        t0 = time.monotonic()
        assert scrape(port, headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert time.monotonic() - t0 < 1.5, "a scrape was kept waiting behind slow clients"
        for s in slow:
            s.close()
        # A request that never completes is cut off after the request deadline.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            t0 = time.monotonic()
            reply = s.recv(1024)
            assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 5
        assert raw(port, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
        assert raw(port, b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * 100 + b"\r\n").startswith(b"HTTP/1.1 431")
        with pytest.raises(urllib.error.HTTPError) as err:
            scrape(port)
        assert err.value.code == 401 and err.value.headers["WWW-Authenticate"] == "Bearer"
        with pytest.raises(urllib.error.HTTPError) as err:
            scrape(port, headers={"Authorization": "Bearer wrong"})
        assert err.value.code == 401


def test_basic_auth(tmp_path):
    import base64
    e, front = sink_envoy(tmp_path, {"address": f"127.0.0.1:{(port := free_port())}",
                                     "basic_auth": {"username": "prom", "password": "p@ss"}})
    with e:
        flushed_twice(e)
        good = "Basic " + base64.b64encode(b"prom:p@ss").decode()
        assert scrape(port, headers={"Authorization": good})[0] == 200
        with pytest.raises(urllib.error.HTTPError) as err:
            scrape(port, headers={"Authorization": "Basic " + base64.b64encode(b"prom:nope").decode()})
        assert err.value.code == 401 and "Basic" in err.value.headers["WWW-Authenticate"]


def test_hot_restart_hands_the_endpoint_to_the_new_epoch(tmp_path):
    """Envoy's hot restart: the new epoch starts while the old one still holds our endpoint's
    port, so the sink binds it with SO_REUSEPORT (as Envoy's own listeners do). Every scrape
    across the handover is answered with metrics, never a 503: the new epoch accepts only once
    it has flushed. Once the new epoch
    has flushed, the old one stops accepting: every later scrape is the new epoch's
    (`envoy_server_hot_restart_epoch` 1), though the old one runs on until its shutdown time —
    counters never jump back to the old process's values."""
    e, _ = sink_envoy(tmp_path, {"address": f"127.0.0.1:{(port := free_port())}"})
    base_id = tmp_path / "base-id"

    def start(epoch: int) -> subprocess.Popen:
        cmd = [str(ENVOY_BIN), "-c", str(e.config_path), "--concurrency", "1", "-l", "info",
               "--restart-epoch", str(epoch), "--drain-time-s", "1", "--parent-shutdown-time-s", "8"]
        cmd += ["--base-id", base_id.read_text().strip()] if epoch else ["--use-dynamic-base-id", "--base-id-path", str(base_id)]
        return subprocess.Popen(cmd, stdout=open(tmp_path / f"epoch{epoch}.log", "wb"), stderr=subprocess.STDOUT)

    def scrape() -> tuple[int, int | None]:
        """Status and the answering process's restart epoch."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                m = re.search(r"^envoy_server_hot_restart_epoch(?:\{[^}]*\})? (\d+)$", r.read().decode(), re.M)
                return r.status, int(m.group(1)) if m else None
        except urllib.error.HTTPError as err:
            return err.code, None
        except OSError:  # refused: nobody listening
            return 0, None

    procs = [start(0)]
    try:
        poll_until(lambda: scrape() == (200, 0), timeout=20, what="epoch 0 serving")
        procs.append(start(1))
        before = []
        while (got := scrape()) != (200, 1):
            assert procs[1].poll() is None, (tmp_path / "epoch1.log").read_text()[-3000:]
            before.append(got)
            time.sleep(0.05)
        # Until then the old epoch answers; a connection the kernel gives the new one waits
        # for its first flush instead of getting a 503.
        assert set(before) <= {(200, 0)}, before
        # The old epoch logs when it stops accepting: from then on only the new one answers.
        poll_until(lambda: "took over the metrics endpoint" in (tmp_path / "epoch0.log").read_text(),
                   timeout=10, what="the old epoch handed the endpoint over")
        after = []
        while procs[0].poll() is None:
            after.append(scrape())
            time.sleep(0.05)
        assert len(after) > 20 and set(after) == {(200, 1)}, after
        assert scrape() == (200, 1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
