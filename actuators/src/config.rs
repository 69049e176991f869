//! The `[actuators]` configuration: which actuator applies each action type, each policy's mode,
//! the limits of each group, and the global kill switch.
//!
//! Everything defaults to doing nothing: every policy is in `shadow` mode and every action type
//! uses the `dry_run` actuator until a user names another one.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use foresight_events::ActionKind;
use serde::{Deserialize, Serialize};

/// How a policy's decisions are actuated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Record what would have been done (dry-run outcome); change nothing.
    #[default]
    Shadow,
    /// Wait for a person: the decision is deferred until `foresight approve DECISION_ID`.
    Propose,
    /// Apply at once, subject to the kill switch, rate limits and blast-radius caps.
    Auto,
}

impl Mode {
    /// The mode's name as written in config and the ledger.
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Shadow => "shadow",
            Mode::Propose => "propose",
            Mode::Auto => "auto",
        }
    }
}

/// The actuators stage's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActuatorsConfig {
    /// The kill switch in configuration: when true nothing is applied, whatever the database's
    /// switch (`foresight actuation stop|start`) says. Decisions are then deferred with the reason.
    pub stopped: bool,
    /// Mode of every policy not listed in `policies`.
    pub default_mode: Mode,
    /// Mode per policy name (the `policy` of a decision).
    pub policies: BTreeMap<String, Mode>,
    /// How each action type is actuated. Action types not listed use the `dry_run` actuator.
    pub actions: BTreeMap<ActionKind, ActionConfig>,
    /// Rate limits and blast-radius caps, per group of action types (an action type names its
    /// group; counted in Postgres, so they hold across instances and restarts).
    pub groups: BTreeMap<String, GroupLimits>,
    /// Decisions whose event time is further in the past than this (by the database's clock)
    /// are deferred as stale instead of applied in `auto` mode: acting on old information after
    /// a long outage or a replay is worse than not acting.
    #[serde(with = "humantime_serde")]
    pub max_decision_age: Duration,
    /// How often the kill switch row is read. The claim of every action reads it too, in the
    /// claim's transaction, so no action starts after `foresight actuation stop` commits; this
    /// poll is what interrupts actions already running.
    #[serde(with = "humantime_serde")]
    pub kill_switch_poll: Duration,
    /// How often the live stage looks for claims without an outcome left by crashed instances,
    /// and for actions approved or applied by other processes that it should verify.
    #[serde(with = "humantime_serde")]
    pub scan_interval: Duration,
}

impl Default for ActuatorsConfig {
    fn default() -> Self {
        Self {
            stopped: false,
            default_mode: Mode::Shadow,
            policies: BTreeMap::new(),
            actions: BTreeMap::new(),
            groups: BTreeMap::from([(DEFAULT_GROUP.to_owned(), GroupLimits::default())]),
            max_decision_age: Duration::from_secs(15 * 60),
            kill_switch_poll: Duration::from_millis(200),
            scan_interval: Duration::from_secs(5),
        }
    }
}

/// The group of action types that do not name one.
pub const DEFAULT_GROUP: &str = "default";

/// How one action type is actuated and verified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    /// The actuator that applies it.
    #[serde(default)]
    pub actuator: ActuatorConfig,
    /// The group whose limits it counts against.
    #[serde(default = "default_group")]
    pub group: String,
    /// How the action is judged after it is applied.
    #[serde(default)]
    pub verification: VerificationConfig,
    /// Apply the decision's recorded inverse when the action fails (a failed action may have
    /// half-happened: a command that died midway, a webhook that timed out). Turn off for
    /// actuators whose failures are known to change nothing.
    #[serde(default = "yes")]
    pub rollback_on_failure: bool,
}

fn default_group() -> String {
    DEFAULT_GROUP.to_owned()
}

fn yes() -> bool {
    true
}

/// Which actuator applies an action type, and its settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActuatorConfig {
    /// Record what would have been done.
    #[default]
    DryRun,
    /// HTTP POST of the decision to an endpoint.
    Webhook(WebhookConfig),
    /// Run a program with the decision on stdin.
    Command(CommandConfig),
    /// A Kubernetes API call (scale, cordon, evict, resources, annotations).
    Kubernetes(KubernetesConfig),
}

impl ActuatorConfig {
    /// The actuator's name in outcomes.
    pub fn name(&self) -> &'static str {
        match self {
            ActuatorConfig::DryRun => "dry-run",
            ActuatorConfig::Webhook(_) => "webhook",
            ActuatorConfig::Command(_) => "command",
            ActuatorConfig::Kubernetes(_) => "kubernetes",
        }
    }
}

/// A webhook: the decision as CloudEvents JSON, signed, with the decision id as idempotency key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The endpoint (`https://`, or `http://` for a local receiver). TLS certificates are always
    /// verified against the system's roots.
    pub url: String,
    /// Environment variable holding the HMAC-SHA256 key (the secret never goes in the file).
    pub secret_env: String,
    /// Timeout of one attempt, connection included.
    #[serde(default = "webhook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Further attempts after a 5xx, 408, 429, timeout or connection error (never after
    /// another 4xx: the receiver refused the request and would refuse it again).
    #[serde(default = "webhook_retries")]
    pub retries: u32,
    /// Wait before the first retry; doubled for each further one, capped at 30 s. A
    /// `Retry-After` header in seconds overrides it (within the same cap).
    #[serde(default = "webhook_backoff", with = "humantime_serde")]
    pub backoff: Duration,
}

fn webhook_timeout() -> Duration {
    Duration::from_secs(10)
}
fn webhook_retries() -> u32 {
    3
}
fn webhook_backoff() -> Duration {
    Duration::from_millis(500)
}

/// A program run with the decision's CloudEvents JSON on stdin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// The program (a path; not run through a shell).
    pub program: PathBuf,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Longest it may run; it is then killed and the action counts as failed.
    #[serde(default = "command_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Most bytes of stdout and of stderr kept in the outcome (the rest is read and dropped).
    #[serde(default = "command_max_output")]
    pub max_output: usize,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn command_timeout() -> Duration {
    Duration::from_secs(30)
}
fn command_max_output() -> usize {
    16 * 1024
}

/// The Kubernetes actuator: one API operation per action type, on the object the decision's
/// action parameters name (see `actuators/README.md` for the parameters of each operation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// What this action type does in Kubernetes: the mapping from action type to operation
    /// (the action type is the key this actuator is configured under).
    pub operation: KubernetesOperation,
    /// The API server (`https://host:6443`, or `http://` for a local proxy). Unset: inferred as
    /// kubectl does (`KUBECONFIG` or `~/.kube/config`, then the in-cluster service account).
    #[serde(default)]
    pub api_server: Option<String>,
    /// Environment variable holding the bearer token for `api_server` (the token never goes in
    /// the file). Unset: no token (e.g. client certificates through a local proxy).
    #[serde(default)]
    pub token_env: Option<String>,
    /// PEM file of the certificate authorities that sign `api_server`'s certificate. Unset: the
    /// system's roots. Certificates are always verified.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Timeout of one API request (reading and writing).
    #[serde(default = "kubernetes_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Timeout of connecting to the API server.
    #[serde(default = "kubernetes_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Send every change with `dryRun=All`: the API server validates and admits it and
    /// persists nothing; the outcome is `dry_run`.
    #[serde(default)]
    pub dry_run: bool,
    /// Namespace of actions that do not name one (`namespace` parameter). Unset: the
    /// kubeconfig context's namespace, or `default`.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Kind of object of actions that do not name one (`kind` parameter), for the operations
    /// that work on several kinds.
    #[serde(default)]
    pub kind: Option<ObjectKind>,
    /// Further attempts of an eviction a PodDisruptionBudget refused (HTTP 429) before the
    /// decision is deferred. An eviction is never forced and the pod never deleted.
    #[serde(default = "kubernetes_evict_retries")]
    pub evict_retries: u32,
    /// Wait before the first retry of a refused eviction; doubled for each further one, capped
    /// at 60 s (a `retryAfterSeconds` from the API server wins, within the same cap).
    #[serde(default = "kubernetes_evict_backoff", with = "humantime_serde")]
    pub evict_backoff: Duration,
    /// Field manager recorded by the API server for our changes.
    #[serde(default = "kubernetes_field_manager")]
    pub field_manager: String,
}

fn kubernetes_timeout() -> Duration {
    Duration::from_secs(10)
}
fn kubernetes_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn kubernetes_evict_retries() -> u32 {
    2
}
fn kubernetes_evict_backoff() -> Duration {
    Duration::from_secs(5)
}
fn kubernetes_field_manager() -> String {
    "foresight".to_owned()
}

/// A Kubernetes operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KubernetesOperation {
    /// Set the replicas of a Deployment or StatefulSet (scale subresource).
    Scale,
    /// Mark a node unschedulable.
    Cordon,
    /// Mark a node schedulable.
    Uncordon,
    /// Evict a pod through the Eviction API (PodDisruptionBudgets are honoured).
    Evict,
    /// Set resource requests and limits of one container of a Deployment or StatefulSet.
    SetResources,
    /// Set or remove annotations of an object.
    Annotate,
}

impl KubernetesOperation {
    /// The operation's name as written in config.
    pub fn as_str(&self) -> &'static str {
        match self {
            KubernetesOperation::Scale => "scale",
            KubernetesOperation::Cordon => "cordon",
            KubernetesOperation::Uncordon => "uncordon",
            KubernetesOperation::Evict => "evict",
            KubernetesOperation::SetResources => "set_resources",
            KubernetesOperation::Annotate => "annotate",
        }
    }
}

/// A kind of Kubernetes object the actuator works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    /// apps/v1 Deployment.
    Deployment,
    /// apps/v1 StatefulSet.
    #[serde(alias = "statefulset")]
    StatefulSet,
    /// core/v1 Pod.
    Pod,
    /// core/v1 Node.
    Node,
}

impl ObjectKind {
    /// The kind's name as written in config and parameters.
    pub fn as_str(&self) -> &'static str {
        match self {
            ObjectKind::Deployment => "deployment",
            ObjectKind::StatefulSet => "stateful_set",
            ObjectKind::Pod => "pod",
            ObjectKind::Node => "node",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn is_namespaced(&self) -> bool {
        !matches!(self, ObjectKind::Node)
    }
}

/// How an applied action is judged: by the entity's risk scores over a window of event time
/// after the decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerificationConfig {
    /// How long after the decision (event time) its entity's scores are watched; 0 settles the
    /// action at once, unverified.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// The action made things worse when the entity's probability of failure exceeds the
    /// decision's by more than this...
    pub margin: f64,
    /// ...in this many consecutive scores (one noisy window does not undo an action).
    pub sustained: u32,
}

impl Default for VerificationConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(30 * 60),
            margin: 0.1,
            sustained: 2,
        }
    }
}

/// The limits of one group of action types.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupLimits {
    /// Most actions started per `per` (wall-clock time: the limit protects the real
    /// infrastructure from changing too fast, whatever the decisions' event times).
    pub max_actions: u32,
    /// The rate limit's sliding window.
    #[serde(with = "humantime_serde")]
    pub per: Duration,
    /// Blast-radius cap: most distinct targets with an action of this group not yet settled
    /// (started and not yet verified, failed or rolled back). Another action on one of those
    /// targets is allowed; an action on a further target is deferred.
    pub max_targets: u32,
}

impl Default for GroupLimits {
    fn default() -> Self {
        Self {
            max_actions: 10,
            per: Duration::from_secs(10 * 60),
            max_targets: 5,
        }
    }
}

/// A configuration problem, with its key under `actuators`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("actuators.{key}: {message}")]
pub struct ConfigError {
    /// The key, below `actuators.`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl ActuatorsConfig {
    /// The mode of a policy.
    pub fn mode(&self, policy: &str) -> Mode {
        self.policies
            .get(policy)
            .copied()
            .unwrap_or(self.default_mode)
    }

    /// Every problem in the configuration.
    pub fn validate(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let mut add = |key: String, message: &str| {
            errors.push(ConfigError {
                key,
                message: message.to_owned(),
            })
        };
        if self.kill_switch_poll.is_zero() || self.kill_switch_poll > Duration::from_secs(1) {
            add(
                "kill_switch_poll".into(),
                "must be more than 0 and at most 1s (the kill switch must act within a second)",
            );
        }
        if self.scan_interval.is_zero() {
            add("scan_interval".into(), "must be more than 0");
        }
        for (name, g) in &self.groups {
            if g.per.is_zero() {
                add(format!("groups.{name}.per"), "must be more than 0");
            }
        }
        for (kind, a) in &self.actions {
            let key = |k: &str| format!("actions.{}.{k}", kind.as_str());
            if !self.groups.contains_key(&a.group) {
                add(key("group"), "names no group in actuators.groups");
            }
            let v = &a.verification;
            if !(v.margin.is_finite() && (0.0..=1.0).contains(&v.margin)) {
                add(key("verification.margin"), "must be within [0, 1]");
            }
            if v.sustained == 0 {
                add(key("verification.sustained"), "must be at least 1");
            }
            match &a.actuator {
                ActuatorConfig::DryRun => {}
                ActuatorConfig::Webhook(w) => {
                    if !(w.url.starts_with("https://") || w.url.starts_with("http://")) {
                        add(key("actuator.webhook.url"), "must be an http(s) URL");
                    }
                    if w.secret_env.trim().is_empty() {
                        add(
                            key("actuator.webhook.secret_env"),
                            "must name an environment variable",
                        );
                    }
                    if w.timeout.is_zero() {
                        add(key("actuator.webhook.timeout"), "must be more than 0");
                    }
                }
                ActuatorConfig::Command(c) => {
                    if c.program.as_os_str().is_empty() {
                        add(key("actuator.command.program"), "must not be empty");
                    }
                    if c.timeout.is_zero() {
                        add(key("actuator.command.timeout"), "must be more than 0");
                    }
                }
                ActuatorConfig::Kubernetes(k) => {
                    let k8s = |k: &str| key(&format!("actuator.kubernetes.{k}"));
                    match &k.api_server {
                        Some(url)
                            if !(url.starts_with("https://") || url.starts_with("http://")) =>
                        {
                            add(k8s("api_server"), "must be an http(s) URL");
                        }
                        Some(_) => {}
                        None => {
                            // Inferred configs carry their own credentials and authorities.
                            if k.token_env.is_some() {
                                add(
                                    k8s("token_env"),
                                    "needs api_server (an inferred config brings its own credentials)",
                                );
                            }
                            if k.ca_file.is_some() {
                                add(
                                    k8s("ca_file"),
                                    "needs api_server (an inferred config brings its own authorities)",
                                );
                            }
                        }
                    }
                    if k.token_env.as_ref().is_some_and(|t| t.trim().is_empty()) {
                        add(k8s("token_env"), "must name an environment variable");
                    }
                    if k.timeout.is_zero() {
                        add(k8s("timeout"), "must be more than 0");
                    }
                    if k.connect_timeout.is_zero() {
                        add(k8s("connect_timeout"), "must be more than 0");
                    }
                    if k.namespace.as_ref().is_some_and(|n| n.trim().is_empty()) {
                        add(k8s("namespace"), "must not be empty");
                    }
                    if k.field_manager.trim().is_empty() {
                        add(k8s("field_manager"), "must not be empty");
                    }
                }
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_do_nothing_and_are_valid() {
        let c = ActuatorsConfig::default();
        assert!(c.validate().is_empty());
        assert_eq!(c.mode("anything"), Mode::Shadow);
        assert!(c.actions.is_empty());
    }

    #[test]
    fn kubernetes_settings_are_checked() {
        let k: KubernetesConfig = serde_json::from_value(serde_json::json!({
            "operation": "scale",
            "token_env": "",
            "ca_file": "/ca.pem",
            "timeout": "0s",
            "kind": "statefulset",
        }))
        .unwrap();
        assert_eq!(k.kind, Some(ObjectKind::StatefulSet));
        assert_eq!(k.evict_retries, 2);
        let mut c = ActuatorsConfig::default();
        c.actions.insert(
            ActionKind::ScaleUp,
            ActionConfig {
                actuator: ActuatorConfig::Kubernetes(k),
                group: DEFAULT_GROUP.into(),
                verification: VerificationConfig::default(),
                rollback_on_failure: true,
            },
        );
        let keys: Vec<String> = c.validate().into_iter().map(|e| e.key).collect();
        let k = "actions.scale_up.actuator.kubernetes";
        assert_eq!(
            keys,
            [
                format!("{k}.token_env"),
                format!("{k}.ca_file"),
                format!("{k}.token_env"),
                format!("{k}.timeout"),
            ]
        );
        let unknown = serde_json::from_value::<KubernetesConfig>(serde_json::json!({
            "operation": "scale", "replica": 3,
        }));
        assert!(unknown.is_err(), "unknown keys are refused");
    }

    #[test]
    fn problems_are_reported_with_their_keys() {
        let mut c = ActuatorsConfig {
            kill_switch_poll: Duration::from_secs(5),
            ..Default::default()
        };
        c.actions.insert(
            ActionKind::Migrate,
            ActionConfig {
                actuator: ActuatorConfig::Webhook(WebhookConfig {
                    url: "ftp://x".into(),
                    secret_env: "".into(),
                    timeout: Duration::from_secs(1),
                    retries: 0,
                    backoff: Duration::ZERO,
                }),
                group: "nope".into(),
                verification: VerificationConfig {
                    margin: 2.0,
                    ..Default::default()
                },
                rollback_on_failure: true,
            },
        );
        let keys: Vec<String> = c.validate().into_iter().map(|e| e.key).collect();
        assert_eq!(
            keys,
            [
                "kill_switch_poll",
                "actions.migrate.group",
                "actions.migrate.verification.margin",
                "actions.migrate.actuator.webhook.url",
                "actions.migrate.actuator.webhook.secret_env",
            ]
        );
    }
}
