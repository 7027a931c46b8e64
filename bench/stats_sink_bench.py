#!/usr/bin/env python3
"""Prometheus scrape cost at 500 clusters (~85,000 series): Envoy's admin `/stats/prometheus`
vs our sink's endpoint, and the sink's flush cost on Envoy's main thread.

One Envoy (1 worker) with 500 clusters, our Prometheus sink and a 5 s stats flush. For each
endpoint we time scrapes (wall time of the whole HTTP exchange, client on core 1) and read the
CPU the serving thread spent (the admin renders on Envoy's main thread; ours on its
"obs-prom-http" thread). Ours is measured twice: the first scrape after a flush, which renders
the new snapshot, and later scrapes, which send the cached rendering. The main-thread flush cost
is our `obs_sink.prometheus.flush_us` gauge. Results go to bench/results/stats_sink.md."""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
import access_log_bench as alb  # noqa: E402
from harness import (ENVOY_BIN, STATS_SINK_SO, direct_response_listener, free_port, hcm_listener, route,  # noqa: E402
                     socket_address, static_cluster)

CLUSTERS = int(os.environ.get("BENCH_CLUSTERS", "500"))
SCRAPES = int(os.environ.get("BENCH_SCRAPES", "10"))
FLUSH_S = 5


def timed_get(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as r:
        n = len(r.read())
    return (time.perf_counter() - t0) * 1000, n


def thread_ns(pid: int, prefix: str) -> int:
    """On-CPU ns of the threads whose name starts with `prefix`."""
    return sum(ns for name, ns in alb.thread_cpu_ns(pid).items() if name.startswith(prefix))


def main():
    os.sched_setaffinity(0, {1})
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="obs-sink-bench-"))
    front, up, mport, admin = free_port(), free_port(), free_port(), free_port()
    sink = {"name": "envoy.stat_sinks.dynamic_modules", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.stat_sinks.dynamic_modules.v3.DynamicModuleStatsSink",
        "dynamic_module_config": {"module": {"local": {"filename": str(STATS_SINK_SO)}}},
        "sink_name": "prometheus",
        "sink_config": {"@type": "type.googleapis.com/google.protobuf.Struct",
                        "value": {"address": f"127.0.0.1:{mport}"}}}}
    cfg = workdir / "envoy.yaml"
    cfg.write_text(json.dumps({
        "admin": {"address": socket_address(admin)},
        "stats_sinks": [sink], "stats_flush_interval": f"{FLUSH_S}s",
        "static_resources": {
            "listeners": [hcm_listener("front", front, [route(f"/c{i}/", f"c{i}") for i in range(CLUSTERS)]),
                          direct_response_listener("up", up)],
            "clusters": [static_cluster(f"c{i}", up) for i in range(CLUSTERS)]}}))
    proc = subprocess.Popen(["taskset", "-c", "0", str(ENVOY_BIN), "-c", str(cfg), "--concurrency", "1",
                             "--use-dynamic-base-id", "--disable-hot-restart", "-l", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 60
        while True:
            try:
                if "LIVE" in alb.admin_get(admin, "/ready"):
                    break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.1)
        for i in range(0, CLUSTERS, 50):
            urllib.request.urlopen(f"http://127.0.0.1:{front}/c{i}/x", timeout=10).read()
        time.sleep(FLUSH_S + 1)
        admin_ms, admin_cpu, ours_first, ours_cached, ours_cpu_first, ours_cpu_cached, flush_us = [], [], [], [], [], [], []
        sizes = {}
        for _ in range(SCRAPES):
            c0 = alb.thread_cpu_ns(proc.pid).get("envoy", 0)
            ms, sizes["admin"] = timed_get(f"http://127.0.0.1:{admin}/stats/prometheus")
            admin_ms.append(ms)
            admin_cpu.append((alb.thread_cpu_ns(proc.pid).get("envoy", 0) - c0) / 1e6)
            # Wait for the next flush, then scrape ours: the first scrape renders it.
            before = alb.envoy_stats(admin, "obs_sink.prometheus.flush_us")
            time.sleep(FLUSH_S + 0.5)
            flush_us.append(alb.envoy_stats(admin, "obs_sink.prometheus.flush_us").get("obs_sink.prometheus.flush_us", 0))
            c0 = thread_ns(proc.pid, "obs-prom-http")
            ms, sizes["ours"] = timed_get(f"http://127.0.0.1:{mport}/metrics")
            ours_first.append(ms)
            ours_cpu_first.append((thread_ns(proc.pid, "obs-prom-http") - c0) / 1e6)
            c0 = thread_ns(proc.pid, "obs-prom-http")
            ms, _ = timed_get(f"http://127.0.0.1:{mport}/metrics")
            ours_cached.append(ms)
            ours_cpu_cached.append((thread_ns(proc.pid, "obs-prom-http") - c0) / 1e6)
            del before
        nseries = sum(1 for line in urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics").read().splitlines()
                      if line and not line.startswith(b"#"))
    finally:
        alb.stop_envoy(proc, admin, 30)
    med = statistics.median
    ratio = med(ours_first) / med(admin_ms)
    report = "\n".join([
        f"# Prometheus scrape cost — Envoy 1.40.0, {CLUSTERS} clusters, {nseries:,} series",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} cores ({alb.platform_cpu()}); "
        f"Envoy pinned to core 0, the scraper to core 1; medians of {SCRAPES} scrapes.",
        "",
        "| endpoint | wall ms per scrape | serving-thread CPU ms per scrape | bytes |",
        "|---|---:|---:|---:|",
        f"| admin `/stats/prometheus` (main thread) | {med(admin_ms):.1f} | {med(admin_cpu):.1f} | {sizes['admin']:,} |",
        f"| ours, first scrape after a flush (renders) | {med(ours_first):.1f} | {med(ours_cpu_first):.1f} | {sizes['ours']:,} |",
        f"| ours, later scrapes (cached rendering) | {med(ours_cached):.1f} | {med(ours_cpu_cached):.1f} | {sizes['ours']:,} |",
        "",
        f"- **ours / admin wall time per scrape (first scrape after a flush): {ratio:.2f}** (target ≤ 0.5)",
        f"- our flush on Envoy's main thread (copying the snapshot): median {med(flush_us) / 1000:.1f} ms per flush "
        f"(every {FLUSH_S} s); the admin endpoint's whole render runs on the main thread on every scrape",
    ]) + "\n"
    print(report)
    out = ROOT / "bench" / "results" / "stats_sink.md"
    out.write_text(report)
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
