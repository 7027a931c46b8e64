"""Bad logger configs stop Envoy from accepting the config, with our message naming the problem
in Envoy's log, and never crash it."""
import pytest

from harness import Envoy, direct_response_listener, free_port, hcm_listener, our_json_logger, route, static_cluster

CASES = {
    "unknown key": ({"path": "{log}", "bogus": 1}, "bogus"),
    "missing path": ({"json_format": {"a": "%PROTOCOL%"}}, "missing field `path`"),
    "unknown operator": ({"path": "{log}", "json_format": {"a": "%NOPE%"}}, "unknown command operator %NOPE%"),
    "filter state": ({"path": "{log}", "json_format": {"a": "%FILTER_STATE(k)%"}}, "%FILTER_STATE% is not supported"),
    "cel": ({"path": "{log}", "json_format": {"a": "%CEL(request.path)%"}}, "%CEL% is not supported"),
    "unwritable path": ({"path": "/proc/obs-no-such-dir/a.log"}, "field `path`: cannot open"),
    "missing directory": ({"path": "/nonexistent-obs-dir/a.log"}, "field `path`: cannot open"),
    "wrong type": ({"path": "{log}", "queue_capacity": "lots"}, "field `queue_capacity`: invalid type"),
    "zero queue": ({"path": "{log}", "queue_capacity": 0}, "field `queue_capacity`: must be between"),
    "bad interval": ({"path": "{log}", "flush_interval_ms": 0}, "field `flush_interval_ms`"),
    "bad sample": ({"path": "{log}", "filter": {"sample": 1.5}}, "field `filter.sample`"),
    "unknown flag": ({"path": "{log}", "filter": {"response_flags": ["XYZ"]}}, "unknown response flag"),
    "bad operator in a list": ({"path": "{log}", "json_format": {"a": [1, "%NOPE%"]}},
                               "field `json_format.a[1]`: unknown command operator %NOPE%"),
    "key with ': '": ({"path": "{log}", "json_format": {"upstream: host": {"x": "%NOPE%"}}},
                      "field `json_format.upstream: host.x`: unknown command operator %NOPE%"),
    "bad time format": ({"path": "{log}", "json_format": {"t": "%START_TIME(%Q)%"}}, "unsupported conversion"),
    "unclosed operator": ({"path": "{log}", "json_format": {"a": "%REQ(X"}}, "missing ')'"),
    "bad header name": ({"path": "{log}", "json_format": {"a": "%REQ(X FOO)%"}}, "\"x foo\" is not a valid header name"),
    "unknown logger name": ("LOGGER:xml", "unknown logger \"xml\""),
}


def config_for(case, log):
    value, _ = CASES[case]
    if isinstance(value, str):
        return None
    return {k: (str(log) if v == "{log}" else v) for k, v in value.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_is_rejected_with_a_message(tmp_path, case):
    front, up = free_port(), free_port()
    cfg = config_for(case, tmp_path / "a.log")
    logger = our_json_logger(cfg if cfg is not None else {"path": str(tmp_path / "a.log")})
    if cfg is None:
        logger["typed_config"]["logger_name"] = CASES[case][0].split(":", 1)[1]
    res = {"listeners": [hcm_listener("front", front, [route("/", "backend")], access_log=[logger]),
                         direct_response_listener("up", up)],
           "clusters": [static_cluster("backend", up)]}
    e = Envoy(tmp_path, res)
    p = e.run_to_exit()
    text = e.log()
    assert p.returncode == 1, f"Envoy accepted a bad config ({case}) or crashed (rc={p.returncode}):\n{text[-2000:]}"
    assert CASES[case][1] in text, text[-3000:]
    assert "envoy-obs access logger" in text
    assert "Caught" not in text and "panic" not in text, text[-3000:]


def test_string_value_config_must_hold_json(tmp_path):
    front = free_port()
    logger = our_json_logger({"path": str(tmp_path / "a.log")})
    logger["typed_config"]["logger_config"] = {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                               "value": "path=/tmp/x"}
    res = {"listeners": [hcm_listener("front", front, [route("/", "backend")], access_log=[logger])],
           "clusters": [static_cluster("backend", free_port())]}
    e = Envoy(tmp_path, res)
    assert e.run_to_exit().returncode == 1
    assert "invalid logger_config" in e.log()


def test_string_value_json_config_is_accepted(tmp_path):
    front = free_port()
    logger = our_json_logger({})
    logger["typed_config"]["logger_config"] = {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                               "value": '{"path": "%s"}' % (tmp_path / "a.log")}
    res = {"listeners": [hcm_listener("front", front, [route("/", "backend")], access_log=[logger])],
           "clusters": [static_cluster("backend", free_port())]}
    e = Envoy(tmp_path, res)
    assert e.run_to_exit(mode="validate").returncode == 0, e.log()[-2000:]
