"""Our header against the real 1.40.0 binary, and our cdylibs against what Envoy resolves."""
import re
import subprocess

import pytest

from harness import ACCESS_LOG_SO, ENVOY_BIN, ROOT, STATS_SINK_SO, TRACER_SO

HEADER = ROOT / "abi" / "include" / "envoy_obs_abi.h"

# Required hooks per kind (../shared/envoy-abi-1.40.md §2.1, §3.2, §4.1): all but the
# optional access_logger_flush, tracer_span_reserve_tags and stat_sink_config_scheduled.
REQUIRED = {
    ACCESS_LOG_SO: ["access_logger_config_new", "access_logger_config_destroy", "access_logger_new",
                    "access_logger_log", "access_logger_destroy"],
    TRACER_SO: ["tracer_config_new", "tracer_config_destroy", "tracer_start_span", "tracer_span_set_operation",
                "tracer_span_set_tag", "tracer_span_log", "tracer_span_finish", "tracer_span_inject_context",
                "tracer_span_spawn_child", "tracer_span_set_sampled", "tracer_span_use_local_decision",
                "tracer_span_get_baggage", "tracer_span_set_baggage", "tracer_span_get_trace_id",
                "tracer_span_get_span_id", "tracer_span_destroy"],
    STATS_SINK_SO: ["stat_sink_config_new", "stat_sink_config_destroy", "stat_sink_flush",
                    "stat_sink_on_histogram_complete"],
}


def declared(prefix: str) -> set[str]:
    pre = subprocess.run(["gcc", "-E", "-P", "-x", "c", str(HEADER)], capture_output=True, text=True, check=True).stdout
    return set(re.findall(rf"\b({prefix}[a-z0-9_]+)\s*\(", pre))


def exported(path, defined_only=True) -> set[str]:
    args = ["nm", "-D"] + (["--defined-only"] if defined_only else []) + [str(path)]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def test_every_declared_callback_is_exported_by_envoy_1_40():
    callbacks = declared("envoy_dynamic_module_callback_")
    assert len(callbacks) >= 150, f"header declares {len(callbacks)} callbacks"
    missing = callbacks - exported(ENVOY_BIN)
    assert not missing, f"declared in our header but not exported by {ENVOY_BIN}: {sorted(missing)}"


def test_header_covers_all_callbacks_of_our_three_kinds():
    kinds = re.compile(r"envoy_dynamic_module_callback_(access_logger_|tracer_|stat_sink_)")
    in_binary = {s for s in exported(ENVOY_BIN) if kinds.match(s)}
    assert in_binary - declared("envoy_dynamic_module_callback_") == set()


@pytest.mark.parametrize("so", list(REQUIRED), ids=lambda p: p.name)
def test_cdylib_exports_required_hooks(so):
    syms = exported(so)
    want = {"envoy_dynamic_module_on_program_init"} | {f"envoy_dynamic_module_on_{h}" for h in REQUIRED[so]}
    assert want - syms == set()
    # Every hook we export is one the header declares (no typos that Envoy would ignore).
    hooks = {s for s in syms if s.startswith("envoy_dynamic_module_on_")}
    assert hooks - declared("envoy_dynamic_module_on_") == set()


@pytest.mark.parametrize("so", list(REQUIRED), ids=lambda p: p.name)
def test_cdylib_only_needs_callbacks_envoy_exports(so):
    undefined = {s for s in exported(so, defined_only=False) if s.startswith("envoy_dynamic_module_callback_")}
    assert undefined - exported(ENVOY_BIN) == set()
