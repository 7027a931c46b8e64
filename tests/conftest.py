import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from harness import ACCESS_LOG_SO, STATS_SINK_SO, TRACER_SO  # noqa: E402


def pytest_sessionstart(session):
    missing = [str(p) for p in (ACCESS_LOG_SO, TRACER_SO, STATS_SINK_SO) if not p.exists()]
    if missing:
        raise SystemExit(f"modules not built: {missing}; run `make build` (or `make test`) first")
