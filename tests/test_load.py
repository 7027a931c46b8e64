"""All three modules load into one real Envoy 1.40.0 with the expected ABI version."""
from harness import (STATS_SINK_SO, TRACER_SO, Envoy, direct_response_listener, free_port,
                     hcm_listener, our_json_logger, route, static_cluster, curl, read_json_lines)


def test_all_modules_load_and_abi_version_matches(tmp_path):
    front, up = free_port(), free_port()
    log = tmp_path / "access.log"
    tracing = {"provider": {"name": "envoy.tracers.dynamic_modules", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.tracers.dynamic_modules.v3.DynamicModuleTracer",
        "dynamic_module_config": {"module": {"local": {"filename": str(TRACER_SO)}}},
        "tracer_name": "opentelemetry",
        "tracer_config": {"@type": "type.googleapis.com/google.protobuf.Struct", "value": {}}}}}
    sinks = {"stats_sinks": [{"name": "envoy.stat_sinks.dynamic_modules", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.stat_sinks.dynamic_modules.v3.DynamicModuleStatsSink",
        "dynamic_module_config": {"module": {"local": {"filename": str(STATS_SINK_SO)}}},
        "sink_name": "prometheus",
        "sink_config": {"@type": "type.googleapis.com/google.protobuf.Struct", "value": {}}}}],
        "stats_flush_interval": "1s"}
    res = {"listeners": [hcm_listener("front", front, [route("/", "backend")],
                                      access_log=[our_json_logger({"path": str(log)})], tracing=tracing),
                         direct_response_listener("up", up)],
           "clusters": [static_cluster("backend", up)]}
    with Envoy(tmp_path, res, concurrency=2, extra_bootstrap=sinks) as e:
        assert curl(f"http://127.0.0.1:{front}/x").stdout == "200"
        assert e.quit() == 0
    text = e.log()
    assert text.count("Dynamic module ABI version v0.2.0 matched") == 3, text[-3000:]
    assert "deprecated" not in text
    assert [r["response_code"] for r in read_json_lines(log)] == [200]
