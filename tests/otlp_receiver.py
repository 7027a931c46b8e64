"""A test OTLP receiver (collector stand-in) for pytest: an oracle independent of our Rust encoder.

Every request is decoded with the official `opentelemetry.proto` classes only.

    with OtlpReceiver("grpc") as rx:          # or OtlpReceiver("http")
        ... point a sender at rx.endpoint (http://127.0.0.1:PORT) ...
        recs = rx.wait_for(3, "logs")         # flat dicts, see log_records()
        rx.received("logs")[0].headers        # request headers of the first accepted export

gRPC (OTLP/gRPC) is served by grpcio (LogsService, TraceService and MetricsService /Export),
behind a small in-process HTTP/2 relay on the public port. grpcio does not show a handler the
request's reserved headers (grpc-encoding, content-type, te, :path...) or whether the message
arrived compressed, so the relay reads the client's HEADERS (HPACK) and the gRPC message prefix of
its DATA frames, tags each stream with a header of its own, and the handler joins the two. Every
other frame passes through untouched; grpcio itself decompresses gzip messages.

HTTP (OTLP/HTTP) is a threaded http.server taking POST /v1/logs, /v1/traces and /v1/metrics with
Content-Type application/x-protobuf, optionally Content-Encoding gzip; it answers with the
serialized Export*ServiceResponse (application/x-protobuf).

Scripted behaviour: `fail_next(n, ...)` fails the next n requests (gRPC status, optionally with a
google.rpc.RetryInfo in grpc-status-details-bin; HTTP status, optionally with Retry-After), and
`partial_success(rejected, message)` makes the next response report a partial success. Every
attempt, accepted or not, is in `attempts()`; accepted requests are in `received()`.
`stop()` then `start()` keeps the same port (a collector going down and coming back).
"""
from __future__ import annotations

import base64
import dataclasses
import gzip
import http.server
import select
import socket
import ssl
import threading
import time
import zlib
from concurrent import futures

import grpc
import hpack
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

SIGNALS = ("logs", "traces", "metrics")
HTTP_PATHS = {"/v1/logs": "logs", "/v1/traces": "traces", "/v1/metrics": "metrics"}
GRPC_PATHS = {"/opentelemetry.proto.collector.logs.v1.LogsService/Export": "logs",
              "/opentelemetry.proto.collector.trace.v1.TraceService/Export": "traces",
              "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export": "metrics"}
REQUEST_TYPES = {"logs": logs_service_pb2.ExportLogsServiceRequest,
                 "traces": trace_service_pb2.ExportTraceServiceRequest,
                 "metrics": metrics_service_pb2.ExportMetricsServiceRequest}
_TAG = "x-otlp-receiver-stream"  # the relay's per-stream tag; never shown in recorded headers


# ----------------------------------------------------------------------------- value helpers

def anyvalue_to_py(v):
    """AnyValue -> python, keeping the OTLP type distinguishable: string_value -> str,
    int_value -> int, double_value -> float, bool_value -> bool, kvlist_value -> dict,
    array_value -> list, bytes_value -> bytes, unset -> None."""
    if v is None:
        return None
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [anyvalue_to_py(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes_to_dict(v.kvlist_value.values)
    return getattr(v, kind)


def anyvalue_kind(v) -> str | None:
    """Which AnyValue field is set: "string_value", "int_value", ... or None."""
    return v.WhichOneof("value")


def attributes_to_dict(kvs) -> dict:
    """repeated KeyValue -> {key: python value} (see anyvalue_to_py)."""
    return {kv.key: anyvalue_to_py(kv.value) for kv in kvs}


def _hex(b: bytes) -> str:
    return b.hex()


# ----------------------------------------------------------------------------- flatteners

def flatten_logs(requests) -> list[dict]:
    """ExportLogsServiceRequest list -> one dict per LogRecord."""
    out = []
    for req in requests:
        for rl in req.resource_logs:
            resource = attributes_to_dict(rl.resource.attributes)
            for sl in rl.scope_logs:
                for lr in sl.log_records:
                    out.append({
                        "resource": resource, "resource_schema_url": rl.schema_url,
                        "scope": sl.scope.name, "scope_version": sl.scope.version,
                        "scope_attributes": attributes_to_dict(sl.scope.attributes),
                        "time_unix_nano": lr.time_unix_nano,
                        "observed_time_unix_nano": lr.observed_time_unix_nano,
                        "severity_number": lr.severity_number, "severity_text": lr.severity_text,
                        "body": anyvalue_to_py(lr.body) if lr.HasField("body") else None,
                        "attributes": attributes_to_dict(lr.attributes),
                        "dropped_attributes_count": lr.dropped_attributes_count,
                        "trace_id": _hex(lr.trace_id), "span_id": _hex(lr.span_id),
                        "flags": lr.flags, "event_name": lr.event_name,
                        "_record": lr,
                    })
    return out


def flatten_spans(requests) -> list[dict]:
    """ExportTraceServiceRequest list -> one dict per Span."""
    out = []
    for req in requests:
        for rs in req.resource_spans:
            resource = attributes_to_dict(rs.resource.attributes)
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    out.append({
                        "resource": resource, "scope": ss.scope.name, "scope_version": ss.scope.version,
                        "name": sp.name, "kind": sp.kind,
                        "trace_id": _hex(sp.trace_id), "span_id": _hex(sp.span_id),
                        "parent_span_id": _hex(sp.parent_span_id), "trace_state": sp.trace_state,
                        "flags": sp.flags,
                        "start_time_unix_nano": sp.start_time_unix_nano,
                        "end_time_unix_nano": sp.end_time_unix_nano,
                        "attributes": attributes_to_dict(sp.attributes),
                        "dropped_attributes_count": sp.dropped_attributes_count,
                        "status": {"code": sp.status.code, "message": sp.status.message},
                        "events": [{"name": e.name, "time_unix_nano": e.time_unix_nano,
                                    "attributes": attributes_to_dict(e.attributes)} for e in sp.events],
                        "links": [{"trace_id": _hex(l.trace_id), "span_id": _hex(l.span_id),
                                   "trace_state": l.trace_state,
                                   "attributes": attributes_to_dict(l.attributes)} for l in sp.links],
                        "_span": sp,
                    })
    return out


def _number(p):
    kind = p.WhichOneof("value")
    return getattr(p, kind) if kind else None


def flatten_metrics(requests) -> list[dict]:
    """ExportMetricsServiceRequest list -> one dict per data point. Common keys: resource, scope,
    name, description, unit, type ("gauge" | "sum" | "histogram" | "exponential_histogram" |
    "summary"), attributes, start_time_unix_nano, time_unix_nano, flags; then per type:
    gauge/sum: value (int for as_int, float for as_double), sum also is_monotonic and
    aggregation_temporality; histogram: count, sum, min, max (None when absent), bucket_counts,
    explicit_bounds, aggregation_temporality; exponential_histogram: count, sum, min, max, scale,
    zero_count, positive/negative {offset, bucket_counts}; summary: count, sum, quantiles."""
    out = []
    for req in requests:
        for rm in req.resource_metrics:
            resource = attributes_to_dict(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    base = {"resource": resource, "scope": sm.scope.name, "scope_version": sm.scope.version,
                            "name": m.name, "description": m.description, "unit": m.unit, "type": kind}
                    data = getattr(m, kind) if kind else None
                    for p in (data.data_points if data is not None else []):
                        d = dict(base, attributes=attributes_to_dict(p.attributes),
                                 start_time_unix_nano=p.start_time_unix_nano,
                                 time_unix_nano=p.time_unix_nano, flags=p.flags, _point=p)
                        if kind in ("gauge", "sum"):
                            d["value"] = _number(p)
                            if kind == "sum":
                                d["is_monotonic"] = data.is_monotonic
                                d["aggregation_temporality"] = data.aggregation_temporality
                        elif kind == "histogram":
                            d.update(count=p.count, sum=p.sum if p.HasField("sum") else None,
                                     min=p.min if p.HasField("min") else None,
                                     max=p.max if p.HasField("max") else None,
                                     bucket_counts=list(p.bucket_counts), explicit_bounds=list(p.explicit_bounds),
                                     aggregation_temporality=data.aggregation_temporality)
                        elif kind == "exponential_histogram":
                            d.update(count=p.count, sum=p.sum if p.HasField("sum") else None,
                                     min=p.min if p.HasField("min") else None,
                                     max=p.max if p.HasField("max") else None,
                                     scale=p.scale, zero_count=p.zero_count,
                                     positive={"offset": p.positive.offset, "bucket_counts": list(p.positive.bucket_counts)},
                                     negative={"offset": p.negative.offset, "bucket_counts": list(p.negative.bucket_counts)},
                                     aggregation_temporality=data.aggregation_temporality)
                        elif kind == "summary":
                            d.update(count=p.count, sum=p.sum,
                                     quantiles=[(q.quantile, q.value) for q in p.quantile_values])
                        out.append(d)
    return out


def _item_count(signal: str, req) -> int:
    if signal == "logs":
        return sum(len(sl.log_records) for rl in req.resource_logs for sl in rl.scope_logs)
    if signal == "traces":
        return sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
    n = 0
    for rm in req.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                if kind:
                    n += len(getattr(m, kind).data_points)
    return n


def _response(signal: str, rejected: int = 0, message: str = "", partial: bool = False):
    if signal == "logs":
        r = logs_service_pb2.ExportLogsServiceResponse()
        if partial:
            r.partial_success.rejected_log_records = rejected
            r.partial_success.error_message = message
    elif signal == "traces":
        r = trace_service_pb2.ExportTraceServiceResponse()
        if partial:
            r.partial_success.rejected_spans = rejected
            r.partial_success.error_message = message
    else:
        r = metrics_service_pb2.ExportMetricsServiceResponse()
        if partial:
            r.partial_success.rejected_data_points = rejected
            r.partial_success.error_message = message
    return r


def _rpc_status(code: int, message: str, retry_delay_s: float | None) -> status_pb2.Status:
    st = status_pb2.Status(code=code, message=message)
    if retry_delay_s is not None:
        d = duration_pb2.Duration()
        d.FromNanoseconds(int(retry_delay_s * 1e9))
        a = any_pb2.Any()
        a.Pack(error_details_pb2.RetryInfo(retry_delay=d))
        st.details.append(a)
    return st


def _grpc_code(code) -> grpc.StatusCode:
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, str):
        return grpc.StatusCode[code.upper()]
    for c in grpc.StatusCode:
        if c.value[0] == int(code):
            return c
    raise ValueError(f"unknown gRPC status code {code!r}")


def _text(b) -> str:
    if isinstance(b, str):
        return b
    try:
        return b.decode()
    except UnicodeDecodeError:
        return b.decode("latin-1")


# ----------------------------------------------------------------------------- records

@dataclasses.dataclass
class Received:
    """One accepted export request."""
    signal: str
    request: object            # the decoded Export*ServiceRequest
    time: float                # time.monotonic() when the whole request had arrived
    headers: dict              # lower-case name -> value (gRPC: incl. :path, content-type, grpc-encoding, te)
    body_size: int             # bytes of the (possibly compressed) body / gRPC message on the wire
    uncompressed_size: int     # bytes of the serialized protobuf
    encoding: str | None       # "gzip" when the body / gRPC message arrived compressed, else None
    items: int                 # log records / spans / metric data points in the request
    outcome: str               # "ok" or "partial"


@dataclasses.dataclass
class Attempt:
    """Every request that reached the receiver, accepted or failed by script."""
    signal: str
    time: float
    outcome: str               # "ok", "partial" or "fail"
    grpc_code: str | None      # gRPC status name ("OK", "UNAVAILABLE", ...) in gRPC mode
    http_status: int | None    # HTTP status in HTTP mode
    headers: dict
    body_size: int
    items: int


@dataclasses.dataclass
class _Failure:
    grpc_code: grpc.StatusCode
    http_status: int
    retry_after: float | None
    retry_delay_s: float | None
    signal: str | None


# ----------------------------------------------------------------------------- gRPC relay

class _H2Relay:
    """Listens on the public port and relays each connection to the internal grpcio server. The
    client->server direction is parsed into HTTP/2 frames: header blocks are HPACK-decoded,
    tagged with `_TAG` on a stream's first block and re-encoded (with a table-less encoder, so
    the server's decoder stays in step); DATA frames are read for the gRPC message prefix
    (compressed flag, length) and forwarded unchanged, as is every other frame."""

    PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

    def __init__(self, port: int, target_port: int, on_stream):
        self.target_port = target_port
        self.on_stream = on_stream  # (tag, info dict) -> None, info filled in place afterwards
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self._stopping = False
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._next_conn = 0
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="otlp-h2-relay")
        self._thread.start()

    def _accept_loop(self):
        while not self._stopping:
            try:
                r, _, _ = select.select([self.listener], [], [], 0.05)
                if not r:
                    continue
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stopping:
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
                self._next_conn += 1
                cid = self._next_conn
            threading.Thread(target=self._c2s, args=(cid, client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _close_pair(self, a, b):
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        with self._lock:
            self._conns.discard(a)
            self._conns.discard(b)

    def _pump(self, src, dst):
        try:
            while True:
                b = src.recv(65536)
                if not b:
                    break
                dst.sendall(b)
        except OSError:
            pass
        self._close_pair(src, dst)

    def _c2s(self, cid, client, upstream):
        decoder = hpack.Decoder()
        decoder.max_allowed_table_size = 1 << 24
        decoder.max_header_list_size = 1 << 24
        encoder = hpack.Encoder()
        encoder.header_table_size = 0  # no dynamic table: nothing to keep in step with the server
        buf = bytearray()
        preface_done = False
        pending = None  # (stream, flags, bytearray) while a header block spans CONTINUATIONs
        seen_streams: set[int] = set()
        streams: dict[int, dict] = {}  # stream -> sniffing state
        try:
            while True:
                chunk = client.recv(65536)
                if not chunk:
                    break
                buf += chunk
                out = bytearray()
                if not preface_done:
                    if len(buf) < len(self.PREFACE):
                        continue
                    out += buf[:len(self.PREFACE)]
                    del buf[:len(self.PREFACE)]
                    preface_done = True
                while len(buf) >= 9:
                    length = int.from_bytes(buf[0:3], "big")
                    if len(buf) < 9 + length:
                        break
                    ftype, flags = buf[3], buf[4]
                    sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                    frame = bytes(buf[:9 + length])
                    payload = frame[9:]
                    del buf[:9 + length]
                    if ftype == 0x1:  # HEADERS
                        if flags & 0x8:  # PADDED
                            payload = payload[1:len(payload) - payload[0]]
                        if flags & 0x20:  # PRIORITY
                            payload = payload[5:]
                        pending = (sid, flags, bytearray(payload))
                    elif ftype == 0x9 and pending is not None:  # CONTINUATION
                        pending[2].extend(payload)
                        flags = pending[1] | (flags & 0x4)
                    else:
                        if ftype == 0x0:  # DATA
                            self._sniff_data(streams.get(sid), payload, flags)
                        out += frame
                        continue
                    if not flags & 0x4:  # END_HEADERS not yet
                        continue
                    psid, pflags, block = pending
                    pending = None
                    headers = decoder.decode(bytes(block), raw=True)
                    if psid not in seen_streams:
                        seen_streams.add(psid)
                        tag = f"{cid}-{psid}"
                        info = {"headers": [(_text(k), _text(v)) for k, v in headers],
                                "compressed": None, "message_size": None, "data_bytes": 0,
                                "_prefix": bytearray()}
                        streams[psid] = info
                        self.on_stream(tag, info)
                        headers = list(headers) + [(_TAG.encode(), tag.encode())]
                    out += self._header_frames(psid, pflags & 0x1, encoder.encode(headers, huffman=True))
                if out:
                    upstream.sendall(out)
        except (OSError, hpack.HPACKError):
            pass
        self._close_pair(client, upstream)

    @staticmethod
    def _sniff_data(info, payload, flags):
        if info is None:
            return
        if flags & 0x8 and payload:  # PADDED
            payload = payload[1:len(payload) - payload[0]]
        info["data_bytes"] += len(payload)
        pre = info["_prefix"]
        if len(pre) < 5:
            pre += payload[:5 - len(pre)]
            if len(pre) == 5:
                info["compressed"] = bool(pre[0])
                info["message_size"] = int.from_bytes(pre[1:5], "big")

    @staticmethod
    def _header_frames(sid: int, end_stream: int, block: bytes, max_frame: int = 16384) -> bytes:
        out = bytearray()
        chunks = [block[i:i + max_frame] for i in range(0, len(block), max_frame)] or [b""]
        for i, c in enumerate(chunks):
            ftype = 0x1 if i == 0 else 0x9
            flags = (end_stream if i == 0 else 0) | (0x4 if i == len(chunks) - 1 else 0)
            out += len(c).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + c
        return bytes(out)

    def close(self):
        self._stopping = True
        self._thread.join(timeout=5)
        self.listener.close()
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


# ----------------------------------------------------------------------------- HTTP server

class _HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "otlp-test-receiver"

    def setup(self):
        super().setup()
        with self.server.conns_lock:
            self.server.conns.add(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            with self.server.conns_lock:
                self.server.conns.discard(self.connection)

    def log_message(self, *args):
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        rx: OtlpReceiver = self.server.receiver
        raw = self._read_body()
        path = self.path.split("?")[0]
        signal = HTTP_PATHS.get(path)
        if signal is None:
            return self._send(404)
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/x-protobuf":
            return self._send(415)
        enc = self.headers.get("Content-Encoding", "").strip().lower() or None
        try:
            if enc == "gzip":
                body = gzip.decompress(raw)
            elif enc == "deflate":
                body = zlib.decompress(raw)
            elif enc in (None, "identity"):
                body, enc = raw, None
            else:
                return self._send(415)
            req = REQUEST_TYPES[signal].FromString(body)
        except (OSError, EOFError, zlib.error, DecodeError):
            return self._send(400, _rpc_status(3, "undecodable body", None).SerializeToString())
        headers = {k.lower(): v for k, v in self.headers.items()}
        verdict = rx._decide(signal, time.monotonic(), headers, len(raw), req, len(body), enc, http_status=200)
        if verdict[0] == "fail":
            f: _Failure = verdict[1]
            extra = {}
            if f.retry_after is not None:
                extra["Retry-After"] = str(int(f.retry_after) if float(f.retry_after).is_integer() else f.retry_after)
            st = _rpc_status(f.grpc_code.value[0], "scripted failure", f.retry_delay_s)
            return self._send(f.http_status, st.SerializeToString(), extra)
        self._send(200, verdict[1].SerializeToString())


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


# ----------------------------------------------------------------------------- receiver

class OtlpReceiver:
    """See the module docstring. Thread-safe; all times are time.monotonic()."""

    def __init__(self, protocol: str = "grpc", port: int | None = None, tls: "ssl.SSLContext | None" = None):
        if protocol not in ("grpc", "http"):
            raise ValueError("protocol must be 'grpc' or 'http'")
        self.protocol = protocol
        self.port = port
        self.tls = tls  # HTTP mode only: a server-side SSLContext (HTTPS, optionally mTLS)
        self._cv = threading.Condition()
        self._received: dict[str, list[Received]] = {s: [] for s in SIGNALS}
        self._attempts: list[Attempt] = []
        self._failures: list[_Failure] = []
        self._partials: list[tuple[int, str]] = []
        self._streams: dict[str, dict] = {}
        self._grpc_server = None
        self._relay = None
        self._http = None
        self._http_thread = None

    # -- lifecycle
    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def url(self, signal: str = "logs") -> str:
        """OTLP/HTTP URL of a signal, e.g. http://127.0.0.1:PORT/v1/logs."""
        return f"{self.endpoint}/v1/{signal}"

    @property
    def running(self) -> bool:
        return bool(self._relay or self._http)

    def start(self) -> "OtlpReceiver":
        if self.running:
            return self
        if self.protocol == "grpc":
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                                 options=[("grpc.so_reuseport", 0),
                                          ("grpc.max_receive_message_length", 64 << 20)])
            logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_LogsServicer(self), server)
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceServicer(self), server)
            metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsServicer(self), server)
            internal = server.add_insecure_port("127.0.0.1:0")
            server.start()
            self._grpc_server = server
            self._relay = _H2Relay(self.port or 0, internal, self._register_stream)
            self.port = self._relay.port
        else:
            srv = _HttpServer(("127.0.0.1", self.port or 0), _HttpHandler)
            if self.tls is not None:
                srv.socket = self.tls.wrap_socket(srv.socket, server_side=True)
            srv.receiver = self
            srv.conns = set()
            srv.conns_lock = threading.Lock()
            self._http = srv
            self.port = srv.server_address[1]
            self._http_thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                                 daemon=True, name="otlp-http")
            self._http_thread.start()
        return self

    def stop(self) -> None:
        """Closes the port and every open connection (the port number is kept for start())."""
        if self._relay:
            self._relay.close()
            self._relay = None
        if self._grpc_server:
            self._grpc_server.stop(0).wait(5)
            self._grpc_server = None
        if self._http:
            self._http.shutdown()
            with self._http.conns_lock:
                conns = list(self._http.conns)
            for c in conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._http.server_close()
            self._http_thread.join(timeout=5)
            self._http = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- scripting
    def fail_next(self, n: int = 1, grpc_code=grpc.StatusCode.UNAVAILABLE, http_status: int = 503,
                  retry_after: float | None = None, retry_delay_s: float | None = None,
                  signal: str | None = None) -> None:
        """The next `n` requests (of `signal`, or of any signal) fail: gRPC with `grpc_code`
        (a grpc.StatusCode, its name or its number), plus a google.rpc.RetryInfo of
        `retry_delay_s` in grpc-status-details-bin when given; HTTP with `http_status`, plus
        `Retry-After: <retry_after>` when given, and a google.rpc.Status body."""
        f = _Failure(_grpc_code(grpc_code), http_status, retry_after, retry_delay_s, signal)
        with self._cv:
            self._failures.extend([f] * n)

    def partial_success(self, rejected: int, message: str = "", n: int = 1) -> None:
        """The next `n` accepted responses report a partial success with `rejected` records."""
        with self._cv:
            self._partials.extend([(rejected, message)] * n)

    def clear(self) -> None:
        """Forgets every received request and attempt (scripts stay)."""
        with self._cv:
            for s in SIGNALS:
                self._received[s].clear()
            self._attempts.clear()

    # -- called by the servers
    def _register_stream(self, tag: str, info: dict) -> None:
        with self._cv:
            self._streams[tag] = info

    def _take_stream(self, metadata) -> dict | None:
        tag = dict(metadata).get(_TAG)
        with self._cv:
            return self._streams.pop(tag, None) if tag else None

    def _decide(self, signal, now, headers, body_size, req, uncompressed, encoding, http_status=None):
        items = _item_count(signal, req)
        with self._cv:
            fail = next((f for f in self._failures if f.signal in (None, signal)), None)
            if fail is not None:
                self._failures.remove(fail)
                self._attempts.append(Attempt(signal, now, "fail", fail.grpc_code.name if http_status is None else None,
                                              fail.http_status if http_status is not None else None,
                                              headers, body_size, items))
                self._cv.notify_all()
                return ("fail", fail)
            partial = self._partials.pop(0) if self._partials else None
            outcome = "partial" if partial else "ok"
            self._received[signal].append(Received(signal, req, now, headers, body_size, uncompressed,
                                                   encoding, items, outcome))
            self._attempts.append(Attempt(signal, now, outcome, "OK" if http_status is None else None,
                                          http_status, headers, body_size, items))
            self._cv.notify_all()
        if partial:
            return ("ok", _response(signal, partial[0], partial[1], partial=True))
        return ("ok", _response(signal))

    def _grpc_export(self, signal: str, req, context):
        now = time.monotonic()
        md = context.invocation_metadata()
        info = self._take_stream(md)
        if info is not None:
            headers = {}
            for k, v in info["headers"]:
                headers[k.lower()] = v
            compressed = bool(info["compressed"])
            body_size = info["message_size"] if info["message_size"] is not None else req.ByteSize()
        else:  # not through the relay: only what grpcio shows
            headers = {k: (v if isinstance(v, str) else base64.b64encode(v).decode()) for k, v in md}
            compressed, body_size = False, req.ByteSize()
        encoding = headers.get("grpc-encoding", "gzip") if compressed else None
        verdict = self._decide(signal, now, headers, body_size, req, req.ByteSize(), encoding)
        if verdict[0] == "fail":
            f: _Failure = verdict[1]
            if f.retry_delay_s is not None:
                st = _rpc_status(f.grpc_code.value[0], "scripted failure", f.retry_delay_s)
                context.set_trailing_metadata((("grpc-status-details-bin", st.SerializeToString()),))
            context.abort(f.grpc_code, "scripted failure")
        return verdict[1]

    # -- results
    def received(self, signal: str = "logs") -> list[Received]:
        """Accepted requests of a signal, in arrival order."""
        with self._cv:
            return list(self._received[signal])

    def requests(self, signal: str = "logs") -> list:
        """The decoded Export*ServiceRequest messages of a signal, in arrival order."""
        return [r.request for r in self.received(signal)]

    def attempts(self, signal: str | None = None) -> list[Attempt]:
        """Every request that reached a handler (accepted or failed by script), in order."""
        with self._cv:
            return [a for a in self._attempts if signal in (None, a.signal)]

    def count(self, signal: str = "logs") -> int:
        """Log records / spans / metric data points accepted so far."""
        with self._cv:
            return sum(r.items for r in self._received[signal])

    def log_records(self) -> list[dict]:
        return flatten_logs(self.requests("logs"))

    def spans(self) -> list[dict]:
        return flatten_spans(self.requests("traces"))

    def metrics(self) -> list[dict]:
        return flatten_metrics(self.requests("metrics"))

    def items(self, signal: str) -> list[dict]:
        return {"logs": self.log_records, "traces": self.spans, "metrics": self.metrics}[signal]()

    def wait_for(self, n: int, signal: str = "logs", timeout: float = 10.0) -> list[dict]:
        """Waits until at least `n` items of `signal` were accepted; returns them flattened."""
        end = time.monotonic() + timeout
        with self._cv:
            while sum(r.items for r in self._received[signal]) < n:
                left = end - time.monotonic()
                if left <= 0:
                    got = sum(r.items for r in self._received[signal])
                    raise AssertionError(f"timed out after {timeout}s waiting for {n} {signal} items "
                                         f"(got {got}; attempts: {len(self._attempts)})")
                self._cv.wait(left)
        return self.items(signal)

    def wait_attempts(self, n: int, signal: str | None = None, timeout: float = 10.0) -> list[Attempt]:
        """Waits until at least `n` attempts (of `signal`) reached the receiver; returns them."""
        end = time.monotonic() + timeout
        with self._cv:
            while len([a for a in self._attempts if signal in (None, a.signal)]) < n:
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {n} attempts "
                                         f"(got {len(self._attempts)})")
                self._cv.wait(left)
        return self.attempts(signal)


class _LogsServicer(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, rx):
        self.rx = rx

    def Export(self, request, context):
        return self.rx._grpc_export("logs", request, context)


class _TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, rx):
        self.rx = rx

    def Export(self, request, context):
        return self.rx._grpc_export("traces", request, context)


class _MetricsServicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, rx):
        self.rx = rx

    def Export(self, request, context):
        return self.rx._grpc_export("metrics", request, context)


# ----------------------------------------------------------------------------- Envoy config helpers
# Envoy's built-in OTLP senders, as used in tests/test_otlp_receiver.py and described in
# tests/OTEL_BUILTIN_NOTES.md; handy for parity tests against our modules.

OTEL_ACCESS_LOG_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.open_telemetry.v3.OpenTelemetryAccessLogConfig"


def h2_cluster(name: str, port: int) -> dict:
    """A STATIC cluster to 127.0.0.1:port speaking HTTP/2 (prior knowledge): the gRPC collector."""
    return {"name": name, "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


def kvlist(d: dict) -> dict:
    """{key: format string} -> KeyValueList JSON with string_value formats."""
    return {"values": [{"key": k, "value": {"string_value": v}} for k, v in d.items()]}


def builtin_otel_access_logger(cluster: str = "otlp", attributes: dict | None = None,
                               body: str | dict | None = "%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE%",
                               resource_attributes: dict | None = None, transport: str = "common_config",
                               log_name: str = "otel_als", http_uri: str | None = None,
                               http_headers: dict | None = None, **extra) -> dict:
    """Envoy's built-in `envoy.access_loggers.open_telemetry` access-log entry.
    transport: "common_config" (deprecated in 1.40 but works; gRPC), "grpc_service" (gRPC) or
    "http_service" (OTLP/HTTP POST to `http_uri` through `cluster`, plus `http_headers`).
    `extra` goes into the typed_config as is (buffer_flush_interval, buffer_size_bytes, ...)."""
    tc = {"@type": OTEL_ACCESS_LOG_TYPE}
    if transport == "common_config":
        tc["common_config"] = {"log_name": log_name, "transport_api_version": "V3",
                               "grpc_service": {"envoy_grpc": {"cluster_name": cluster}}}
    elif transport == "grpc_service":
        tc["grpc_service"] = {"envoy_grpc": {"cluster_name": cluster}}
        tc["log_name"] = log_name
    elif transport == "http_service":
        tc["http_service"] = {"http_uri": {"uri": http_uri, "cluster": cluster, "timeout": "2s"},
                              "request_headers_to_add": [{"header": {"key": k, "value": v}}
                                                         for k, v in (http_headers or {}).items()]}
        tc["log_name"] = log_name
    else:
        raise ValueError(transport)
    if body is not None:
        tc["body"] = {"string_value": body} if isinstance(body, str) else body
    if attributes:
        tc["attributes"] = kvlist(attributes)
    if resource_attributes:
        tc["resource_attributes"] = kvlist(resource_attributes)
    tc.update(extra)
    return {"name": "envoy.access_loggers.open_telemetry", "typed_config": tc}
