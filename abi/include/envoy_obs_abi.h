/*
 * envoy_obs_abi.h -- the subset of Envoy 1.40.0's dynamic-module C ABI used by envoy-obs.
 *
 * Written for this project from ../shared/envoy-abi-1.40.md (itself checked against the
 * 1.40.0 binary). It declares: program init, the module-wide callbacks, and every hook and
 * callback of the access-logger, tracer and stat-sink kinds. Hooks (envoy_dynamic_module_on_*)
 * are implemented by our cdylibs; callbacks (envoy_dynamic_module_callback_*) are exported by
 * the envoy binary and resolved when Envoy dlopen()s a module.
 *
 * Regenerate the Rust bindings after editing:  make bindings
 * tests/test_abi_conformance.py checks every callback declared here against `nm -D envoy`.
 */
#ifndef ENVOY_OBS_ABI_H
#define ENVOY_OBS_ABI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------- common types */

typedef const char* envoy_dynamic_module_type_abi_version_module_ptr;

/* Memory owned by Envoy, valid for the duration of the hook that exposes it. */
typedef struct {
  const char* ptr;
  size_t length;
} envoy_dynamic_module_type_envoy_buffer;

/* Memory owned by the module. Same layout as envoy_buffer. */
typedef struct {
  const char* ptr;
  size_t length;
} envoy_dynamic_module_type_module_buffer;

typedef struct {
  const char* key_ptr;
  size_t key_length;
  const char* value_ptr;
  size_t value_length;
} envoy_dynamic_module_type_envoy_http_header;

/* C enums are 4-byte ints on this ABI. The Rust side takes them as integers and maps them. */
typedef uint32_t envoy_dynamic_module_type_http_header_type; /* 0 req hdr, 1 req trl, 2 resp hdr, 3 resp trl */
typedef uint32_t envoy_dynamic_module_type_log_level;        /* 0 trace .. 5 critical, 6 off */
typedef uint32_t envoy_dynamic_module_type_metrics_result;   /* 0 ok, 1 not found, 2 bad labels, 3 frozen */
typedef uint32_t envoy_dynamic_module_type_access_log_type;  /* 6 = DownstreamEnd */
typedef uint32_t envoy_dynamic_module_type_response_flag;    /* 0 .. 29 */
typedef uint32_t envoy_dynamic_module_type_attribute_id;     /* 0 .. 68 */
typedef uint32_t envoy_dynamic_module_type_trace_reason;     /* 0 not traceable .. 4 client forced */

typedef envoy_dynamic_module_type_envoy_buffer EB;
typedef envoy_dynamic_module_type_module_buffer MB;

/* ---------------------------------------------------------------- module-wide */

envoy_dynamic_module_type_abi_version_module_ptr envoy_dynamic_module_on_program_init(void);

void envoy_dynamic_module_callback_log(envoy_dynamic_module_type_log_level level, MB message);
void envoy_dynamic_module_callback_log_v2(envoy_dynamic_module_type_log_level level, MB message,
                                          MB source_file, uint32_t source_line);
bool envoy_dynamic_module_callback_log_enabled(envoy_dynamic_module_type_log_level level);
envoy_dynamic_module_type_log_level envoy_dynamic_module_callback_get_log_level(void);
uint32_t envoy_dynamic_module_callback_get_concurrency(void);
bool envoy_dynamic_module_callback_is_validation_mode(void);
bool envoy_dynamic_module_callback_get_runtime_bool(MB key, bool default_value);
uint64_t envoy_dynamic_module_callback_get_runtime_int(MB key, uint64_t default_value);
double envoy_dynamic_module_callback_get_runtime_number(MB key, double default_value);
bool envoy_dynamic_module_callback_register_function(MB key, void* function_ptr);
bool envoy_dynamic_module_callback_get_function(MB key, void** function_ptr_out);
bool envoy_dynamic_module_callback_register_shared_data(MB key, void* data_ptr);
bool envoy_dynamic_module_callback_get_shared_data(MB key, void** data_ptr_out);

/* ---------------------------------------------------------------- access logger */

typedef void* envoy_dynamic_module_type_access_logger_config_envoy_ptr;
typedef const void* envoy_dynamic_module_type_access_logger_config_module_ptr;
typedef void* envoy_dynamic_module_type_access_logger_envoy_ptr;
typedef const void* envoy_dynamic_module_type_access_logger_module_ptr;

typedef envoy_dynamic_module_type_access_logger_envoy_ptr AL;
typedef envoy_dynamic_module_type_access_logger_config_envoy_ptr ALC;

/* v1 timing: absolute start, then ns offsets from start; -1 = unavailable. */
typedef struct {
  int64_t start_time_unix_ns;
  int64_t request_complete_duration_ns;
  int64_t first_upstream_tx_byte_sent_ns;
  int64_t last_upstream_tx_byte_sent_ns;
  int64_t first_upstream_rx_byte_received_ns;
  int64_t last_upstream_rx_byte_received_ns;
  int64_t first_downstream_tx_byte_sent_ns;
  int64_t last_downstream_tx_byte_sent_ns;
} envoy_dynamic_module_type_timing_info;

/* v2 timing (176 bytes): value[i] is meaningful only when has[i]; see TIMING_V2_* indices. */
enum {
  ENVOY_OBS_TIMING_START_TIME_UNIX_NS = 0,
  ENVOY_OBS_TIMING_DOWNSTREAM_CONNECTION_BEGIN = 1,
  ENVOY_OBS_TIMING_DOWNSTREAM_HANDSHAKE_START = 2,
  ENVOY_OBS_TIMING_DOWNSTREAM_HANDSHAKE_COMPLETE = 3,
  ENVOY_OBS_TIMING_LAST_DOWNSTREAM_HEADER_RX = 4,
  ENVOY_OBS_TIMING_LAST_DOWNSTREAM_RX = 5,
  ENVOY_OBS_TIMING_UPSTREAM_CONNECT_START = 6,
  ENVOY_OBS_TIMING_UPSTREAM_CONNECT_COMPLETE = 7,
  ENVOY_OBS_TIMING_UPSTREAM_HANDSHAKE_COMPLETE = 8,
  ENVOY_OBS_TIMING_FIRST_UPSTREAM_TX = 9,
  ENVOY_OBS_TIMING_LAST_UPSTREAM_TX = 10,
  ENVOY_OBS_TIMING_FIRST_UPSTREAM_RX = 11,
  ENVOY_OBS_TIMING_FIRST_UPSTREAM_RX_BODY = 12,
  ENVOY_OBS_TIMING_LAST_UPSTREAM_RX = 13,
  ENVOY_OBS_TIMING_FIRST_DOWNSTREAM_TX = 14,
  ENVOY_OBS_TIMING_LAST_DOWNSTREAM_TX = 15,
  ENVOY_OBS_TIMING_LAST_DOWNSTREAM_ACK = 16,
  ENVOY_OBS_TIMING_REQUEST_COMPLETE = 17,
  ENVOY_OBS_TIMING_DOWNSTREAM_CONNECTION_END = 18,
  ENVOY_OBS_TIMING_COUNT = 19
};
typedef struct {
  int64_t value[19];
  bool has[19];
} envoy_dynamic_module_type_timing_info_v2;

typedef struct {
  uint64_t bytes_received;
  uint64_t bytes_sent;
  uint64_t wire_bytes_received; /* upstream wire bytes */
  uint64_t wire_bytes_sent;     /* upstream wire bytes */
} envoy_dynamic_module_type_bytes_info;

typedef struct {
  uint64_t wire_bytes_received;
  uint64_t wire_bytes_sent;
} envoy_dynamic_module_type_downstream_wire_bytes;

/* hooks */
envoy_dynamic_module_type_access_logger_config_module_ptr
envoy_dynamic_module_on_access_logger_config_new(ALC config_envoy_ptr, EB name, EB config);
void envoy_dynamic_module_on_access_logger_config_destroy(
    envoy_dynamic_module_type_access_logger_config_module_ptr config_module_ptr);
envoy_dynamic_module_type_access_logger_module_ptr envoy_dynamic_module_on_access_logger_new(
    envoy_dynamic_module_type_access_logger_config_module_ptr config_module_ptr, AL logger_envoy_ptr);
void envoy_dynamic_module_on_access_logger_log(AL logger_envoy_ptr,
                                               envoy_dynamic_module_type_access_logger_module_ptr logger_module_ptr,
                                               envoy_dynamic_module_type_access_log_type log_type);
void envoy_dynamic_module_on_access_logger_destroy(envoy_dynamic_module_type_access_logger_module_ptr logger_module_ptr);
void envoy_dynamic_module_on_access_logger_flush(envoy_dynamic_module_type_access_logger_module_ptr logger_module_ptr);

/* headers */
size_t envoy_dynamic_module_callback_access_logger_get_headers_size(AL l, envoy_dynamic_module_type_http_header_type t);
bool envoy_dynamic_module_callback_access_logger_get_headers(AL l, envoy_dynamic_module_type_http_header_type t,
                                                             envoy_dynamic_module_type_envoy_http_header* result_headers);
bool envoy_dynamic_module_callback_access_logger_get_header_value(AL l, envoy_dynamic_module_type_http_header_type t,
                                                                  MB key, EB* result, size_t index,
                                                                  size_t* total_count_out);
/* fixed-size stream info */
void envoy_dynamic_module_callback_access_logger_get_timing_info(AL l, envoy_dynamic_module_type_timing_info* out);
void envoy_dynamic_module_callback_access_logger_get_timing_info_v2(AL l, envoy_dynamic_module_type_timing_info_v2* out);
void envoy_dynamic_module_callback_access_logger_get_bytes_info(AL l, envoy_dynamic_module_type_bytes_info* out);
void envoy_dynamic_module_callback_access_logger_get_downstream_wire_bytes(
    AL l, envoy_dynamic_module_type_downstream_wire_bytes* out);
/* scalars */
uint32_t envoy_dynamic_module_callback_access_logger_get_response_code(AL l);
uint32_t envoy_dynamic_module_callback_access_logger_get_attempt_count(AL l);
uint32_t envoy_dynamic_module_callback_access_logger_get_worker_index(AL l);
uint64_t envoy_dynamic_module_callback_access_logger_get_response_flags(AL l);
bool envoy_dynamic_module_callback_access_logger_has_response_flag(AL l, envoy_dynamic_module_type_response_flag flag);
uint64_t envoy_dynamic_module_callback_access_logger_get_connection_id(AL l);
uint64_t envoy_dynamic_module_callback_access_logger_get_upstream_connection_id(AL l);
uint64_t envoy_dynamic_module_callback_access_logger_get_request_headers_bytes(AL l);
uint64_t envoy_dynamic_module_callback_access_logger_get_response_headers_bytes(AL l);
uint64_t envoy_dynamic_module_callback_access_logger_get_response_trailers_bytes(AL l);
int64_t envoy_dynamic_module_callback_access_logger_get_upstream_pool_ready_duration_ns(AL l);
int64_t envoy_dynamic_module_callback_access_logger_get_downstream_peer_cert_v_start(AL l);
int64_t envoy_dynamic_module_callback_access_logger_get_downstream_peer_cert_v_end(AL l);
int64_t envoy_dynamic_module_callback_access_logger_get_upstream_peer_cert_v_start(AL l);
int64_t envoy_dynamic_module_callback_access_logger_get_upstream_peer_cert_v_end(AL l);
bool envoy_dynamic_module_callback_access_logger_is_mtls(AL l);
bool envoy_dynamic_module_callback_access_logger_is_trace_sampled(AL l);
bool envoy_dynamic_module_callback_access_logger_is_health_check(AL l);
bool envoy_dynamic_module_callback_access_logger_get_downstream_peer_cert_presented(AL l);
bool envoy_dynamic_module_callback_access_logger_get_downstream_peer_cert_validated(AL l);
/* strings: false when unavailable */
bool envoy_dynamic_module_callback_access_logger_get_protocol(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_request_id(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_response_code_details(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_route_name(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_virtual_cluster_name(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_local_reply_body(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_connection_termination_details(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_requested_server_name(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_upstream_cluster(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_upstream_host(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_upstream_protocol(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_upstream_transport_failure_reason(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_downstream_tls_version(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_downstream_tls_cipher(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_downstream_tls_session_id(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_downstream_peer_subject(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_downstream_peer_issuer(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_downstream_peer_serial(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_downstream_peer_cert_digest(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_downstream_peer_fingerprint_1(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_downstream_local_subject(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_downstream_transport_failure_reason(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_ja3_hash(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_ja4_hash(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_upstream_tls_version(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_upstream_tls_cipher(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_upstream_tls_session_id(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_upstream_peer_subject(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_upstream_peer_issuer(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_upstream_peer_cert_digest(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_upstream_local_subject(AL l, EB* result);
/* always false in 1.40 (stubs in the binary); declared because they are part of the kind */
bool envoy_dynamic_module_callback_access_logger_get_trace_id(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_span_id(AL l, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_filter_state(AL l, MB key, EB* result);
/* addresses: IP without port, port separately */
bool envoy_dynamic_module_callback_access_logger_get_downstream_remote_address(AL l, EB* address_out, uint32_t* port_out);
bool envoy_dynamic_module_callback_access_logger_get_downstream_local_address(AL l, EB* address_out, uint32_t* port_out);
bool envoy_dynamic_module_callback_access_logger_get_downstream_direct_remote_address(AL l, EB* address_out,
                                                                                    uint32_t* port_out);
bool envoy_dynamic_module_callback_access_logger_get_downstream_direct_local_address(AL l, EB* address_out,
                                                                                   uint32_t* port_out);
bool envoy_dynamic_module_callback_access_logger_get_upstream_remote_address(AL l, EB* address_out, uint32_t* port_out);
bool envoy_dynamic_module_callback_access_logger_get_upstream_local_address(AL l, EB* address_out, uint32_t* port_out);
/* SAN lists: call _size, then pass an array of that many buffers */
size_t envoy_dynamic_module_callback_access_logger_get_downstream_peer_uri_san_size(AL l);
bool envoy_dynamic_module_callback_access_logger_get_downstream_peer_uri_san(AL l, EB* sans_out);
size_t envoy_dynamic_module_callback_access_logger_get_downstream_peer_dns_san_size(AL l);
bool envoy_dynamic_module_callback_access_logger_get_downstream_peer_dns_san(AL l, EB* sans_out);
size_t envoy_dynamic_module_callback_access_logger_get_downstream_local_uri_san_size(AL l);
bool envoy_dynamic_module_callback_access_logger_get_downstream_local_uri_san(AL l, EB* sans_out);
size_t envoy_dynamic_module_callback_access_logger_get_downstream_local_dns_san_size(AL l);
bool envoy_dynamic_module_callback_access_logger_get_downstream_local_dns_san(AL l, EB* sans_out);
size_t envoy_dynamic_module_callback_access_logger_get_upstream_peer_uri_san_size(AL l);
bool envoy_dynamic_module_callback_access_logger_get_upstream_peer_uri_san(AL l, EB* sans_out);
size_t envoy_dynamic_module_callback_access_logger_get_upstream_peer_dns_san_size(AL l);
bool envoy_dynamic_module_callback_access_logger_get_upstream_peer_dns_san(AL l, EB* sans_out);
size_t envoy_dynamic_module_callback_access_logger_get_upstream_local_uri_san_size(AL l);
bool envoy_dynamic_module_callback_access_logger_get_upstream_local_uri_san(AL l, EB* sans_out);
size_t envoy_dynamic_module_callback_access_logger_get_upstream_local_dns_san_size(AL l);
bool envoy_dynamic_module_callback_access_logger_get_upstream_local_dns_san(AL l, EB* sans_out);
/* dynamic metadata and attributes */
bool envoy_dynamic_module_callback_access_logger_get_dynamic_metadata(AL l, MB filter_name, MB path, EB* result);
bool envoy_dynamic_module_callback_access_logger_get_dynamic_metadata_number(AL l, MB filter_name, MB path,
                                                                             double* result);
bool envoy_dynamic_module_callback_access_logger_get_dynamic_metadata_bool(AL l, MB filter_name, MB path, bool* result);
bool envoy_dynamic_module_callback_access_logger_get_attribute_string(AL l, envoy_dynamic_module_type_attribute_id id,
                                                                      EB* result);
bool envoy_dynamic_module_callback_access_logger_get_attribute_int(AL l, envoy_dynamic_module_type_attribute_id id,
                                                                   uint64_t* result);
bool envoy_dynamic_module_callback_access_logger_get_attribute_bool(AL l, envoy_dynamic_module_type_attribute_id id,
                                                                    bool* result);
/* metrics: take the CONFIG handle; define only inside config_new */
envoy_dynamic_module_type_metrics_result envoy_dynamic_module_callback_access_logger_config_define_counter(
    ALC c, MB name, size_t* counter_id_ptr);
envoy_dynamic_module_type_metrics_result envoy_dynamic_module_callback_access_logger_config_define_gauge(
    ALC c, MB name, size_t* gauge_id_ptr);
envoy_dynamic_module_type_metrics_result envoy_dynamic_module_callback_access_logger_config_define_histogram(
    ALC c, MB name, size_t* histogram_id_ptr);
envoy_dynamic_module_type_metrics_result envoy_dynamic_module_callback_access_logger_increment_counter(ALC c, size_t id,
                                                                                                     uint64_t value);
envoy_dynamic_module_type_metrics_result envoy_dynamic_module_callback_access_logger_increment_gauge(ALC c, size_t id,
                                                                                                   uint64_t value);
envoy_dynamic_module_type_metrics_result envoy_dynamic_module_callback_access_logger_decrement_gauge(ALC c, size_t id,
                                                                                                   uint64_t value);
envoy_dynamic_module_type_metrics_result envoy_dynamic_module_callback_access_logger_set_gauge(ALC c, size_t id,
                                                                                             uint64_t value);
envoy_dynamic_module_type_metrics_result envoy_dynamic_module_callback_access_logger_record_histogram_value(
    ALC c, size_t id, uint64_t value);

/* ---------------------------------------------------------------- tracer */

typedef void* envoy_dynamic_module_type_tracer_config_envoy_ptr;
typedef const void* envoy_dynamic_module_type_tracer_config_module_ptr;
typedef void* envoy_dynamic_module_type_tracer_span_envoy_ptr;
typedef const void* envoy_dynamic_module_type_tracer_span_module_ptr;

typedef envoy_dynamic_module_type_tracer_config_envoy_ptr TC;
typedef envoy_dynamic_module_type_tracer_span_envoy_ptr TS;
typedef envoy_dynamic_module_type_tracer_span_module_ptr SPAN;

envoy_dynamic_module_type_tracer_config_module_ptr envoy_dynamic_module_on_tracer_config_new(TC config_envoy_ptr,
                                                                                              EB name, EB config);
void envoy_dynamic_module_on_tracer_config_destroy(envoy_dynamic_module_type_tracer_config_module_ptr config_module_ptr);
SPAN envoy_dynamic_module_on_tracer_start_span(envoy_dynamic_module_type_tracer_config_module_ptr config_module_ptr,
                                               TS span_envoy_ptr, EB operation_name, bool traced,
                                               envoy_dynamic_module_type_trace_reason reason);
void envoy_dynamic_module_on_tracer_span_set_operation(SPAN span, EB operation);
void envoy_dynamic_module_on_tracer_span_set_tag(SPAN span, EB key, EB value);
void envoy_dynamic_module_on_tracer_span_reserve_tags(SPAN span, size_t count); /* optional */
void envoy_dynamic_module_on_tracer_span_log(SPAN span, int64_t timestamp_ns, EB event);
void envoy_dynamic_module_on_tracer_span_finish(SPAN span);
void envoy_dynamic_module_on_tracer_span_inject_context(SPAN span, TS span_envoy_ptr);
SPAN envoy_dynamic_module_on_tracer_span_spawn_child(SPAN span, EB name, int64_t start_time_ns);
void envoy_dynamic_module_on_tracer_span_set_sampled(SPAN span, bool sampled);
bool envoy_dynamic_module_on_tracer_span_use_local_decision(SPAN span);
bool envoy_dynamic_module_on_tracer_span_get_baggage(SPAN span, EB key, MB* value_out);
void envoy_dynamic_module_on_tracer_span_set_baggage(SPAN span, EB key, EB value);
bool envoy_dynamic_module_on_tracer_span_get_trace_id(SPAN span, MB* value_out);
bool envoy_dynamic_module_on_tracer_span_get_span_id(SPAN span, MB* value_out);
void envoy_dynamic_module_on_tracer_span_destroy(SPAN span);

bool envoy_dynamic_module_callback_tracer_get_trace_context_value(TS s, MB key, EB* value_out);
void envoy_dynamic_module_callback_tracer_set_trace_context_value(TS s, MB key, MB value);
void envoy_dynamic_module_callback_tracer_remove_trace_context_value(TS s, MB key);
bool envoy_dynamic_module_callback_tracer_get_trace_context_protocol(TS s, EB* value_out);
bool envoy_dynamic_module_callback_tracer_get_trace_context_host(TS s, EB* value_out);
bool envoy_dynamic_module_callback_tracer_get_trace_context_path(TS s, EB* value_out);
bool envoy_dynamic_module_callback_tracer_get_trace_context_method(TS s, EB* value_out);
envoy_dynamic_module_type_metrics_result envoy_dynamic_module_callback_tracer_define_counter(
    TC c, MB name, MB* label_names, size_t label_names_length, size_t* counter_id_ptr);
envoy_dynamic_module_type_metrics_result envoy_dynamic_module_callback_tracer_define_gauge(
    TC c, MB name, MB* label_names, size_t label_names_length, size_t* gauge_id_ptr);
envoy_dynamic_module_type_metrics_result envoy_dynamic_module_callback_tracer_define_histogram(
    TC c, MB name, MB* label_names, size_t label_names_length, size_t* histogram_id_ptr);
envoy_dynamic_module_type_metrics_result envoy_dynamic_module_callback_tracer_increment_counter(
    TC c, size_t id, MB* label_values, size_t label_values_length, uint64_t value);
envoy_dynamic_module_type_metrics_result envoy_dynamic_module_callback_tracer_set_gauge(
    TC c, size_t id, MB* label_values, size_t label_values_length, uint64_t value);
envoy_dynamic_module_type_metrics_result envoy_dynamic_module_callback_tracer_record_histogram_value(
    TC c, size_t id, MB* label_values, size_t label_values_length, uint64_t value);

/* ---------------------------------------------------------------- stat sink */

typedef void* envoy_dynamic_module_type_stat_sink_config_envoy_ptr;
typedef const void* envoy_dynamic_module_type_stat_sink_config_module_ptr;
typedef void* envoy_dynamic_module_type_stat_sink_snapshot_envoy_ptr;
typedef void* envoy_dynamic_module_type_stat_sink_config_scheduler_module_ptr;

typedef envoy_dynamic_module_type_stat_sink_config_envoy_ptr SC;
typedef envoy_dynamic_module_type_stat_sink_snapshot_envoy_ptr SN;

envoy_dynamic_module_type_stat_sink_config_module_ptr envoy_dynamic_module_on_stat_sink_config_new(SC config_envoy_ptr,
                                                                                                    EB sink_name,
                                                                                                    EB sink_config);
void envoy_dynamic_module_on_stat_sink_config_destroy(envoy_dynamic_module_type_stat_sink_config_module_ptr config_module_ptr);
void envoy_dynamic_module_on_stat_sink_flush(envoy_dynamic_module_type_stat_sink_config_module_ptr config_module_ptr,
                                             SN snapshot_envoy_ptr);
void envoy_dynamic_module_on_stat_sink_on_histogram_complete(
    envoy_dynamic_module_type_stat_sink_config_module_ptr config_module_ptr, EB histogram_name, uint64_t value);
void envoy_dynamic_module_on_stat_sink_config_scheduled(SC config_envoy_ptr,
                                                        envoy_dynamic_module_type_stat_sink_config_module_ptr config_module_ptr,
                                                        uint64_t event_id); /* optional */

size_t envoy_dynamic_module_callback_stat_sink_snapshot_get_counter_count(SN n);
size_t envoy_dynamic_module_callback_stat_sink_snapshot_get_gauge_count(SN n);
size_t envoy_dynamic_module_callback_stat_sink_snapshot_get_text_readout_count(SN n);
size_t envoy_dynamic_module_callback_stat_sink_snapshot_get_histogram_count(SN n);
bool envoy_dynamic_module_callback_stat_sink_snapshot_get_counter(SN n, size_t index, char* name_buffer,
                                                                  size_t name_buffer_capacity, size_t* name_size,
                                                                  uint64_t* value_out, uint64_t* delta_out);
bool envoy_dynamic_module_callback_stat_sink_snapshot_get_gauge(SN n, size_t index, char* name_buffer,
                                                                size_t name_buffer_capacity, size_t* name_size,
                                                                uint64_t* value_out);
bool envoy_dynamic_module_callback_stat_sink_snapshot_get_text_readout(SN n, size_t index, char* name_buffer,
                                                                       size_t name_buffer_capacity, size_t* name_size,
                                                                       char* value_buffer, size_t value_buffer_capacity,
                                                                       size_t* value_size);
bool envoy_dynamic_module_callback_stat_sink_snapshot_get_histogram(SN n, size_t index, char* name_buffer,
                                                                    size_t name_buffer_capacity, size_t* name_size,
                                                                    uint64_t* sample_count_out, double* sample_sum_out);
size_t envoy_dynamic_module_callback_stat_sink_snapshot_get_histogram_bucket_count(SN n, size_t index);
bool envoy_dynamic_module_callback_stat_sink_snapshot_get_histogram_bucket(SN n, size_t index, size_t bucket_index,
                                                                           double* upper_bound_out, uint64_t* count_out);
#define ENVOY_OBS_STAT_TAG_FNS(X)                                                                                   \
  bool envoy_dynamic_module_callback_stat_sink_snapshot_get_##X##_tag_count(SN n, size_t index, size_t* tag_count);   \
  bool envoy_dynamic_module_callback_stat_sink_snapshot_get_##X##_tag(                                               \
      SN n, size_t index, size_t tag_index, char* name_buffer, size_t name_buffer_capacity, size_t* name_size,       \
      char* value_buffer, size_t value_buffer_capacity, size_t* value_size);                                         \
  bool envoy_dynamic_module_callback_stat_sink_snapshot_get_##X##_tag_extracted_name(                                \
      SN n, size_t index, char* name_buffer, size_t name_buffer_capacity, size_t* name_size);
ENVOY_OBS_STAT_TAG_FNS(counter)
ENVOY_OBS_STAT_TAG_FNS(gauge)
ENVOY_OBS_STAT_TAG_FNS(text_readout)
ENVOY_OBS_STAT_TAG_FNS(histogram)
#undef ENVOY_OBS_STAT_TAG_FNS

envoy_dynamic_module_type_metrics_result envoy_dynamic_module_callback_stat_sink_config_define_gauge(SC c, MB name,
                                                                                                   size_t* gauge_id_ptr);
envoy_dynamic_module_type_metrics_result envoy_dynamic_module_callback_stat_sink_config_set_gauge(SC c, size_t gauge_id,
                                                                                                uint64_t value);
envoy_dynamic_module_type_stat_sink_config_scheduler_module_ptr
envoy_dynamic_module_callback_stat_sink_config_scheduler_new(SC c);
void envoy_dynamic_module_callback_stat_sink_config_scheduler_commit(
    envoy_dynamic_module_type_stat_sink_config_scheduler_module_ptr scheduler, uint64_t event_id);
void envoy_dynamic_module_callback_stat_sink_config_scheduler_delete(
    envoy_dynamic_module_type_stat_sink_config_scheduler_module_ptr scheduler);

#endif /* ENVOY_OBS_ABI_H */
