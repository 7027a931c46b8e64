"""A tiny threaded HTTP/1.1 upstream for tests that need to see what Envoy sends upstream.

    with EchoUpstream() as up:               # or EchoUpstream(status=503).start()
        ... route an Envoy cluster to 127.0.0.1:up.port ...
        up.requests[-1]["traceparent"]       # request headers, lower-cased names
        up.wait_for(3)                       # poll until 3 requests arrived

Every request (any method) is answered with `status` (200 by default; `set_status()` changes it)
and the body "echo\\n". `requests` holds one dict of lower-cased header name -> value per request,
plus ":method" and ":path"; a header sent more than once has its values joined with ",".
"""
from __future__ import annotations

import http.server
import socketserver
import threading
import time


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _serve(self):
        up: EchoUpstream = self.server.upstream
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        h: dict[str, str] = {":method": self.command, ":path": self.path}
        for k, v in self.headers.items():
            k = k.lower()
            h[k] = f"{h[k]},{v}" if k in h else v
        with up._lock:
            up.requests.append(h)
            status = up.status
        body = b"echo\n"
        self.send_response(status)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _serve

    def log_message(self, *args):  # quiet
        pass


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


class EchoUpstream:
    def __init__(self, status: int = 200, port: int = 0):
        self.status = status
        self.port = port
        self.requests: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._srv: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "EchoUpstream":
        srv = _Server(("127.0.0.1", self.port), _Handler)
        srv.upstream = self
        self._srv = srv
        self.port = srv.server_address[1]
        self._thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="echo-upstream")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._srv:
            self._srv.shutdown()
            self._srv.server_close()
            self._thread.join(timeout=5)
            self._srv = None

    def set_status(self, status: int) -> None:
        with self._lock:
            self.status = status

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[dict[str, str]]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if len(self.requests) >= n:
                    return list(self.requests)
            time.sleep(0.01)
        raise AssertionError(f"timed out after {timeout}s waiting for {n} upstream requests "
                             f"(got {len(self.requests)})")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
