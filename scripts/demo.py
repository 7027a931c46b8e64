#!/usr/bin/env python3
"""`make demo`: the whole pack end to end on this machine.

Starts a small upstream, the project's own OTLP collector (tests/otlp_receiver.py, decoding
with the official opentelemetry-proto package), Envoy 1.40.0 with all three modules
(examples/all-in-one/envoy.yaml: JSON access log, OTLP access log, OpenTelemetry tracer,
Prometheus endpoint) and a local Prometheus scraping that endpoint; drives traffic (successes,
404s, 503s) for `--duration` seconds while printing a live summary; then prints where
everything is and what each part saw, and stops everything. Ctrl-C stops it cleanly at any
time. Exits non-zero if a signal produced nothing."""
from __future__ import annotations

import argparse
import collections
import http.server
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from harness import ENVOY_BIN, MODULE_DIR, count_lines, free_port  # noqa: E402
from otlp_receiver import OtlpReceiver  # noqa: E402


class Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server API)
        body = json.dumps({"hello": "from the upstream", "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def get(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def prom_query(port: int, q: str) -> list:
    try:
        url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.request.quote(q)}"
        with urllib.request.urlopen(url, timeout=3) as r:
            return json.loads(r.read())["data"]["result"]
    except (OSError, ValueError, KeyError):
        return []


def interrupt(_sig, _frame):
    raise KeyboardInterrupt


def main() -> int:
    # Ctrl-C and SIGTERM stop the demo cleanly, also when started in the background (where a
    # shell leaves SIGINT ignored).
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=20, help="seconds of traffic (default 20)")
    args = ap.parse_args()
    work = ROOT / ".work" / "demo"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ports = {k: free_port() for k in ("listen", "upstream", "admin", "metrics", "prometheus")}
    log = work / "access.log"
    procs: list[subprocess.Popen] = []
    rx = OtlpReceiver("grpc").start()
    up = http.server.ThreadingHTTPServer(("127.0.0.1", ports["upstream"]), Upstream)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    stop = threading.Event()
    sent = collections.Counter()
    try:
        cfg = (ROOT / "examples" / "all-in-one" / "envoy.yaml").read_text()
        for k, v in {"@MODULE_DIR@": str(MODULE_DIR), "@LOG_PATH@": str(log), "@COLLECTOR@": rx.endpoint,
                     "@METRICS_PORT@": ports["metrics"], "@LISTEN_PORT@": ports["listen"],
                     "@UPSTREAM_PORT@": ports["upstream"], "@ADMIN_PORT@": ports["admin"]}.items():
            cfg = cfg.replace(k, str(v))
        (work / "envoy.yaml").write_text(cfg)
        envoy = subprocess.Popen([str(ENVOY_BIN), "-c", str(work / "envoy.yaml"), "--concurrency", "2",
                                  "--use-dynamic-base-id", "-l", "info"],
                                 stdout=open(work / "envoy.log", "wb"), stderr=subprocess.STDOUT)
        procs.append(envoy)
        admin = f"http://127.0.0.1:{ports['admin']}"
        for _ in range(200):
            if envoy.poll() is not None:
                print((work / "envoy.log").read_text()[-3000:])
                raise SystemExit("Envoy exited; its log is above")
            try:
                if urllib.request.urlopen(f"{admin}/ready", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        for line in (work / "envoy.log").read_text().splitlines():
            if "ABI version" in line:
                print("envoy:", line.split("] ")[-1])
        prom = shutil.which("prometheus")
        if prom:
            (work / "prometheus.yml").write_text(json.dumps({
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [{"job_name": "envoy", "static_configs": [
                    {"targets": [f"127.0.0.1:{ports['metrics']}"]}]}]}))
            procs.append(subprocess.Popen([prom, f"--config.file={work / 'prometheus.yml'}",
                                           f"--storage.tsdb.path={work / 'tsdb'}",
                                           f"--web.listen-address=127.0.0.1:{ports['prometheus']}"],
                                          stdout=subprocess.DEVNULL, stderr=open(work / "prometheus.log", "wb")))

        base = f"http://127.0.0.1:{ports['listen']}"

        def traffic():
            i = 0
            while not stop.is_set():
                i += 1
                if i % 10 == 0:
                    path = "/nope"
                elif i % 10 == 5:
                    path = "/broken"
                else:
                    path = f"/api/items/{i}"
                hdr = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"} if i % 25 == 0 else {}
                sent[get(base + path, hdr)] += 1
                time.sleep(0.02)
        t = threading.Thread(target=traffic, daemon=True)
        t.start()
        print(f"== traffic to {base} for {args.duration:.0f} s: 80% /api (200), 10% no route (404), "
              "10% upstream down (503)")
        t0 = time.monotonic()
        while time.monotonic() - t0 < args.duration:
            time.sleep(2)
            series = prom_query(ports["prometheus"], 'count({job="envoy",__name__!~"up|scrape_.*"})') if prom else []
            print(f"  {time.monotonic() - t0:4.0f}s  requests {sum(sent.values()):5d}  JSON lines {count_lines(log):5d}  "
                  f"OTLP log records {rx.count('logs'):5d}  spans {rx.count('traces'):5d}  "
                  f"series in Prometheus {series[0]['value'][1] if series else '-':>6}", flush=True)
        stop.set()
        t.join(5)
        time.sleep(2.5)  # the loggers flush within 0.5 s, the stats every 2 s

        recs = [json.loads(line) for line in log.read_text().splitlines()]
        spans = rx.spans()
        metrics_text = urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=10).read().decode()
        ours = sum(1 for line in metrics_text.splitlines() if line and not line.startswith("#"))
        scraped = prom_query(ports["prometheus"], 'count({job="envoy",__name__!~"up|scrape_.*"})') if prom else []
        print("\n== where everything is")
        print(f"  JSON access log      {log}")
        print(f"  Prometheus endpoint  http://127.0.0.1:{ports['metrics']}/metrics   (our stats sink)")
        if prom:
            print(f"  Prometheus           http://127.0.0.1:{ports['prometheus']}   (scraping it every second)")
        print(f"  OTLP collector       {rx.endpoint}   (this script; spans and log records decoded below)")
        print(f"  Envoy admin          {admin}   config {work / 'envoy.yaml'}, log {work / 'envoy.log'}")
        print("\n== what each part saw")
        print(f"  requests sent        {sum(sent.values())} by status {dict(sorted(sent.items()))}")
        codes = collections.Counter(r["response_code"] for r in recs)
        print(f"  JSON log lines       {len(recs)} (all valid JSON) by status {dict(sorted(codes.items()))}")
        logs = rx.log_records()
        sev = collections.Counter(r["severity_text"] for r in logs)
        print(f"  OTLP log records     {len(logs)} by severity {dict(sorted(sev.items()))}")
        kinds = collections.Counter({2: "server", 3: "client"}.get(s["kind"], s["kind"]) for s in spans)
        traced = sum(1 for s in spans if s["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736")
        print(f"  spans                {len(spans)} ({dict(kinds)}), {traced} continuing the client's traceparent")
        print(f"  Prometheus series    {ours} on our endpoint" + (f", {scraped[0]['value'][1]} in Prometheus" if scraped else ""))
        if recs:
            print("\n  a JSON line:  ", json.dumps(recs[-1]))
        if spans:
            s = spans[-1]
            print(f"  a span:        {s['name']} kind={s['kind']} trace={s['trace_id']} "
                  f"status={s['attributes'].get('http.status_code')} attrs={len(s['attributes'])}")
        stats = urllib.request.urlopen(f"{admin}/stats?filter=^obs\\.", timeout=5).read().decode()
        print("\n== the modules' own counters in Envoy's /stats")
        for line in stats.splitlines():
            if any(w in line for w in ("records_logged", "records_written", "records_exported", "records_dropped",
                                       "spans_sampled", "spans_exported", "spans_dropped")):
                print("  ", line)
        ok = bool(recs) and bool(spans) and bool(logs) and ours > 0
        print("\n" + ("demo OK" if ok else "demo FAILED: a signal produced nothing"))
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping")
        return 130
    finally:
        stop.set()
        for p in procs:
            if p is procs[0] and p.poll() is None:
                try:
                    urllib.request.urlopen(urllib.request.Request(
                        f"http://127.0.0.1:{ports['admin']}/quitquitquit", method="POST"), timeout=5).read()
                    p.wait(15)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        up.shutdown()
        rx.stop()


if __name__ == "__main__":
    sys.exit(main())
