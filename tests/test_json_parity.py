"""Parity: Envoy's built-in file logger (log_format.json_format) and ours, attached to the same
HttpConnectionManager, log the same traffic. Records are matched by x-request-id and must be
equal after JSON parsing: same keys, same values, same types.

Stated tolerance for time-dependent fields: START_TIME values and the millisecond durations
may differ by at most 1 ms (both loggers read the same stream info, so in practice they are equal)."""
import datetime

from harness import (Envoy, curl, direct_response_listener, free_port, hcm_listener, paired_loggers, read_json_lines,
                     records_by_id, route, static_cluster, wait_lines)

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
TIME_FIELDS = {"dur", "rqdur", "rqtx", "rsdur", "rstx", "pool"}


def start_ms(s: str) -> float:
    return datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp() * 1000


def test_same_records_as_builtin_json_format(tmp_path):
    front, up, dead = free_port(), free_port(), free_port()
    logs, builtin, ours = paired_loggers(tmp_path, FORMAT)
    retry = route("/retry", "dead", name="r_retry")
    retry["route"]["retry_policy"] = {"retry_on": "connect-failure", "num_retries": 1}
    res = {"listeners": [hcm_listener("front", front, [route("/ok", "backend", name="r_ok"),
                                                       route("/dead", "dead", name="r_dead"), retry],
                                      access_log=logs),
                         direct_response_listener("up", up)],
           "clusters": [static_cluster("backend", up), static_cluster("dead", dead)]}
    base = f"http://127.0.0.1:{front}"
    with Envoy(tmp_path, res, concurrency=2, env={"OBS_PARITY_ENV": "from-env"}) as e:
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
        ]
        assert codes == ["200", "200", "200", "404", "503", "503", "200", "200", "200", "404"]
        wait_lines(len(codes), builtin, ours)
        assert e.quit() == 0
    a, b = records_by_id(builtin), records_by_id(ours)
    assert len(a) == len(codes) and a.keys() == b.keys()
    for rid, x in a.items():
        y = b[rid]
        assert x.keys() == y.keys(), rid
        for k in x:
            if k in TIME_FIELDS and x[k] is not None and y[k] is not None:
                assert type(x[k]) is type(y[k]) and abs(x[k] - y[k]) <= 1, (rid, k, x[k], y[k])
            elif k == "start":
                assert abs(start_ms(x[k]) - start_ms(y[k])) <= 1, (rid, k, x[k], y[k])
            elif k in ("mixed", "start_f", "start_s", "start_clock"):
                assert x[k][:4] == y[k][:4] and len(x[k]) == len(y[k]), (rid, k, x[k], y[k])
            else:
                assert type(x[k]) is type(y[k]) and x[k] == y[k], (rid, k, x[k], y[k])
    # The traffic covered what the issue asks for.
    recs = list(a.values())
    assert {r["code"] for r in recs} == {200, 404, 503}
    assert {r["proto"] for r in recs} == {"HTTP/1.1", "HTTP/2"}
    assert any(r["brx"] > 0 for r in recs) and any(r["long"] == "L" * 10 for r in recs)
    assert any(r["rep"] == "a" for r in recs) and any(r["flags"] == "UF" for r in recs)
    assert any(r["flags"] == "URX,UF" for r in recs), "flags in the order Envoy set them"
    assert all(r["pct"] == "100% of %PROTOCOL%" for r in recs)
    assert any(r["uhn"] and r["uhn"].startswith("127.0.0.1:") for r in recs), "a STATIC host is named by its address"
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
