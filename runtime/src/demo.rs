//! A generated fleet with injected degradations and known failure times, and the numbers that say
//! how early Foresight saw them coming.

use std::{collections::BTreeMap, f64::consts::TAU};

use chrono::{DateTime, Duration as Delta, Utc};
use foresight_events::{EntityId, FailureReport, MetricSample};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Normal};

/// What to generate.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    /// Nodes in the fleet.
    pub nodes: usize,
    /// Hours of history.
    pub hours: u32,
    /// Seconds between samples.
    pub step_seconds: u32,
    /// Seed: same seed, same fleet.
    pub seed: u64,
    /// First sample time.
    pub start: DateTime<Utc>,
}

impl Default for FleetSpec {
    fn default() -> Self {
        Self {
            nodes: 10,
            hours: 48,
            step_seconds: 60,
            seed: 7,
            start: DateTime::from_timestamp(1_767_225_600, 0).expect("valid"), // 2026-01-01
        }
    }
}

/// A degradation injected into one entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Degradation {
    /// Memory use climbs steadily until the node runs out.
    MemoryLeak,
    /// The disk fills until it is full.
    DiskFilling,
    /// Temperature drifts up until thermal shutdown.
    ThermalDrift,
    /// A dependency fails: latency jumps with no warning (and its callers slow down with it).
    DependencyOutage,
    /// Error logs swell from a trickle to a storm until the service crashes.
    ErrorLogStorm,
}

impl Degradation {
    fn failure_kind(self) -> &'static str {
        match self {
            Degradation::MemoryLeak => "oom",
            Degradation::DiskFilling => "disk_full",
            Degradation::ThermalDrift => "thermal_shutdown",
            Degradation::DependencyOutage => "dependency_outage",
            Degradation::ErrorLogStorm => "crash",
        }
    }
}

/// The generated fleet: samples in time order, and the failures that really happened.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// Samples, ordered by time.
    pub samples: Vec<MetricSample>,
    /// Logs and traces as OTLP/JSON messages (as the OpenTelemetry Collector's Kafka exporter
    /// writes them), with their time: each service's log records and its calls to the services
    /// it depends on, one message per service per minute.
    pub otlp: Vec<(DateTime<Utc>, String)>,
    /// Which service calls which (caller, callee).
    pub dependencies: Vec<(EntityId, EntityId)>,
    /// Which node each service runs on.
    pub placement: Vec<(EntityId, EntityId)>,
    /// Failures (the labels).
    pub failures: Vec<FailureReport>,
    /// Which entity got which degradation, from when.
    pub injected: Vec<(EntityId, Degradation, DateTime<Utc>)>,
    /// Every entity.
    pub entities: Vec<EntityId>,
}

struct Series {
    entity: EntityId,
    metric: &'static str,
    base: f64,
    daily_amplitude: f64,
    noise: f64,
    lo: f64,
    hi: f64,
}

/// Generates a fleet: nodes with cpu, memory, disk and temperature (daily seasonality, noise), a
/// few services with p99 latency, and four injected degradations ending in failures.
pub fn generate(spec: &FleetSpec) -> Fleet {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let id = |s: String| EntityId::new(s).expect("generated ids are valid");
    let nodes: Vec<EntityId> = (1..=spec.nodes)
        .map(|i| id(format!("node-{i:02}")))
        .collect();
    let services: Vec<EntityId> = ["svc-checkout", "svc-payments", "svc-search"]
        .into_iter()
        .map(|s| id(s.to_owned()))
        .collect();
    // Services run on nodes that are not degraded; checkout calls payments and search.
    let placement: Vec<(EntityId, EntityId)> = services
        .iter()
        .zip([0, 1, 3])
        .map(|(svc, n)| (svc.clone(), nodes[n % nodes.len()].clone()))
        .collect();
    let dependencies = vec![
        (services[0].clone(), services[1].clone()),
        (services[0].clone(), services[2].clone()),
    ];
    let mut series = Vec::new();
    for node in &nodes {
        let cpu = rng.gen_range(25.0..55.0);
        let mem = rng.gen_range(35.0..60.0);
        let disk = rng.gen_range(30.0..70.0);
        let temp = rng.gen_range(50.0..62.0);
        for (metric, base, amp, noise, lo, hi) in [
            ("cpu_pct", cpu, 15.0, 4.0, 0.0, 100.0),
            ("mem_used_pct", mem, 3.0, 0.8, 0.0, 100.0),
            ("disk_used_pct", disk, 0.0, 0.15, 0.0, 100.0),
            ("temperature_c", temp, 4.0, 0.6, -20.0, 120.0),
        ] {
            series.push(Series {
                entity: node.clone(),
                metric,
                base,
                daily_amplitude: amp,
                noise,
                lo,
                hi,
            });
        }
    }
    for svc in &services {
        let base = rng.gen_range(80.0..160.0);
        series.push(Series {
            entity: svc.clone(),
            metric: "p99_latency_ms",
            base,
            daily_amplitude: base * 0.25,
            noise: base * 0.06,
            lo: 1.0,
            hi: 10_000.0,
        });
    }

    let total_steps = (spec.hours as i64 * 3600) / spec.step_seconds as i64;
    let hour = |h: f64| spec.start + Delta::seconds((h * 3600.0) as i64);
    // Injected degradations: (entity, metric, kind, start hour, hours to failure).
    let pick = |i: usize| nodes[i % nodes.len()].clone();
    let h = spec.hours as f64;
    let plan = [
        (
            pick(2),
            "mem_used_pct",
            Degradation::MemoryLeak,
            0.40 * h,
            0.25 * h,
        ),
        (
            pick(4),
            "disk_used_pct",
            Degradation::DiskFilling,
            0.20 * h,
            0.60 * h,
        ),
        (
            pick(6),
            "temperature_c",
            Degradation::ThermalDrift,
            0.50 * h,
            0.30 * h,
        ),
        (
            services[1].clone(),
            "p99_latency_ms",
            Degradation::DependencyOutage,
            0.70 * h,
            0.0,
        ),
    ];

    let mut samples = Vec::with_capacity(series.len() * total_steps as usize);
    let mut failed: BTreeMap<EntityId, DateTime<Utc>> = BTreeMap::new();
    let mut failures = Vec::new();
    // The error-log storm on search: from a trickle of errors to a storm, then a crash.
    let (storm_start, storm_hours) = (0.55 * h, 0.12 * h);
    let crash = hour(storm_start + storm_hours);
    failed.insert(services[2].clone(), crash);
    failures.push(FailureReport {
        entity: services[2].clone(),
        time: crash,
        kind: Degradation::ErrorLogStorm.failure_kind().to_owned(),
        detail: "error logs stormed until the process crashed".into(),
    });
    let outage = plan[3].3;
    let labels_of: BTreeMap<EntityId, std::sync::Arc<BTreeMap<String, String>>> = placement
        .iter()
        .map(|(svc, node)| {
            let labels = BTreeMap::from([("node".to_owned(), node.to_string())]);
            (svc.clone(), std::sync::Arc::new(labels))
        })
        .collect();
    for step in 0..total_steps {
        let t = spec.start + Delta::seconds(step * spec.step_seconds as i64);
        let hours = (step * spec.step_seconds as i64) as f64 / 3600.0;
        let day_phase = (hours / 24.0) * TAU;
        for s in &series {
            if failed.get(&s.entity).is_some_and(|f| *f <= t) {
                continue; // A failed component stops reporting.
            }
            let mut value = s.base + s.daily_amplitude * (day_phase - 1.0).sin();
            value += Normal::new(0.0, s.noise)
                .expect("noise sd > 0")
                .sample(&mut rng);
            for (entity, metric, kind, start_h, ttf_h) in &plan {
                if entity != &s.entity || *metric != s.metric || hours < *start_h {
                    continue;
                }
                let progress = (hours - start_h) / ttf_h.max(1e-9);
                match kind {
                    Degradation::MemoryLeak | Degradation::DiskFilling => {
                        value += (101.0 - s.base) * progress.min(1.2);
                    }
                    Degradation::ThermalDrift => value += (92.0 - s.base) * progress.min(1.2),
                    // Not in the plan: the storm is in the logs (see `otlp_messages`).
                    Degradation::ErrorLogStorm => {}
                    Degradation::DependencyOutage => {
                        if hours - start_h < 0.5 {
                            value = 900.0 + 100.0 * rng.r#gen::<f64>();
                        }
                    }
                }
            }
            // Checkout waits on payments: slower while payments is out.
            if s.entity == services[0] && hours >= outage && hours - outage < 0.5 {
                value += 250.0 + 50.0 * rng.r#gen::<f64>();
            }
            let value = value.clamp(s.lo, s.hi);
            samples.push(MetricSample {
                entity: s.entity.clone(),
                metric: s.metric.to_owned(),
                time: t,
                value,
                labels: labels_of.get(&s.entity).cloned().unwrap_or_default(),
                kind: Default::default(),
            });
            let limit_hit = match s.metric {
                "mem_used_pct" => value >= 99.5,
                "disk_used_pct" => value >= 99.5,
                "temperature_c" => value >= 90.0,
                "p99_latency_ms" => value >= 850.0,
                _ => false,
            };
            if limit_hit && !failed.contains_key(&s.entity) {
                let kind = plan
                    .iter()
                    .find(|p| p.0 == s.entity && p.1 == s.metric)
                    .map(|p| p.2.failure_kind())
                    .unwrap_or("limit_reached");
                failed.insert(s.entity.clone(), t);
                failures.push(FailureReport {
                    entity: s.entity.clone(),
                    time: t,
                    kind: kind.to_owned(),
                    detail: format!("{} reached {value:.1}", s.metric),
                });
            }
        }
    }
    let mut injected: Vec<_> = plan.iter().map(|p| (p.0.clone(), p.2, hour(p.3))).collect();
    injected.push((
        services[2].clone(),
        Degradation::ErrorLogStorm,
        hour(storm_start),
    ));
    failures.sort_by_key(|f| f.time);
    let otlp = otlp_messages(
        spec,
        total_steps,
        &services,
        &dependencies,
        &failed,
        (storm_start, storm_hours),
        outage,
    );
    let mut entities: Vec<EntityId> = nodes.into_iter().chain(services).collect();
    entities.sort();
    Fleet {
        samples,
        otlp,
        dependencies,
        placement,
        failures,
        injected,
        entities,
    }
}

/// Logs and calls of the services, one OTLP/JSON message per service per minute: a few log
/// records (errors rare, then storming on search before its crash, and frequent on payments while
/// it is out), and checkout's calls to the services it depends on (failing while the callee is
/// out or crashing).
fn otlp_messages(
    spec: &FleetSpec,
    total_steps: i64,
    services: &[EntityId],
    dependencies: &[(EntityId, EntityId)],
    failed: &BTreeMap<EntityId, DateTime<Utc>>,
    (storm_start, storm_hours): (f64, f64),
    outage: f64,
) -> Vec<(DateTime<Utc>, String)> {
    // Its own generator: the metric samples stay what they were without logs and traces.
    let mut rng = StdRng::seed_from_u64(spec.seed ^ 0x6c6f_6773);
    let mut out = Vec::new();
    let mut span_id: u64 = 0;
    let steps_per_minute = (60 / spec.step_seconds.max(1)).max(1) as i64;
    for step in (0..total_steps).step_by(steps_per_minute as usize) {
        let t = spec.start + Delta::seconds(step * spec.step_seconds as i64);
        let hours = (step * spec.step_seconds as i64) as f64 / 3600.0;
        let nanos = |offset_ms: i64| {
            ((t + Delta::milliseconds(offset_ms))
                .timestamp_nanos_opt()
                .unwrap_or_default())
            .to_string()
        };
        let up = |e: &EntityId| failed.get(e).is_none_or(|f| t < *f);
        let trouble = |e: &EntityId| -> f64 {
            if e == &services[2] && hours >= storm_start {
                0.02 + 0.9 * ((hours - storm_start) / storm_hours).min(1.0)
            } else if e == &services[1] && hours >= outage && hours - outage < 0.5 {
                0.6
            } else {
                0.02
            }
        };
        for svc in services.iter().filter(|s| up(s)) {
            let p_error = trouble(svc);
            let records: Vec<serde_json::Value> = (0..4)
                .map(|i| {
                    let n = rng.gen_range(3..400);
                    let (severity, text, body) = if rng.r#gen::<f64>() < p_error {
                        let body = match rng.gen_range(0..3) {
                            0 => format!("upstream timeout after {n}ms"),
                            1 => format!(
                                "unhandled exception in worker {}: connection reset by peer",
                                n % 16
                            ),
                            _ => format!("request failed: pool exhausted ({n} waiting)"),
                        };
                        (17, "ERROR", body)
                    } else if rng.r#gen::<f64>() < 0.05 {
                        (13, "WARN", format!("slow request: {n}ms"))
                    } else {
                        (9, "INFO", format!("GET /api/{} 200 in {n}ms", svc.as_str()))
                    };
                    serde_json::json!({
                        "timeUnixNano": nanos(i * 10_000),
                        "severityNumber": severity,
                        "severityText": text,
                        "body": {"stringValue": body},
                    })
                })
                .collect();
            let logs = serde_json::json!({"resourceLogs": [{
                "resource": {"attributes": [
                    {"key": "service.name", "value": {"stringValue": svc.as_str()}}
                ]},
                "scopeLogs": [{"logRecords": records}],
            }]});
            out.push((t, logs.to_string()));
            let calls: Vec<serde_json::Value> = dependencies
                .iter()
                .filter(|(caller, _)| caller == svc)
                .flat_map(|(_, callee)| {
                    let p_fail = if up(callee) { trouble(callee) } else { 1.0 };
                    (0..3)
                        .map(|i| {
                            span_id += 1;
                            let latency = rng.gen_range(20..120) as i64;
                            let error = rng.r#gen::<f64>() < p_fail;
                            serde_json::json!({
                                "traceId": format!("{span_id:032x}"),
                                "spanId": format!("{span_id:016x}"),
                                "name": format!("call {}", callee.as_str()),
                                "kind": 3,
                                "startTimeUnixNano": nanos(i * 15_000),
                                "endTimeUnixNano": nanos(i * 15_000 + latency),
                                "attributes": [
                                    {"key": "peer.service", "value": {"stringValue": callee.as_str()}}
                                ],
                                "status": {"code": if error { 2 } else { 1 }},
                            })
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            if !calls.is_empty() {
                let traces = serde_json::json!({"resourceSpans": [{
                    "resource": {"attributes": [
                        {"key": "service.name", "value": {"stringValue": svc.as_str()}}
                    ]},
                    "scopeSpans": [{"spans": calls}],
                }]});
                out.push((t, traces.to_string()));
            }
        }
    }
    out
}

impl Fleet {
    /// Every message as a JSON line, in time order: native JSON samples, then the OTLP/JSON logs
    /// and traces of the same minute. What `foresight replay` reads, and what a live pipeline
    /// would be sent.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(self.samples.len() + self.otlp.len());
        let mut otlp = self.otlp.iter().peekable();
        for s in &self.samples {
            while let Some((_, m)) = otlp.next_if(|(t, _)| *t < s.time) {
                out.push(m.clone());
            }
            out.push(serde_json::to_string(s).expect("samples serialise"));
        }
        out.extend(otlp.map(|(_, m)| m.clone()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_fails_where_injected() {
        let spec = FleetSpec {
            nodes: 8,
            hours: 24,
            ..FleetSpec::default()
        };
        let a = generate(&spec);
        let b = generate(&spec);
        assert_eq!(a.samples, b.samples);
        let kinds: Vec<_> = a.failures.iter().map(|f| f.kind.as_str()).collect();
        for kind in ["oom", "thermal_shutdown", "dependency_outage"] {
            assert!(kinds.contains(&kind), "{kinds:?}");
        }
        // Failed components stop reporting.
        for f in &a.failures {
            assert!(
                !a.samples
                    .iter()
                    .any(|s| s.entity == f.entity && s.time > f.time)
            );
        }
    }

    /// The logs and traces decode without a rejection, and make the dependency edges.
    #[test]
    fn logs_and_traces_decode_into_edges_and_log_records() {
        let fleet = generate(&FleetSpec {
            nodes: 7,
            hours: 12,
            ..FleetSpec::default()
        });
        let decoder = foresight_ingest::Decoder::new(Default::default());
        let (mut logs, mut edges, mut errors) = (0, BTreeMap::new(), 0);
        for (t, m) in &fleet.otlp {
            let d = decoder.decode(
                m.as_bytes(),
                foresight_ingest::Format::Auto,
                foresight_ingest::Signal::Metrics,
                None,
                Some(*t),
            );
            assert!(d.rejections.is_empty(), "{:?}", d.rejections);
            for t in d.telemetry {
                match t {
                    foresight_events::Telemetry::Log(l) => {
                        logs += 1;
                        errors += usize::from(l.severity == foresight_events::Severity::Error);
                    }
                    foresight_events::Telemetry::Edge(e) => {
                        *edges
                            .entry((e.caller.to_string(), e.callee.to_string()))
                            .or_insert(0) += e.calls;
                    }
                    foresight_events::Telemetry::Sample(_) => {}
                }
            }
        }
        assert!(logs > 1000 && errors > 50, "{logs} logs, {errors} errors");
        let pairs: Vec<_> = edges.keys().cloned().collect();
        assert_eq!(
            pairs,
            vec![
                ("svc-checkout".to_owned(), "svc-payments".to_owned()),
                ("svc-checkout".to_owned(), "svc-search".to_owned()),
            ]
        );
        assert!(fleet.failures.iter().any(|f| f.kind == "crash"));
        let lines = fleet.lines();
        assert_eq!(lines.len(), fleet.samples.len() + fleet.otlp.len());
    }
}
