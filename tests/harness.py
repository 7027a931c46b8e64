"""Real-Envoy test harness: boots Envoy 1.40.0 (from the project's virtualenv) on ephemeral
ports with a dynamic --base-id, waits for readiness through the admin port, drives traffic and
tears down. Configs are built as Python dicts and written as JSON (valid YAML for Envoy)."""
from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import subprocess
import time
import urllib.request

import envoy as _envoy_pkg

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENVOY_BIN = pathlib.Path(os.environ.get("ENVOY_BIN") or pathlib.Path(_envoy_pkg.__file__).parent / "_bin" / "envoy")
MODULE_DIR = pathlib.Path(os.environ.get("OBS_MODULE_DIR") or ROOT / "target" / "release")
ACCESS_LOG_SO = MODULE_DIR / "libenvoy_obs_access_log.so"
TRACER_SO = MODULE_DIR / "libenvoy_obs_tracer.so"
STATS_SINK_SO = MODULE_DIR / "libenvoy_obs_stats_sink.so"

ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll_until(fn, timeout=10.0, interval=0.02, what="condition"):
    """Polls `fn` until it returns a truthy value; raises with `what` after `timeout`."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def socket_address(port: int) -> dict:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def static_cluster(name: str, port: int) -> dict:
    return {"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": socket_address(port)}}]}]}}


def hcm_listener(name: str, port: int, routes: list, access_log: list | None = None,
                 stat_prefix: str = "ingress", **hcm_extra) -> dict:
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": stat_prefix, "codec_type": "AUTO",
           "route_config": {"virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": routes}]},
           "http_filters": [ROUTER]}
    if access_log:
        hcm["access_log"] = access_log
    hcm.update(hcm_extra)
    return {"name": name, "address": socket_address(port),
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}


# Holds a request until its body has arrived, as a real server reads it before answering.
BUFFER = {"name": "envoy.filters.http.buffer",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                           "max_request_bytes": 16 << 20}}


def direct_response_listener(name: str, port: int, body: str = "hello\n") -> dict:
    """A real HTTP upstream: an Envoy listener answering 200 with a fixed body once it has read
    the whole request. Answering before the body is in would end the front's stream early, a
    race an HTTP/2 client can see as a stream error (curl exit 92)."""
    return hcm_listener(name, port, [{"match": {"prefix": "/"},
                                      "direct_response": {"status": 200, "body": {"inline_string": body}}}],
                        stat_prefix=f"{name}_up", http_filters=[BUFFER, ROUTER])


def route(prefix: str, cluster: str, name: str | None = None) -> dict:
    r = {"match": {"prefix": prefix}, "route": {"cluster": cluster}}
    if name:
        r["name"] = name
    return r


def our_logger(name: str, logger_config: dict, so: pathlib.Path = ACCESS_LOG_SO, namespace: str = "obs") -> dict:
    """One of our access loggers (`logger_name` json or otlp) with a Struct config."""
    return {"name": "envoy.access_loggers.dynamic_modules",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.dynamic_modules.v3.DynamicModuleAccessLog",
                "dynamic_module_config": {"module": {"local": {"filename": str(so)}}, "metrics_namespace": namespace},
                "logger_name": name,
                "logger_config": {"@type": "type.googleapis.com/google.protobuf.Struct", "value": logger_config}}}


def our_json_logger(logger_config: dict, so: pathlib.Path = ACCESS_LOG_SO, namespace: str = "obs") -> dict:
    return our_logger("json", logger_config, so, namespace)


def our_otlp_logger(logger_config: dict, namespace: str = "obs") -> dict:
    return our_logger("otlp", logger_config, namespace=namespace)


def builtin_json_logger(path: str, json_format: dict) -> dict:
    return {"name": "envoy.access_loggers.file",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                             "path": path, "log_format": {"json_format": json_format}}}


def paired_loggers(tmp_path, json_format: dict, omit_empty_values: bool = False):
    """Envoy's built-in file logger and ours with the same `json_format`, for parity tests:
    returns (access_log list, built-in log path, our log path)."""
    builtin, ours = tmp_path / "builtin.log", tmp_path / "ours.log"
    b = builtin_json_logger(str(builtin), json_format)
    cfg = {"path": str(ours), "json_format": json_format}
    if omit_empty_values:
        b["typed_config"]["log_format"]["omit_empty_values"] = True
        cfg["omit_empty_values"] = True
    return [b, our_json_logger(cfg)], builtin, ours


def wait_lines(n: int, *paths) -> None:
    """Polls until every file holds `n` lines."""
    poll_until(lambda: all(count_lines(p) == n for p in paths), what=f"{n} lines in each of {[str(p) for p in paths]}")


def records_by_id(path) -> dict[str, dict]:
    """The file's JSON lines keyed by their `request_id` field."""
    return {r["request_id"]: r for r in read_json_lines(path)}


class Envoy:
    """One Envoy process. Use as a context manager; `quit()` shuts it down gracefully."""

    def __init__(self, workdir: pathlib.Path, static_resources: dict, concurrency: int = 1,
                 extra_bootstrap: dict | None = None, log_level: str = "info", env: dict | None = None,
                 stdout=None):
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.admin_port = free_port()
        bootstrap = {"admin": {"address": socket_address(self.admin_port)},
                     "static_resources": static_resources}
        bootstrap.update(extra_bootstrap or {})
        self.config_path = self.workdir / "envoy.yaml"
        self.config_path.write_text(json.dumps(bootstrap, indent=1))
        self.log_path = self.workdir / "envoy.log"
        self.concurrency = concurrency
        self.log_level = log_level
        self.env = env
        # Envoy's stdout: its log file (with stderr), or this file/socket object (stderr stays
        # in the log file).
        self.stdout = stdout
        self.proc: subprocess.Popen | None = None

    def command(self, mode: str | None = None) -> list[str]:
        cmd = [str(ENVOY_BIN), "-c", str(self.config_path), "--concurrency", str(self.concurrency),
               "--use-dynamic-base-id", "-l", self.log_level, "--disable-hot-restart",
               # The built-in file logger otherwise holds records for up to 10 s.
               "--file-flush-interval-msec", "200"]
        if mode:
            cmd += ["--mode", mode]
        return cmd

    def start(self, expect_ready: bool = True) -> "Envoy":
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, **(self.env or {}))
        out, err = (self._log, subprocess.STDOUT) if self.stdout is None else (self.stdout, self._log)
        self.proc = subprocess.Popen(self.command(), stdout=out, stderr=err, env=env)
        if expect_ready:
            poll_until(self._ready, timeout=20, what=f"Envoy ready (log: {self.log_path})")
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"Envoy exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def admin(self, path: str, method: str = "GET") -> str:
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method=method)
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read().decode()

    def stats(self, filter_re: str = "") -> dict[str, int]:
        out = {}
        for line in self.admin(f"/stats?filter={filter_re}").splitlines():
            k, _, v = line.partition(": ")
            try:
                out[k] = int(v)
            except ValueError:
                pass
        return out

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def quit(self, timeout: float = 30) -> int:
        if self.proc and self.proc.poll() is None:
            try:
                self.admin("/quitquitquit", method="POST")
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("Envoy did not exit after /quitquitquit")
        if getattr(self, "_log", None):
            self._log.close()
        return self.proc.returncode if self.proc else 0

    def run_to_exit(self, mode: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
        """Runs Envoy expecting it to exit by itself (validate mode, rejected config)."""
        env = dict(os.environ, **(self.env or {}))
        p = subprocess.run(self.command(mode), capture_output=True, text=True, timeout=timeout, env=env, errors="replace")
        self.log_path.write_text(p.stdout + p.stderr)
        return p

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()


def curl(url: str, *args: str, http2: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10"]
    if http2:
        cmd.append("--http2-prior-knowledge")
    return subprocess.run(cmd + list(args) + [url], capture_output=True, text=True, check=check)


def h2load(url: str, n: int, clients: int = 8, cpu: int | None = None, timeout: float = 600,
           rate: int | None = None, streams: int = 0) -> str:
    """Sends exactly `n` requests with h2load — HTTP/1.1 keep-alive, or with `streams` > 0
    HTTP/2 (prior knowledge) with up to that many concurrent streams per connection —
    optionally pinned to `cpu`, optionally paced at `rate` requests/s in total; returns h2load's
    report and fails unless every request succeeded."""
    proto = ["-m", str(streams)] if streams else ["--h1", "-m", "1"]
    cmd = (["taskset", "-c", str(cpu)] if cpu is not None else []) + [
        "h2load", *proto, "-n", str(n), "-c", str(clients), "-t", "1", url]
    if rate:
        cmd.insert(-1, f"--rps={max(1, rate // clients)}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout
    m = re.search(r"(\d+) succeeded", out)
    if not m or int(m.group(1)) != n:
        raise AssertionError(f"h2load did not complete every request:\n{out}")
    return out


def read_json_lines(path) -> list[dict]:
    """Every line must be one valid JSON object."""
    out = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            try:
                out.append(json.loads(raw))
            except ValueError as e:
                raise AssertionError(f"{path}:{i + 1} is not valid JSON ({e}): {raw[:200]!r}")
    return out


def count_lines(path) -> int:
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


# ----------------------------------------------------------------------------- tracing helpers
# See tests/OTEL_TRACER_NOTES.md (facts about Envoy's built-in OpenTelemetry tracer).

def router(start_child_span: bool = False) -> dict:
    """The router filter; `start_child_span` makes it start a CLIENT child span per upstream try."""
    r = {"name": "envoy.filters.http.router",
         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    if start_child_span:
        r["typed_config"]["start_child_span"] = True
    return r


def builtin_tracer(cluster: str = "otlp", service_name: str = "edge", **extra) -> dict:
    """Envoy's built-in `envoy.tracers.opentelemetry` provider (OTLP/gRPC through `cluster`)."""
    tc = {"@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
          "grpc_service": {"envoy_grpc": {"cluster_name": cluster}}, "service_name": service_name}
    tc.update(extra)
    return {"name": "envoy.tracers.opentelemetry", "typed_config": tc}


def our_tracer(config: dict, so: pathlib.Path = TRACER_SO, namespace: str = "obs",
               tracer_name: str = "opentelemetry") -> dict:
    """Our tracer (`libenvoy_obs_tracer.so`) as an HCM `tracing.provider`, with a Struct config."""
    return {"name": "envoy.tracers.dynamic_modules",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.tracers.dynamic_modules.v3.DynamicModuleTracer",
                "dynamic_module_config": {"module": {"local": {"filename": str(so)}}, "metrics_namespace": namespace},
                "tracer_name": tracer_name,
                "tracer_config": {"@type": "type.googleapis.com/google.protobuf.Struct", "value": config}}}


def hcm_tracing(provider: dict, sampling: float = 100, custom_tags: list | None = None, **extra) -> dict:
    """The HCM `tracing` block: `random_sampling` percent, the provider, custom_tags."""
    t = {"random_sampling": {"value": sampling}, "provider": provider}
    if custom_tags:
        t["custom_tags"] = custom_tags
    t.update(extra)
    return t


def min_flush_spans_runtime(n: int = 1) -> dict:
    """extra_bootstrap making the built-in OTel tracer export every `n` spans (default 5)."""
    return {"layered_runtime": {"layers": [{"name": "static", "static_layer": {
        "tracing.opentelemetry.min_flush_spans": n}}]}}


TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def parse_traceparent(value: str) -> tuple[str, str, str]:
    """'00-<trace id>-<parent id>-<flags>' -> (trace id, parent id, flags); fails if malformed."""
    m = TRACEPARENT_RE.match(value or "")
    if not m:
        raise AssertionError(f"not a valid traceparent: {value!r}")
    return m.group(1), m.group(2), m.group(3)


# ----------------------------------------------------------------------------- Prometheus server

class Prometheus:
    """A real Prometheus server (Debian's `prometheus`, installed by scripts/setup.sh) scraping
    `targets` (host:port strings) as job `job` every `scrape_interval`, with its TSDB under
    `workdir`. Use as a context manager; `query()` runs an instant query through the HTTP API."""

    def __init__(self, workdir: pathlib.Path, targets: list[str], job: str = "envoy",
                 scrape_interval: str = "1s", metrics_path: str = "/metrics"):
        import shutil
        self.binary = shutil.which("prometheus")
        assert self.binary, "scripts/setup.sh installs Debian's prometheus package"
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.job = job
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(json.dumps({
            "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval},
            "scrape_configs": [{"job_name": job, "metrics_path": metrics_path,
                                "static_configs": [{"targets": targets}]}]}))
        self.log_path = self.workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Prometheus":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([self.binary, f"--config.file={self.config_path}",
                                      f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=self._log)
        return self

    def api(self, path: str, **params) -> dict:
        """GET /api/v1/<path> with query parameters (lists repeat the key); returns `data`.
        Raises on HTTP or API errors (the message is Prometheus's)."""
        import urllib.error
        import urllib.parse
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise ValueError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query at the current time: the result vector (or [scalar] wrapped)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_up(self, timeout: float = 60) -> None:
        """Polls until every target of the job was scraped successfully."""
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"Prometheus exited:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                r = self.query(f'up{{job="{self.job}"}}')
            except (OSError, ValueError):
                return False
            return bool(r) and all(s["value"][1] == "1" for s in r)
        poll_until(up, timeout=timeout, interval=0.2, what=f"Prometheus targets up (log: {self.log_path})")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
