#!/usr/bin/env python3
"""Access-log CPU cost on a real Envoy 1.40.0: no access log vs Envoy's built-in file logger
(`log_format.json_format`) vs the envoy-obs JSON logger, with the same 17-field map.

Method. One Envoy process with 1 worker; the worker thread is pinned to core 0, Envoy's other
threads (main, the loggers' background writers) are left to the scheduler as in production
(BENCH_PROCESS_CPUS=0 pins them to the worker's core too); h2load (HTTP/1.1 keep-alive) is
pinned to core 1. The Envoy has three listeners that differ only in their access log: none,
built-in, ours; each answers with a `direct_response` (no upstream process competes for the
cores). Short bursts go to the three listeners in turn, many rounds over. Per burst we read the
worker thread's on-CPU nanoseconds (/proc/<pid>/task/*/schedstat): request-path work is
synchronous, so a burst's worker CPU is its own. The background writers ("AccessLogFlush" for
Envoy's file logger, "obs-json-flush" for ours) are measured over the whole run and divided by
the records they wrote. Added cost per round = worker CPU minus the same round's no-log burst,
plus background per record; the ratio is the median of per-round ratios, and the run reports
how much the no-log baseline itself moved (this VM's speed drifts by ±20 % within seconds).

A second, deterministic measurement follows when valgrind is installed: the same Envoy under
callgrind, counting instructions per request per variant (BENCH_CALLGRIND=0 skips it).

Results of `make bench` are written to bench/results/access_log.md (table there).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from harness import (ACCESS_LOG_SO, ENVOY_BIN, builtin_json_logger, count_lines, free_port,  # noqa: E402
                     hcm_listener, our_json_logger, socket_address)
from harness import h2load as harness_h2load  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "60"))
REQUESTS = int(os.environ.get("BENCH_REQUESTS", "10000"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "20000"))
CLIENTS = int(os.environ.get("BENCH_CLIENTS", "16"))
SETTLE_S = 0.3
# The worker thread is always pinned to core 0; Envoy's other threads (main, flush threads) may
# use these cores. BENCH_PROCESS_CPUS=0 makes them share the worker's core.
PROCESS_CPUS = os.environ.get("BENCH_PROCESS_CPUS", "0-1")
VARIANTS = ["none", "builtin", "ours"]

# 17 fields: the common production access-log shape.
FORMAT = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration": "%DURATION%",
    "upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "x_forwarded_for": "%REQ(X-FORWARDED-FOR)%",
    "user_agent": "%REQ(USER-AGENT)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "authority": "%REQ(:AUTHORITY)%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
}
assert len(FORMAT) == 17


def thread_cpu_ns(pid: int) -> dict[str, int]:
    """On-CPU ns per thread name (summed over threads sharing a name)."""
    out: dict[str, int] = {}
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            ns = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError):
            continue
        out[name] = out.get(name, 0) + ns
    return out


def admin_get(admin: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=10) as r:
        return r.read().decode()


def our_stats(admin: int) -> dict[str, int]:
    out = {}
    for line in admin_get(admin, "/stats?filter=obs.access_log").splitlines():
        k, _, v = line.partition(": ")
        if v.isdigit():
            out[k.removeprefix("obs.access_log.json.")] = int(v)
    return out


def h2load(url: str, n: int, clients: int = CLIENTS) -> float:
    """`n` requests from h2load pinned to core 1; returns requests per second."""
    out = harness_h2load(url, n, clients=clients, cpu=1)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    return float(rps.group(1)) if rps else 0.0


def stop_envoy(proc: subprocess.Popen, admin: int, timeout: float) -> None:
    """Graceful /quitquitquit, killed if it does not exit within `timeout`."""
    try:
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{admin}/quitquitquit", method="POST"),
                               timeout=10).read()
    except OSError:
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_envoy(workdir: pathlib.Path, logs: dict[str, pathlib.Path], wrapper: list[str] | None = None,
                ready_timeout: float = 20):
    ports = {v: free_port() for v in VARIANTS}
    direct = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}
    access_logs = {
        "none": [],
        "builtin": [builtin_json_logger(str(logs["builtin"]), FORMAT)],
        # self_timing lets our logger report its own per-record worker time; its two TSC reads
        # per record are counted against us in every CPU figure.
        "ours": [our_json_logger({"path": str(logs["ours"]), "json_format": FORMAT, "self_timing": True},
                                 so=ACCESS_LOG_SO)],
    }
    listeners = [hcm_listener(v, ports[v], [direct], access_log=access_logs[v], stat_prefix=v) for v in VARIANTS]
    admin = free_port()
    cfg = workdir / "envoy.yaml"
    cfg.write_text(json.dumps({"admin": {"address": socket_address(admin)}, "static_resources": {"listeners": listeners}}))
    log = open(workdir / "envoy.log", "wb")
    proc = subprocess.Popen(["taskset", "-c", PROCESS_CPUS] + (wrapper or []) + [str(ENVOY_BIN), "-c", str(cfg), "--concurrency", "1",
                             "--use-dynamic-base-id", "--disable-hot-restart", "-l", "warning",
                             "--file-flush-interval-msec", "100"], stdout=log, stderr=subprocess.STDOUT)
    end = time.monotonic() + ready_timeout
    while True:
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"Envoy did not start; see {workdir / 'envoy.log'}")
        try:
            if "LIVE" in admin_get(admin, "/ready"):
                break
        except OSError:
            time.sleep(0.05)
    for task in pathlib.Path(f"/proc/{proc.pid}/task").iterdir():
        if not wrapper and (task / "comm").read_text().strip().startswith("wrk:"):
            subprocess.run(["taskset", "-p", "-c", "0", task.name], check=True, capture_output=True)
    return proc, admin, ports


def wait_for_lines(logs: dict[str, pathlib.Path], n: int, timeout: float = 60):
    end = time.monotonic() + timeout
    while any(count_lines(p) < n for p in logs.values()):
        if time.monotonic() > end:
            raise RuntimeError(f"loggers did not write {n} lines: " + str({k: count_lines(p) for k, p in logs.items()}))
        time.sleep(0.05)


def burst(proc, port: int, n: int) -> dict:
    """One burst; returns the worker thread's CPU per request (work done synchronously on the
    request path, so it needs no settling time) and the throughput."""
    before = thread_cpu_ns(proc.pid)
    rps = h2load(f"http://127.0.0.1:{port}/bench", n)
    after = thread_cpu_ns(proc.pid)
    worker = sum(after[k] - before.get(k, 0) for k in after if k.startswith("wrk:"))
    return {"worker_us": worker / n / 1000, "rps": rps}


def instruction_counts(workdir: pathlib.Path) -> dict[str, float] | None:
    """Instructions per request per variant under valgrind's callgrind: deterministic where
    CPU time on this VM is not. One Envoy (three listeners) runs under callgrind; counters are
    zeroed before and dumped after each burst, so each figure covers every Envoy thread during
    that burst (including both loggers' flush threads)."""
    if not shutil_which("valgrind") or os.environ.get("BENCH_CALLGRIND", "1") == "0":
        return None
    n = int(os.environ.get("BENCH_CALLGRIND_REQUESTS", "2000"))
    cg_dir = workdir / "callgrind"
    cg_dir.mkdir()
    logs = {"builtin": workdir / "cg-builtin.log", "ours": workdir / "cg-ours.log"}
    proc, admin, ports = start_envoy(workdir, logs, wrapper=["valgrind", "--tool=callgrind", "--instr-atstart=no",
                                                            f"--callgrind-out-file={cg_dir}/cg.out"], ready_timeout=300)
    out: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for v in VARIANTS:
            h2load(f"http://127.0.0.1:{ports[v]}/bench", 200, clients=4)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
        for rnd in range(2):
            for v in VARIANTS:
                subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
                h2load(f"http://127.0.0.1:{ports[v]}/bench", n, clients=4)
                time.sleep(1.0)  # both loggers flush within 100 ms / one wake; valgrind is slow
                before = set(cg_dir.iterdir())
                subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
                new = sorted(set(cg_dir.iterdir()) - before)
                ir = sum(int(m.group(1)) for f in new for m in [re.search(r"^totals:\s+(\d+)", f.read_text(), re.M)] if m)
                out[v].append(ir / n)
                print(f"callgrind round {rnd + 1}/2 {v:8s} {ir / n:10.0f} instructions/request", flush=True)
    finally:
        stop_envoy(proc, admin, 120)
    return {v: statistics.median(x) for v, x in out.items()}


def shutil_which(cmd: str) -> str | None:
    import shutil
    return shutil.which(cmd)


def main():
    shm = pathlib.Path("/dev/shm")
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="obs-bench-", dir=shm if shm.is_dir() else None))
    logs = {"builtin": workdir / "builtin.log", "ours": workdir / "ours.log"}
    proc, admin, ports = start_envoy(workdir, logs)
    results = {v: [] for v in VARIANTS}
    try:
        for v in VARIANTS:  # warm-up, not measured
            h2load(f"http://127.0.0.1:{ports[v]}/bench", WARMUP)
        wait_for_lines(logs, WARMUP)
        bg_before = thread_cpu_ns(proc.pid)
        for rnd in range(ROUNDS):
            order = VARIANTS[rnd % 3:] + VARIANTS[:rnd % 3]  # rotate who goes first
            for v in order:
                r = burst(proc, ports[v], REQUESTS)
                results[v].append(r)
            print(f"round {rnd + 1:2d}/{ROUNDS} worker µs/request: "
                  + "  ".join(f"{v} {results[v][-1]['worker_us']:6.3f}" for v in VARIANTS), flush=True)
        wait_for_lines(logs, WARMUP + ROUNDS * REQUESTS)
        time.sleep(SETTLE_S)
        bg_after = thread_cpu_ns(proc.pid)
        hook = our_stats(admin)
    finally:
        stop_envoy(proc, admin, 60)
    total = WARMUP + ROUNDS * REQUESTS
    for v, path in logs.items():
        lines = count_lines(path)
        if lines != total:
            raise RuntimeError(f"{v}: {lines} log lines, expected {total}")
        path.unlink()

    # Background writers, over the whole measured run: ours renders and writes on
    # "obs-json-flush", Envoy's file logger writes on "AccessLogFlush" (used by nothing else here).
    measured = ROUNDS * REQUESTS
    bg = {"none": 0.0,
          "builtin": (bg_after.get("AccessLogFlush", 0) - bg_before.get("AccessLogFlush", 0)) / measured / 1000,
          "ours": (bg_after.get("obs-json-flush", 0) - bg_before.get("obs-json-flush", 0)) / measured / 1000}
    # Per round: worker delta over the no-log burst of the same round, plus background per record.
    added_rounds = {v: [r["worker_us"] - n["worker_us"] + bg[v] for r, n in zip(results[v], results["none"])]
                    for v in VARIANTS}
    added = {v: statistics.median(added_rounds[v]) for v in VARIANTS}
    worker_added = {v: statistics.median(r["worker_us"] - n["worker_us"] for r, n in zip(results[v], results["none"]))
                    for v in VARIANTS}
    per_round = [o / b for o, b in zip(added_rounds["ours"], added_rounds["builtin"]) if b > 0]
    ratio = statistics.median(per_round) if per_round else float("nan")
    rq = statistics.quantiles(per_round, n=4) if len(per_round) >= 4 else [float("nan")] * 3
    base = [r["worker_us"] for r in results["none"]]
    q = statistics.quantiles(base, n=4) if len(base) >= 2 else [base[0]] * 3
    noise = (q[2] - q[0]) / statistics.median(base)
    noisy = noise > 0.08 or added["builtin"] < 1.0
    lines = [
        f"# Access-log CPU cost — Envoy 1.40.0, 1 worker, {ROUNDS} rounds x {REQUESTS:,} requests per variant, "
        "17-field json_format",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} cores ({platform_cpu()}); "
        f"one Envoy with three listeners (none / built-in / ours), alternating bursts; HTTP/1.1 keep-alive, "
        f"{CLIENTS} connections. Per round: worker CPU over the same round's no-log burst; background "
        "writer threads over the whole run. Medians over rounds.",
        "",
        "| variant | worker µs/request | added on the worker | background µs/record | added in total | req/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v in VARIANTS:
        wk = statistics.median(r["worker_us"] for r in results[v])
        rps = statistics.median(r["rps"] for r in results[v])
        lines.append(f"| {v} | {wk:.3f} | {worker_added[v]:+.3f} | {bg[v]:.3f} | {added[v]:+.3f} | {rps:,.0f} |")
    lines += [
        "",
        f"- **ratio ours / built-in of the added CPU per request: {ratio:.2f}** (median of per-round ratios, "
        f"interquartile range {rq[0]:.2f}–{rq[2]:.2f}; target ≤ 0.5)",
        f"- **our worker-thread CPU per record: {worker_added['ours']:.3f} µs** (target ≤ 1 µs); built-in: "
        f"{worker_added['builtin']:.3f} µs",
        f"- run quality: the no-log worker's interquartile spread was {noise:.0%} of its median"
        + (" — **too noisy to judge: rerun**" if noisy else ""),
        f"- our logger's own measurement of worker time per record (self_timing, TSC): median "
        f"{hook.get('worker_ns_p50', 0) / 1000:.3f} µs, p99 {hook.get('worker_ns_p99', 0) / 1000:.3f} µs, mean "
        f"{hook.get('worker_ns', 0) / max(hook.get('records_logged', 1), 1) / 1000:.3f} µs "
        "(wall time inside the hook, so the mean includes interrupts)",
    ]
    ir = instruction_counts(workdir)
    if ir:
        ir_added = {v: ir[v] - ir["none"] for v in VARIANTS}
        lines += [
            "",
            "Instructions per request under valgrind (callgrind; deterministic, all Envoy threads):",
            "",
            "| variant | instructions/request | added over no log |",
            "|---|---:|---:|",
        ] + [f"| {v} | {ir[v]:,.0f} | {ir_added[v]:+,.0f} |" for v in VARIANTS] + [
            "",
            f"- **ratio ours / built-in (added instructions per request): "
            f"{ir_added['ours'] / ir_added['builtin']:.2f}**",
        ]
    report = "\n".join(lines) + "\n"
    print()
    print(report)
    out = ROOT / "bench" / "results" / "access_log.md"
    out.write_text(report)
    print(f"written to {out.relative_to(ROOT)}")


def platform_cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
