//! The kubernetes actuator against a **fake** Kubernetes API server.
//!
//! No Kubernetes API server can run on this machine (nor in CI), so these tests serve, with
//! axum on a local port, the real API's JSON shapes for exactly the calls the actuator makes:
//! GET and PATCH (merge and strategic merge) of apps/v1 Deployments and StatefulSets and of
//! their `scale` subresource, GET and PATCH of core/v1 Nodes and Pods, and POST of the policy/v1
//! `eviction` subresource of a pod (201 with a `Status`, or 429 with a `Status` when a
//! PodDisruptionBudget protects the pod). It keeps the objects in memory, honours `dryRun=All`
//! by persisting nothing, and records every request it received so the tests can assert what
//! was sent. It is not a Kubernetes: no admission, no validation beyond the content types, no
//! controllers (an evicted pod simply disappears).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use chrono::{TimeZone, Utc};
use foresight_actuators::{
    Actuate, KillSignal, Kubernetes, Operation, Reconciled, Request,
    config::{KubernetesConfig, KubernetesOperation},
};
use foresight_events::{
    Action, ActionKind, Band, Decision, EntityId, EventData, EventId, OutcomeStatus,
};
use serde_json::{Value, json};

/// A variable cargo sets for every test run, used as the bearer token: the tests cannot set
/// one of their own (`set_var` is unsafe, and the crate forbids unsafe code).
const TOKEN_ENV: &str = "CARGO_PKG_NAME";

/// One request the fake received.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    query: String,
    content_type: String,
    authorization: String,
    body: Value,
}

impl Seen {
    fn dry_run(&self) -> bool {
        self.query.split('&').any(|kv| kv == "dryRun=All")
    }
}

/// The fake API server's state.
#[derive(Default)]
struct Fake {
    /// Objects by their API path (`/apis/apps/v1/namespaces/web/deployments/api`).
    objects: BTreeMap<String, Value>,
    /// Pod paths a PodDisruptionBudget protects: their evictions are refused with 429.
    protected: BTreeSet<String>,
    /// Every request, in order.
    seen: Vec<Seen>,
}

type Shared = Arc<Mutex<Fake>>;

fn status(code: u16, reason: &str, message: &str, details: Option<Value>) -> Response {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": if code < 300 { "Success" } else { "Failure" },
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        body["details"] = d;
    }
    respond(code, &body)
}

fn respond(code: u16, body: &Value) -> Response {
    (
        StatusCode::from_u16(code).unwrap(),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// An RFC 7386 JSON merge patch; with `strategic`, lists of objects with a `name` (containers)
/// are merged item by item by name, as the strategic merge patch does for them.
fn merge(target: &mut Value, patch: &Value, strategic: bool) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        match (v, t.get_mut(k)) {
            (Value::Null, _) => {
                t.remove(k);
            }
            (Value::Array(items), Some(Value::Array(existing))) if strategic => {
                for item in items {
                    let name = item.get("name");
                    match existing.iter_mut().find(|e| e.get("name") == name) {
                        Some(e) if name.is_some() => merge(e, item, true),
                        _ => existing.push(item.clone()),
                    }
                }
            }
            _ => merge(t.entry(k.clone()).or_insert(Value::Null), v, strategic),
        }
    }
}

/// The autoscaling/v1 Scale of a workload.
fn scale_of(obj: &Value) -> Value {
    let mut spec = json!({});
    // The real API omits `replicas` when it is 0.
    if let Some(n) = obj["spec"]["replicas"].as_i64().filter(|&n| n != 0) {
        spec["replicas"] = json!(n);
    }
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": obj["metadata"]["name"],
            "namespace": obj["metadata"]["namespace"],
            "resourceVersion": obj["metadata"]["resourceVersion"],
        },
        "spec": spec,
        "status": { "replicas": obj["spec"]["replicas"] },
    })
}

fn bump(obj: &mut Value) {
    let rv: u64 = obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    obj["metadata"]["resourceVersion"] = json!((rv + 1).to_string());
}

async fn api(
    State(fake): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let h = |k: header::HeaderName| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let seen = Seen {
        method: method.clone(),
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or_default().to_owned(),
        content_type: h(header::CONTENT_TYPE),
        authorization: h(header::AUTHORIZATION),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    let mut fake = fake.lock().unwrap();
    fake.seen.push(seen.clone());
    let dry = seen.dry_run();
    let path = uri.path();
    let (base, sub) = match path.rsplit_once('/') {
        Some((b, s @ ("scale" | "eviction"))) => (b.to_owned(), Some(s)),
        _ => (path.to_owned(), None),
    };
    let name = base.rsplit('/').next().unwrap_or_default().to_owned();
    let Some(current) = fake.objects.get(&base).cloned() else {
        return status(404, "NotFound", &format!("\"{name}\" not found"), None);
    };
    match (method, sub) {
        (Method::GET, None) => respond(200, &current),
        (Method::GET, Some("scale")) => respond(200, &scale_of(&current)),
        (Method::PATCH, sub @ (None | Some("scale"))) => {
            let strategic = match seen.content_type.as_str() {
                "application/merge-patch+json" => false,
                // Strategic merge is for built-in objects, not for the scale subresource.
                "application/strategic-merge-patch+json" if sub.is_none() => true,
                other => {
                    return status(
                        415,
                        "UnsupportedMediaType",
                        &format!("the body of the request was in an unknown format: {other}"),
                        None,
                    );
                }
            };
            let mut next = current.clone();
            if sub == Some("scale") {
                let replicas = &seen.body["spec"]["replicas"];
                if !replicas.is_i64() {
                    return status(422, "Invalid", "spec.replicas: Required value", None);
                }
                next["spec"]["replicas"] = replicas.clone();
            } else {
                merge(&mut next, &seen.body, strategic);
            }
            bump(&mut next);
            if !dry {
                fake.objects.insert(base, next.clone());
            }
            respond(200, &if sub.is_some() { scale_of(&next) } else { next })
        }
        (Method::POST, Some("eviction")) => {
            if fake.protected.contains(&base) {
                return status(
                    429,
                    "TooManyRequests",
                    "Cannot evict pod as it would violate the pod's disruption budget.",
                    Some(json!({ "causes": [{
                        "reason": "DisruptionBudget",
                        "message": "The disruption budget api-pdb needs 2 healthy pods and has 2 currently",
                    }] })),
                );
            }
            if !dry {
                fake.objects.remove(&base);
            }
            status(201, "", "", None)
        }
        (m, _) => status(
            405,
            "MethodNotAllowed",
            &format!("{m} is not supported by the fake"),
            None,
        ),
    }
}

/// A fake API server holding `objects`; its URL and its state.
async fn fake(objects: Vec<Value>) -> (String, Shared) {
    let mut state = Fake::default();
    for o in objects {
        let m = &o["metadata"];
        let (name, ns) = (m["name"].as_str().unwrap(), m["namespace"].as_str());
        let path = match (o["kind"].as_str().unwrap(), ns) {
            ("Deployment", Some(ns)) => format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}"),
            ("StatefulSet", Some(ns)) => {
                format!("/apis/apps/v1/namespaces/{ns}/statefulsets/{name}")
            }
            ("Pod", Some(ns)) => format!("/api/v1/namespaces/{ns}/pods/{name}"),
            ("Node", None) => format!("/api/v1/nodes/{name}"),
            other => panic!("the fake does not serve {other:?}"),
        };
        state.objects.insert(path, o);
    }
    let shared = Arc::new(Mutex::new(state));
    let app = Router::new().fallback(api).with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), shared)
}

fn workload(kind: &str, ns: &str, name: &str, replicas: i64, containers: Value) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": { "name": name, "namespace": ns, "uid": format!("uid-{name}"), "resourceVersion": "1" },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": { "containers": containers },
            },
        },
    })
}

fn node(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "uid": format!("uid-{name}"), "resourceVersion": "1" },
        "spec": { "podCIDR": "10.244.1.0/24" },
    })
}

fn pod(ns: &str, name: &str, created: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns, "uid": format!("uid-{name}"), "resourceVersion": "1",
            "creationTimestamp": created, "annotations": annotations,
        },
        "spec": { "containers": [{ "name": "app", "image": "example/app:1" }] },
        "status": { "phase": "Running" },
    })
}

fn config(operation: KubernetesOperation, url: &str) -> KubernetesConfig {
    KubernetesConfig {
        operation,
        api_server: Some(url.to_owned()),
        token_env: Some(TOKEN_ENV.to_owned()),
        ca_file: None,
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        dry_run: false,
        namespace: Some("web".into()),
        kind: None,
        evict_retries: 2,
        evict_backoff: Duration::from_millis(20),
        field_manager: "foresight".into(),
    }
}

fn decision(kind: ActionKind, target: &str, params: Value) -> Decision {
    let target = EntityId::new(target).unwrap();
    let params: BTreeMap<String, Value> = serde_json::from_value(params).unwrap();
    Decision {
        entity: target.clone(),
        time: Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
        score_id: EventId::derive("s", &[kind.as_str().as_bytes()]),
        probability: 0.9,
        interval: [0.8, 0.95],
        band: Band::High,
        policy: "p".into(),
        rule: "r".into(),
        action: Action {
            kind,
            target: target.clone(),
            params,
        },
        reason: "r".into(),
        expected_effect: "e".into(),
        inverse: Some(Action {
            kind: ActionKind::ScaleBack,
            target,
            params: BTreeMap::new(),
        }),
        alternatives: vec![],
    }
}

fn request<'a>(d: &'a Decision, op: Operation, memo: Option<&'a Value>) -> Request<'a> {
    Request {
        decision: d,
        decision_id: d.id(),
        operation: op,
        action: match op {
            Operation::Apply => &d.action,
            Operation::Rollback => d.inverse.as_ref().unwrap(),
        },
        memo,
        stop: KillSignal::never(),
    }
}

fn object(fake: &Shared, path: &str) -> Option<Value> {
    fake.lock().unwrap().objects.get(path).cloned()
}

fn seen(fake: &Shared) -> Vec<Seen> {
    fake.lock().unwrap().seen.clone()
}

fn calls(fake: &Shared) -> Vec<String> {
    seen(fake)
        .iter()
        .map(|s| format!("{} {}", s.method, s.path))
        .collect()
}

const DEPLOY: &str = "/apis/apps/v1/namespaces/web/deployments/api";

#[tokio::test]
async fn scale_up_records_the_replicas_before_and_its_rollback_restores_them() {
    let (url, fake) = fake(vec![
        workload("Deployment", "web", "api", 2, json!([{ "name": "app" }])),
        workload("StatefulSet", "db", "pg", 3, json!([{ "name": "pg" }])),
    ])
    .await;
    let k = Kubernetes::new(config(KubernetesOperation::Scale, &url)).unwrap();
    let d = decision(
        ActionKind::ScaleUp,
        "api",
        json!({ "kind": "Deployment", "replicas": 5 }),
    );
    let e = k.apply(request(&d, Operation::Apply, None)).await;
    assert_eq!(e.status, OutcomeStatus::Applied, "{}", e.detail);
    assert_eq!(e.detail, "deployment web/api: replicas 2 -> replicas 5");
    assert_eq!(object(&fake, DEPLOY).unwrap()["spec"]["replicas"], 5);
    let memo = e.memo.expect("the replicas before are recorded");
    assert_eq!(memo["previous"], json!({ "replicas": 2 }));
    let s = seen(&fake);
    assert_eq!(
        calls(&fake),
        [
            format!("GET {DEPLOY}/scale"),
            format!("PATCH {DEPLOY}/scale")
        ]
    );
    assert_eq!(s[1].content_type, "application/merge-patch+json");
    assert_eq!(s[1].body, json!({ "spec": { "replicas": 5 } }));
    assert!(!s[1].dry_run());
    assert!(
        s[1].query.contains("fieldManager=foresight"),
        "{}",
        s[1].query
    );
    let token = std::env::var(TOKEN_ENV).expect("cargo sets it for test runs");
    assert!(
        s.iter()
            .all(|r| r.authorization == format!("Bearer {token}"))
    );

    // The inverse: back to the recorded count, whatever the inverse action says.
    let r = k.apply(request(&d, Operation::Rollback, Some(&memo))).await;
    assert_eq!(r.status, OutcomeStatus::Applied, "{}", r.detail);
    assert_eq!(
        r.detail,
        "restored deployment web/api: replicas 5 -> replicas 2"
    );
    assert_eq!(object(&fake, DEPLOY).unwrap()["spec"]["replicas"], 2);
    assert_eq!(seen(&fake)[3].body, json!({ "spec": { "replicas": 2 } }));

    // A StatefulSet in another namespace, through the same subresource.
    let d = decision(
        ActionKind::ScaleBack,
        "pg",
        json!({ "kind": "StatefulSet", "namespace": "db", "replicas": 1 }),
    );
    let e = k.apply(request(&d, Operation::Apply, None)).await;
    assert_eq!(e.status, OutcomeStatus::Applied, "{}", e.detail);
    let sts = "/apis/apps/v1/namespaces/db/statefulsets/pg";
    assert_eq!(object(&fake, sts).unwrap()["spec"]["replicas"], 1);
    assert_eq!(e.memo.unwrap()["previous"], json!({ "replicas": 3 }));
}

#[tokio::test]
async fn cordon_then_uncordon() {
    let (url, fake) = fake(vec![node("n1")]).await;
    let path = "/api/v1/nodes/n1";
    let k = Kubernetes::new(config(KubernetesOperation::Cordon, &url)).unwrap();
    let d = decision(ActionKind::Migrate, "n1", json!({}));
    let e = k.apply(request(&d, Operation::Apply, None)).await;
    assert_eq!(e.status, OutcomeStatus::Applied, "{}", e.detail);
    assert_eq!(object(&fake, path).unwrap()["spec"]["unschedulable"], true);
    let s = seen(&fake);
    assert_eq!(
        calls(&fake),
        [format!("GET {path}"), format!("PATCH {path}")]
    );
    assert_eq!(s[1].body, json!({ "spec": { "unschedulable": true } }));
    let memo = e.memo.unwrap();
    assert_eq!(memo["previous"], json!({ "unschedulable": false }));

    let r = k.apply(request(&d, Operation::Rollback, Some(&memo))).await;
    assert_eq!(r.status, OutcomeStatus::Applied, "{}", r.detail);
    assert_eq!(object(&fake, path).unwrap()["spec"]["unschedulable"], false);
    assert_eq!(
        seen(&fake)[3].body,
        json!({ "spec": { "unschedulable": false } })
    );

    // Without a memo (an action resolved after a crash) the undo of a cordon is an uncordon.
    k.apply(request(&d, Operation::Apply, None)).await;
    assert_eq!(object(&fake, path).unwrap()["spec"]["unschedulable"], true);
    let r = k.apply(request(&d, Operation::Rollback, None)).await;
    assert_eq!(r.status, OutcomeStatus::Applied, "{}", r.detail);
    assert_eq!(object(&fake, path).unwrap()["spec"]["unschedulable"], false);
    // The node's other fields are untouched.
    assert_eq!(
        object(&fake, path).unwrap()["spec"]["podCIDR"],
        "10.244.1.0/24"
    );
}

#[tokio::test]
async fn eviction_admitted() {
    let path = "/api/v1/namespaces/web/pods/api-0";
    let (url, fake) = fake(vec![pod("web", "api-0", "2023-01-01T00:00:00Z", json!({}))]).await;
    let k = Kubernetes::new(config(KubernetesOperation::Evict, &url)).unwrap();
    let d = decision(ActionKind::Evict, "api-0", json!({}));
    let e = k.apply(request(&d, Operation::Apply, None)).await;
    assert_eq!(e.status, OutcomeStatus::Applied, "{}", e.detail);
    assert!(e.detail.contains("HTTP 201"), "{}", e.detail);
    assert!(object(&fake, path).is_none(), "the fake evicted the pod");
    let s = seen(&fake);
    assert_eq!(calls(&fake), [format!("POST {path}/eviction")]);
    assert_eq!(s[0].body["metadata"]["name"], "api-0");
    assert!(!s[0].dry_run());

    // An eviction has no inverse.
    let r = k.apply(request(&d, Operation::Rollback, None)).await;
    assert_eq!(r.status, OutcomeStatus::Failed);
    assert!(r.detail.contains("cannot be undone"), "{}", r.detail);
    assert_eq!(seen(&fake).len(), 1, "the rollback called nothing");
}

#[tokio::test]
async fn eviction_refused_by_a_disruption_budget_is_deferred_with_backoff_and_never_forced() {
    let path = "/api/v1/namespaces/web/pods/api-0";
    let (url, fake) = fake(vec![pod("web", "api-0", "2023-01-01T00:00:00Z", json!({}))]).await;
    fake.lock().unwrap().protected.insert(path.to_owned());
    let k = Kubernetes::new(config(KubernetesOperation::Evict, &url)).unwrap();
    let d = decision(ActionKind::Evict, "api-0", json!({}));
    let started = Instant::now();
    let e = k.apply(request(&d, Operation::Apply, None)).await;
    let took = started.elapsed();
    assert_eq!(e.status, OutcomeStatus::Deferred, "{}", e.detail);
    assert!(
        e.detail
            .contains("Cannot evict pod as it would violate the pod's disruption budget."),
        "{}",
        e.detail
    );
    assert!(e.detail.contains("needs 2 healthy pods"), "{}", e.detail);
    assert!(e.detail.contains("not forced"), "{}", e.detail);
    // evict_retries = 2: three attempts, 20 ms then 40 ms apart.
    assert!(took >= Duration::from_millis(60), "{took:?}");
    assert_eq!(calls(&fake), vec![format!("POST {path}/eviction"); 3]);
    for s in seen(&fake) {
        // The same polite eviction each time: no grace period override, no DELETE.
        assert_eq!(s.body["metadata"]["name"], "api-0");
        assert!(s.body["delete_options"].is_null(), "{}", s.body);
    }
    assert!(object(&fake, path).is_some(), "the pod is still there");
}

#[tokio::test]
async fn set_resources_and_restore_them() {
    let (url, fake) = fake(vec![workload(
        "Deployment",
        "web",
        "api",
        2,
        json!([
            { "name": "app", "image": "example/app:1", "resources": { "requests": { "cpu": "100m" } } },
            { "name": "sidecar", "image": "example/proxy:1", "resources": { "limits": { "memory": "64Mi" } } },
        ]),
    )])
    .await;
    let mut c = config(KubernetesOperation::SetResources, &url);
    c.kind = Some(foresight_actuators::config::ObjectKind::Deployment);
    let k = Kubernetes::new(c).unwrap();
    let d = decision(
        ActionKind::RaiseLimits,
        "api",
        json!({ "container": "app", "requests": { "cpu": "500m" }, "limits": { "memory": "1Gi" } }),
    );
    let e = k.apply(request(&d, Operation::Apply, None)).await;
    assert_eq!(e.status, OutcomeStatus::Applied, "{}", e.detail);
    assert_eq!(
        e.detail,
        "deployment web/api: container app requests {cpu=100m} limits {memory unset} -> container app requests {cpu=500m} limits {memory=1Gi}"
    );
    let s = seen(&fake);
    assert_eq!(
        calls(&fake),
        [format!("GET {DEPLOY}"), format!("PATCH {DEPLOY}")]
    );
    assert_eq!(s[1].content_type, "application/strategic-merge-patch+json");
    let containers = |fake: &Shared| {
        object(fake, DEPLOY).unwrap()["spec"]["template"]["spec"]["containers"].clone()
    };
    let now = containers(&fake);
    assert_eq!(
        now[0]["resources"],
        json!({ "requests": { "cpu": "500m" }, "limits": { "memory": "1Gi" } })
    );
    assert_eq!(now[0]["image"], "example/app:1");
    assert_eq!(
        now[1]["resources"],
        json!({ "limits": { "memory": "64Mi" } })
    );

    let r = k
        .apply(request(&d, Operation::Rollback, e.memo.as_ref()))
        .await;
    assert_eq!(r.status, OutcomeStatus::Applied, "{}", r.detail);
    let now = containers(&fake);
    // The limit that did not exist is removed again (a strategic merge patch with null).
    assert_eq!(
        now[0]["resources"],
        json!({ "requests": { "cpu": "100m" }, "limits": {} })
    );
    assert_eq!(
        seen(&fake)[3].body["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"],
        json!({ "memory": null })
    );
    assert_eq!(
        now[1]["resources"],
        json!({ "limits": { "memory": "64Mi" } })
    );

    // A container the template does not have: failed, nothing written.
    let d = decision(
        ActionKind::RaiseLimits,
        "api",
        json!({ "container": "nope", "limits": { "cpu": "1" } }),
    );
    let e = k.apply(request(&d, Operation::Apply, None)).await;
    assert_eq!(e.status, OutcomeStatus::Failed);
    assert!(e.detail.contains("no container \"nope\""), "{}", e.detail);
    assert_eq!(seen(&fake).last().unwrap().method, Method::GET);
}

#[tokio::test]
async fn annotate_and_restore() {
    let path = "/api/v1/namespaces/web/pods/api-0";
    let (url, fake) = fake(vec![pod(
        "web",
        "api-0",
        "2023-01-01T00:00:00Z",
        json!({ "owner": "team-a", "keep": "x" }),
    )])
    .await;
    let k = Kubernetes::new(config(KubernetesOperation::Annotate, &url)).unwrap();
    let d = decision(
        ActionKind::Monitor,
        "api-0",
        json!({ "kind": "Pod", "annotations": { "foresight.io/risk": "high", "owner": "foresight" } }),
    );
    let e = k.apply(request(&d, Operation::Apply, None)).await;
    assert_eq!(e.status, OutcomeStatus::Applied, "{}", e.detail);
    assert_eq!(
        object(&fake, path).unwrap()["metadata"]["annotations"],
        json!({ "owner": "foresight", "keep": "x", "foresight.io/risk": "high" })
    );
    let s = seen(&fake);
    assert_eq!(s[1].content_type, "application/merge-patch+json");
    assert_eq!(
        s[1].body,
        json!({ "metadata": { "annotations": { "foresight.io/risk": "high", "owner": "foresight" } } })
    );

    let r = k
        .apply(request(&d, Operation::Rollback, e.memo.as_ref()))
        .await;
    assert_eq!(r.status, OutcomeStatus::Applied, "{}", r.detail);
    assert_eq!(
        object(&fake, path).unwrap()["metadata"]["annotations"],
        json!({ "owner": "team-a", "keep": "x" })
    );
}

#[tokio::test]
async fn server_side_dry_run_sends_dry_run_all_and_changes_nothing() {
    let pod_path = "/api/v1/namespaces/web/pods/api-0";
    let objects = vec![
        workload("Deployment", "web", "api", 2, json!([{ "name": "app" }])),
        pod("web", "api-0", "2023-01-01T00:00:00Z", json!({})),
    ];
    let (url, fake) = fake(objects).await;
    let before = fake.lock().unwrap().objects.clone();

    let mut c = config(KubernetesOperation::Scale, &url);
    c.dry_run = true;
    let scale = Kubernetes::new(c.clone()).unwrap();
    let d = decision(
        ActionKind::ScaleUp,
        "api",
        json!({ "kind": "Deployment", "replicas": 5 }),
    );
    let e = scale.apply(request(&d, Operation::Apply, None)).await;
    assert_eq!(e.status, OutcomeStatus::DryRun, "{}", e.detail);
    assert!(e.detail.contains("dryRun=All"), "{}", e.detail);
    assert_eq!(e.memo, None, "nothing to roll back");

    c.operation = KubernetesOperation::Evict;
    let evict = Kubernetes::new(c).unwrap();
    let d = decision(ActionKind::Evict, "api-0", json!({}));
    let e = evict.apply(request(&d, Operation::Apply, None)).await;
    assert_eq!(e.status, OutcomeStatus::DryRun, "{}", e.detail);

    let s = seen(&fake);
    assert_eq!(
        calls(&fake),
        [
            format!("GET {DEPLOY}/scale"),
            format!("PATCH {DEPLOY}/scale"),
            format!("POST {pod_path}/eviction"),
        ]
    );
    assert!(s[1].dry_run() && s[2].dry_run(), "{s:?}");
    assert_eq!(
        fake.lock().unwrap().objects,
        before,
        "the fake changed nothing"
    );
}

#[tokio::test]
async fn reconcile_reads_the_object() {
    let pod_path = "/api/v1/namespaces/web/pods/api-0";
    let (url, fake) = fake(vec![
        workload("Deployment", "web", "api", 5, json!([{ "name": "app" }])),
        node("n1"),
        pod("web", "api-0", "2023-01-01T00:00:00Z", json!({})),
        // Created after the decision (1_700_000_000 = 2023-11-14): maybe a replacement.
        pod("web", "db-0", "2024-06-01T00:00:00Z", json!({})),
    ])
    .await;
    let k = Kubernetes::new(config(KubernetesOperation::Scale, &url)).unwrap();
    let d = decision(
        ActionKind::ScaleUp,
        "api",
        json!({ "kind": "Deployment", "replicas": 5 }),
    );
    let r = k.reconcile(request(&d, Operation::Apply, None)).await;
    assert_eq!(
        r,
        Reconciled::Applied("deployment web/api has replicas 5".into())
    );
    let d7 = decision(
        ActionKind::ScaleUp,
        "api",
        json!({ "kind": "Deployment", "replicas": 7 }),
    );
    let r = k.reconcile(request(&d7, Operation::Apply, None)).await;
    assert_eq!(
        r,
        Reconciled::NotApplied(
            "deployment web/api has replicas 5; the action sets replicas 7".into()
        )
    );
    // A rollback is checked against the recorded state before.
    let memo = json!({
        "object": { "kind": "deployment", "namespace": "web", "name": "api" },
        "applied": { "replicas": 7 },
        "previous": { "replicas": 5 },
    });
    let r = k
        .reconcile(request(&d7, Operation::Rollback, Some(&memo)))
        .await;
    assert!(matches!(r, Reconciled::Applied(_)), "{r:?}");

    let cordon = Kubernetes::new(config(KubernetesOperation::Cordon, &url)).unwrap();
    let d = decision(ActionKind::Migrate, "n1", json!({}));
    let r = cordon.reconcile(request(&d, Operation::Apply, None)).await;
    assert!(matches!(r, Reconciled::NotApplied(_)), "{r:?}");

    let evict = Kubernetes::new(config(KubernetesOperation::Evict, &url)).unwrap();
    let r = evict
        .reconcile(request(
            &decision(ActionKind::Evict, "api-0", json!({})),
            Operation::Apply,
            None,
        ))
        .await;
    assert!(matches!(r, Reconciled::NotApplied(_)), "{r:?}");
    let r = evict
        .reconcile(request(
            &decision(ActionKind::Evict, "db-0", json!({})),
            Operation::Apply,
            None,
        ))
        .await;
    assert!(matches!(r, Reconciled::Unknown(_)), "{r:?}");
    fake.lock().unwrap().objects.remove(pod_path);
    let r = evict
        .reconcile(request(
            &decision(ActionKind::Evict, "api-0", json!({})),
            Operation::Apply,
            None,
        ))
        .await;
    assert_eq!(r, Reconciled::Applied("pod web/api-0 is gone".into()));

    // Reconciling only ever reads.
    assert!(seen(&fake).iter().all(|s| s.method == Method::GET));
    assert_eq!(seen(&fake).len(), 7);
}

#[tokio::test]
async fn a_decision_lacking_required_params_fails_with_the_reason() {
    let (url, fake) = fake(vec![workload("Deployment", "web", "api", 2, json!([]))]).await;
    let cases = [
        (
            KubernetesOperation::Scale,
            json!({ "kind": "Deployment" }),
            "the action lacks the parameter `replicas`",
        ),
        (
            KubernetesOperation::Scale,
            json!({ "replicas": 3 }),
            "the action lacks the parameter `kind`",
        ),
        (
            KubernetesOperation::Scale,
            json!({ "kind": "Deployment", "replicas": "many" }),
            "the action's parameter `replicas` is \"many\": expected a whole number from 0",
        ),
        (
            KubernetesOperation::SetResources,
            json!({ "kind": "Deployment", "limits": { "cpu": "1" } }),
            "the action lacks the parameter `container`",
        ),
        (
            KubernetesOperation::Annotate,
            json!({ "kind": "Deployment" }),
            "the action lacks the parameter `annotations`",
        ),
        (
            KubernetesOperation::Evict,
            json!({ "kind": "Deployment" }),
            "evict does not work on a deployment",
        ),
    ];
    for (op, params, reason) in cases {
        let k = Kubernetes::new(config(op, &url)).unwrap();
        let d = decision(ActionKind::ScaleUp, "api", params);
        let e = k.apply(request(&d, Operation::Apply, None)).await;
        assert_eq!(e.status, OutcomeStatus::Failed, "{}", e.detail);
        assert!(e.detail.contains(reason), "{op:?}: {}", e.detail);
        assert_eq!(e.memo, None);
    }
    assert!(seen(&fake).is_empty(), "nothing was called");

    // An object that does not exist: failed with the API's answer, nothing written.
    let k = Kubernetes::new(config(KubernetesOperation::Scale, &url)).unwrap();
    let d = decision(
        ActionKind::ScaleUp,
        "gone",
        json!({ "kind": "Deployment", "replicas": 3 }),
    );
    let e = k.apply(request(&d, Operation::Apply, None)).await;
    assert_eq!(e.status, OutcomeStatus::Failed);
    assert!(e.detail.contains("HTTP 404"), "{}", e.detail);
    assert_eq!(
        calls(&fake),
        ["GET /apis/apps/v1/namespaces/web/deployments/gone/scale"]
    );
}

#[tokio::test]
async fn the_kill_switch_stops_a_refused_eviction_waiting_for_its_retry() {
    let path = "/api/v1/namespaces/web/pods/api-0";
    let (url, fake) = fake(vec![pod("web", "api-0", "2023-01-01T00:00:00Z", json!({}))]).await;
    fake.lock().unwrap().protected.insert(path.to_owned());
    let mut c = config(KubernetesOperation::Evict, &url);
    c.evict_backoff = Duration::from_secs(30);
    let k = Kubernetes::new(c).unwrap();
    let d = decision(ActionKind::Evict, "api-0", json!({}));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut req = request(&d, Operation::Apply, None);
    req.stop = KillSignal::new(rx);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(true).unwrap();
        // Keep the sender alive so the signal stays engaged.
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    let started = Instant::now();
    let e = k.apply(req.clone()).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(e.status, OutcomeStatus::Deferred, "{}", e.detail);
    assert!(e.detail.contains("kill switch"), "{}", e.detail);
    assert_eq!(calls(&fake), [format!("POST {path}/eviction")]);

    // Engaged before the action: nothing is called.
    let e = k.apply(req).await;
    assert_eq!(e.status, OutcomeStatus::Failed, "{}", e.detail);
    assert_eq!(seen(&fake).len(), 1);
}

#[test]
fn a_missing_token_variable_is_a_configuration_error() {
    let mut c = config(KubernetesOperation::Scale, "https://127.0.0.1:6443");
    c.token_env = Some("FORESIGHT_TEST_SURELY_UNSET_K8S_TOKEN".into());
    let e = Kubernetes::new(c).unwrap_err();
    assert!(e.to_string().contains("is not set"), "{e}");
}
