//! A bounded fuzz run on stable Rust (`cargo test`): the config parsers and the format-string
//! compiler take mutated inputs built from a checked-in seed corpus and must return a value or
//! an error, never panic. Compiled plans then capture and render against a fake stream with
//! hostile header values, and every rendered line must be valid JSON / decodable protobuf.
//!
//! Deterministic (fixed seed) so a failure reproduces; `FUZZ_ITERS` raises the budget locally.
use crate::format::tests::FakeStream;
use crate::format::{Ctx, JsonPlan};
use crate::logger::Plan;
use envoy_obs_common::fuzz::Mutator;

/// Seed inputs: the shapes users write, and the edges of the grammar.
const SEEDS: &[&str] = &[
    "%REQ(:METHOD)%",
    "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH):10%",
    "[%START_TIME(%Y-%m-%dT%H:%M:%S.%3fZ)%] %RESPONSE_CODE% %RESPONSE_FLAGS_LONG%",
    "%DYNAMIC_METADATA(ns:a:b)%%UPSTREAM_HOST%",
    "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%:%DOWNSTREAM_REMOTE_PORT% %TRACE_ID% %SPAN_ID%",
    "%ENVIRONMENT(HOME)% %HOSTNAME% %ACCESS_LOG_TYPE% 100%% literal",
    "%START_TIME(%s.%9f %Ez %%)%",
    "%%%(%)%:%?%",
    r#"{"path":"/dev/null","json_format":{"a":"%REQ(X)%","b":{"c":"%DURATION%"}},"filter":{"or":[{"status_code":{"ge":500}},{"sample":0.5}]}}"#,
    r#"{"endpoint":"http://127.0.0.1:4317","body":{"m":"%REQ(:METHOD)%"},"attributes":{"x":"%PROTOCOL%","n":5},"typed_values":true}"#,
    r#"{"path":"/dev/null","queue_capacity":1,"flush_interval_ms":60000,"omit_empty_values":true}"#,
];

const ALPHABET: &[u8] = b"%():?{}[]\",.-_/\\ 0123456789abcdefghijklmnopqrstuvwxyzREQRESPSTARTIMEDURATION\x00\xff\xc3";

fn iters() -> usize {
    Mutator::iterations(20_000)
}

fn hostile_stream() -> FakeStream {
    let mut s = FakeStream::ok();
    s.req.insert(b"x".to_vec(), b"\xff\"\\\x01\n".to_vec());
    s.req.insert(b"x-a".to_vec(), vec![b'a'; 5000]);
    s
}

#[test]
fn format_strings_never_panic_and_render_valid_json() {
    let mut rng = Mutator::new(0x9e37_79b9_7f4a_7c15, ALPHABET);
    let stream = hostile_stream();
    let (mut rec, mut scratch, mut out) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..iters() {
        let mut s = SEEDS[i % SEEDS.len()].as_bytes().to_vec();
        rng.mutate(&mut s);
        let text = String::from_utf8_lossy(&s).into_owned();
        let map = serde_json::json!({ "k": text, "n": { "m": text } });
        if let Ok(plan) = JsonPlan::compile(map.as_object().expect("object"), i % 2 == 0) {
            rec.clear();
            out.clear();
            let cx = Ctx::with_bulk(&stream, 6, Plan::bulk_headers(&plan));
            Plan::capture(&plan, &cx, &mut rec);
            plan.render(&rec, &mut scratch, &mut out);
            assert!(
                serde_json::from_slice::<serde_json::Value>(&out).is_ok(),
                "{text:?} rendered {:?}",
                String::from_utf8_lossy(&out)
            );
            // A truncated record must not panic either.
            out.clear();
            plan.render(&rec[..rec.len() / 2], &mut scratch, &mut out);
        }
    }
}

#[test]
fn logger_configs_never_panic() {
    let mut rng = Mutator::new(0x2545_f491_4f6c_dd1d, ALPHABET);
    for i in 0..iters() {
        let mut s = SEEDS[i % SEEDS.len()].as_bytes().to_vec();
        rng.mutate(&mut s);
        let _ = crate::json::compile(&s);
        let _ = crate::otlp::compile(&s, &|_| None);
    }
}
