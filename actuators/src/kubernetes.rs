//! The Kubernetes actuator: one API operation per action type (config), on the object the
//! decision's action parameters name.
//!
//! Every change is read before it is written: the state before is kept in the effect's memo,
//! so the rollback restores exactly that (the replica count, the node's schedulability, the
//! container's previous requests and limits, the previous annotations, removing those that did
//! not exist). An eviction goes through the Eviction API, so PodDisruptionBudgets are honoured:
//! a 429 is retried with backoff, then the decision is deferred. It is never forced and the pod
//! is never deleted; an eviction cannot be undone.

use std::{collections::BTreeMap, fmt, time::Duration};

use chrono::{DateTime, Utc};
use foresight_events::{Action, OutcomeStatus};
use k8s_openapi::api::{
    apps::v1::{Deployment, StatefulSet},
    core::v1::{Node, Pod},
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, EvictParams, Patch, PatchParams, PostParams},
    config::{Config, KubeConfigOptions, Kubeconfig},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use crate::{
    actuate::{Actuate, Effect, KillSignal, Operation, Reconciled, Request, truncate},
    config::{KubernetesConfig, KubernetesOperation, ObjectKind},
    error::ActuatorError,
};

/// Longest wait between two attempts of a refused eviction.
const MAX_EVICT_BACKOFF: Duration = Duration::from_secs(60);

/// Most bytes of an API error kept in an outcome.
const MAX_ERROR: usize = 1024;

/// What is wrong with a decision's action for the configured operation (the decision's fault:
/// it becomes a `failed` outcome with this reason; nothing is called).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum ParamError {
    /// A parameter the operation needs is absent.
    #[error("the action lacks the parameter `{0}`")]
    Missing(&'static str),
    /// A parameter has the wrong type or value.
    #[error("the action's parameter `{param}` {problem}")]
    Invalid {
        /// The parameter.
        param: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The operation does not apply to that kind of object.
    #[error("{operation} does not work on a {kind}")]
    Unsupported {
        /// The configured operation.
        operation: &'static str,
        /// The kind the action names.
        kind: &'static str,
    },
}

/// One object in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ObjectRef {
    kind: ObjectKind,
    /// Unset for nodes; unset before the client's default namespace is filled in.
    namespace: Option<String>,
    name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind.as_str(), self.name),
            None => write!(f, "{} {}", self.kind.as_str(), self.name),
        }
    }
}

/// A state of some fields of an object: what an action sets, or what they were before.
/// `None` values are fields that are (or must be made) absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Change {
    /// `spec.replicas` of the scale subresource.
    Replicas(i32),
    /// A node's `spec.unschedulable`.
    Unschedulable(bool),
    /// One container's resources in the pod template.
    Resources {
        container: String,
        requests: BTreeMap<String, Option<String>>,
        limits: BTreeMap<String, Option<String>>,
    },
    /// `metadata.annotations`.
    Annotations(BTreeMap<String, Option<String>>),
}

fn describe_map(map: &BTreeMap<String, Option<String>>) -> String {
    let items: Vec<String> = map
        .iter()
        .map(|(k, v)| match v {
            Some(v) => format!("{k}={v}"),
            None => format!("{k} unset"),
        })
        .collect();
    format!("{{{}}}", items.join(", "))
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Replicas(n) => write!(f, "replicas {n}"),
            Change::Unschedulable(true) => write!(f, "unschedulable (cordoned)"),
            Change::Unschedulable(false) => write!(f, "schedulable (uncordoned)"),
            Change::Resources {
                container,
                requests,
                limits,
            } => {
                write!(f, "container {container}")?;
                if !requests.is_empty() {
                    write!(f, " requests {}", describe_map(requests))?;
                }
                if !limits.is_empty() {
                    write!(f, " limits {}", describe_map(limits))?;
                }
                Ok(())
            }
            Change::Annotations(a) => write!(f, "annotations {}", describe_map(a)),
        }
    }
}

/// What an action asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Plan {
    /// Set fields of an object.
    Change { object: ObjectRef, change: Change },
    /// Evict a pod.
    Evict { pod: ObjectRef },
}

/// What the actuator keeps for the rollback: the object, what was set and what it was before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Memo {
    object: ObjectRef,
    applied: Change,
    previous: Change,
}

fn string_param(action: &Action, param: &'static str) -> Result<Option<String>, ParamError> {
    match action.params.get(param) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.clone())),
        Some(_) => Err(ParamError::Invalid {
            param,
            problem: "must be a non-empty string".into(),
        }),
    }
}

fn parse_kind(text: &str) -> Result<ObjectKind, ParamError> {
    match text.to_ascii_lowercase().replace(['_', '-'], "").as_str() {
        "deployment" | "deployments" => Ok(ObjectKind::Deployment),
        "statefulset" | "statefulsets" => Ok(ObjectKind::StatefulSet),
        "pod" | "pods" => Ok(ObjectKind::Pod),
        "node" | "nodes" => Ok(ObjectKind::Node),
        _ => Err(ParamError::Invalid {
            param: "kind",
            problem: format!("is {text:?}: expected Deployment, StatefulSet, Pod or Node"),
        }),
    }
}

/// A map of strings (numbers are taken as their text: `cpu = 2`), `null` meaning "remove".
fn string_map(
    action: &Action,
    param: &'static str,
) -> Result<BTreeMap<String, Option<String>>, ParamError> {
    let invalid = |problem: &str| ParamError::Invalid {
        param,
        problem: problem.into(),
    };
    match action.params.get(param) {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    Value::Null => None,
                    _ => return Err(invalid("must map names to strings (or null to remove)")),
                };
                Ok((k.clone(), v))
            })
            .collect(),
        Some(_) => Err(invalid("must be a table of names to strings")),
    }
}

/// The plan of `action` under `operation`, with `config`'s defaults; no IO.
fn parse(
    operation: KubernetesOperation,
    action: &Action,
    config: &KubernetesConfig,
) -> Result<Plan, ParamError> {
    let name = string_param(action, "name")?.unwrap_or_else(|| action.target.as_str().to_owned());
    let kind = match string_param(action, "kind")? {
        Some(k) => Some(parse_kind(&k)?),
        None => None,
    };
    let unsupported = |kind: ObjectKind| ParamError::Unsupported {
        operation: operation.as_str(),
        kind: kind.as_str(),
    };
    // The operations on one kind imply it; a kind given anyway must agree.
    let implied = |only: ObjectKind| match kind {
        Some(k) if k != only => Err(unsupported(k)),
        _ => Ok(only),
    };
    let kind = match operation {
        KubernetesOperation::Cordon | KubernetesOperation::Uncordon => implied(ObjectKind::Node)?,
        KubernetesOperation::Evict => implied(ObjectKind::Pod)?,
        _ => kind.or(config.kind).ok_or(ParamError::Missing("kind"))?,
    };
    let namespace = if kind.is_namespaced() {
        string_param(action, "namespace")?.or_else(|| config.namespace.clone())
    } else {
        None
    };
    let object = ObjectRef {
        kind,
        namespace,
        name,
    };
    let workload = matches!(kind, ObjectKind::Deployment | ObjectKind::StatefulSet);
    let change = match operation {
        KubernetesOperation::Evict => return Ok(Plan::Evict { pod: object }),
        KubernetesOperation::Cordon => Change::Unschedulable(true),
        KubernetesOperation::Uncordon => Change::Unschedulable(false),
        KubernetesOperation::Scale => {
            if !workload {
                return Err(unsupported(kind));
            }
            let replicas = action
                .params
                .get("replicas")
                .ok_or(ParamError::Missing("replicas"))?;
            let replicas = replicas
                .as_u64()
                .and_then(|n| i32::try_from(n).ok())
                .ok_or_else(|| ParamError::Invalid {
                    param: "replicas",
                    problem: format!("is {replicas}: expected a whole number from 0"),
                })?;
            Change::Replicas(replicas)
        }
        KubernetesOperation::SetResources => {
            if !workload {
                return Err(unsupported(kind));
            }
            let container =
                string_param(action, "container")?.ok_or(ParamError::Missing("container"))?;
            let requests = string_map(action, "requests")?;
            let limits = string_map(action, "limits")?;
            if requests.is_empty() && limits.is_empty() {
                return Err(ParamError::Missing("requests` or `limits"));
            }
            Change::Resources {
                container,
                requests,
                limits,
            }
        }
        KubernetesOperation::Annotate => {
            let annotations = string_map(action, "annotations")?;
            if annotations.is_empty() {
                return Err(ParamError::Missing("annotations"));
            }
            Change::Annotations(annotations)
        }
    };
    Ok(Plan::Change { object, change })
}

/// The change that undoes an action applied without a recorded memo (e.g. resolved after a
/// crash): the inverse action's own parameters, or for a cordon, its opposite.
fn derive_undo(
    operation: KubernetesOperation,
    inverse: &Action,
    config: &KubernetesConfig,
) -> Result<(ObjectRef, Change), String> {
    let opposite = match operation {
        KubernetesOperation::Cordon => Some(false),
        KubernetesOperation::Uncordon => Some(true),
        _ => None,
    };
    match parse(operation, inverse, config) {
        Ok(Plan::Change { object, change }) => Ok(match opposite {
            Some(u) => (object, Change::Unschedulable(u)),
            None => (object, change),
        }),
        Ok(Plan::Evict { .. }) => Err("an eviction cannot be undone".into()),
        Err(e) => Err(format!(
            "no record of the state before the action, and the inverse action does not say it: {e}"
        )),
    }
}

/// Why a call did not complete.
enum CallError {
    /// The kill switch engaged while it was in flight.
    Interrupted,
    /// The API server answered with an error status.
    Api(Box<kube::core::Status>),
    /// Anything else (connection, timeout, decoding).
    Other(String),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Interrupted => write!(f, "interrupted by the kill switch"),
            CallError::Api(s) => write!(
                f,
                "HTTP {} {}: {}",
                s.code,
                s.reason,
                truncate(&s.message, MAX_ERROR)
            ),
            CallError::Other(e) => write!(f, "{}", truncate(e, MAX_ERROR)),
        }
    }
}

impl From<kube::Error> for CallError {
    fn from(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) => CallError::Api(s),
            e => CallError::Other(e.to_string()),
        }
    }
}

/// Runs `call` unless the kill switch engages first.
async fn guarded<T>(
    stop: &KillSignal,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, CallError> {
    let mut stop = stop.clone();
    tokio::select! {
        biased;
        () = stop.engaged() => Err(CallError::Interrupted),
        r = call => r.map_err(CallError::from),
    }
}

fn api_resource(kind: ObjectKind) -> ApiResource {
    match kind {
        ObjectKind::Deployment => ApiResource::erase::<Deployment>(&()),
        ObjectKind::StatefulSet => ApiResource::erase::<StatefulSet>(&()),
        ObjectKind::Pod => ApiResource::erase::<Pod>(&()),
        ObjectKind::Node => ApiResource::erase::<Node>(&()),
    }
}

fn dynamic_api(client: &Client, object: &ObjectRef) -> Api<DynamicObject> {
    let ar = api_resource(object.kind);
    match &object.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

/// A JSON value as text, if it is a string or a number (quantities may be written as numbers).
fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The fields `like` names, as they are in `obj`.
fn fields_of(obj: &DynamicObject, like: &Change) -> Result<Change, String> {
    Ok(match like {
        Change::Replicas(_) => return Err("replicas are read from the scale subresource".into()),
        Change::Unschedulable(_) => Change::Unschedulable(
            obj.data
                .pointer("/spec/unschedulable")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        ),
        Change::Resources {
            container,
            requests,
            limits,
        } => {
            let c = obj
                .data
                .pointer("/spec/template/spec/containers")
                .and_then(Value::as_array)
                .and_then(|cs| {
                    cs.iter()
                        .find(|c| c.get("name").and_then(Value::as_str) == Some(container))
                })
                .ok_or_else(|| format!("its pod template has no container {container:?}"))?;
            let read = |section: &str, keys: &BTreeMap<String, Option<String>>| {
                keys.keys()
                    .map(|k| {
                        let v = c.pointer(&format!("/resources/{section}/{k}"));
                        (k.clone(), text(v))
                    })
                    .collect()
            };
            Change::Resources {
                container: container.clone(),
                requests: read("requests", requests),
                limits: read("limits", limits),
            }
        }
        Change::Annotations(keys) => {
            let now = obj.metadata.annotations.clone().unwrap_or_default();
            Change::Annotations(
                keys.keys()
                    .map(|k| (k.clone(), now.get(k).cloned()))
                    .collect(),
            )
        }
    })
}

/// The Kubernetes actuator.
pub struct Kubernetes {
    config: KubernetesConfig,
    /// The bearer token, read from `token_env` when the actuator is built.
    token: Option<String>,
    /// Built on first use: building it is async (kubeconfig inference) and needs the runtime.
    client: OnceCell<Client>,
}

impl fmt::Debug for Kubernetes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the token.
        f.debug_struct("Kubernetes")
            .field("config", &self.config)
            .field("connected", &self.client.initialized())
            .finish()
    }
}

impl Kubernetes {
    /// A Kubernetes actuator; its token is read from the environment now, and the API server is
    /// first contacted by the first action.
    pub fn new(config: KubernetesConfig) -> Result<Self, ActuatorError> {
        let token = match &config.token_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(t) if !t.trim().is_empty() => Some(t.trim().to_owned()),
                Ok(_) => {
                    return Err(ActuatorError::Config(format!(
                        "kubernetes token variable {var} is empty"
                    )));
                }
                Err(_) => {
                    return Err(ActuatorError::Config(format!(
                        "kubernetes token variable {var} is not set"
                    )));
                }
            },
        };
        if let Some(ca) = &config.ca_file
            && !ca.is_file()
        {
            return Err(ActuatorError::Config(format!(
                "kubernetes ca_file {} is not a readable file",
                ca.display()
            )));
        }
        Ok(Self {
            config,
            token,
            client: OnceCell::new(),
        })
    }

    async fn connect(&self) -> Result<Client, String> {
        let c = &self.config;
        let mut config = match &c.api_server {
            Some(server) => {
                // Through kube's own kubeconfig loader, so that the CA file and the token are
                // handled exactly as kubectl handles them.
                let mut cluster = json!({ "server": server });
                if let Some(ca) = &c.ca_file {
                    cluster["certificate-authority"] = json!(ca);
                }
                let mut user = json!({});
                if let Some(token) = &self.token {
                    user["token"] = json!(token);
                }
                let kubeconfig: Kubeconfig = serde_json::from_value(json!({
                    "clusters": [{ "name": "foresight", "cluster": cluster }],
                    "users": [{ "name": "foresight", "user": user }],
                    "contexts": [{ "name": "foresight", "context": { "cluster": "foresight", "user": "foresight" } }],
                    "current-context": "foresight",
                }))
                .map_err(|e| format!("kubernetes client configuration: {e}"))?;
                Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .map_err(|e| format!("kubernetes client configuration: {e}"))?
            }
            None => Config::infer()
                .await
                .map_err(|e| format!("kubernetes client configuration (inferred): {e}"))?,
        };
        config.connect_timeout = Some(c.connect_timeout);
        config.read_timeout = Some(c.timeout);
        config.write_timeout = Some(c.timeout);
        // kube would otherwise retry 429s itself, up to 15 times: a refused eviction is retried
        // here, with our backoff, under the kill switch, and reported.
        config.default_retry = false;
        if let Some(ns) = &c.namespace {
            config.default_namespace = ns.clone();
        }
        Client::try_from(config).map_err(|e| format!("kubernetes client: {e}"))
    }

    async fn client(&self) -> Result<&Client, String> {
        // A failure is not cached: the next action tries again.
        self.client.get_or_try_init(|| self.connect()).await
    }

    fn patch_params(&self) -> PatchParams {
        PatchParams {
            dry_run: self.config.dry_run,
            field_manager: Some(self.config.field_manager.clone()),
            ..Default::default()
        }
    }

    /// Fills in the client's default namespace.
    fn resolve(client: &Client, mut object: ObjectRef) -> ObjectRef {
        if object.kind.is_namespaced() && object.namespace.is_none() {
            object.namespace = Some(client.default_namespace().to_owned());
        }
        object
    }

    /// The fields `like` names, as they are now.
    async fn read(
        &self,
        client: &Client,
        stop: &KillSignal,
        object: &ObjectRef,
        like: &Change,
    ) -> Result<Change, CallError> {
        let api = dynamic_api(client, object);
        if let Change::Replicas(_) = like {
            let scale = guarded(stop, api.get_scale(&object.name)).await?;
            // The API omits `replicas` when it is 0.
            let replicas = scale.spec.and_then(|s| s.replicas).unwrap_or(0);
            return Ok(Change::Replicas(replicas));
        }
        let obj = guarded(stop, api.get(&object.name)).await?;
        fields_of(&obj, like).map_err(CallError::Other)
    }

    /// Writes `change` to `object` (with `dryRun=All` when configured).
    async fn write(
        &self,
        client: &Client,
        stop: &KillSignal,
        object: &ObjectRef,
        change: &Change,
    ) -> Result<(), CallError> {
        let api = dynamic_api(client, object);
        let pp = self.patch_params();
        let name = &object.name;
        match change {
            Change::Replicas(n) => {
                let patch = Patch::Merge(json!({ "spec": { "replicas": n } }));
                guarded(stop, api.patch_scale(name, &pp, &patch)).await?;
            }
            Change::Unschedulable(u) => {
                let patch = Patch::Merge(json!({ "spec": { "unschedulable": u } }));
                guarded(stop, api.patch(name, &pp, &patch)).await?;
            }
            Change::Resources {
                container,
                requests,
                limits,
            } => {
                // A strategic merge patch merges containers by name (a JSON merge patch would
                // replace the whole list); `null` removes a key.
                let mut resources = json!({});
                if !requests.is_empty() {
                    resources["requests"] = json!(requests);
                }
                if !limits.is_empty() {
                    resources["limits"] = json!(limits);
                }
                let patch = Patch::Strategic(json!({ "spec": { "template": { "spec": {
                    "containers": [{ "name": container, "resources": resources }]
                } } } }));
                guarded(stop, api.patch(name, &pp, &patch)).await?;
            }
            Change::Annotations(a) => {
                let patch = Patch::Merge(json!({ "metadata": { "annotations": a } }));
                guarded(stop, api.patch(name, &pp, &patch)).await?;
            }
        }
        Ok(())
    }

    /// Reads the fields, then sets them: the memo holds what they were.
    async fn change(
        &self,
        client: &Client,
        stop: &KillSignal,
        object: ObjectRef,
        change: Change,
    ) -> Effect {
        let previous = match self.read(client, stop, &object, &change).await {
            Ok(p) => p,
            Err(e) => {
                return Effect::new(
                    OutcomeStatus::Failed,
                    format!("reading {object} before changing it: {e}; nothing was changed"),
                );
            }
        };
        let written = self.write(client, stop, &object, &change).await;
        if self.config.dry_run {
            return match written {
                Ok(()) => Effect::new(
                    OutcomeStatus::DryRun,
                    format!(
                        "server-side dry run (dryRun=All) admitted: would set {object} {change} (now {previous}); nothing was changed"
                    ),
                ),
                Err(e) => Effect::new(
                    OutcomeStatus::Failed,
                    format!("server-side dry run of setting {object} {change} refused: {e}"),
                ),
            };
        }
        let detail = format!("{object}: {previous} -> {change}");
        let memo = Memo {
            object,
            applied: change,
            previous,
        };
        let memo = Some(serde_json::to_value(&memo).expect("memos serialise"));
        match written {
            Ok(()) => Effect {
                status: OutcomeStatus::Applied,
                detail,
                memo,
            },
            // Kept with the memo: a timed-out patch may have been applied, and the rollback
            // must know what to restore.
            Err(CallError::Interrupted) => Effect {
                status: OutcomeStatus::Unknown,
                detail: format!(
                    "{detail} interrupted by the kill switch; it may have been applied"
                ),
                memo,
            },
            Err(e) => Effect {
                status: OutcomeStatus::Failed,
                detail: format!("{detail} failed: {e}"),
                memo,
            },
        }
    }

    /// Evicts a pod; retries while a PodDisruptionBudget refuses, then defers. Never forces.
    async fn evict(&self, client: &Client, stop: &KillSignal, pod: ObjectRef) -> Effect {
        let ns = pod.namespace.as_deref().unwrap_or("default");
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let params = EvictParams {
            delete_options: None,
            post_options: PostParams {
                dry_run: self.config.dry_run,
                field_manager: Some(self.config.field_manager.clone()),
            },
        };
        let mut backoff = self.config.evict_backoff;
        let mut waited = Duration::ZERO;
        let mut refusals = Vec::new();
        for attempt in 0..=self.config.evict_retries {
            if attempt > 0 {
                let mut s = stop.clone();
                tokio::select! {
                    biased;
                    () = s.engaged() => {
                        return Effect::new(
                            OutcomeStatus::Deferred,
                            format!("eviction of {pod} refused by its disruption budget ({}); stopped by the kill switch before attempt {}; not forced", refusals.join("; "), attempt + 1),
                        );
                    }
                    () = tokio::time::sleep(backoff) => {}
                }
                waited += backoff;
                backoff = (backoff * 2).min(MAX_EVICT_BACKOFF);
            }
            match guarded(stop, pods.evict(&pod.name, &params)).await {
                Ok(status) => {
                    let (s, what) = if self.config.dry_run {
                        (
                            OutcomeStatus::DryRun,
                            "server-side dry run (dryRun=All) of the eviction admitted; nothing was changed",
                        )
                    } else {
                        (OutcomeStatus::Applied, "evicted through the Eviction API")
                    };
                    let mut detail = format!("{pod}: {what} (attempt {}", attempt + 1);
                    if status.code != 0 {
                        detail.push_str(&format!(", HTTP {}", status.code));
                    }
                    detail.push(')');
                    if !refusals.is_empty() {
                        detail.push_str(&format!(" after {}", refusals.join("; ")));
                    }
                    return Effect::new(s, detail);
                }
                Err(CallError::Api(s)) if s.code == 429 => {
                    let causes: Vec<String> = s
                        .details
                        .iter()
                        .flat_map(|d| &d.causes)
                        .map(|c| format!("{}: {}", c.reason, c.message))
                        .collect();
                    let mut why = format!("attempt {}: HTTP 429 {}", attempt + 1, s.message);
                    if !causes.is_empty() {
                        why.push_str(&format!(" ({})", causes.join("; ")));
                    }
                    refusals.push(truncate(&why, MAX_ERROR));
                    if let Some(after) = s
                        .details
                        .as_ref()
                        .map(|d| d.retry_after_seconds)
                        .filter(|&a| a > 0)
                    {
                        backoff = Duration::from_secs(after.into()).min(MAX_EVICT_BACKOFF);
                    }
                }
                Err(CallError::Interrupted) => {
                    return Effect::new(
                        OutcomeStatus::Unknown,
                        format!(
                            "eviction of {pod} interrupted by the kill switch; it may have been admitted"
                        ),
                    );
                }
                Err(e) => {
                    return Effect::new(OutcomeStatus::Failed, format!("eviction of {pod}: {e}"));
                }
            }
        }
        Effect::new(
            OutcomeStatus::Deferred,
            format!(
                "eviction of {pod} refused by its PodDisruptionBudget {} times over {waited:?} of backoff ({}); not forced and the pod not deleted: try later",
                refusals.len(),
                refusals.join("; ")
            ),
        )
    }

    /// The object and the state a rollback restores.
    fn undo_target(&self, request: &Request<'_>) -> Result<(ObjectRef, Change), String> {
        let op = self.config.operation;
        if op == KubernetesOperation::Evict {
            return Err(
                "an eviction cannot be undone: the pod's controller replaces the pod".into(),
            );
        }
        match request.memo {
            Some(memo) => {
                let memo: Memo = serde_json::from_value(memo.clone()).map_err(|e| {
                    format!("the recorded state before the action is unreadable: {e}")
                })?;
                Ok((memo.object, memo.previous))
            }
            None => derive_undo(op, request.action, &self.config),
        }
    }

    async fn reconcile_eviction(
        &self,
        client: &Client,
        stop: &KillSignal,
        pod: &ObjectRef,
        decided: DateTime<Utc>,
    ) -> Reconciled {
        let api = dynamic_api(client, pod);
        match guarded(stop, api.get_opt(&pod.name)).await {
            Ok(None) => Reconciled::Applied(format!("{pod} is gone")),
            Ok(Some(p)) if p.metadata.deletion_timestamp.is_some() => {
                Reconciled::Applied(format!("{pod} is terminating"))
            }
            Ok(Some(p)) => {
                let created = p
                    .metadata
                    .creation_timestamp
                    .and_then(|t| serde_json::to_value(t).ok())
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .and_then(|t| DateTime::parse_from_rfc3339(&t).ok());
                match created {
                    // Pods of a StatefulSet come back under the same name.
                    Some(t) if t >= decided => Reconciled::Unknown(format!(
                        "{pod} was created at {t}, after the decision: it may be the replacement of an evicted pod"
                    )),
                    Some(_) => Reconciled::NotApplied(format!(
                        "{pod} is running and older than the decision: it was not evicted"
                    )),
                    None => Reconciled::Unknown(format!(
                        "{pod} exists and shows no creation time: cannot tell whether it is a replacement"
                    )),
                }
            }
            Err(e) => Reconciled::Unknown(format!("reading {pod}: {e}")),
        }
    }
}

impl Actuate for Kubernetes {
    async fn apply(&self, request: Request<'_>) -> Effect {
        let stop = &request.stop;
        if stop.is_engaged() {
            return Effect::new(
                OutcomeStatus::Failed,
                "stopped by the kill switch before any call",
            );
        }
        let op = self.config.operation;
        let plan = match request.operation {
            Operation::Apply => match parse(op, request.action, &self.config) {
                Ok(p) => p,
                Err(e) => {
                    return Effect::new(
                        OutcomeStatus::Failed,
                        format!(
                            "invalid action for kubernetes {}: {e}; nothing was done",
                            op.as_str()
                        ),
                    );
                }
            },
            Operation::Rollback => match self.undo_target(&request) {
                Ok((object, change)) => Plan::Change { object, change },
                Err(e) => return Effect::new(OutcomeStatus::Failed, e),
            },
        };
        let client = match self.client().await {
            Ok(c) => c,
            Err(e) => return Effect::new(OutcomeStatus::Failed, e),
        };
        match plan {
            Plan::Evict { pod } => self.evict(client, stop, Self::resolve(client, pod)).await,
            Plan::Change { object, change } => {
                let object = Self::resolve(client, object);
                let mut effect = self.change(client, stop, object, change).await;
                if request.operation == Operation::Rollback {
                    // The memo of the undo is of no use: the apply's memo stays the record.
                    effect.memo = None;
                    let what = if effect.status == OutcomeStatus::Applied {
                        "restored"
                    } else {
                        "rollback:"
                    };
                    effect.detail = format!("{what} {}", effect.detail);
                }
                effect
            }
        }
    }

    async fn reconcile(&self, request: Request<'_>) -> Reconciled {
        if self.config.dry_run {
            return Reconciled::NotApplied(
                "server-side dry run (dryRun=All): this actuator never changes objects".into(),
            );
        }
        let op = self.config.operation;
        let stop = &request.stop;
        let (plan, what) = match request.operation {
            Operation::Apply => match parse(op, request.action, &self.config) {
                Ok(p) => (p, "the action sets"),
                Err(e) => {
                    return Reconciled::NotApplied(format!(
                        "the action is invalid ({e}): it is refused before any call"
                    ));
                }
            },
            Operation::Rollback => match self.undo_target(&request) {
                Ok((object, change)) => (Plan::Change { object, change }, "the rollback restores"),
                Err(e) => return Reconciled::Unknown(e),
            },
        };
        let client = match self.client().await {
            Ok(c) => c,
            Err(e) => return Reconciled::Unknown(e),
        };
        match plan {
            Plan::Evict { pod } => {
                let pod = Self::resolve(client, pod);
                self.reconcile_eviction(client, stop, &pod, request.decision.time)
                    .await
            }
            Plan::Change { object, change } => {
                let object = Self::resolve(client, object);
                match self.read(client, stop, &object, &change).await {
                    Ok(now) if now == change => Reconciled::Applied(format!("{object} has {now}")),
                    Ok(now) => {
                        Reconciled::NotApplied(format!("{object} has {now}; {what} {change}"))
                    }
                    Err(e) => Reconciled::Unknown(format!("reading {object}: {e}")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use foresight_events::{ActionKind, EntityId};

    use super::*;

    fn config(operation: KubernetesOperation) -> KubernetesConfig {
        serde_json::from_value(json!({ "operation": operation })).unwrap()
    }

    fn action(params: Value) -> Action {
        Action {
            kind: ActionKind::ScaleUp,
            target: EntityId::new("api").unwrap(),
            params: serde_json::from_value(params).unwrap(),
        }
    }

    #[test]
    fn scale_needs_a_kind_and_replicas() {
        let c = config(KubernetesOperation::Scale);
        assert_eq!(
            parse(c.operation, &action(json!({ "replicas": 3 })), &c),
            Err(ParamError::Missing("kind"))
        );
        assert_eq!(
            parse(c.operation, &action(json!({ "kind": "Deployment" })), &c),
            Err(ParamError::Missing("replicas"))
        );
        assert!(matches!(
            parse(
                c.operation,
                &action(json!({ "kind": "Deployment", "replicas": -1 })),
                &c
            ),
            Err(ParamError::Invalid {
                param: "replicas",
                ..
            })
        ));
        assert_eq!(
            parse(
                c.operation,
                &action(json!({ "kind": "Node", "replicas": 1 })),
                &c
            ),
            Err(ParamError::Unsupported {
                operation: "scale",
                kind: "node"
            })
        );
        let plan = parse(
            c.operation,
            &action(json!({ "kind": "StatefulSet", "namespace": "db", "replicas": 3 })),
            &c,
        )
        .unwrap();
        assert_eq!(
            plan,
            Plan::Change {
                object: ObjectRef {
                    kind: ObjectKind::StatefulSet,
                    namespace: Some("db".into()),
                    name: "api".into()
                },
                change: Change::Replicas(3)
            }
        );
    }

    #[test]
    fn the_configured_kind_and_namespace_are_defaults() {
        let mut c = config(KubernetesOperation::Annotate);
        c.kind = Some(ObjectKind::Deployment);
        c.namespace = Some("web".into());
        let plan = parse(
            c.operation,
            &action(json!({ "annotations": { "a": "1" } })),
            &c,
        )
        .unwrap();
        let Plan::Change { object, .. } = plan else {
            panic!("an annotation is a change")
        };
        assert_eq!(object.to_string(), "deployment web/api");
        let plan = parse(
            c.operation,
            &action(json!({ "annotations": { "a": null }, "kind": "node", "namespace": "x" })),
            &c,
        )
        .unwrap();
        let Plan::Change { object, change } = plan else {
            panic!("an annotation is a change")
        };
        // Nodes have no namespace, whatever the action says.
        assert_eq!(object.to_string(), "node api");
        assert_eq!(change.to_string(), "annotations {a unset}");
    }

    #[test]
    fn cordon_implies_a_node_and_its_undo_is_uncordon() {
        let c = config(KubernetesOperation::Cordon);
        assert_eq!(
            parse(c.operation, &action(json!({ "kind": "Pod" })), &c),
            Err(ParamError::Unsupported {
                operation: "cordon",
                kind: "pod"
            })
        );
        let (object, change) = derive_undo(c.operation, &action(json!({})), &c).unwrap();
        assert_eq!(object.to_string(), "node api");
        assert_eq!(change, Change::Unschedulable(false));
        let evict = config(KubernetesOperation::Evict);
        assert!(derive_undo(evict.operation, &action(json!({})), &evict).is_err());
    }

    #[test]
    fn resources_need_a_container_and_values() {
        let mut c = config(KubernetesOperation::SetResources);
        c.kind = Some(ObjectKind::Deployment);
        assert_eq!(
            parse(
                c.operation,
                &action(json!({ "limits": { "cpu": "1" } })),
                &c
            ),
            Err(ParamError::Missing("container"))
        );
        assert!(parse(c.operation, &action(json!({ "container": "app" })), &c).is_err());
        assert!(matches!(
            parse(
                c.operation,
                &action(json!({ "container": "app", "limits": ["1"] })),
                &c
            ),
            Err(ParamError::Invalid {
                param: "limits",
                ..
            })
        ));
        let Plan::Change { change, .. } = parse(
            c.operation,
            &action(json!({ "container": "app", "limits": { "cpu": 2, "memory": "1Gi" } })),
            &c,
        )
        .unwrap() else {
            panic!("resources are a change")
        };
        assert_eq!(
            change.to_string(),
            "container app limits {cpu=2, memory=1Gi}"
        );
    }
}
