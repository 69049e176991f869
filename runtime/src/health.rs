//! The HTTP server of a `foresight run` process: `/healthz` (the process is alive), `/readyz`
//! (its stages can work: broker and database reachable, partitions assigned, not stalled) and
//! `/metrics` (Prometheus text format).

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer as _},
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    pipeline::{Observer, Stage},
};

/// How long one dependency check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What the readiness checks look at.
pub(crate) struct Health {
    stages: Vec<Stage>,
    observer: Arc<Observer>,
    /// The database pool, once connected (stages that need Postgres).
    pub(crate) pool: OnceLock<sqlx::PgPool>,
    needs_database: bool,
    /// A metadata-only client for the broker check (never subscribes).
    broker: Option<BaseConsumer>,
    stall_after: Duration,
    /// When the process started (Unix milliseconds).
    started_ms: i64,
    /// One broker check at a time: a slow broker must not pile up blocked threads.
    broker_check: tokio::sync::Mutex<()>,
}

/// One check's verdict.
#[derive(Debug, Serialize)]
struct Check {
    name: String,
    ok: bool,
    detail: String,
}

/// The `/readyz` body.
#[derive(Debug, Serialize)]
struct Readiness {
    ready: bool,
    checks: Vec<Check>,
}

impl Health {
    pub(crate) fn new(
        stages: &[Stage],
        config: &Config,
        observer: Arc<Observer>,
        needs_database: bool,
    ) -> Self {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &config.kafka.brokers);
        for (k, v) in &config.kafka.client {
            c.set(k, v);
        }
        let broker = c
            .create::<BaseConsumer>()
            .inspect_err(|e| tracing::warn!(error = %e, "Broker health client not created."))
            .ok();
        Self {
            stages: stages.to_vec(),
            observer,
            pool: OnceLock::new(),
            needs_database,
            broker,
            stall_after: config.observability.stall_after,
            started_ms: chrono::Utc::now().timestamp_millis(),
            broker_check: tokio::sync::Mutex::new(()),
        }
    }

    async fn broker(&self) -> Check {
        let _one = self.broker_check.lock().await;
        let result = match &self.broker {
            None => Err("no client (see the log)".to_owned()),
            Some(client) => tokio::task::block_in_place(|| {
                client
                    .fetch_metadata(None, CHECK_TIMEOUT)
                    .map(|m| format!("{} broker(s)", m.brokers().len()))
                    .map_err(|e| format!("{e}; is the broker up?"))
            }),
        };
        Check {
            name: "broker".into(),
            ok: result.is_ok(),
            detail: result.unwrap_or_else(|e| e),
        }
    }

    async fn database(&self) -> Option<Check> {
        if !self.needs_database {
            return None;
        }
        let detail = match self.pool.get() {
            None => Err("not connected yet".to_owned()),
            Some(pool) => {
                match tokio::time::timeout(CHECK_TIMEOUT, sqlx::query("SELECT 1").execute(pool))
                    .await
                {
                    Ok(Ok(_)) => Ok("reachable".to_owned()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
                }
            }
        };
        Some(Check {
            name: "database".into(),
            ok: detail.is_ok(),
            detail: detail.unwrap_or_else(|e| e),
        })
    }

    fn stage(&self, stage: Stage, now_ms: i64) -> Check {
        let p = self.observer.stage(stage);
        let assigned = p.consumer.assigned();
        let lag: i64 = p.consumer.lag().values().sum();
        // Idle since its last read, or since this process started if it has read nothing.
        let last = p
            .last_read_ms
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(self.started_ms);
        let stalled = lag > 0 && now_ms - last > self.stall_after.as_millis() as i64;
        let (ok, detail) = if assigned.is_empty() {
            (false, "no partitions assigned yet".to_owned())
        } else if stalled {
            (
                false,
                format!(
                    "stalled: {lag} message(s) waiting, nothing read for more than {}",
                    humantime::format_duration(self.stall_after)
                ),
            )
        } else {
            (true, format!("{} partition(s), lag {lag}", assigned.len()))
        };
        Check {
            name: format!("stage {}", stage.name()),
            ok,
            detail,
        }
    }

    async fn readiness(&self) -> Readiness {
        let mut checks = vec![self.broker().await];
        checks.extend(self.database().await);
        let now = chrono::Utc::now().timestamp_millis();
        checks.extend(self.stages.iter().map(|&s| self.stage(s, now)));
        Readiness {
            ready: checks.iter().all(|c| c.ok),
            checks,
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let r = health.readiness().await;
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::to_string_pretty(&r).unwrap_or_default() + "\n";
    (status, [(header::CONTENT_TYPE, "application/json")], body)
}

async fn metrics() -> impl IntoResponse {
    match crate::telemetry::prometheus_text() {
        Some(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        ),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "metrics are not set up in this process\n".to_owned(),
        ),
    }
}

/// Why the HTTP server could not start.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen on {address} for /healthz, /readyz and /metrics: {source}; set \
     observability.listen to a free address (port 0 picks one; empty turns the server off)"
)]
pub struct ListenError {
    /// The configured address.
    pub address: String,
    /// Why.
    pub source: std::io::Error,
}

/// Binds `address` and serves the endpoints until `shutdown`; returns the bound address.
pub(crate) async fn serve(
    address: &str,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<std::net::SocketAddr, ListenError> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| ListenError {
            address: address.to_owned(),
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| ListenError {
        address: address.to_owned(),
        source,
    })?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health);
    tracing::info!(address = %bound, "Serving /healthz, /readyz and /metrics.");
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "The health and metrics server stopped.");
        }
    });
    Ok(bound)
}
