"""Our OpenTelemetry tracer (`libenvoy_obs_tracer.so`, `tracer_name: opentelemetry`) on a real
Envoy 1.40.0, next to Envoy's built-in `envoy.tracers.opentelemetry`.

Spans are received by tests/otlp_receiver.py, which decodes with the official opentelemetry-proto
classes. The upstream is tests/echo_upstream.py, which records the headers Envoy sends it. The
facts about the built-in tracer that these tests rely on are in tests/OTEL_TRACER_NOTES.md and
are asserted by the `test_builtin_*` tests, which need only Envoy.

Layout of every Envoy here (`tracing_envoy`): one HCM listener per tracer, each with the router's
`start_child_span: true` and routes
  /ok      -> cluster `backend` (the echo upstream; its status can be changed),
  /down    -> cluster `dead` (a closed port: 503 UF),
  /direct  -> direct_response 200 (no upstream, a single span; for load),
  anything else -> no route (404 NR).
"""
from __future__ import annotations

import contextlib
import os
import time
import urllib.parse
import uuid

import pytest

from echo_upstream import EchoUpstream
from harness import (Envoy, builtin_tracer, curl, free_port, h2load, hcm_listener, hcm_tracing,
                     min_flush_spans_runtime, our_tracer, parse_traceparent, poll_until, route, router,
                     static_cluster)
from otlp_receiver import OtlpReceiver, h2_cluster

SERVER, CLIENT = 2, 3
UNSET, ERROR = 0, 2
TAGS = [{"tag": "lit", "literal": {"value": "v1"}},
        {"tag": "hdr", "request_header": {"name": "x-hdr", "default_value": "nohdr"}},
        {"tag": "envtag", "environment": {"name": "OBS_TAG_ENV", "default_value": "noenv"}}]
TAG_ENV = {"OBS_TAG_ENV": "envval"}
TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
B3_TRACE, B3_SPAN = "80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1"
B3_TRACE2 = "463ac35c9f6413ad48485a3953bb6124"
B3_TRACE3, B3_TRACE4 = "a1f198ee56343ba864fe8b2a57d3eff7", "b2f198ee56343ba864fe8b2a57d3eff7"
SETTLE = 0.6  # > several of our flush intervals (100 ms): time for unexpected spans to show up


def tp(trace=TRACE, parent=PARENT, flags="01") -> str:
    return f"00-{trace}-{parent}-{flags}"


# ----------------------------------------------------------------------------- set-up helpers

def ours_config(rx: OtlpReceiver, **extra) -> dict:
    """Our tracer's Struct config exporting to `rx`, quick to flush and to give up."""
    cfg = {"service_name": "edge", "endpoint": rx.endpoint,
           "protocol": "grpc" if rx.protocol == "grpc" else "http/protobuf",
           "flush_interval_ms": 100, "timeout_ms": 2000,
           "retry": {"initial_backoff_ms": 50, "max_backoff_ms": 200, "max_elapsed_ms": 2000}}
    cfg.update(extra)
    return cfg


def tracing_listener(name: str, port: int, provider: dict, sampling: float = 100,
                     custom_tags: list | None = TAGS, start_child_span: bool = True, egress: bool = False,
                     filters: list | None = None, spawn_upstream_span: bool = False) -> dict:
    """`/ok` to the upstream, `/down` to a dead one, `/direct` answered by Envoy, `/grpc<N>`
    answered by Envoy with `grpc-status: N`. `egress`: an outbound listener (Envoy then names
    the HCM's span `egress <host>`). `spawn_upstream_span`: the HCM's way to a client span per
    upstream request (the router's `start_child_span` is deprecated in 1.40)."""
    grpc = [{"match": {"prefix": f"/grpc{n}"}, "direct_response": {"status": 200},
             "response_headers_to_add": [{"header": {"key": "grpc-status", "value": str(n)}}]} for n in (5, 14, 4294967296)]
    routes = [route("/ok", "backend", name="ok_route"), route("/down", "dead", name="down_route"),
              {"match": {"prefix": "/direct"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}},
              *grpc]
    lst = hcm_listener(name, port, routes, stat_prefix="ingress", http_filters=[*(filters or []), router(start_child_span)],
                       tracing=hcm_tracing(provider, sampling, custom_tags,
                                           **({"spawn_upstream_span": True} if spawn_upstream_span else {})))
    if egress:
        lst["traffic_direction"] = "OUTBOUND"
    return lst


def tracing_envoy(tmp_path, up: EchoUpstream | None, listeners: dict[str, dict], builtin_rx: OtlpReceiver | None = None,
                  env: dict | None = None, concurrency: int = 1, **listener_kw) -> tuple[Envoy, dict[str, int]]:
    """An Envoy with one traced listener per entry of `listeners` (name -> provider, or
    name -> (provider, {tracing_listener kwargs})); returns it (not started) and the ports.
    `builtin_rx` adds the `otlp` cluster the built-in tracer exports through."""
    ports, ls = {}, []
    for name, spec in listeners.items():
        provider, kw = spec if isinstance(spec, tuple) else (spec, {})
        ports[name] = free_port()
        ls.append(tracing_listener(name, ports[name], provider, **{**listener_kw, **kw}))
    clusters = [static_cluster("backend", up.port if up else free_port()), static_cluster("dead", free_port())]
    if builtin_rx is not None:
        clusters.append(h2_cluster("otlp", builtin_rx.port))
    e = Envoy(tmp_path, {"listeners": ls, "clusters": clusters}, concurrency=concurrency,
              extra_bootstrap=min_flush_spans_runtime(1), env=dict(TAG_ENV, **(env or {})))
    return e, ports


def get(port: int, path: str, *args: str, case: str | None = None) -> str:
    """curl with a fixed Host (so `http.url` does not name the listener's port); `case` goes in
    an `x-case` header, which the upstream records."""
    extra = ["-H", "host: edge.test"] + (["-H", f"x-case: {case}"] if case else [])
    return curl(f"http://127.0.0.1:{port}{path}", *extra, *args).stdout


def upstream_by_case(up: EchoUpstream) -> dict[str, dict]:
    return {r["x-case"]: r for r in up.requests if "x-case" in r}


def traces(spans: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for s in spans:
        out.setdefault(s["trace_id"], []).append(s)
    return out


def root_of(group: list[dict]) -> dict:
    ids = {s["span_id"] for s in group}
    roots = [s for s in group if s["parent_span_id"] not in ids]
    assert len(roots) == 1, f"expected one root span in {[(s['name'], s['span_id'], s['parent_span_id']) for s in group]}"
    return roots[0]


def by_case(spans: list[dict]) -> dict[str, list[dict]]:
    """Traces keyed by the `case` query parameter of their root span's `http.url`."""
    out = {}
    for group in traces(spans).values():
        url = root_of(group)["attributes"].get("http.url", "")
        case = urllib.parse.parse_qs(urllib.parse.urlparse(url).query).get("case", ["?"])[0]
        assert case not in out, f"two traces for case {case!r}"
        out[case] = group
    return out


def shape(group: list[dict]) -> list[dict]:
    """What parity compares: per span (SERVER first) name, kind, parent (by name, or the remote
    parent's id), attributes with their types, status, flags, trace_state, event names, links."""
    names = {s["span_id"]: s["name"] for s in group}
    out = []
    for s in sorted(group, key=lambda s: (s["kind"], s["name"])):
        p = s["parent_span_id"]
        out.append({"name": s["name"], "kind": s["kind"],
                    "parent": names.get(p, f"remote:{p}" if p else None),
                    "attributes": {k: (type(v).__name__, v) for k, v in s["attributes"].items()},
                    "status": s["status"], "flags": s["flags"], "trace_state": s["trace_state"],
                    "events": [e["name"] for e in s["events"]], "links": len(s["links"])})
    return out


def shape_diff(case: str, builtin: list[dict], ours: list[dict]) -> list[str]:
    """Readable differences between two shapes: one line per differing field or attribute."""
    if [(s["kind"], s["name"]) for s in builtin] != [(s["kind"], s["name"]) for s in ours]:
        return [f"{case}: spans (kind, name) built-in {[(s['kind'], s['name']) for s in builtin]}, "
                f"ours {[(s['kind'], s['name']) for s in ours]}"]
    out = []
    for b, o in zip(builtin, ours):
        where = f"{case}: {b['name']!r}"
        for k in b:
            if k == "attributes":
                for a in sorted(set(b[k]) | set(o[k])):
                    if b[k].get(a) != o[k].get(a):
                        out.append(f"{where} attribute {a!r}: built-in {b[k].get(a)}, ours {o[k].get(a)}")
            elif b[k] != o[k]:
                out.append(f"{where} {k}: built-in {b[k]!r}, ours {o[k]!r}")
    return out


def assert_nested_times(group: list[dict]) -> None:
    root = root_of(group)
    assert 1.7e18 < root["start_time_unix_nano"] <= root["end_time_unix_nano"]
    for s in group:
        if s is not root:
            assert root["start_time_unix_nano"] <= s["start_time_unix_nano"] <= s["end_time_unix_nano"] \
                <= root["end_time_unix_nano"], (s["name"], s["start_time_unix_nano"], s["end_time_unix_nano"])


def assert_upstream_saw_client_span(group: list[dict], upstream_request: dict) -> None:
    """The upstream's traceparent is valid and its parent-id is the CLIENT span's id."""
    client = [s for s in group if s["kind"] == CLIENT]
    assert len(client) == 1, [s["name"] for s in group]
    trace, parent, flags = parse_traceparent(upstream_request.get("traceparent"))
    assert (trace, parent, flags) == (client[0]["trace_id"], client[0]["span_id"], "01")


def our_stats(e: Envoy, prefix: str = "otel") -> dict[str, int]:
    p = f"obs.tracer.{prefix}."
    return {k.removeprefix(p): v for k, v in e.stats(p.replace(".", r"\.")).items() if k.startswith(p)}


def drained(e: Envoy, prefix: str = "otel", sampled: int | None = None, timeout: float = 30) -> dict[str, int]:
    """Waits until every sampled span is exported, dropped or failed (and, when given, until
    `sampled` spans were sampled); returns the counters."""
    def settled():
        s = our_stats(e, prefix)
        if sampled is not None and s.get("spans_sampled") != sampled:
            return None
        done = s.get("spans_exported", 0) + s.get("spans_dropped", 0) + s.get("spans_failed", 0)
        return s if "spans_sampled" in s and done == s["spans_sampled"] else None
    return poll_until(settled, timeout=timeout, what=f"obs.tracer.{prefix}: exported + dropped + failed == sampled")


def unique_span_ids(rx: OtlpReceiver) -> set[str]:
    return {s["span_id"] for s in rx.spans()}


@contextlib.contextmanager
def receivers(*protocols: str):
    with contextlib.ExitStack() as st:
        yield [st.enter_context(OtlpReceiver(p)) for p in protocols]


# ----------------------------------------------------------------------------- the built-in alone

BUILTIN_ROOT_KEYS = {"node_id", "zone", "guid:x-request-id", "http.url", "http.method", "downstream_cluster",
                     "user_agent", "http.protocol", "peer.address", "request_size", "response_size", "component",
                     "upstream_cluster", "upstream_cluster.name", "http.status_code", "response_flags"}
BUILTIN_CHILD_KEYS = {"http.protocol", "upstream_address", "peer.address", "component", "upstream_cluster",
                      "upstream_cluster.name", "http.status_code", "response_flags"}
CUSTOM = {"lit", "hdr", "envtag"}


def test_builtin_tracer_spans_attributes_and_status(tmp_path):
    """Checks the helpers and the facts in OTEL_TRACER_NOTES.md (spans, attributes, status rule,
    resource, scope, flags) on the built-in tracer alone."""
    with OtlpReceiver("grpc") as rx, EchoUpstream() as up:
        e, ports = tracing_envoy(tmp_path, up, {"b": builtin_tracer()}, builtin_rx=rx)
        with e:
            p = ports["b"]
            assert get(p, "/ok?x=1&case=ok", "-H", "x-hdr: hv") == "200"
            assert get(p, "/nope?case=no_route") == "404"
            assert get(p, "/down?case=down") == "503"
            up.set_status(404)
            assert get(p, "/ok?case=up404") == "404"
            up.set_status(500)
            assert get(p, "/ok?case=up500") == "500"
            up.set_status(200)
            spans = rx.wait_for(9, "traces")
            stats = e.stats("tracing.opentelemetry")
        cases = by_case(spans)
        assert set(cases) == {"ok", "no_route", "down", "up404", "up500"}
        for group in cases.values():
            assert_nested_times(group)
            for s in group:
                assert s["resource"] == {"service.name": "edge", "telemetry.sdk.name": "envoy",
                                         "telemetry.sdk.language": "cpp",
                                         "telemetry.sdk.version": s["scope_version"]}
                assert s["scope"] == "envoy" and "/1.40.0/" in s["scope_version"]
                assert s["flags"] == 0x101 and s["trace_state"] == "" and s["events"] == [] and s["links"] == []
                assert all(isinstance(v, str) for v in s["attributes"].values())
                assert s["status"]["message"] == ""

        def pair(case):
            g = cases[case]
            root = root_of(g)
            kids = [s for s in g if s is not root]
            return root, (kids[0] if kids else None)

        root, child = pair("ok")
        assert (root["name"], root["kind"], root["parent_span_id"]) == ("ingress", SERVER, "")
        assert (child["name"], child["kind"], child["parent_span_id"]) == ("router backend egress", CLIENT, root["span_id"])
        assert set(root["attributes"]) == BUILTIN_ROOT_KEYS | CUSTOM
        assert set(child["attributes"]) == BUILTIN_CHILD_KEYS | CUSTOM
        assert root["attributes"]["http.url"] == "http://edge.test/ok?x=1&case=ok"
        assert root["attributes"]["http.status_code"] == child["attributes"]["http.status_code"] == "200"
        assert root["attributes"]["hdr"] == child["attributes"]["hdr"] == "hv"
        assert root["attributes"]["lit"] == child["attributes"]["lit"] == "v1"
        assert root["attributes"]["envtag"] == child["attributes"]["envtag"] == "envval"
        assert child["attributes"]["upstream_address"] == f"127.0.0.1:{up.port}"

        root, child = pair("no_route")
        assert child is None and root["attributes"]["response_flags"] == "NR"
        assert "upstream_cluster" not in root["attributes"]

        root, child = pair("down")
        assert child["name"] == "router dead egress"
        assert root["attributes"]["error"] == "true" and root["attributes"]["response_flags"] == "UF"
        assert child["attributes"]["http.status_code"] == "0" and child["attributes"]["error"] == "true"
        assert child["attributes"]["error.reason"] == "remote connection failure"

        # Status: SERVER >= 500, CLIENT >= 400, from http.status_code only (not the `error` tag).
        status = {c: tuple(s["status"]["code"] for s in pair(c) if s is not None) for c in cases}
        assert status == {"ok": (UNSET, UNSET), "no_route": (UNSET,), "down": (ERROR, UNSET),
                          "up404": (UNSET, ERROR), "up500": (ERROR, ERROR)}
        assert "error" not in pair("up404")[1]["attributes"]
        assert stats["tracing.opentelemetry.spans_sent"] == 9


def test_builtin_tracer_propagation_and_sampling(tmp_path):
    """What the upstream receives from the built-in, and its sampling with an incoming traceparent."""
    with OtlpReceiver("grpc") as rx, EchoUpstream() as up:
        e, ports = tracing_envoy(tmp_path, up, {"b": builtin_tracer(),
                                                "zero": (builtin_tracer(), {"sampling": 0}),
                                                "nochild": (builtin_tracer(), {"start_child_span": False})},
                                 builtin_rx=rx)
        with e:
            b, zero, nochild = ports["b"], ports["zero"], ports["nochild"]
            get(b, "/ok?case=plain", case="plain")
            get(b, "/ok?case=tp01", "-H", f"traceparent: {tp()}", "-H", "tracestate: vendor=abc,other=x",
                "-H", "baggage: k1=v1,k2=v2", case="tp01")
            get(b, "/ok?case=tp00", "-H", f"traceparent: {tp(flags='00')}", case="tp00")
            get(b, "/ok?case=b3", "-H", f"b3: {B3_TRACE}-{B3_SPAN}-1", case="b3")
            get(b, "/ok?case=b3multi", "-H", f"x-b3-traceid: {B3_TRACE}", "-H", f"x-b3-spanid: {B3_SPAN}",
                "-H", "x-b3-sampled: 1", case="b3multi")
            get(zero, "/ok?case=zero01", "-H", f"traceparent: {tp(flags='01')}", case="zero01")
            get(zero, "/ok?case=zero", case="zero")
            get(nochild, "/ok?case=nochild", case="nochild")
            # The last request is a barrier: spans are sent one by one, in order.
            spans = rx.wait_for(9, "traces")
            time.sleep(SETTLE)
            spans = rx.spans()
        cases = by_case(spans)
        assert set(cases) == {"plain", "tp01", "b3", "b3multi", "nochild"}, "00 and random_sampling 0: nothing"
        assert [s["name"] for s in cases["nochild"]] == ["ingress"]
        ups = upstream_by_case(up)
        for c in ("plain", "tp01", "b3", "b3multi"):
            assert_upstream_saw_client_span(cases[c], ups[c])
        assert ups["plain"]["tracestate"] == "", "an empty tracestate header is always sent"
        # Continued: same trace id, root's parent = incoming span id, trace_state on both spans.
        root = root_of(cases["tp01"])
        assert (root["trace_id"], root["parent_span_id"], root["flags"]) == (TRACE, PARENT, 0x301)
        assert {s["trace_state"] for s in cases["tp01"]} == {"vendor=abc,other=x"}
        assert ups["tp01"]["tracestate"] == "vendor=abc,other=x" and ups["tp01"]["baggage"] == "k1=v1,k2=v2"
        # B3 is ignored (a new trace), and passed through untouched.
        for c in ("b3", "b3multi"):
            assert root_of(cases[c])["trace_id"] != B3_TRACE and root_of(cases[c])["parent_span_id"] == ""
        assert ups["b3"]["b3"] == f"{B3_TRACE}-{B3_SPAN}-1" and ups["b3multi"]["x-b3-spanid"] == B3_SPAN
        # Not sampled: the trace id is kept, the flag is 00.
        for c in ("tp00", "zero01"):
            trace, parent, flags = parse_traceparent(ups[c]["traceparent"])
            assert (trace, flags) == (TRACE, "00") and parent != PARENT
        assert parse_traceparent(ups["zero"]["traceparent"])[2] == "00"
        # Without a child span the upstream sees the root's id.
        assert parse_traceparent(ups["nochild"]["traceparent"])[1] == cases["nochild"][0]["span_id"]


# ----------------------------------------------------------------------------- 1. parity

PARITY_CASES = {
    # case: (path, curl args, upstream status, built-in span count)
    "ok": ("/ok?x=1", ["-H", "x-hdr: hv"], 200, 2),
    "h2_post": ("/ok", ["--http2-prior-knowledge", "-d", "hello-body"], 200, 2),
    "no_route": ("/nope", [], 200, 1),
    "upstream_down": ("/down", [], 200, 2),
    "upstream_404": ("/ok", [], 404, 2),
    "upstream_500": ("/ok", [], 500, 2),
    "traceparent": ("/ok", ["-H", f"traceparent: {tp()}", "-H", "tracestate: vendor=abc,other=x"], 200, 2),
}


@pytest.mark.parametrize("child", ["start_child_span", "spawn_upstream_span"])
def test_parity_with_builtin_tracer(tmp_path, child):
    """The built-in tracer and ours (same service name, 100% sampling, a client span per
    upstream request — the router's `start_child_span`, or the HCM's `spawn_upstream_span` that
    replaces it — the same custom_tags) in one Envoy, one listener each, the same requests (same Host and
    x-request-id): per request the same spans, parent/child structure, kinds, names, attribute
    keys, values and types, status, flags and trace_state. Incoming traceparent: continued by both.
    The upstream sees a traceparent whose parent-id is the CLIENT span's id, from both.

    Deliberate differences:
    - Resource: both have `service.name: edge`. The built-in also sends `telemetry.sdk.name: envoy`,
      `telemetry.sdk.language: cpp` and `telemetry.sdk.version: <sha>/1.40.0/...`; ours sends its own
      telemetry.sdk.* (not Envoy's: it is not Envoy's C++ SDK).
    - Scope: the built-in's is `envoy` / <Envoy version>; ours has its own name.
    - With no incoming tracestate, the built-in sends the upstream an empty `tracestate:` header
      (overwriting a client tracestate that came without a traceparent); ours sends none.
    - Timestamps: the built-in's have microsecond resolution, ours nanosecond (only the nesting
      of times is compared).
    Not in these cases, deliberate (README): a traceparent that does not parse starts a new trace
    (the built-in drops tracing for the request, or continues upper-case hex and version ff), a
    later version's traceparent is continued; an invalid or multi-line tracestate; tag values that
    are not UTF-8 (repaired here, sent raw by the built-in); the span kind of an egress listener
    with spawn_upstream_span.
    """
    with receivers("grpc", "grpc") as (theirs, mine), EchoUpstream() as up:
        kw = {"start_child_span": False, "spawn_upstream_span": True} if child == "spawn_upstream_span" else {}
        e, ports = tracing_envoy(tmp_path, up, {"builtin": builtin_tracer(), "ours": our_tracer(ours_config(mine))},
                                 builtin_rx=theirs, **kw)
        with e:
            for name, (path, args, status, _) in PARITY_CASES.items():
                up.set_status(status)
                rid = str(uuid.uuid4())
                q = f"{path}{'&' if '?' in path else '?'}case={name}"
                for listener in ("builtin", "ours"):
                    get(ports[listener], q, "-H", f"x-request-id: {rid}", *args, case=f"{listener}:{name}")
            total = sum(n for *_, n in PARITY_CASES.values())
            theirs.wait_for(total, "traces")
            mine.wait_for(total, "traces")
            time.sleep(SETTLE)
            b_spans, o_spans = theirs.spans(), mine.spans()
        assert len(b_spans) == total, "the built-in behaves as in OTEL_TRACER_NOTES.md"
        assert len(o_spans) == total, f"ours exported {len(o_spans)} spans, the built-in {total}"
        b_cases, o_cases = by_case(b_spans), by_case(o_spans)
        assert set(o_cases) == set(b_cases) == set(PARITY_CASES)
        ups = upstream_by_case(up)
        diffs = [d for name in PARITY_CASES for d in shape_diff(name, shape(b_cases[name]), shape(o_cases[name]))]
        assert not diffs, "ours differs from the built-in:\n" + "\n".join(diffs)
        for name in PARITY_CASES:
            for listener, group in (("builtin", b_cases[name]), ("ours", o_cases[name])):
                assert_nested_times(group)
                # (with the upstream down, no request reaches it to look at)
                if name != "upstream_down" and any(s["kind"] == CLIENT for s in group):
                    assert_upstream_saw_client_span(group, ups[f"{listener}:{name}"])
        for name in ("traceparent",):
            for group in (b_cases[name], o_cases[name]):
                root = root_of(group)
                assert (root["trace_id"], root["parent_span_id"]) == (TRACE, PARENT)
            assert ups[f"ours:{name}"]["tracestate"] == ups[f"builtin:{name}"]["tracestate"] == "vendor=abc,other=x"
        for s in b_spans + o_spans:
            assert s["resource"]["service.name"] == "edge"
        assert {s["scope"] for s in b_spans} == {"envoy"}
        assert len({s["scope"] for s in o_spans}) == 1 and o_spans[0]["scope"]


def test_parity_egress_span_kind_and_grpc_status(tmp_path):
    """Span kind and status where Envoy's tracer derives them from more than `http.status_code`:
    - an outbound listener's span (`egress <host>`) is a CLIENT one, with or without the
      router's CLIENT child (`start_child_span`);
    - `grpc.status_code` sets the status (gRPC semantic conventions): NotFound (5) is an error
      on a client span only, Unavailable (14) on both; HTTP 200 alone is no error.
    Same comparison as the parity test above, request by request, built-in against ours."""
    grpc = ["-H", "content-type: application/grpc", "--http2-prior-knowledge"]
    cases = {  # case: (listener pair, path, curl args)
        "out_ok": ("out", "/ok", []),
        "out_grpc5": ("out", "/grpc5", grpc),
        "out_grpc14": ("out", "/grpc14", grpc),
        # A misbehaving upstream's code, too large for 32 bits: still not OK, for both.
        "out_grpc_big": ("out", "/grpc4294967296", grpc),
        "outchild_ok": ("outchild", "/ok", []),
        "in_grpc5": ("in", "/grpc5", grpc),
        "in_grpc14": ("in", "/grpc14", grpc),
    }
    with receivers("grpc", "grpc") as (theirs, mine), EchoUpstream() as up:
        specs = {"out": {"egress": True, "start_child_span": False}, "outchild": {"egress": True}, "in": {}}
        listeners = {f"{who}_{pair}": (builtin_tracer() if who == "builtin" else our_tracer(ours_config(mine)), kw)
                     for pair, kw in specs.items() for who in ("builtin", "ours")}
        e, ports = tracing_envoy(tmp_path, up, listeners, builtin_rx=theirs)
        with e:
            for name, (pair, path, args) in cases.items():
                rid = str(uuid.uuid4())
                for who in ("builtin", "ours"):
                    get(ports[f"{who}_{pair}"], f"{path}?case={name}", "-H", f"x-request-id: {rid}", *args)
            total = 1 + 1 + 1 + 1 + 2 + 1 + 1
            theirs.wait_for(total, "traces")
            mine.wait_for(total, "traces")
            time.sleep(SETTLE)
            b_cases, o_cases = by_case(theirs.spans()), by_case(mine.spans())
    assert set(b_cases) == set(o_cases) == set(cases)
    kinds = {name: sorted(s["kind"] for s in b_cases[name]) for name in cases}
    assert kinds["out_ok"] == [CLIENT] and kinds["outchild_ok"] == [CLIENT, CLIENT], kinds
    assert kinds["in_grpc5"] == [SERVER], kinds
    errors = {name: root_of(b_cases[name])["status"].get("code") for name in cases}
    assert errors["out_grpc5"] == errors["out_grpc14"] == errors["in_grpc14"] == errors["out_grpc_big"] == 2, errors
    assert errors["in_grpc5"] != 2 and errors["out_ok"] != 2, errors
    diffs = [d for name in cases for d in shape_diff(name, shape(b_cases[name]), shape(o_cases[name]))]
    assert not diffs, "ours differs from the built-in:\n" + "\n".join(diffs)


def test_parity_unsampled_requests_export_nothing(tmp_path):
    """Both tracers, sampler unset on ours (Envoy's decision): an incoming traceparent with flag 00
    under random_sampling 100, and any request under random_sampling 0 (even with an incoming 01),
    export nothing; the upstream gets the same trace id with flag 00 from both."""
    with receivers("grpc", "grpc") as (theirs, mine), EchoUpstream() as up:
        e, ports = tracing_envoy(tmp_path, up, {
            "builtin": builtin_tracer(), "ours": our_tracer(ours_config(mine)),
            "builtin0": (builtin_tracer(), {"sampling": 0}), "ours0": (our_tracer(ours_config(mine)), {"sampling": 0})},
            builtin_rx=theirs)
        with e:
            for kind in ("builtin", "ours"):
                get(ports[kind], "/ok?case=tp00", "-H", f"traceparent: {tp(flags='00')}", case=f"{kind}:tp00")
                get(ports[kind + "0"], "/ok?case=zero01", "-H", f"traceparent: {tp(flags='01')}", case=f"{kind}:zero01")
                get(ports[kind + "0"], "/ok?case=zero", case=f"{kind}:zero")
                get(ports[kind], "/ok?case=barrier", case=f"{kind}:barrier")
            theirs.wait_for(2, "traces")
            mine.wait_for(2, "traces")
            time.sleep(SETTLE)
            b_cases, o_cases = by_case(theirs.spans()), by_case(mine.spans())
        assert set(b_cases) == {"barrier"}
        assert set(o_cases) == {"barrier"}, "ours exported spans of unsampled requests"
        ups = upstream_by_case(up)
        for kind in ("builtin", "ours"):
            for case in ("tp00", "zero01"):
                trace, parent, flags = parse_traceparent(ups[f"{kind}:{case}"].get("traceparent"))
                assert (trace, flags) == (TRACE, "00") and parent != PARENT, (kind, case)
            assert parse_traceparent(ups[f"{kind}:zero"].get("traceparent"))[2] == "00"


def test_incoming_not_sampled_survives_a_route_refresh(tmp_path):
    """A filter that clears the route cache makes Envoy refresh its tracing decision and hand it
    to spans that use the local decision. An incoming `-00` decided this trace, so the refresh
    (random_sampling 100) must not turn it sampled: nothing exported, `-00` upstream. A request
    that brought no decision still follows Envoy's."""
    lua = {"name": "envoy.filters.http.lua", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string":
                                "function envoy_on_request(h) h:clearRouteCache() end"}}}
    with OtlpReceiver("grpc") as rx, EchoUpstream() as up:
        e, ports = tracing_envoy(tmp_path, up, {"ours": (our_tracer(ours_config(rx)), {"filters": [lua]})})
        with e:
            get(ports["ours"], "/ok?case=tp00", "-H", f"traceparent: {tp(flags='00')}", case="tp00")
            get(ports["ours"], "/ok?case=plain", case="plain")
            rx.wait_for(2, "traces")
            time.sleep(SETTLE)
            cases = by_case(rx.spans())
        assert set(cases) == {"plain"}, "the refresh turned an incoming -00 into a sampled trace"
        assert parse_traceparent(upstream_by_case(up)["tp00"]["traceparent"])[2] == "00"


# ----------------------------------------------------------------------------- 2. B3

def test_b3_single_and_multi_are_continued_and_injected(tmp_path):
    with OtlpReceiver("grpc") as rx, EchoUpstream() as up:
        e, ports = tracing_envoy(tmp_path, up, {
            "b3": our_tracer(ours_config(rx, propagators=["b3"], service_name="b3", stat_prefix="b3")),
            "multi": our_tracer(ours_config(rx, propagators=["b3multi"], service_name="multi", stat_prefix="multi")),
            "default": our_tracer(ours_config(rx, service_name="default"))})
        with e:
            get(ports["b3"], "/ok?case=b3", "-H", f"b3: {B3_TRACE}-{B3_SPAN}-1", case="b3")
            get(ports["multi"], "/ok?case=multi", "-H", f"X-B3-TraceId: {B3_TRACE2}", "-H", f"X-B3-SpanId: {B3_SPAN}",
                "-H", "X-B3-Sampled: 1", "-H", "X-B3-ParentSpanId: 05e3ac9a4f6e3b90", case="multi")
            get(ports["b3"], "/ok?case=b3_new", case="b3_new")
            get(ports["multi"], "/ok?case=multi_new", case="multi_new")
            get(ports["default"], "/ok?case=default_b3", "-H", f"b3: {B3_TRACE}-{B3_SPAN}-1", case="default_b3")
            # The b3 propagator also reads the multi headers (OpenTelemetry's B3 extract).
            get(ports["b3"], "/ok?case=b3_from_multi", "-H", f"X-B3-TraceId: {B3_TRACE3}", "-H", f"X-B3-SpanId: {B3_SPAN}",
                "-H", "X-B3-Sampled: 1", case="b3_from_multi")
            # A decision without ids: deny is honoured (no span, "0" upstream), debug passed on.
            get(ports["b3"], "/ok?case=b3_deny", "-H", "b3: 0", case="b3_deny")
            get(ports["multi"], "/ok?case=multi_deny", "-H", "X-B3-Sampled: 0", case="multi_deny")
            get(ports["b3"], "/ok?case=b3_debug", "-H", f"b3: {B3_TRACE4}-{B3_SPAN}-d", case="b3_debug")
            spans = rx.wait_for(14, "traces")
            time.sleep(SETTLE)
            spans = rx.spans()
        cases = by_case(spans)
        assert set(cases) == {"b3", "multi", "b3_new", "multi_new", "default_b3", "b3_from_multi", "b3_debug"}
        ups = upstream_by_case(up)
        for c, trace in (("b3", B3_TRACE), ("multi", B3_TRACE2)):
            root = root_of(cases[c])
            assert (root["trace_id"], root["parent_span_id"]) == (trace, B3_SPAN), c
        for c in ("b3", "b3_new"):
            client = next(s for s in cases[c] if s["kind"] == CLIENT)
            parts = ups[c]["b3"].split("-")
            assert parts[:3] == [client["trace_id"], client["span_id"], "1"], ups[c]["b3"]
            assert "traceparent" not in ups[c], "only the configured propagators are injected"
        for c in ("multi", "multi_new"):
            client = next(s for s in cases[c] if s["kind"] == CLIENT)
            h = ups[c]
            assert (h["x-b3-traceid"], h["x-b3-spanid"], h["x-b3-sampled"]) == (client["trace_id"], client["span_id"], "1")
            # The parent of the span upstream continues: ours, not the one that came in.
            assert h["x-b3-parentspanid"] == client["parent_span_id"], h
            assert "traceparent" not in h
        root = root_of(cases["b3_from_multi"])
        assert (root["trace_id"], root["parent_span_id"]) == (B3_TRACE3, B3_SPAN)
        # ...and with b3 alone only the single header goes on: the client's X-B3-* (its span
        # as parent, its decision) would otherwise reach the next hop beside ours.
        h = ups["b3_from_multi"]
        client = next(s for s in cases["b3_from_multi"] if s["kind"] == CLIENT)
        assert h["b3"].split("-")[:2] == [B3_TRACE3, client["span_id"]], h
        assert not [k for k in h if k.startswith("x-b3-")], h
        assert ups["b3_deny"]["b3"].endswith("-0") and ups["multi_deny"]["x-b3-sampled"] == "0"
        assert ups["b3_deny"]["b3"].split("-")[0] != B3_TRACE, "a new trace, not sampled"
        client = next(s for s in cases["b3_debug"] if s["kind"] == CLIENT)
        assert ups["b3_debug"]["b3"] == f"{B3_TRACE4}-{client['span_id']}-d", ups["b3_debug"]
        # Default propagators (tracecontext, baggage) ignore b3, like the built-in.
        root = root_of(cases["default_b3"])
        assert root["trace_id"] != B3_TRACE and root["parent_span_id"] == ""
        assert_upstream_saw_client_span(cases["default_b3"], ups["default_b3"])


# ----------------------------------------------------------------------------- 3. samplers

def test_samplers_always_off_parent_based_and_override(tmp_path):
    """always_off: nothing exported, context still propagated (flag 00). parent_based (root
    always_on / always_off) follows the incoming sampled flag. A configured sampler overrides
    Envoy's decision (always_on under random_sampling 0 exports)."""
    with OtlpReceiver("grpc") as rx, EchoUpstream() as up:
        def t(name, sampler, **kw):
            return our_tracer(ours_config(rx, sampler=sampler, service_name=name, stat_prefix=name)), kw
        e, ports = tracing_envoy(tmp_path, up, {
            "off": t("off", {"type": "always_off"}),
            "parent": t("parent", {"type": "parent_based", "root": {"type": "always_on"}}),
            "parent_off": t("parent_off", {"type": "parent_based", "root": {"type": "always_off"}}),
            "forced_on": t("forced_on", {"type": "always_on"}, sampling=0)})
        with e:
            for i in range(3):
                get(ports["off"], f"/ok?case=off{i}", case=f"off{i}")
            get(ports["off"], "/ok?case=off_tp", "-H", f"traceparent: {tp()}", case="off_tp")
            get(ports["parent"], "/ok?case=parent01", "-H", f"traceparent: {tp(trace='a' * 32)}", case="parent01")
            get(ports["parent"], "/ok?case=parent00", "-H", f"traceparent: {tp(trace='b' * 32, flags='00')}",
                case="parent00")
            get(ports["parent"], "/ok?case=parent_root", case="parent_root")
            get(ports["parent_off"], "/ok?case=parent_off_root", case="parent_off_root")
            get(ports["parent_off"], "/ok?case=parent_off01", "-H", f"traceparent: {tp(trace='c' * 32)}",
                case="parent_off01")
            get(ports["forced_on"], "/ok?case=forced_on", case="forced_on")
            rx.wait_for(8, "traces")
            off = poll_until(lambda: (lambda x: x if x.get("spans_started") == 8 else None)(our_stats(e, "off")),
                             what="8 spans started by the always_off tracer")
            time.sleep(SETTLE)
            cases = by_case(rx.spans())
        assert set(cases) == {"parent01", "parent_root", "parent_off01", "forced_on"}
        assert root_of(cases["parent01"])["trace_id"] == "a" * 32
        assert root_of(cases["parent_off01"])["trace_id"] == "c" * 32
        ups = upstream_by_case(up)
        for c in ("off0", "off1", "off2", "off_tp", "parent00", "parent_off_root"):
            assert parse_traceparent(ups[c].get("traceparent"))[2] == "00", c
        assert parse_traceparent(ups["off_tp"]["traceparent"])[0] == TRACE
        assert parse_traceparent(ups["parent00"]["traceparent"])[0] == "b" * 32
        for c in ("parent01", "parent_root", "parent_off01", "forced_on"):
            assert_upstream_saw_client_span(cases[c], ups[c])
        assert off["spans_started"] == 8 and off["spans_sampled"] == 0 and off["spans_exported"] == 0, off


def test_trace_id_ratio_samples_a_quarter_of_traces(tmp_path):
    n = 4000
    with OtlpReceiver("grpc") as rx:
        cfg = ours_config(rx, sampler={"type": "trace_id_ratio", "ratio": 0.25}, flush_interval_ms=200)
        e, ports = tracing_envoy(tmp_path, None, {"r": our_tracer(cfg)})
        with e:
            h2load(f"http://127.0.0.1:{ports['r']}/direct", n, clients=8)
            s = drained(e, timeout=60)
            poll_until(lambda: rx.count("traces") >= s["spans_exported"], what="receiver has every exported span")
        roots = {sp["span_id"] for sp in rx.spans() if sp["kind"] == SERVER}
        assert s["spans_started"] == n
        assert s["spans_exported"] == s["spans_sampled"] == len(roots), s
        assert abs(len(roots) / n - 0.25) <= 0.03, f"{len(roots)} of {n} sampled"


# ----------------------------------------------------------------------------- 4. tracestate, baggage

def test_tracestate_and_baggage_pass_through(tmp_path):
    with OtlpReceiver("grpc") as rx, EchoUpstream() as up:
        e, ports = tracing_envoy(tmp_path, up, {"o": our_tracer(ours_config(rx, propagators=["tracecontext", "baggage"]))})
        with e:
            p = ports["o"]
            get(p, "/ok?case=both", "-H", f"traceparent: {tp()}", "-H", "tracestate: vendor=abc,other=x",
                "-H", "baggage: k1=v1,k2=v2;prop=1", case="both")
            get(p, "/ok?case=baggage_only", "-H", "baggage: user=alice", case="baggage_only")
            # A traceparent that does not parse (upper-case hex): a new trace, without the old
            # tracestate.
            get(p, "/ok?case=stale", "-H", f"traceparent: {tp().upper()}",
                "-H", "tracestate: congo=t61rcWkgMzE", case="stale")
            # No traceparent at all, and a list that breaks the W3C grammar (a key twice): the
            # tracestate goes too (W3C Trace Context 3.3; the W3C test suite expects both).
            get(p, "/ok?case=orphan", "-H", "tracestate: congo=t61rcWkgMzE", case="orphan")
            get(p, "/ok?case=invalid", "-H", f"traceparent: {tp(trace='5' * 32)}", "-H", "tracestate: a=1,a=2",
                case="invalid")
            spans = rx.wait_for(10, "traces")
        cases = by_case(spans)
        ups = upstream_by_case(up)
        assert {s["trace_state"] for s in cases["both"]} == {"vendor=abc,other=x"}
        assert_upstream_saw_client_span(cases["both"], ups["both"])
        assert ups["both"]["tracestate"] == "vendor=abc,other=x"

        def members(v):
            return {m.split(";")[0].strip() for m in v.split(",")}
        assert members(ups["both"]["baggage"]) == {"k1=v1", "k2=v2"}
        assert ups["both"]["baggage"] == "k1=v1,k2=v2;prop=1", "unchanged baggage passes as it came"
        assert "tracestate" not in ups["stale"], ups["stale"]
        assert "tracestate" not in ups["orphan"] and "tracestate" not in ups["invalid"], (ups["orphan"], ups["invalid"])
        assert {s["trace_state"] for s in cases["invalid"]} == {""}
        assert_upstream_saw_client_span(cases["stale"], ups["stale"])
        assert root_of(cases["stale"])["parent_span_id"] == ""
        assert members(ups["baggage_only"]["baggage"]) == {"user=alice"}
        assert_upstream_saw_client_span(cases["baggage_only"], ups["baggage_only"])


# ----------------------------------------------------------------------------- 5. failures, shutdown

def test_collector_down_then_up_accounts_for_every_span(tmp_path):
    with OtlpReceiver("grpc") as rx:
        cfg = ours_config(rx, timeout_ms=500, retry={"initial_backoff_ms": 50, "max_backoff_ms": 200,
                                                     "max_elapsed_ms": 1000})
        e, ports = tracing_envoy(tmp_path, None, {"o": our_tracer(cfg)})
        url = f"http://127.0.0.1:{ports['o']}/direct"
        with e:
            rx.stop()
            h2load(url, 400, clients=4, rate=200)
            poll_until(lambda: (lambda s: s.get("spans_failed", 0) + s.get("spans_dropped", 0))(our_stats(e)) > 0,
                       timeout=15, what="spans failed or dropped while the collector is down")
            rx.start()
            h2load(url, 400, clients=4, rate=400)
            s = drained(e, sampled=800)
            poll_until(lambda: len(unique_span_ids(rx)) >= s["spans_exported"], what="receiver has every exported span")
        assert s["spans_started"] == s["spans_sampled"] == 800
        assert s["spans_exported"] + s["spans_dropped"] + s["spans_failed"] == 800
        assert s["spans_failed"] + s["spans_dropped"] > 0
        assert s["spans_exported"] >= 400, "every span made after the collector came back is exported"
        assert len(unique_span_ids(rx)) == s["spans_exported"], "the receiver's own count agrees"


def test_graceful_shutdown_delivers_every_queued_span(tmp_path):
    n = 3000
    with OtlpReceiver("grpc") as rx:
        e, ports = tracing_envoy(tmp_path, None, {"o": our_tracer(ours_config(rx, flush_interval_ms=30000,
                                                                              max_batch_size=10000))})
        with e:
            h2load(f"http://127.0.0.1:{ports['o']}/direct", n, clients=8)
            assert rx.count("traces") < n
            assert e.quit() == 0
        assert rx.count("traces") == n
        assert len(unique_span_ids(rx)) == n


# ----------------------------------------------------------------------------- 6. bad config

BAD = {
    "unknown sampler type": ({"sampler": {"type": "sometimes"}}, {}, "field `sampler.type`"),
    "ratio above 1": ({"sampler": {"type": "trace_id_ratio", "ratio": 1.5}}, {}, "field `sampler.ratio`"),
    "bad root ratio": ({"sampler": {"type": "parent_based", "root": {"type": "trace_id_ratio", "ratio": -1}}}, {},
                       "field `sampler.root.ratio`"),
    "unknown propagator": ({"propagators": ["tracecontext", "jaeger"]}, {}, "field `propagators"),
    "bad endpoint": ({"endpoint": "ftp://localhost:4317"}, {}, "field `endpoint`"),
    "unknown key": ({"endpoint": "http://127.0.0.1:4317", "bogus": True}, {}, "field `bogus`"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_is_rejected_naming_the_field(tmp_path, case):
    cfg, env, needle = BAD[case]
    e, _ = tracing_envoy(tmp_path, None, {"o": our_tracer(cfg)}, env=env)
    p = e.run_to_exit()
    assert p.returncode == 1, f"accepted or crashed (rc={p.returncode}):\n{e.log()[-2000:]}"
    assert needle in e.log(), e.log()[-3000:]
    assert "panic" not in e.log()


# ----------------------------------------------------------------------------- 7. counters, config keys

def test_counters(tmp_path):
    with OtlpReceiver("grpc") as rx, EchoUpstream() as up:
        e, ports = tracing_envoy(tmp_path, up, {
            "o": our_tracer(ours_config(rx)),
            "unsampled": (our_tracer(ours_config(rx, stat_prefix="unsampled")), {"sampling": 0})})
        with e:
            for _ in range(5):
                get(ports["o"], "/ok")
            for _ in range(2):
                get(ports["o"], "/nope")
            for _ in range(3):
                get(ports["unsampled"], "/ok")
            s = drained(e, sampled=12)
            u = poll_until(lambda: (lambda x: x if x.get("spans_started") == 6 else None)(our_stats(e, "unsampled")),
                           what="unsampled spans started")
            rx.wait_for(12, "traces")
        assert (s["spans_started"], s["spans_sampled"], s["spans_exported"]) == (12, 12, 12), s
        assert (s["spans_dropped"], s["spans_failed"], s["export_retries"]) == (0, 0, 0), s
        assert (u["spans_sampled"], u["spans_exported"]) == (0, 0), u
        assert len(unique_span_ids(rx)) == 12


@pytest.mark.parametrize("protocol,compression", [("grpc", "none"), ("grpc", "gzip"),
                                                  ("http", "none"), ("http", "gzip")])
def test_transports_headers_and_resource(tmp_path, protocol, compression):
    with OtlpReceiver(protocol) as rx, EchoUpstream() as up:
        cfg = ours_config(rx, compression=compression, headers={"authorization": "Bearer t0k3n"},
                          resource_attributes={"deployment.environment": "test"})
        e, ports = tracing_envoy(tmp_path, up, {"o": our_tracer(cfg)})
        with e:
            get(ports["o"], "/ok")
            spans = rx.wait_for(2, "traces")
        assert {s["name"] for s in spans} == {"ingress", "router backend egress"}
        for s in spans:
            assert s["resource"]["service.name"] == "edge"
            assert s["resource"]["deployment.environment"] == "test"
        attempts = rx.attempts("traces")
        assert all(a.headers.get("authorization") == "Bearer t0k3n" for a in attempts)
        enc = "grpc-encoding" if protocol == "grpc" else "content-encoding"
        assert {a.headers.get(enc) for a in attempts} == ({"gzip"} if compression == "gzip" else {None})


def test_service_name_and_propagators_from_environment(tmp_path):
    """service_name unset: OTEL_SERVICE_NAME, else Envoy's default "unknown_service:envoy".
    propagators unset: OTEL_PROPAGATORS, its names in any case, and one only the applications'
    SDKs know (`xray`) ignored with a warning (OpenTelemetry's environment spec), not fatal."""
    with OtlpReceiver("grpc") as rx, EchoUpstream() as up:
        cfg = ours_config(rx)
        del cfg["service_name"]
        e, ports = tracing_envoy(tmp_path / "env", up, {"o": our_tracer(cfg)},
                                 env={"OTEL_SERVICE_NAME": "from-env", "OTEL_PROPAGATORS": "B3Multi,xray"})
        with e:
            get(ports["o"], "/ok?case=env", "-H", f"X-B3-TraceId: {B3_TRACE}", "-H", f"X-B3-SpanId: {B3_SPAN}",
                "-H", "X-B3-Sampled: 1", case="env")
            spans = rx.wait_for(2, "traces")
            assert 'OTEL_PROPAGATORS: ignoring "xray"' in e.log()
        assert {s["resource"]["service.name"] for s in spans} == {"from-env"}
        root = root_of(spans)
        assert (root["trace_id"], root["parent_span_id"]) == (B3_TRACE, B3_SPAN)
        h = upstream_by_case(up)["env"]
        client = next(s for s in spans if s["kind"] == CLIENT)
        assert (h["x-b3-traceid"], h["x-b3-spanid"]) == (B3_TRACE, client["span_id"])
        assert "traceparent" not in h
        rx.clear()
        if os.environ.get("OTEL_SERVICE_NAME"):
            pytest.skip("OTEL_SERVICE_NAME is set in the test environment")
        e, ports = tracing_envoy(tmp_path / "noenv", up, {"o": our_tracer(cfg)})
        with e:
            get(ports["o"], "/ok")
            spans = rx.wait_for(2, "traces")
        assert {s["resource"]["service.name"] for s in spans} == {"unknown_service:envoy"}
