#!/usr/bin/env python3
"""A/B of two builds of the JSON access logger, side by side in one Envoy.

    .venv/bin/python bench/ab_access_log.py A.so B.so

Copy a build of `libenvoy_obs_access_log.so` aside, change and rebuild, then compare the two.
One Envoy (1 worker pinned to core 0, h2load on core 1, closed loop as in access_log_bench.py)
has three listeners: no access log, build A, build B, each with the benchmark's 17-field map.
Bursts rotate over the three for AB_ROUNDS rounds (60). Per round, each build's worker CPU
per request minus the same round's no-log burst. The printed figure is the median over rounds
of B's cost minus A's. Passing the same file twice (an A/A run) shows the method's resolution,
about ±0.15 µs here, which includes the listeners' own offsets: identical listeners of one Envoy
differ by a few tenths of a µs (access_log_bench.aa_check), so an A/B difference that small says
nothing about the builds.

AB_B_TIMING=0 turns `self_timing` off for B (both have it on otherwise).
"""
from __future__ import annotations

import os
import pathlib
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import access_log_bench as alb  # noqa: E402
from harness import our_json_logger  # noqa: E402

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
    proc, admin, ports = alb.start_envoy(wd, {}, custom=variants)
    try:
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
