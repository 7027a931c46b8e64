//! What every logger kind shares: the per-thread hot path (filter -> capture -> one queue
//! push, optional self-timing) and the config object owning the pipeline.
//!
//! A logger kind supplies a [`Plan`] (what to capture per record, on the worker) and an
//! [`Exporter`] (what to do with captured records, on the flush thread).
use std::sync::Arc;
use std::time::Duration;

use envoy_obs_common::config::ConfigError;
use envoy_obs_common::ffi::access_log::Stream;
use envoy_obs_common::pipeline::{Exporter, Pipeline, PipelineConfig, Producer, Reporter};
use envoy_obs_common::timing::CycleClock;

use crate::filter::{Filter, FilterSpec};
use crate::format::{BulkHeaders, Ctx};

/// Bound on the drain when Envoy destroys the config.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `flush_interval_ms`: like Envoy's file logger, at most a second behind.
pub const DEFAULT_FLUSH_INTERVAL_MS: u64 = 1000;
/// Default per-worker `queue_capacity` in records.
pub const DEFAULT_QUEUE_CAPACITY: usize = 8192;

/// Serde default of `flush_interval_ms`.
pub fn default_flush_interval_ms() -> u64 {
    DEFAULT_FLUSH_INTERVAL_MS
}

/// Serde default of `queue_capacity`.
pub fn default_queue_capacity() -> usize {
    DEFAULT_QUEUE_CAPACITY
}

/// The worker-side capture of one logger kind.
pub trait Plan: Send + Sync + 'static {
    /// Appends one record's captured values.
    fn capture<S: Stream>(&self, cx: &Ctx<'_, S>, out: &mut Vec<u8>);
    /// Which header maps to fetch whole per record.
    fn bulk_headers(&self) -> BulkHeaders;
}

/// Pipeline knobs every logger kind has.
#[derive(Clone, Debug)]
pub struct Common {
    /// Flush thread name.
    pub thread_name: &'static str,
    /// `flush_interval_ms`.
    pub flush_interval_ms: u64,
    /// `queue_capacity`.
    pub queue_capacity: usize,
    /// `self_timing`.
    pub self_timing: bool,
}

/// Validates the knobs shared by every logger kind.
pub fn check_common(flush_interval_ms: u64, queue_capacity: usize, stat_prefix: &str) -> Result<(), ConfigError> {
    if !(1..=60_000).contains(&flush_interval_ms) {
        return Err(ConfigError::new("flush_interval_ms", "must be between 1 and 60000"));
    }
    if !(1..=1_048_576).contains(&queue_capacity) {
        return Err(ConfigError::new("queue_capacity", "must be between 1 and 1048576"));
    }
    if stat_prefix.is_empty() || !stat_prefix.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
    {
        return Err(ConfigError::new("stat_prefix", "must be non-empty [a-z0-9_]"));
    }
    Ok(())
}

/// Compiles an optional `filter`, errors naming the field path.
pub fn compile_filter(spec: &Option<FilterSpec>) -> Result<Option<Filter>, ConfigError> {
    spec.as_ref().map(|s| s.compile("filter")).transpose()
}

struct Inner<P> {
    plan: Arc<P>,
    bulk_headers: BulkHeaders,
    filter: Option<Filter>,
    self_timing: Option<CycleClock>,
}

/// The config object Envoy holds between `config_new` and `config_destroy`.
pub struct Logger<P> {
    inner: Arc<Inner<P>>,
    /// `None` under `envoy --mode validate`: nothing is opened, no thread runs.
    pipeline: Option<Pipeline>,
}

impl<P: Plan> Logger<P> {
    /// Starts the flush thread with `exporter` (`None` under validation: nothing starts).
    pub fn start<E: Exporter, R: Reporter>(
        common: &Common,
        plan: Arc<P>,
        filter: Option<Filter>,
        exporter: Option<E>,
        slots: usize,
        reporter: R,
    ) -> Result<Self, ConfigError> {
        let self_timing = common.self_timing.then(|| CycleClock::calibrate(Duration::from_millis(20)));
        let pipeline = match exporter {
            None => None,
            Some(exporter) => {
                let cfg = PipelineConfig {
                    thread_name: common.thread_name.into(),
                    slots,
                    queue_capacity: common.queue_capacity,
                    flush_interval: Duration::from_millis(common.flush_interval_ms),
                    shutdown_timeout: SHUTDOWN_TIMEOUT,
                };
                Some(
                    Pipeline::start(cfg, exporter, reporter)
                        .map_err(|e| ConfigError::new("", format!("cannot start flush thread: {e}")))?,
                )
            }
        };
        let bulk_headers = plan.bulk_headers();
        Ok(Logger { inner: Arc::new(Inner { plan, bulk_headers, filter, self_timing }), pipeline })
    }

    /// The per-thread logger for worker `index`.
    pub fn thread_logger(&self, index: usize) -> ThreadLogger<P> {
        ThreadLogger { inner: self.inner.clone(), producer: self.pipeline.as_ref().map(|p| p.producer(index)) }
    }

    /// Waits until everything queued so far is exported (tests, explicit flushes).
    pub fn flush(&self, timeout: Duration) -> bool {
        self.pipeline.as_ref().is_none_or(|p| p.flush(timeout))
    }
}

/// One per Envoy thread; only ever used from that thread.
pub struct ThreadLogger<P> {
    inner: Arc<Inner<P>>,
    producer: Option<Producer>,
}

impl<P: Plan> ThreadLogger<P> {
    /// The per-record hot path.
    #[inline]
    pub fn log<S: Stream>(&self, stream: &S, log_type: u32) {
        let Some(producer) = &self.producer else { return };
        if let Some(clock) = &self.inner.self_timing {
            let t0 = CycleClock::now();
            self.log_record(producer, stream, log_type);
            producer.record_busy_ns(clock.ns_between(t0, CycleClock::now()));
        } else {
            self.log_record(producer, stream, log_type);
        }
    }

    #[inline(always)]
    fn log_record<S: Stream>(&self, producer: &Producer, stream: &S, log_type: u32) {
        let cx = Ctx::with_bulk(stream, log_type, self.inner.bulk_headers);
        if let Some(f) = &self.inner.filter {
            if !f.keep(&cx) {
                producer.skip();
                return;
            }
        }
        producer.push_with(|buf| self.inner.plan.capture(&cx, buf));
    }
}
