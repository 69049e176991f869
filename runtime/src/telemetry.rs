//! Foresight's telemetry about itself: logs (text or JSON), traces and metrics.
//!
//! - **Traces**: a span per input processed per stage (`stage.process`), whose parent is the
//!   W3C `traceparent` header of the input message; every output carries the span's own
//!   `traceparent`, so a decision's trace leads back through the score and the window to the
//!   telemetry that caused it. Exported over OTLP/HTTP when `observability.otlp_endpoint` is set.
//!   Without an exporter the trace context is still propagated (ids made here).
//! - **Metrics**: the names are in [`names`]; exported over OTLP/HTTP when configured, and always
//!   rendered in the Prometheus text format at `/metrics` (see [`crate::health`]).
//!
//! The metrics are read from the stages' live counters ([`crate::runner::Progress`]) when they
//! are collected (observable instruments), so counting costs the stages an atomic add; only the
//! latency histogram is recorded as it happens.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
    time::Duration,
};

use opentelemetry::{
    Context, KeyValue,
    metrics::Histogram,
    propagation::{Extractor, TextMapPropagator as _},
    trace::{SpanContext, TraceContextExt as _, TraceFlags, TraceState, TracerProvider as _},
};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::{
    Resource,
    metrics::{PeriodicReader, SdkMeterProvider},
    propagation::TraceContextPropagator,
    trace::{IdGenerator as _, RandomIdGenerator, Sampler, SdkTracerProvider},
};
use rdkafka::message::{BorrowedHeaders, Headers as _};
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _};

use crate::pipeline::{Observer, Stage};

/// Every metric Foresight exports, in one place. Prometheus names add `_total` to counters and
/// the unit to the rest (`foresight_processing_latency_seconds`).
pub mod names {
    /// Counter, by `stage`: input messages read (throughput).
    pub const MESSAGES: &str = "foresight_messages";
    /// Counter, by `stage`: events produced.
    pub const EVENTS: &str = "foresight_events";
    /// Counter, by `stage` and `reason` (the error class): dead letters produced.
    pub const DEAD_LETTERS: &str = "foresight_dead_letters";
    /// Gauge, by `stage`, `topic` and `partition`: messages between the consumer's position and
    /// the end of the partition.
    pub const CONSUMER_LAG: &str = "foresight_consumer_lag";
    /// Gauge, by `stage`: partitions the stage's consumer owns.
    pub const PARTITIONS_ASSIGNED: &str = "foresight_partitions_assigned";
    /// Histogram (seconds), by `stage`: from an output's event time to when it was produced. For
    /// the allocator, the latency from the telemetry window's end to the decision.
    pub const PROCESSING_LATENCY: &str = "foresight_processing_latency";
    /// Gauge, by `stage`: outputs waiting for the broker's acknowledgement (their inputs'
    /// offsets wait for them).
    pub const OUTPUTS_IN_FLIGHT: &str = "foresight_outputs_in_flight";
    /// Counter, by `stage`: client replacements (a consumer reading nothing while input waits,
    /// found by the watchdog, or an output the broker refused).
    pub const STALLS: &str = "foresight_stalls";
    /// Counter, by `stage`: forecast model fits (scheduled refits and refits on drift).
    pub const MODEL_REFITS: &str = "foresight_model_refits";
    /// Counter, by `actuator` and `outcome`: actuations and how they ended.
    pub const ACTUATIONS: &str = "foresight_actuations";
}

/// The meter every instrument comes from.
const METER: &str = "foresight";

/// Observability of Foresight itself: health and metrics endpoints, OTLP export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObservabilityConfig {
    /// Address of the process's HTTP server (`/healthz`, `/readyz`, `/metrics`), e.g.
    /// `0.0.0.0:9464` in a container; port 0 picks a free port (logged); empty: no server.
    pub listen: String,
    /// OTLP/HTTP (protobuf) endpoint of a collector, e.g. `http://otel-collector:4318`: traces go
    /// to `<endpoint>/v1/traces`, metrics to `<endpoint>/v1/metrics`. Unset: nothing is exported
    /// (`/metrics` still serves the metrics, and trace context is still propagated).
    pub otlp_endpoint: Option<String>,
    /// HTTP headers sent with every OTLP request (e.g. a vendor's API key). Put secrets in
    /// `FORESIGHT_OBSERVABILITY__OTLP_HEADERS__<NAME>` rather than the file; never printed.
    pub otlp_headers: std::collections::BTreeMap<String, String>,
    /// How often metrics are exported over OTLP.
    #[serde(with = "humantime_serde")]
    pub metrics_interval: Duration,
    /// Share of new traces (inputs without a sampled `traceparent`) whose spans are recorded and
    /// exported, in [0, 1]; inputs whose upstream was sampled are always recorded.
    pub trace_sample_ratio: f64,
    /// The `service.name` of exported telemetry.
    pub service_name: String,
    /// A stage that has input waiting (lag) but has read nothing for this long is stalled, and
    /// `/readyz` answers 503.
    #[serde(with = "humantime_serde")]
    pub stall_after: Duration,
}

impl Default for ObservabilityConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
            otlp_endpoint: None,
            otlp_headers: Default::default(),
            metrics_interval: Duration::from_secs(10),
            trace_sample_ratio: 0.1,
            service_name: "foresight".into(),
            stall_after: Duration::from_secs(60),
        }
    }
}

impl ObservabilityConfig {
    /// Values that parse but cannot work, as (key, problem).
    pub fn validate(&self) -> Vec<(&'static str, String)> {
        let mut issues = Vec::new();
        if !self.listen.is_empty() && self.listen.parse::<std::net::SocketAddr>().is_err() {
            issues.push((
                "listen",
                format!(
                    "{:?} is not an address: expected host:port, e.g. 0.0.0.0:9464",
                    self.listen
                ),
            ));
        }
        if let Some(e) = &self.otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            issues.push((
                "otlp_endpoint",
                format!("{e:?} must be an http:// or https:// URL"),
            ));
        }
        if !(0.0..=1.0).contains(&self.trace_sample_ratio) {
            issues.push((
                "trace_sample_ratio",
                format!("must be between 0 and 1, not {}", self.trace_sample_ratio),
            ));
        }
        if self.metrics_interval.is_zero() {
            issues.push(("metrics_interval", "must be more than 0".into()));
        }
        if self.stall_after.is_zero() {
            issues.push(("stall_after", "must be more than 0".into()));
        }
        issues
    }
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// An exporter could not be built (e.g. a malformed endpoint).
    #[error("OpenTelemetry exporter: {0}")]
    Exporter(String),
    /// A global subscriber was installed already.
    #[error("logging was set up twice: {0}")]
    Logging(String),
}

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (fields included), for log collectors.
    Json,
}

/// The Prometheus registry `/metrics` renders (set once, by [`init`]).
static REGISTRY: OnceLock<prometheus::Registry> = OnceLock::new();

/// The metrics in the Prometheus text format, if metrics are set up in this process.
pub fn prometheus_text() -> Option<String> {
    let registry = REGISTRY.get()?;
    let mut text = String::new();
    match prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut text) {
        Ok(()) => Some(text),
        Err(e) => Some(format!("# metrics could not be rendered: {e}\n")),
    }
}

/// Telemetry providers of a process; [`Telemetry::shutdown`] flushes what is pending.
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: SdkMeterProvider,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("exporting_traces", &self.tracer.is_some())
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Exports what is pending and stops the exporters.
    pub fn shutdown(self) {
        if let Some(t) = self.tracer
            && let Err(e) = t.shutdown()
        {
            tracing::warn!(error = %e, "Trace export did not shut down cleanly.");
        }
        if let Err(e) = self.meter.shutdown() {
            tracing::warn!(error = %e, "Metric export did not shut down cleanly.");
        }
    }
}

fn resource(config: &ObservabilityConfig) -> Resource {
    Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build()
}

fn otlp_headers(config: &ObservabilityConfig) -> HashMap<String, String> {
    config
        .otlp_headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A per-layer filter asked about every event and span, never answered from the callsite cache.
///
/// A per-layer filter hands its verdict to its layer through state kept from the last check, and
/// a callsite whose interest is cached as "always" is not checked: its event then meets the
/// verdict of whatever was checked last. `log` records bridged into tracing are checked one by
/// one (sqlx asks `log_enabled!` after every query), so under `RUST_LOG=warn,foresight=info` a
/// rejected sqlx record made the next cached event of Foresight's vanish from the log (a stage's
/// "Stage started."; see tokio-rs/tracing issue 2519). Callsites the filter never wants stay
/// cached as such.
struct Fresh<F>(F);

impl<S, F: tracing_subscriber::layer::Filter<S>> tracing_subscriber::layer::Filter<S> for Fresh<F> {
    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        self.0.enabled(meta, cx)
    }

    fn callsite_enabled(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        let interest = self.0.callsite_enabled(meta);
        if interest.is_never() {
            interest
        } else {
            tracing::subscriber::Interest::sometimes()
        }
    }

    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        self.0.event_enabled(event, cx)
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        self.0.max_level_hint()
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        cx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0.on_new_span(attrs, id, cx);
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        cx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0.on_record(id, values, cx);
    }

    fn on_enter(&self, id: &tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_enter(id, cx);
    }

    fn on_exit(&self, id: &tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_exit(id, cx);
    }

    fn on_close(&self, id: tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_close(id, cx);
    }
}

/// Sets up logs (to stderr, in `format`), trace export and metrics (Prometheus, and OTLP when
/// configured) for this process. Call once, from within the Tokio runtime, before any stage runs.
pub fn init(config: &ObservabilityConfig, format: LogFormat) -> Result<Telemetry, TelemetryError> {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(
                "info,librdkafka=warn,rdkafka=warn,sqlx=warn,opentelemetry=warn,opentelemetry_sdk=warn",
            )
        })
    };
    // Colours only for a terminal: a log written to a file or a collector stays plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let exporter_error =
        |e: opentelemetry_otlp::ExporterBuildError| TelemetryError::Exporter(e.to_string());

    let tracer = match &config.otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                .with_headers(otlp_headers(config))
                .with_timeout(Duration::from_secs(10))
                .build()
                .map_err(exporter_error)?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                        config.trace_sample_ratio,
                    ))))
                    .with_resource(resource(config))
                    .build(),
            )
        }
        None => None,
    };
    // Spans reach OpenTelemetry only when they are exported: the layer's own filter keeps the
    // stage spans (info) whatever RUST_LOG says about log lines.
    let otel = tracer.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("foresight"))
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("foresight", tracing::Level::INFO),
            )
    });
    tracing_subscriber::registry()
        .with(fmt.with_filter(Fresh(filter())))
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::Logging(e.to_string()))?;

    let registry = prometheus::Registry::new();
    let prometheus = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .scope_info_enabled(false)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let mut meter = SdkMeterProvider::builder()
        .with_reader(prometheus)
        .with_resource(resource(config));
    if let Some(endpoint) = &config.otlp_endpoint {
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/metrics", endpoint.trim_end_matches('/')))
            .with_headers(otlp_headers(config))
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(exporter_error)?;
        meter = meter.with_reader(
            PeriodicReader::builder(exporter)
                .with_interval(config.metrics_interval)
                .build(),
        );
    }
    let meter = meter.build();
    opentelemetry::global::set_meter_provider(meter.clone());
    let _ = REGISTRY.set(registry);
    Ok(Telemetry { tracer, meter })
}

/// Registers the observable metrics of `stages`, read from `observer` at each collection.
/// Without [`init`] (library use, tests) this registers with a no-op provider.
pub fn observe(observer: Arc<Observer>, stages: &[Stage]) {
    let meter = opentelemetry::global::meter_provider().meter(METER);
    let stages: Arc<[Stage]> = stages.into();
    macro_rules! per_stage {
        ($builder:ident, $name:expr, $desc:expr, $unit:expr, |$p:ident| $value:expr) => {{
            let (observer, stages) = (observer.clone(), stages.clone());
            meter
                .$builder($name)
                .with_description($desc)
                .with_unit($unit)
                .with_callback(move |i| {
                    for &s in stages.iter() {
                        let $p = observer.stage(s);
                        i.observe($value, &[KeyValue::new("stage", s.name())]);
                    }
                })
                .build()
        }};
    }
    use std::sync::atomic::Ordering::Relaxed;
    let _ = per_stage!(
        u64_observable_counter,
        names::MESSAGES,
        "Input messages read.",
        "{message}",
        |p| p.messages.load(Relaxed)
    );
    let _ = per_stage!(
        u64_observable_counter,
        names::EVENTS,
        "Events produced.",
        "{event}",
        |p| p.events.load(Relaxed)
    );
    let _ = per_stage!(
        i64_observable_gauge,
        names::OUTPUTS_IN_FLIGHT,
        "Outputs waiting for the broker's acknowledgement.",
        "{event}",
        |p| p.in_flight.load(Relaxed) as i64
    );
    let _ = per_stage!(
        u64_observable_counter,
        names::STALLS,
        "Client replacements: stalled consumers, refused outputs.",
        "{stall}",
        |p| p.stalls.load(Relaxed)
    );
    if stages.contains(&Stage::Scoring) {
        // Only the scoring stage fits forecast models.
        let observer = observer.clone();
        let _ = meter
            .u64_observable_counter(names::MODEL_REFITS)
            .with_description("Forecast model fits (scheduled and on drift).")
            .with_unit("{fit}")
            .with_callback(move |i| {
                let fits = observer.stage(Stage::Scoring).refits.load(Relaxed);
                i.observe(fits, &[KeyValue::new("stage", Stage::Scoring.name())]);
            })
            .build();
    }
    let _ = per_stage!(
        i64_observable_gauge,
        names::PARTITIONS_ASSIGNED,
        "Partitions the stage's consumer owns.",
        "{partition}",
        |p| p.consumer.assigned().len() as i64
    );
    {
        let (observer, stages) = (observer.clone(), stages.clone());
        let _ = meter
            .u64_observable_counter(names::DEAD_LETTERS)
            .with_description("Dead letters produced, by error class.")
            .with_unit("{message}")
            .with_callback(move |i| {
                for &s in stages.iter() {
                    for (class, n) in observer.stage(s).dead_letters_by_class() {
                        i.observe(
                            n,
                            &[
                                KeyValue::new("stage", s.name()),
                                KeyValue::new("reason", class),
                            ],
                        );
                    }
                }
            })
            .build();
    }
    {
        let (observer, stages) = (observer.clone(), stages.clone());
        let _ = meter
            .i64_observable_gauge(names::CONSUMER_LAG)
            .with_description("Messages between the consumer's position and the partition's end.")
            .with_unit("{message}")
            .with_callback(move |i| {
                for &s in stages.iter() {
                    for ((topic, partition), lag) in observer.stage(s).consumer.lag() {
                        i.observe(
                            lag,
                            &[
                                KeyValue::new("stage", s.name()),
                                KeyValue::new("topic", topic),
                                KeyValue::new("partition", i64::from(partition)),
                            ],
                        );
                    }
                }
            })
            .build();
    }
    {
        let (observer, stages) = (observer.clone(), stages.clone());
        let _ = meter
            .u64_observable_counter(names::ACTUATIONS)
            .with_description("Actuations, by actuator and outcome.")
            .with_unit("{actuation}")
            .with_callback(move |i| {
                for &s in stages.iter() {
                    for ((actuator, outcome), n) in observer.stage(s).actuations() {
                        i.observe(
                            n,
                            &[
                                KeyValue::new("actuator", actuator),
                                KeyValue::new("outcome", outcome),
                            ],
                        );
                    }
                }
            })
            .build();
    }
}

/// The processing latency histogram of one stage.
#[derive(Debug, Clone)]
pub(crate) struct Latency {
    histogram: Histogram<f64>,
    attributes: [KeyValue; 1],
}

impl Latency {
    pub(crate) fn new(stage: &'static str) -> Self {
        let histogram = opentelemetry::global::meter_provider()
            .meter(METER)
            .f64_histogram(names::PROCESSING_LATENCY)
            .with_description("From an output's event time to when it was produced.")
            .with_unit("s")
            .with_boundaries(vec![
                0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                21600.0, 86400.0,
            ])
            .build();
        Self {
            histogram,
            attributes: [KeyValue::new("stage", stage)],
        }
    }

    /// Records one output whose event time is `time`.
    pub(crate) fn record(&self, time: Option<chrono::DateTime<chrono::Utc>>) {
        if let Some(time) = time {
            let seconds = (chrono::Utc::now() - time).num_milliseconds() as f64 / 1000.0;
            self.histogram.record(seconds.max(0.0), &self.attributes);
        }
    }
}

/// The W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";

struct HeaderExtractor<'a>(&'a BorrowedHeaders);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(key))
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|h| h.key).collect()
    }
}

/// The trace context in a message's headers (an empty context without a valid `traceparent`).
pub fn extract(headers: Option<&BorrowedHeaders>) -> Context {
    match headers {
        Some(h) => TraceContextPropagator::new().extract(&HeaderExtractor(h)),
        None => Context::new(),
    }
}

/// A span for processing one input, child of the input's trace context.
pub fn input_span(
    stage: &'static str,
    topic: &str,
    partition: i32,
    offset: i64,
    parent: &Context,
) -> tracing::Span {
    let span = tracing::info_span!(
        target: "foresight",
        "stage.process",
        stage,
        topic,
        partition,
        offset,
        otel.kind = "consumer",
    );
    if parent.span().span_context().is_valid() {
        // Fails only without an OpenTelemetry layer (nothing exported): then the header below
        // carries the context on by itself.
        let _ = span.set_parent(parent.clone());
    }
    span
}

/// The `traceparent` for the outputs of `span`: the span's own context when spans are exported;
/// otherwise a new span id in the parent's trace (or a new trace), so the context still flows.
pub fn traceparent(span: &tracing::Span, parent: &Context) -> String {
    let own = span.context().span().span_context().clone();
    let context = if own.is_valid() {
        own
    } else {
        let ids = RandomIdGenerator::default();
        let parent = parent.span().span_context().clone();
        let (trace_id, flags) = if parent.is_valid() {
            (parent.trace_id(), parent.trace_flags())
        } else {
            (ids.new_trace_id(), TraceFlags::SAMPLED)
        };
        SpanContext::new(
            trace_id,
            ids.new_span_id(),
            flags,
            false,
            TraceState::default(),
        )
    };
    format_traceparent(&context)
}

/// A new trace's `traceparent` (a producer of telemetry starts one per message).
pub fn new_traceparent() -> String {
    let ids = RandomIdGenerator::default();
    format_traceparent(&SpanContext::new(
        ids.new_trace_id(),
        ids.new_span_id(),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    ))
}

fn format_traceparent(c: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        c.trace_id(),
        c.span_id(),
        c.trace_flags().to_u8()
    )
}

/// The trace id (32 hex digits) of a `traceparent` value, if it is well-formed.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(version, 2) && hex(trace, 32) && hex(span, 16) && hex(flags, 2) && trace != "0".repeat(32))
        .then_some(trace)
}

#[cfg(test)]
mod tests {
    use rdkafka::message::Headers as _;

    use super::*;

    #[test]
    fn traceparent_continues_the_parents_trace_without_an_exporter() {
        let parent_header = new_traceparent();
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: TRACEPARENT,
            value: Some(parent_header.as_str()),
        });
        let parent = {
            struct Owned<'a>(&'a rdkafka::message::OwnedHeaders);
            impl Extractor for Owned<'_> {
                fn get(&self, key: &str) -> Option<&str> {
                    self.0
                        .iter()
                        .find(|h| h.key == key)
                        .and_then(|h| h.value)
                        .and_then(|v| std::str::from_utf8(v).ok())
                }
                fn keys(&self) -> Vec<&str> {
                    self.0.iter().map(|h| h.key).collect()
                }
            }
            TraceContextPropagator::new().extract(&Owned(&headers))
        };
        let span = input_span("test", "t", 0, 1, &parent);
        let child = traceparent(&span, &parent);
        assert_eq!(trace_id_of(&child), trace_id_of(&parent_header));
        assert_ne!(child, parent_header, "a new span id");
        // No parent: a new trace.
        let fresh = traceparent(&span, &Context::new());
        assert!(trace_id_of(&fresh).is_some());
        assert_ne!(trace_id_of(&fresh), trace_id_of(&parent_header));
    }

    #[test]
    fn malformed_traceparents_have_no_trace_id() {
        assert_eq!(trace_id_of("00-abc-def-01"), None);
        assert_eq!(
            trace_id_of("00-00000000000000000000000000000000-0000000000000001-01"),
            None
        );
        assert_eq!(
            trace_id_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }

    /// Counts the events that reach it.
    struct Count(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Count {
        fn on_event(&self, _: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// One callsite, so its interest is cached after the first call.
    fn started(i: usize) {
        tracing::info!(target: "foresight::telemetry::test", i, "Stage started.");
    }

    #[test]
    fn bridged_log_checks_cannot_hide_the_next_event() {
        use tracing_subscriber::{Layer as _, layer::SubscriberExt as _};
        // The log bridge, as `init` installs it (another test may have installed it already).
        let _ = tracing_log::LogTracer::init();
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry().with(Count(seen.clone()).with_filter(
            Fresh(tracing_subscriber::EnvFilter::new("warn,foresight=info")),
        ));
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..3 {
                started(i);
                // What sqlx does after every query: a check, of a record the filter rejects,
                // with no event after it.
                let _ = log::log_enabled!(target: "sqlx::query", log::Level::Info);
            }
            started(3);
        });
        assert_eq!(
            seen.load(std::sync::atomic::Ordering::SeqCst),
            4,
            "every event logged"
        );
    }

    #[test]
    fn defaults_are_valid_and_mistakes_are_reported() {
        assert!(ObservabilityConfig::default().validate().is_empty());
        let bad = ObservabilityConfig {
            listen: "nine".into(),
            otlp_endpoint: Some("collector:4318".into()),
            trace_sample_ratio: 2.0,
            ..Default::default()
        };
        let keys: Vec<_> = bad.validate().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["listen", "otlp_endpoint", "trace_sample_ratio"]);
    }
}
