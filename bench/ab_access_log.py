#!/usr/bin/env python3
"""A/B of two builds of the JSON access logger, side by side in one Envoy.

    .venv/bin/python bench/ab_access_log.py A.so B.so

Copy a build of `libenvoy_obs_access_log.so` aside, change and rebuild, then compare the two.
One Envoy (1 worker pinned to core 0, h2load on core 1, closed loop as in access_log_bench.py)
has three listeners: no access log, build A, build B, each with the benchmark's 17-field map.
Bursts rotate over the three for AB_ROUNDS rounds (60). Per round, each build's worker CPU
per request minus the same round's no-log burst. The printed figure is the median over rounds
of B's cost minus A's. Passing the same file twice (an A/A run) shows the method's resolution,
about ±0.15 µs here.

AB_B_TIMING=0 turns `self_timing` off for B (both have it on otherwise).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import access_log_bench as alb  # noqa: E402
from harness import ENVOY_BIN, free_port, hcm_listener, our_json_logger, socket_address  # noqa: E402

ROUNDS = int(os.environ.get("AB_ROUNDS", "60"))
REQUESTS = 20000


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = (pathlib.Path(p).resolve() for p in sys.argv[1:])
    wd = pathlib.Path(tempfile.mkdtemp(prefix="ab-access-log-"))

    def logger(so: pathlib.Path, name: str, timing: bool = True) -> list:
        cfg = {"path": str(wd / f"{name}.log"), "json_format": alb.FORMAT, "self_timing": timing}
        # A namespace each: the two builds' counters must not share names.
        return [our_json_logger(cfg, so=so, namespace=f"obs{name.lower()}")]

    variants = {"none": [], "A": logger(a, "A"), "B": logger(b, "B", os.environ.get("AB_B_TIMING", "1") == "1")}
    ports = {v: free_port() for v in variants}
    admin = free_port()
    direct = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}
    listeners = [hcm_listener(v, ports[v], [direct], access_log=variants[v], stat_prefix=v) for v in variants]
    cfg = wd / "envoy.yaml"
    cfg.write_text(json.dumps({"admin": {"address": socket_address(admin)},
                               "static_resources": {"listeners": listeners}}))
    proc = subprocess.Popen(["taskset", "-c", "0-1", str(ENVOY_BIN), "-c", str(cfg), "--concurrency", "1",
                             "--use-dynamic-base-id", "--disable-hot-restart", "-l", "warning"],
                            stdout=open(wd / "envoy.log", "wb"), stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 20
        while True:
            if proc.poll() is not None or time.monotonic() > end:
                sys.exit(f"Envoy did not start; see {wd / 'envoy.log'}")
            try:
                if "LIVE" in alb.admin_get(admin, "/ready"):
                    break
            except OSError:
                time.sleep(0.05)
        for task in pathlib.Path(f"/proc/{proc.pid}/task").iterdir():
            if (task / "comm").read_text().startswith("wrk:"):
                subprocess.run(["taskset", "-p", "-c", "0", task.name], check=True, capture_output=True)
        for v in variants:
            alb.h2load(f"http://127.0.0.1:{ports[v]}/bench", REQUESTS)
        worker: dict[str, list[float]] = {v: [] for v in variants}
        order = list(variants)
        for r in range(ROUNDS):
            for v in order[r % 3:] + order[:r % 3]:
                worker[v].append(alb.burst(proc, ports[v], REQUESTS)["worker_us"])
    finally:
        alb.stop_envoy(proc, admin, 30)
    # The two access logs reach ~1 GB each in a 60-round run.
    shutil.rmtree(wd)
    added = {v: [x - n for x, n in zip(worker[v], worker["none"])] for v in ("A", "B")}
    print(f"A = {a}\nB = {b}\n{ROUNDS} rounds x {REQUESTS:,} requests; no-log worker median "
          f"{statistics.median(worker['none']):.3f} µs/request, spread {alb.spread(worker['none']):.0%}")
    for v in ("A", "B"):
        print(f"{v}: worker added, median {statistics.median(added[v]):.3f} µs/request")
    diff = [y - x for x, y in zip(added["A"], added["B"])]
    q = statistics.quantiles(diff, n=4)
    print(f"B - A: median {statistics.median(diff):+.3f} µs/request (per-round IQR {q[0]:+.3f} to {q[2]:+.3f}); "
          f"B cheaper in {sum(d < 0 for d in diff)} of {len(diff)} rounds")


if __name__ == "__main__":
    main()
