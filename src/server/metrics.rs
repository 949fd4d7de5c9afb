//! Prometheus metrics of the server.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Everything `/metrics` reports.
pub struct Metrics {
    registry: Registry,
    /// Requests waiting for a batch slot.
    pub queue_depth: IntGauge,
    /// Sequences being prefilled or decoded.
    pub running: IntGauge,
    /// Seconds from admission to the first token.
    pub ttft: Histogram,
    /// Seconds between consecutive tokens of a sequence.
    pub itl: Histogram,
    /// Prompt tokens received.
    pub prompt_tokens: IntCounter,
    /// Prompt tokens served from a cached state.
    pub cached_prompt_tokens: IntCounter,
    /// Tokens generated.
    pub generated_tokens: IntCounter,
    /// Bytes of decode state held (running sequences and the prefix cache).
    pub state_bytes: IntGauge,
    /// HTTP responses by status code.
    pub requests: IntCounterVec,
    /// Requests resumed from a state on disk.
    pub disk_hits: IntCounter,
    /// Requests that found no state in memory or on disk (with a disk tier).
    pub disk_misses: IntCounter,
    /// State files written.
    pub disk_writes: IntCounter,
    /// State files that could not be written (full or read-only directory, ...).
    pub disk_write_errors: IntCounter,
    /// State files skipped: damaged, of another model or format, or changed.
    pub disk_read_errors: IntCounter,
    /// States not written because the writer was behind.
    pub disk_skipped: IntCounter,
    /// Bytes of state files kept.
    pub disk_bytes: IntGauge,
    /// State files kept.
    pub disk_entries: IntGauge,
}

impl Metrics {
    /// A fresh registry with every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let gauge = |n: &str, h: &str| {
            let g = IntGauge::new(n, h).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |n: &str, h: &str| {
            let c = IntCounter::new(n, h).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let hist = |n: &str, h: &str| {
            let buckets = vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ];
            let x = Histogram::with_opts(HistogramOpts::new(n, h).buckets(buckets))
                .expect("valid metric");
            registry
                .register(Box::new(x.clone()))
                .expect("unique metric");
            x
        };
        let requests = IntCounterVec::new(
            Opts::new(
                "hadal_http_responses_total",
                "HTTP responses by status code",
            ),
            &["code"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(requests.clone()))
            .expect("unique metric");
        Metrics {
            queue_depth: gauge("hadal_queue_depth", "Requests waiting for a batch slot"),
            running: gauge(
                "hadal_running_sequences",
                "Sequences being prefilled or decoded",
            ),
            ttft: hist(
                "hadal_time_to_first_token_seconds",
                "Seconds from admission to the first generated token",
            ),
            itl: hist(
                "hadal_inter_token_latency_seconds",
                "Seconds between consecutive tokens of a sequence",
            ),
            prompt_tokens: counter("hadal_prompt_tokens_total", "Prompt tokens received"),
            cached_prompt_tokens: counter(
                "hadal_cached_prompt_tokens_total",
                "Prompt tokens resumed from a cached decode state",
            ),
            generated_tokens: counter("hadal_generated_tokens_total", "Tokens generated"),
            state_bytes: gauge("hadal_state_bytes", "Bytes of decode state held"),
            requests,
            disk_hits: counter(
                "hadal_state_disk_hits_total",
                "Requests resumed from a decode state on disk",
            ),
            disk_misses: counter(
                "hadal_state_disk_misses_total",
                "Requests that found no cached decode state in memory or on disk",
            ),
            disk_writes: counter("hadal_state_disk_writes_total", "State files written"),
            disk_write_errors: counter(
                "hadal_state_disk_write_errors_total",
                "State files that could not be written",
            ),
            disk_read_errors: counter(
                "hadal_state_disk_read_errors_total",
                "State files skipped as damaged, of another model or format, or changed",
            ),
            disk_skipped: counter(
                "hadal_state_disk_skipped_total",
                "States not written because the writer was behind",
            ),
            disk_bytes: gauge("hadal_state_disk_bytes", "Bytes of state files kept"),
            disk_entries: gauge("hadal_state_disk_entries", "State files kept"),
            registry,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("UTF-8 metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
