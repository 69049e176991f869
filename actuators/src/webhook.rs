//! The webhook actuator: an HTTP POST of the decision as CloudEvents JSON.
//!
//! Signed as the [Standard Webhooks](https://www.standardwebhooks.com/) specification says, so
//! receivers can use its libraries: `webhook-id` (the idempotency key), `webhook-timestamp` (Unix
//! seconds) and `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`. The
//! same key travels as `Idempotency-Key` too (IETF httpapi draft), and `X-Foresight-Operation`
//! says `apply` or `rollback`. The key is the decision id (`<id>.rollback` for the undo), so a
//! receiver that honours it never acts twice on one decision, whatever we resend.

use std::time::Duration;

use base64::Engine as _;
use foresight_events::{CLOUDEVENTS_CONTENT_TYPE, Event, OutcomeStatus};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{
    actuate::{Actuate, Effect, Reconciled, Request, truncate},
    config::WebhookConfig,
    error::ActuatorError,
};

/// The CloudEvents `source` of decisions sent by the actuators.
pub const SOURCE: &str = "/foresight/actuator";

/// Longest backoff between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Most bytes of a response body kept in the outcome.
const MAX_BODY: usize = 2048;

/// The webhook actuator.
#[derive(Debug)]
pub struct Webhook {
    config: WebhookConfig,
    secret: Vec<u8>,
    client: reqwest::Client,
}

/// The Standard Webhooks signature of one request.
pub fn signature(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// What one attempt came to.
enum Attempt {
    Done(Effect),
    /// Worth another try; `after` from `Retry-After`; `sent` if the request may have arrived.
    Retry {
        why: String,
        after: Option<Duration>,
        sent: bool,
    },
}

impl Webhook {
    /// A webhook actuator; its secret is read from the environment now.
    pub fn new(config: WebhookConfig) -> Result<Self, ActuatorError> {
        let secret = std::env::var(&config.secret_env).map_err(|_| {
            ActuatorError::Config(format!(
                "webhook secret variable {} is not set",
                config.secret_env
            ))
        })?;
        if secret.is_empty() {
            return Err(ActuatorError::Config(format!(
                "webhook secret variable {} is empty",
                config.secret_env
            )));
        }
        Self::with_secret(config, secret.into_bytes())
    }

    /// A webhook actuator with the given HMAC key (`secret_env` is not read).
    pub fn with_secret(config: WebhookConfig, secret: Vec<u8>) -> Result<Self, ActuatorError> {
        // rustls with the system's roots: certificates are always verified.
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("foresight-actuators/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ActuatorError::Config(format!("webhook client: {e}")))?;
        Ok(Self {
            config,
            secret,
            client,
        })
    }

    async fn attempt(&self, key: &str, operation: &str, body: &[u8]) -> Attempt {
        // The timestamp is wall-clock time on purpose: it lets the receiver refuse replays of
        // old signed requests.
        let timestamp = chrono::Utc::now().timestamp();
        let response = self
            .client
            .post(&self.config.url)
            .header(reqwest::header::CONTENT_TYPE, CLOUDEVENTS_CONTENT_TYPE)
            .header("idempotency-key", key)
            .header("webhook-id", key)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                signature(&self.secret, key, timestamp, body),
            )
            .header("x-foresight-operation", operation)
            .body(body.to_vec())
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                // A timeout may strike after the request arrived; a connection refused cannot.
                let sent = !e.is_connect();
                let kind = if e.is_timeout() {
                    "timed out"
                } else {
                    "failed"
                };
                return Attempt::Retry {
                    why: format!("request {kind}: {e}"),
                    after: None,
                    sent,
                };
            }
        };
        let status = response.status();
        let after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = response.text().await.unwrap_or_default();
        let text = truncate(&text, MAX_BODY);
        let code = status.as_u16();
        if status.is_success() {
            Attempt::Done(Effect::new(
                OutcomeStatus::Applied,
                format!("HTTP {code}: {text}"),
            ))
        } else if status.is_server_error() || code == 408 || code == 429 {
            Attempt::Retry {
                why: format!("HTTP {code}: {text}"),
                after,
                sent: true,
            }
        } else {
            Attempt::Done(Effect::new(
                OutcomeStatus::Failed,
                format!("HTTP {code} (refused; not retried): {text}"),
            ))
        }
    }
}

impl Actuate for Webhook {
    async fn apply(&self, request: Request<'_>) -> Effect {
        let key = request.idempotency_key();
        let body = Event::new(SOURCE, request.decision.clone()).to_json();
        let mut stop = request.stop.clone();
        let mut backoff = self.config.backoff;
        let mut errors = Vec::new();
        let mut maybe_sent = false;
        for attempt in 0..=self.config.retries {
            if attempt > 0 {
                tokio::select! {
                    biased;
                    () = stop.engaged() => {
                        return Effect::new(
                            if maybe_sent { OutcomeStatus::Unknown } else { OutcomeStatus::Failed },
                            format!("stopped by the kill switch before attempt {}: {}", attempt + 1, errors.join("; ")),
                        );
                    }
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            let outcome = tokio::select! {
                biased;
                () = stop.engaged() => {
                    return Effect::new(
                        OutcomeStatus::Unknown,
                        format!("interrupted by the kill switch during attempt {}; the receiver may have acted (idempotency key {key})", attempt + 1),
                    );
                }
                a = self.attempt(&key, request.operation.as_str(), &body) => a,
            };
            match outcome {
                Attempt::Done(mut effect) => {
                    effect.detail = format!("attempt {}: {}", attempt + 1, effect.detail);
                    if !errors.is_empty() {
                        effect
                            .detail
                            .push_str(&format!(" (earlier: {})", errors.join("; ")));
                    }
                    return effect;
                }
                Attempt::Retry { why, after, sent } => {
                    maybe_sent |= sent;
                    errors.push(format!("attempt {}: {why}", attempt + 1));
                    if let Some(after) = after {
                        backoff = after.min(MAX_BACKOFF);
                    }
                }
            }
        }
        Effect::new(
            OutcomeStatus::Failed,
            format!(
                "gave up after {} attempts: {}",
                self.config.retries + 1,
                errors.join("; ")
            ),
        )
    }

    async fn reconcile(&self, request: Request<'_>) -> Reconciled {
        Reconciled::Unknown(format!(
            "a webhook cannot be asked whether it acted: check the receiver for idempotency key {}",
            request.idempotency_key()
        ))
    }
}
