"""Parity: Envoy's built-in file logger (log_format.json_format) and ours, attached to the same
HttpConnectionManager, log the same traffic. Records are matched by x-request-id and must be
equal after JSON parsing: same keys, same values, same types.

Stated tolerance for time-dependent fields: START_TIME values and the millisecond durations
may differ by at most 1 ms (both loggers read the same stream info, so in practice they are equal)."""
import datetime
import re

from harness import (ROUTER, Envoy, curl, direct_response_listener, free_port, h2load, hcm_listener, paired_loggers,
                     poll_until, read_json_lines, records_by_id, route, static_cluster, wait_lines)

FORMAT = {
    "start": "%START_TIME%",
    "start_s": "%START_TIME(%s)%",
    "start_f": "%START_TIME(%Y/%m/%d %H:%M:%S.%3f %z)%",
    "start_day": "%START_TIME(%u|%w|%V|%G|%g|%U|%W|%C|%x|%Ey|%EY|%Od|%Ez|%j)%",
    "start_clock": "%START_TIME(%c|%k|%l|%r|%X|%E6S|%E3f)%",
    "start_paren": "%START_TIME((%Y) %H (UTC))%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "authority": "%REQ(:AUTHORITY)%",
    "ua": "%REQ(USER-AGENT)%",
    "long": "%REQ(X-LONG):10%",
    "utf": "%REQ(X-UTF)%",
    "utf_cut": "%REQ(X-UTF):5%",
    "utf_split": "%REQ(X-UTF2):3%",
    # Each value escaped on its own: the invalid one byte by byte, the valid one and the text
    # around them kept as UTF-8.
    "utf_mixed": "ü %REQ(X-UTF2)% %REQ(X-UTF)%",
    "uhn": "%UPSTREAM_HOST_NAME%",
    "uhn_np": "%UPSTREAM_HOST_NAME_WITHOUT_PORT%",
    "uid": "%UNIQUE_ID%",
    "pct": "100%% of %%PROTOCOL%%",
    "rep": "%REQ(X-REP)%",
    "missing": "%REQ(X-NOPE)%",
    "resp_ct": "%RESP(CONTENT-TYPE)%",
    "trailer": "%TRAILER(GRPC-STATUS)%",
    "proto": "%PROTOCOL%",
    "uproto": "%UPSTREAM_PROTOCOL%",
    "code": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "ctd": "%CONNECTION_TERMINATION_DETAILS%",
    "flags": "%RESPONSE_FLAGS%",
    "flags_long": "%RESPONSE_FLAGS_LONG%",
    "brx": "%BYTES_RECEIVED%",
    "btx": "%BYTES_SENT%",
    "uwtx": "%UPSTREAM_WIRE_BYTES_SENT%",
    "uwrx": "%UPSTREAM_WIRE_BYTES_RECEIVED%",
    "dwtx": "%DOWNSTREAM_WIRE_BYTES_SENT%",
    "dwrx": "%DOWNSTREAM_WIRE_BYTES_RECEIVED%",
    "rqhb": "%REQUEST_HEADERS_BYTES%",
    "rshb": "%RESPONSE_HEADERS_BYTES%",
    "rstb": "%RESPONSE_TRAILERS_BYTES%",
    "dur": "%DURATION%",
    "rqdur": "%REQUEST_DURATION%",
    "rqtx": "%REQUEST_TX_DURATION%",
    "rsdur": "%RESPONSE_DURATION%",
    "rstx": "%RESPONSE_TX_DURATION%",
    "pool": "%UPSTREAM_CONNECTION_POOL_READY_DURATION%",
    "cd_total": "%COMMON_DURATION(DS_RX_BEG:DS_TX_END)%",
    "cd_upstream_us": "%COMMON_DURATION(US_TX_BEG:US_RX_END:us)%",
    "cd_rx_ns": "%COMMON_DURATION(DS_RX_BEG:DS_RX_END:ns)%",
    "cd_response_ns": "%COMMON_DURATION(US_RX_BEG:DS_TX_BEG:ns)%",
    "cd_backwards": "%COMMON_DURATION(DS_TX_END:DS_RX_BEG:ms)%",
    "cd_up_tx": "%COMMON_DURATION(US_TX_END:US_RX_BEG:ms)%",
    "cd_connect_us": "%COMMON_DURATION(US_CX_BEG:US_CX_END:us)%",
    "cd_body_ns": "%COMMON_DURATION(DS_RX_BEG:US_RX_BODY_BEG:ns)%",
    "cd_tls_ns": "%COMMON_DURATION(US_CX_BEG:US_HS_END:ns)%",
    "code_parens": "%RESPONSE_CODE()%",
    "handshake": "%DOWNSTREAM_HANDSHAKE_DURATION%",
    "roundtrip": "%ROUNDTRIP_DURATION%",
    "route": "%ROUTE_NAME%",
    "cluster": "%UPSTREAM_CLUSTER%",
    "uhost": "%UPSTREAM_HOST%",
    "ula": "%UPSTREAM_LOCAL_ADDRESS%",
    "ulawp": "%UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%",
    "ulap": "%UPSTREAM_LOCAL_PORT%",
    "ura": "%UPSTREAM_REMOTE_ADDRESS%",
    "urawp": "%UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "urap": "%UPSTREAM_REMOTE_PORT%",
    "utfr": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "dra": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "drawp": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "drp": "%DOWNSTREAM_REMOTE_PORT%",
    "dla": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "dlp": "%DOWNSTREAM_LOCAL_PORT%",
    "ddra": "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%",
    "cid": "%CONNECTION_ID%",
    "ucid": "%UPSTREAM_CONNECTION_ID%",
    "sni": "%REQUESTED_SERVER_NAME%",
    "tlsv": "%DOWNSTREAM_TLS_VERSION%",
    "dm": "%DYNAMIC_METADATA(foo:bar)%",
    "host": "%HOSTNAME%",
    "lrb": "%LOCAL_REPLY_BODY%",
    "alt": "%ACCESS_LOG_TYPE%",
    "env": "%ENVIRONMENT(OBS_PARITY_ENV)%",
    "env_missing": "%ENVIRONMENT(OBS_PARITY_NOT_SET)%",
    "trace": "%TRACE_ID%",
    "mixed": "[%START_TIME%] %REQ(:METHOD)% %RESPONSE_CODE% %RESPONSE_FLAGS% x=%REQ(X-NOPE)%",
    "lit": "literal",
    "num": 5,
    # (Integer literals are doubles in Envoy's Struct: 100000 prints as 1e+05, 123456 as is.)
    "num_round": 100000,
    "num_neg": -3000000,
    "num_plain": 123456,
    "flt": 2.5,
    "list": ["%REQ(:METHOD)%", 100000, "%REQ(X-NOPE)%", {"k": "%RESPONSE_CODE%"}, ["x %PROTOCOL%"], None],
    "yes": True,
    "nested": {"code": "%RESPONSE_CODE%", "deeper": {"proto": "%PROTOCOL%", "lit": "x"}},
}
TIME_FIELDS = {"dur", "rqdur", "rqtx", "rsdur", "rstx", "pool", "cd_total", "cd_up_tx"}


def start_ms(s: str) -> float:
    return datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp() * 1000


UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def assert_same_records(a: dict, b: dict, n: int) -> None:
    """Records keyed by request id: the same `n` requests, the same keys, equal values of the
    same JSON types, except the stated time tolerances and the random UNIQUE_ID."""
    assert len(a) == n and a.keys() == b.keys()
    for rid, x in a.items():
        y = b[rid]
        assert x.keys() == y.keys(), rid
        for k in x:
            u, v = x[k], y[k]
            if k in TIME_FIELDS and u is not None and v is not None:
                # A record logged before the request completes (DownstreamStart, periodic ones)
                # has its duration so far, read by each logger at its own call: ours against the
                # wall clock (the ABI gives the start only as Unix time), Envoy's against its
                # monotonic one (README: the documented difference). Usually both read 0 here; a
                # loaded CI run read ours 2 and the built-in 5 ms, so the same 5 ms as `emit`. A
                # completed request's durations are fixed: 1 ms (rounding).
                live = k == "dur" and str(x.get("alt", "")).endswith(("Start", "Periodic"))
                assert type(u) is type(v) and abs(u - v) <= (5 if live else 1), (rid, k, u, v)
            elif k == "start":
                assert abs(start_ms(u) - start_ms(v)) <= 1, (rid, k, u, v)
            elif k == "emit":  # each logger's own clock when it logs
                assert abs(start_ms(u) - start_ms(v)) <= 5, (rid, k, u, v)
            elif k == "start_local":
                assert u[:19] == v[:19] and u[-5:] == v[-5:], (rid, k, u, v)
            elif k == "uid":  # random per record, in the same form
                assert UUID4.fullmatch(u) and UUID4.fullmatch(v) and u != v, (rid, u, v)
            elif k in ("mixed", "start_f", "start_s", "start_clock"):
                assert u[:4] == v[:4] and len(u) == len(v), (rid, k, u, v)
            else:
                assert type(u) is type(v) and u == v, (rid, k, u, v)


def test_same_records_as_builtin_json_format(tmp_path):
    front, up, dead = free_port(), free_port(), free_port()
    logs, builtin, ours = paired_loggers(tmp_path, FORMAT)
    # A STRICT_DNS host is named by its hostname (a STATIC one by its address).
    dns = {**static_cluster("dns", up), "type": "STRICT_DNS", "dns_lookup_family": "V4_ONLY"}
    dns["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"] = {
        "address": {"socket_address": {"address": "localhost", "port_value": up}}, "hostname": "localhost:1234"}
    retry = route("/retry", "dead", name="r_retry")
    retry["route"]["retry_policy"] = {"retry_on": "connect-failure", "num_retries": 1}
    res = {"listeners": [hcm_listener("front", front, [route("/ok", "backend", name="r_ok"),
                                                       route("/dead", "dead", name="r_dead"), retry,
                                                       route("/dns", "dns", name="r_dns")],
                                      access_log=logs),
                         direct_response_listener("up", up)],
           "clusters": [static_cluster("backend", up), static_cluster("dead", dead), dns]}
    base = f"http://127.0.0.1:{front}"
    with Envoy(tmp_path, res, concurrency=2, env={"OBS_PARITY_ENV": "from-env"}) as e:
        poll_until(lambda: e.stats("cluster.dns.membership_healthy").get("cluster.dns.membership_healthy") == 1,
                   what="the DNS cluster resolved")
        codes = [
            curl(f"{base}/ok", "-H", "x-rep: a", "-H", "x-rep: b", "-A", "parity-agent/1.0").stdout,
            curl(f"{base}/ok", "-H", "x-long: " + "L" * 300).stdout,
            # Not UTF-8 (a lone 0xe9 beside a valid é), and a cut through a two-byte character:
            # Envoy writes every byte from 0x80 up as \u00XX then.
            curl(f"{base}/ok", "-H", 'x-utf: caf\udce9 "é"', "-H", "x-utf2: naïve").stdout,
            curl(f"{base}/nope").stdout,
            curl(f"{base}/dead").stdout,
            curl(f"{base}/retry").stdout,
            curl(f"{base}/ok", "-d", "a request body").stdout,
            curl(f"{base}/ok?q=1", http2=True).stdout,
            curl(f"{base}/ok", "-d", "h2 body", "-H", "x-rep: one", "-H", "x-rep: two", http2=True).stdout,
            curl(f"{base}/nope", http2=True).stdout,
            curl(f"{base}/dns").stdout,
        ]
        assert codes == ["200", "200", "200", "404", "503", "503", "200", "200", "200", "404", "200"]
        wait_lines(len(codes), builtin, ours)
        assert e.quit() == 0
    a, b = records_by_id(builtin), records_by_id(ours)
    assert_same_records(a, b, len(codes))
    # The traffic covered what the issue asks for.
    recs = list(a.values())
    assert {r["code"] for r in recs} == {200, 404, 503}
    assert {r["proto"] for r in recs} == {"HTTP/1.1", "HTTP/2"}
    assert any(r["brx"] > 0 for r in recs) and any(r["long"] == "L" * 10 for r in recs)
    assert any(r["rep"] == "a" for r in recs) and any(r["flags"] == "UF" for r in recs)
    assert any(r["flags"] == "URX,UF" for r in recs), "flags in the order Envoy set them"
    assert all(r["pct"] == "100% of %PROTOCOL%" for r in recs)
    assert any(r["uhn"] and r["uhn"].startswith("127.0.0.1:") for r in recs), "a STATIC host is named by its address"
    assert any(r["uhn"] == "localhost:1234" and r["uhn_np"] == "localhost" for r in recs), "a DNS host by its name"
    assert any(r["uhn_np"] == "127.0.0.1" for r in recs)
    assert any(r["utf"] == 'caf\u00e9 "\u00c3\u00a9"' and r["utf_split"] == "na\u00c3" for r in recs)
    assert any(r["utf_mixed"] == 'ü naïve caf\u00e9 "\u00c3\u00a9"' for r in recs)
    assert all(r["env"] == "from-env" for r in recs)


OMIT_FORMAT = {
    "unavailable": "%REQ(X-NOPE)%",
    "code": "%RESPONSE_CODE%",
    "text": "x%REQ(X-NOPE)%",
    "only_commands": "%REQ(X-NOPE)%%REQ(X-NOPE2)%",
    "all_gone": {"inner": "%REQ(X-NOPE)%"},
    "partly": {"gone": "%REQ(X-NOPE)%", "kept": 1, "flags": "%RESPONSE_FLAGS%"},
    "list": ["%REQ(:METHOD)%", 1, "%REQ(X-NOPE)%", {"k": "%REQ(X-NOPE)%"}, ["%RESPONSE_CODE%"], None, "a %REQ(X-NOPE)%"],
    "list_emptied": ["%REQ(X-NOPE)%"],
    "list_empty": [],
    "empty_literal": "",
    "literal_null": None,
    "null_map": {"x": None},
    "empty_value": "%LOCAL_REPLY_BODY%",
    "route": "%ROUTE_NAME%",
    "upstream": "%UPSTREAM_HOST%",
    "request_id": "%REQ(X-REQUEST-ID)%",
}


def test_omit_empty_values_like_builtin(tmp_path):
    front, up = free_port(), free_port()
    logs, builtin, ours = paired_loggers(tmp_path, OMIT_FORMAT, omit_empty_values=True)
    res = {"listeners": [hcm_listener("front", front, [route("/ok", "backend", name="r_ok")], access_log=logs),
                         direct_response_listener("up", up)],
           "clusters": [static_cluster("backend", up)]}
    with Envoy(tmp_path, res) as e:
        assert curl(f"http://127.0.0.1:{front}/ok").stdout == "200"
        assert curl(f"http://127.0.0.1:{front}/nope").stdout == "404"
        wait_lines(2, builtin, ours)
        e.quit()
    a = records_by_id(builtin)
    assert a == records_by_id(ours)
    assert any("route" not in r and "upstream" not in r for r in a.values())


META_FORMAT = {
    "request_id": "%REQ(X-REQUEST-ID)%",
    "str": "%DYNAMIC_METADATA(obs.test:name)%",
    "num": "%DYNAMIC_METADATA(obs.test:count)%",
    "frac": "%DYNAMIC_METADATA(obs.test:ratio)%",
    "flag": "%DYNAMIC_METADATA(obs.test:enabled)%",
    "nested": "%DYNAMIC_METADATA(obs.test:inner:leaf)%",
    "missing": "%DYNAMIC_METADATA(obs.test:nope)%",
    "other_ns": "%DYNAMIC_METADATA(obs.none:name)%",
    "text": "n=%DYNAMIC_METADATA(obs.test:count)% f=%DYNAMIC_METADATA(obs.test:enabled)%",
    "trunc": "%DYNAMIC_METADATA(obs.test:name):3%",
}


def test_dynamic_metadata_like_builtin(tmp_path):
    front, up = free_port(), free_port()
    logs, builtin, ours = paired_loggers(tmp_path, META_FORMAT)
    listener = hcm_listener("front", front, [route("/", "backend")], access_log=logs)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"].insert(0, {"name": "envoy.filters.http.set_metadata", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
        "metadata": [{"metadata_namespace": "obs.test", "value": {
            "name": "checkout", "count": 42, "ratio": 0.25, "enabled": True, "inner": {"leaf": "deep"}}}]}})
    res = {"listeners": [listener, direct_response_listener("up", up)], "clusters": [static_cluster("backend", up)]}
    with Envoy(tmp_path, res) as e:
        assert curl(f"http://127.0.0.1:{front}/x").stdout == "200"
        wait_lines(1, builtin, ours)
        e.quit()
    a, b = read_json_lines(builtin), read_json_lines(ours)
    assert a == b
    assert a[0]["str"] == "checkout" and a[0]["num"] == 42 and a[0]["flag"] is True


DERIVED_FORMAT = {
    "request_id": "%REQ(X-REQUEST-ID)%",
    "g": "%GRPC_STATUS%",
    "g_snake": "%GRPC_STATUS(SNAKE_STRING)%",
    "g_num": "%GRPC_STATUS(NUMBER)%",
    "g_number": "%GRPC_STATUS_NUMBER%",
    "g_text": "g=%GRPC_STATUS(CAMEL_STRING)% n=%GRPC_STATUS_NUMBER%",
    "qa": "%QUERY_PARAM(a)%",
    "qc": "%QUERY_PARAM(c)%",
    "qd": "%QUERY_PARAM(d)%",
    "qe": "%QUERY_PARAM(e)%",
    "q_decoded_name": "%QUERY_PARAM(a&)%",
    "q_bad_escape": "%QUERY_PARAM(bad)%",
    "q_eq": "%QUERY_PARAM(f)%",
    "q_cut": "%QUERY_PARAM(e):3%",
    "q_missing": "%QUERY_PARAM(z)%",
    "q_text": "a=%QUERY_PARAM(a)% z=%QUERY_PARAM(z)%",
    "path": "%PATH%",
    "path_nq": "%PATH(NQ)%",
    "path_orig": "%PATH(WQ:ORIG)%",
    "path_nq_path": "%PATH(NQ:PATH)%",
    "path_cut": "%PATH(NQ:PATH):4%",
    "rwq": "%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "rwq_cut": "%REQ_WITHOUT_QUERY(:PATH):3%",
    "co_sni_or_authority": '%COALESCE({"operators": ["REQUESTED_SERVER_NAME", {"command": "REQ", "param": ":authority"}]})%',
    "co_number": '%COALESCE({"operators": [{"command": "REQ", "param": "x-nope"}, "GRPC_STATUS_NUMBER", "RESPONSE_CODE"]})%',
    # An empty value counts as a value in Envoy 1.40 (later versions pass over it).
    "co_empty": '%COALESCE({"operators": ["LOCAL_REPLY_BODY", "PROTOCOL"]})%',
    "co_cut": '%COALESCE({"operators": [{"command": "QUERY_PARAM", "param": "e", "max_length": 4}]}):3%',
    "co_cut_text": 'c=%COALESCE({"operators": ["RESPONSE_CODE"]}):1%',
    "co_cut_typed": '%COALESCE({"operators": ["RESPONSE_CODE"]}):1%',
    "co_time": '%COALESCE({"operators": [{"command": "START_TIME", "param": "%s"}]})%',
    "co_none": '%COALESCE({"operators": [{"command": "REQ", "param": "x-nope"}]})%',
    "co_text": 'route=%COALESCE({"operators": ["ROUTE_NAME", {"command": "QUERY_PARAM", "param": "a"}]})%',
    "start_local": "%START_TIME_LOCAL%",
    "start_local_f": "%START_TIME_LOCAL(%F %T %z %Ez %Z %s)%",
    "start_utc_z": "%START_TIME(%z %Z)%",
    "emit": "%EMIT_TIME%",
    "emit_local": "%EMIT_TIME_LOCAL(%z|%Z)%",
    # An empty header name is accepted and never present: the other one decides.
    "req_empty_main": "%REQ(?USER-AGENT)%",
    "req_empty_alt": "%REQ(X-NONE?)%",
    "req_empty_alt_found": "%REQ(USER-AGENT?)%",
    "start_ampm": "%START_TIME(%I %p %P)%",
    # Envoy's request map answers `host` with :authority.
    "req_host": "%REQ(HOST)%",
    "req_host_alt": "%REQ(X-NOPE?HOST)%",
    "req_host_text": "h=%REQ(HOST):4%",
    "rwq_host": "%REQ_WITHOUT_QUERY(HOST)%",
    # strftime's flags and widths (glibc's, which absl hands these to).
    "start_flags": "%START_TIME(%-d/%-m/%Y %-I:%M:%S %P|%_3H|%^a|%#B|%010A|%-10k|%0e|%#p)%",
    "start_local_flags": "%START_TIME_LOCAL(%-H:%-M %^b %_5j)%",
}


def all_operator_loggers(tmp_path):
    """The built-in and our logger with both maps; the built-in gets the extension that serves
    REQ_WITHOUT_QUERY."""
    logs, builtin, ours = paired_loggers(tmp_path, {**FORMAT, **DERIVED_FORMAT})
    logs[0]["typed_config"]["log_format"]["formatters"] = [{
        "name": "envoy.formatter.req_without_query",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery"}}]
    return logs, builtin, ours


def test_grpc_status_query_path_and_local_times_like_builtin(tmp_path):
    """The operators derived from headers (gRPC status from trailers, headers or the HTTP code;
    query parameters; the path with and without its query) and the local-time ones, against the
    built-in on gRPC and plain traffic, with Envoy in a half-hour time zone. REQ_WITHOUT_QUERY
    is an extension in Envoy (`envoy.formatter.req_without_query`), enabled for the built-in."""
    from grpc_upstream import GrpcUpstream
    from otlp_receiver import h2_cluster

    front, up, up503, dead = free_port(), free_port(), free_port(), free_port()
    # With the whole main map too: these routes have no names, some answer themselves.
    logs, builtin, ours = all_operator_loggers(tmp_path)

    def status_header(prefix, value):
        return {"match": {"prefix": prefix}, "direct_response": {"status": 200},
                "response_headers_to_add": [{"header": {"key": "grpc-status", "value": value}}]}

    routes = [route("/t.S/", "grpc"), status_header("/hdr", "7"), status_header("/bad", "abc"),
              status_header("/big", "99"), {"match": {"prefix": "/e429"}, "direct_response": {"status": 429}},
              route("/u503", "backend503"), route("/dead", "dead"), route("/", "backend")]
    up503_listener = hcm_listener("up503", up503, [{"match": {"prefix": "/"}, "direct_response": {"status": 503}}],
                                  stat_prefix="up503")
    # gRPC calls carry a message only to the gRPC server; the rest are header-only POSTs, since
    # an HTTP/2 body still in flight when Envoy answers itself ends the stream with an error.
    msg = tmp_path / "empty.msg"
    msg.write_bytes(b"\0\0\0\0\0")
    grpc_head = ["--http2-prior-knowledge", "-X", "POST", "-H", "content-type: application/grpc", "-H", "te: trailers"]
    grpc_h = [*grpc_head, "--data-binary", f"@{msg}"]
    query = "/q?a=1&b=2&a=3&c=&d&e=x%20y+z&%61%26=amp&bad=%zz%4&f=a=b"
    with GrpcUpstream() as g:
        res = {"listeners": [hcm_listener("front", front, routes, access_log=logs), direct_response_listener("up", up),
                             up503_listener],
               "clusters": [static_cluster("backend", up), static_cluster("backend503", up503),
                            static_cluster("dead", dead), h2_cluster("grpc", g.port)]}
        base = f"http://127.0.0.1:{front}"
        with Envoy(tmp_path, res, concurrency=1, env={"TZ": "Asia/Kolkata"}) as e:
            requests = [
                (query, []), (query, ["-H", "x-envoy-original-path: /orig/p?o=1"]), ("/plain", []),
                ("/hdr", []), ("/dead", []),
                *[(p, grpc_h) for p in ("/t.S/Ok", "/t.S/C5", "/t.S/C1", "/t.S/C16")],
                *[(p, grpc_head) for p in ("/hdr", "/bad", "/big", "/e429", "/u503", "/dead", "/plain")],
                ("/t.S/C5", ["--http2-prior-knowledge", "-H", "content-type: application/grpc-web",
                             "--data-binary", f"@{msg}"]),
                ("/t.S/C14", [x.replace("grpc", "grpc+proto") if x.startswith("content-type") else x for x in grpc_h]),
            ]
            for path, args in requests:
                curl(base + path, *args)
            wait_lines(len(requests), builtin, ours)
            assert e.quit() == 0
    a, b = records_by_id(builtin), records_by_id(ours)
    assert_same_records(a, b, len(requests))
    recs = list(a.values())
    assert all(r["start_local"].endswith("+0530") for r in recs)
    # The traffic reached every source of a gRPC status, and the parts of a query.
    assert {r["g"] for r in recs} >= {None, "OK", "NotFound", "Canceled", "Unauthenticated", "PermissionDenied",
                                      "-1", "99", "Unavailable", "Unknown"}, recs
    assert any(r["g_snake"] == "CANCELLED" for r in recs) and any(r["g_num"] == -1 for r in recs)
    assert [r["g"] for r in recs if r["path"].startswith("/t.S/C")][-2:] == [None, "Unavailable"], "grpc-web, grpc+proto"
    assert any(r["qe"] == "x y+z" and r["q_decoded_name"] == "amp" and r["q_bad_escape"] == "%zz%4" for r in recs)
    assert any(r["path_orig"] == "/orig/p?o=1" and r["rwq"] == "/orig/p" for r in recs)
    assert all(r["start_local_f"].split(" ")[2:5] == ["+0530", "+05:30", "IST"] for r in recs)
    assert all(r["start_utc_z"] == "+0000 UTC" and r["emit_local"] == "+0530|IST" for r in recs)


def test_tcp_proxy_records_like_builtin(tmp_path):
    """The same maps on a TCP proxy's access log (Envoy's TcpConnectionEnd records): HTTP-only
    operators unavailable, bytes, addresses and hosts of the connection, and the flags of a
    connection that failed in the order the TCP proxy sets them (`UF,URX`)."""
    logs, builtin, ours = all_operator_loggers(tmp_path)
    tcp, tcp_dead, up, dead = free_port(), free_port(), free_port(), free_port()

    def tcp_listener(name, port, cluster):
        proxy = {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                 "stat_prefix": name, "cluster": cluster, "access_log": logs}
        return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": proxy}]}]}

    res = {"listeners": [tcp_listener("tcp", tcp, "backend"), tcp_listener("tcp_dead", tcp_dead, "dead"),
                         direct_response_listener("up", up)],
           "clusters": [static_cluster("backend", up), static_cluster("dead", dead)]}
    with Envoy(tmp_path, res, env={"OBS_PARITY_ENV": "from-env"}) as e:
        curl(f"http://127.0.0.1:{tcp}/through?a=1", "-H", "x-request-id: not-seen-by-a-tcp-proxy")
        curl(f"http://127.0.0.1:{tcp}/again", http2=True)
        assert curl(f"http://127.0.0.1:{tcp_dead}/x", check=False).returncode != 0
        wait_lines(3, builtin, ours)
        assert e.quit() == 0
    a = {r["cid"]: {**r, "request_id": str(r["cid"])} for r in read_json_lines(builtin)}
    b = {r["cid"]: {**r, "request_id": str(r["cid"])} for r in read_json_lines(ours)}
    assert_same_records(a, b, 3)
    recs = list(a.values())
    assert {r["alt"] for r in recs} == {"TcpConnectionEnd"} and all(r["method"] is None for r in recs)
    assert sorted(r["flags"] for r in recs) == ["-", "-", "UF,URX"]
    assert all(r["brx"] > 0 for r in recs if r["flags"] == "-")


def test_start_and_upstream_records_like_builtin(tmp_path):
    """Records of the other HTTP log types: DownstreamStart (the HCM's
    `flush_access_log_on_new_request`) beside DownstreamEnd, and the router's `upstream_log`
    (UpstreamEnd), each with both maps against the built-in."""
    (tmp_path / "up").mkdir()
    logs, builtin, ours = all_operator_loggers(tmp_path)
    ulogs, ubuiltin, uours = all_operator_loggers(tmp_path / "up")
    front, up = free_port(), free_port()
    router = {**ROUTER, "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                                         "upstream_log": ulogs}}
    res = {"listeners": [hcm_listener("front", front, [route("/", "backend", name="r")], access_log=logs,
                                      http_filters=[router],
                                      access_log_options={"flush_access_log_on_new_request": True}),
                         direct_response_listener("up", up)],
           "clusters": [static_cluster("backend", up)]}
    with Envoy(tmp_path, res, env={"OBS_PARITY_ENV": "from-env"}) as e:
        curl(f"http://127.0.0.1:{front}/x?a=1")
        curl(f"http://127.0.0.1:{front}/y", "-d", "body", http2=True)
        wait_lines(4, builtin, ours)
        wait_lines(2, ubuiltin, uours)
        assert e.quit() == 0

    def keyed(path):
        return {f'{r["request_id"]} {r["alt"]}': r for r in read_json_lines(path)}

    a, b = keyed(builtin), keyed(ours)
    assert_same_records(a, b, 4)
    assert sorted(r["alt"] for r in a.values()) == ["DownstreamEnd"] * 2 + ["DownstreamStart"] * 2
    a, b = keyed(ubuiltin), keyed(uours)
    assert_same_records(a, b, 2)
    assert {r["alt"] for r in a.values()} == {"UpstreamEnd"}


def test_sample_keeps_the_requests_envoys_runtime_filter_keeps(tmp_path):
    """`sample: 0.1` keeps exactly the requests Envoy's own runtime filter keeps at 1,000 in
    10,000 (both decide on Envoy's integer of the x-request-id), so logs sampled by the pack
    and by Envoy, and traces sampled by `random_sampling` at the same rate, are the same
    requests."""
    fmt = {"request_id": "%REQ(X-REQUEST-ID)%"}
    logs, builtin, ours = paired_loggers(tmp_path, fmt)
    logs[0]["filter"] = {"runtime_filter": {"runtime_key": "obs_test.sample",
                                            "percent_sampled": {"numerator": 1000, "denominator": "TEN_THOUSAND"}}}
    logs[1]["typed_config"]["logger_config"]["value"]["filter"] = {"sample": 0.1}
    logs[1]["typed_config"]["logger_config"]["value"]["flush_interval_ms"] = 100
    front = free_port()
    res = {"listeners": [hcm_listener("front", front, [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}],
                                      access_log=logs)]}
    with Envoy(tmp_path, res) as e:
        h2load(f"http://127.0.0.1:{front}/", 1000, clients=4)
        assert e.quit() == 0  # both loggers drain on shutdown
    a = {r["request_id"] for r in read_json_lines(builtin)}
    b = {r["request_id"] for r in read_json_lines(ours)}
    assert 50 <= len(a) <= 150, len(a)
    assert a == b, (len(a), len(b), sorted(a ^ b)[:5])
