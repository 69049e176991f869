//! The deployment files stay in step with the code: the Kubernetes manifests validate against the
//! Kubernetes OpenAPI schemas (no cluster runs here, so a schema validator stands in for the API
//! server), their RBAC grants exactly the Kubernetes actuator's calls, and the configuration and
//! policies embedded in the manifests and the compose stack load with the real loaders.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;
use foresight::{Config, Stage};
use serde_yaml_ng::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn documents(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v = <Value as serde::Deserialize>::deserialize(doc)
            .with_context(|| format!("{}", path.display()))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn manifests() -> anyhow::Result<Vec<(PathBuf, Vec<Value>)>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/kubernetes"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    files
        .into_iter()
        .map(|f| documents(&f).map(|d| (f, d)))
        .collect()
}

fn all_objects() -> anyhow::Result<Vec<Value>> {
    Ok(manifests()?.into_iter().flat_map(|(_, d)| d).collect())
}

fn kind_named<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name))
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// Loads a configuration file with the real loader, its policy file mapped from the container
/// path (`/etc/foresight/policies/X`) to `policies`, and builds every processor from it (the
/// allocator parses and checks the policy).
fn load_config(text: &str, policies: &Path) -> anyhow::Result<Config> {
    let dir = tempfile::tempdir()?;
    let mapped = text.replace(
        "/etc/foresight/policies/",
        &format!("{}/", policies.display()),
    );
    let file = dir.path().join("foresight.toml");
    std::fs::write(&file, mapped)?;
    let config = Config::load(Some(&file)).map_err(|e| anyhow::anyhow!("{e}"))?;
    foresight::pipeline::Processors::new(&config)?;
    Ok(config)
}

#[test]
fn kubernetes_manifests_validate_against_the_openapi_schemas() -> anyhow::Result<()> {
    // kubernetes-validate bundles the Kubernetes OpenAPI (JSON) schemas of each release and
    // validates offline; --strict also refuses fields the schemas do not have.
    // The version the Kubernetes actuator's client is built for (k8s-openapi's v1_36).
    let python = foresight_tests::python();
    let validate = |files: &[PathBuf]| {
        Command::new(&python)
            .args(["-m", "kubernetes_validate", "--strict", "-k", "1.36.0"])
            .args(files)
            .output()
    };
    // The validator does refuse a wrong manifest (a string for replicas, an unknown field).
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.yaml");
    let good = std::fs::read_to_string(repo().join("deploy/kubernetes/40-deployments.yaml"))?;
    std::fs::write(&bad, good.replacen("replicas: 3", "replicas: three", 1))?;
    let refused = validate(std::slice::from_ref(&bad))?;
    assert!(
        !refused.status.success(),
        "a wrong manifest must fail validation"
    );
    let files: Vec<PathBuf> = manifests()?.into_iter().map(|(f, _)| f).collect();
    let output = validate(&files)
        .with_context(|| {
            format!("running {python} -m kubernetes_validate (pip install -r tests/clients/requirements.txt)")
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "validation failed:\n{text}");
    // Every document was checked (the tool says INFO ... passed ... per document).
    let documents: usize = manifests()?.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(
        text.matches("passed").count(),
        documents,
        "each document validated:\n{text}"
    );
    Ok(())
}

#[test]
fn rbac_grants_exactly_the_kubernetes_actuators_calls() -> anyhow::Result<()> {
    let objects = all_objects()?;
    // (apiGroup, resource, verb) for each call of actuators/src/kubernetes.rs: every change reads
    // the fields first (get) then patches; the scale subresource for replicas; evictions through
    // the Eviction API.
    let mut want = BTreeSet::new();
    for (group, resource) in [
        ("apps", "deployments"),
        ("apps", "statefulsets"),
        ("apps", "deployments/scale"),
        ("apps", "statefulsets/scale"),
        ("", "nodes"),
        ("", "pods"),
    ] {
        for verb in ["get", "patch"] {
            want.insert((group.to_owned(), resource.to_owned(), verb.to_owned()));
        }
    }
    want.insert(("".into(), "pods/eviction".into(), "create".into()));

    let roles: Vec<&Value> = objects
        .iter()
        .filter(|o| matches!(str_of(&o["kind"]), "Role" | "ClusterRole"))
        .collect();
    assert_eq!(roles.len(), 1, "one role, the actuator's");
    let mut granted = BTreeSet::new();
    for rule in roles[0]["rules"].as_sequence().context("rules")? {
        let list = |k: &str| -> Vec<String> {
            rule[k]
                .as_sequence()
                .map(|s| s.iter().map(|v| str_of(v).to_owned()).collect())
                .unwrap_or_default()
        };
        assert!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none());
        for g in list("apiGroups") {
            for r in list("resources") {
                for v in list("verbs") {
                    assert!(v != "*" && r != "*" && g != "*", "no wildcards: {rule:?}");
                    granted.insert((g.clone(), r.clone(), v));
                }
            }
        }
    }
    assert_eq!(granted, want);

    // Bound to the actuator's account only, which only the actuator's pods use.
    let binding =
        kind_named(&objects, "ClusterRoleBinding", "foresight-actuator").context("the binding")?;
    let subjects = binding["subjects"].as_sequence().context("subjects")?;
    assert_eq!(subjects.len(), 1);
    assert_eq!(str_of(&subjects[0]["name"]), "foresight-actuator");
    for d in objects
        .iter()
        .filter(|o| str_of(&o["kind"]) == "Deployment")
    {
        let spec = &d["spec"]["template"]["spec"];
        let component = str_of(&d["metadata"]["labels"]["app.kubernetes.io/component"]);
        let account = str_of(&spec["serviceAccountName"]);
        if component == "actuator" {
            assert_eq!(account, "foresight-actuator");
        } else {
            assert_eq!(account, "foresight", "{component}");
            assert_eq!(spec["automountServiceAccountToken"].as_bool(), Some(false));
        }
    }
    Ok(())
}

#[test]
fn kubernetes_deployments_run_every_stage_with_probes_and_the_embedded_config() -> anyhow::Result<()>
{
    let objects = all_objects()?;
    let configmap = kind_named(&objects, "ConfigMap", "foresight-config").context("config")?;
    let policies = kind_named(&objects, "ConfigMap", "foresight-policies").context("policies")?;
    // The embedded policies are the examples', so a change to one shows here.
    let dir = tempfile::tempdir()?;
    for (name, text) in policies["data"].as_mapping().context("policy data")? {
        let name = str_of(name);
        let example = std::fs::read_to_string(repo().join("examples/policies").join(name))?;
        assert_eq!(str_of(text), example, "{name} is the example policy");
        std::fs::write(dir.path().join(name), str_of(text))?;
    }
    let config = load_config(str_of(&configmap["data"]["foresight.toml"]), dir.path())?;
    let port: u16 = config
        .observability
        .listen
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .parse()?;

    let mut stages = BTreeSet::new();
    for d in objects
        .iter()
        .filter(|o| str_of(&o["kind"]) == "Deployment")
    {
        let spec = &d["spec"]["template"]["spec"];
        let c = &spec["containers"][0];
        let args: Vec<&str> = c["args"]
            .as_sequence()
            .context("args")?
            .iter()
            .map(str_of)
            .collect();
        let [run, stage] = args[..] else {
            panic!("args {args:?}")
        };
        assert_eq!(run, "run");
        let stage = Stage::ALL
            .into_iter()
            .find(|s| s.name() == stage)
            .with_context(|| format!("unknown stage {stage}"))?;
        stages.insert(stage.name());
        // Singletons stay single; partitioned stages use at most the partitions there are.
        let replicas = d["spec"]["replicas"].as_i64().context("replicas")?;
        match stage {
            Stage::Fleet | Stage::Allocator => assert_eq!(replicas, 1, "{}", stage.name()),
            _ => assert!(replicas >= 1 && replicas <= i64::from(config.kafka.partitions)),
        }
        assert_eq!(
            c["ports"][0]["containerPort"].as_u64(),
            Some(u64::from(port))
        );
        assert_eq!(
            str_of(&c["livenessProbe"]["httpGet"]["path"]),
            "/healthz",
            "{}",
            stage.name()
        );
        assert_eq!(str_of(&c["readinessProbe"]["httpGet"]["path"]), "/readyz");
        assert!(c["resources"]["requests"].is_mapping() && c["resources"]["limits"].is_mapping());
        assert_eq!(
            spec["securityContext"]["runAsNonRoot"].as_bool(),
            Some(true)
        );
        assert_eq!(
            c["securityContext"]["allowPrivilegeEscalation"].as_bool(),
            Some(false)
        );
        // The database URL (with its password) comes from the Secret, not the ConfigMap.
        let env = c["env"].as_sequence().context("env")?;
        let url = env
            .iter()
            .find(|e| str_of(&e["name"]) == "FORESIGHT_POSTGRES__URL")
            .context("FORESIGHT_POSTGRES__URL")?;
        assert_eq!(
            str_of(&url["valueFrom"]["secretKeyRef"]["name"]),
            "foresight-secrets"
        );
    }
    let all: BTreeSet<&str> = Stage::ALL.iter().map(|s| s.name()).collect();
    assert_eq!(stages, all, "one Deployment per stage");
    Ok(())
}

#[test]
fn compose_stack_has_kafka_kraft_postgres_and_every_stage() -> anyhow::Result<()> {
    let dir = repo().join("deploy/compose");
    let compose = documents(&dir.join("docker-compose.yml"))?.remove(0);
    let services = compose["services"].as_mapping().context("services")?;
    let service = |name: &str| &compose["services"][name];
    assert!(str_of(&service("kafka")["image"]).starts_with("apache/kafka:"));
    let kafka_env = &service("kafka")["environment"];
    assert_eq!(
        str_of(&kafka_env["KAFKA_PROCESS_ROLES"]),
        "broker,controller"
    );
    assert!(str_of(&service("postgres")["image"]).starts_with("postgres:"));
    assert_eq!(
        service("topics")["command"][0].as_str(),
        Some("topics"),
        "topic init"
    );
    for stage in Stage::ALL {
        let s = service(stage.name());
        let command: Vec<&str> = s["command"]
            .as_sequence()
            .with_context(|| format!("service {}", stage.name()))?
            .iter()
            .map(str_of)
            .collect();
        assert_eq!(command, ["run", stage.name()]);
    }
    assert!(services.len() >= Stage::ALL.len() + 3);

    // The mounted configuration and policies load with the real loaders.
    let config_text = std::fs::read_to_string(dir.join("foresight.toml"))?;
    let config = load_config(&config_text, &repo().join("examples/policies"))?;
    assert_eq!(config.kafka.brokers, "kafka:9092", "the compose broker");
    assert!(config.observability.listen.ends_with(":9464"));

    // The compose client's own validation, where one is installed (no Docker engine is needed
    // for `config`; none runs here).
    let file = dir.join("docker-compose.yml");
    let attempts: [(&str, &[&str]); 2] = [("docker", &["compose"]), ("docker-compose", &[])];
    let mut validated = false;
    for (program, prefix) in attempts {
        // Is this client there at all (`docker` may lack the compose plugin)?
        let present = Command::new(program)
            .args(prefix)
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !present {
            continue;
        }
        let Ok(out) = Command::new(program)
            .args(prefix)
            .arg("-f")
            .arg(&file)
            .args(["config", "--quiet"])
            .output()
        else {
            continue;
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{program} {prefix:?} config: {stderr}"
        );
        validated = true;
        break;
    }
    if !validated {
        eprintln!(
            "SKIPPED part: neither `docker compose` nor `docker-compose` is installed, so the \
             compose client's own validation did not run (the structure was checked above)."
        );
    }
    Ok(())
}

#[test]
fn dockerfile_builds_the_binary_as_non_root_with_the_configured_port() -> anyhow::Result<()> {
    // No Docker engine runs here, so the image cannot be built in a test: its promises are
    // checked against the code instead.
    let text = std::fs::read_to_string(repo().join("Dockerfile"))?;
    let froms = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(froms >= 2, "multi-stage");
    assert!(text.contains("cargo build --release --locked --bin foresight"));
    let user = text
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .context("a USER")?;
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "{user}"
    );
    let exposed = text
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .context("EXPOSE")?;
    let compose = std::fs::read_to_string(repo().join("deploy/compose/foresight.toml"))?;
    let config = load_config(&compose, &repo().join("examples/policies"))?;
    assert!(
        config
            .observability
            .listen
            .ends_with(&format!(":{exposed}")),
        "the exposed port is the one the stages listen on"
    );
    assert!(text.contains(&format!(
        "FORESIGHT_OBSERVABILITY__LISTEN=0.0.0.0:{exposed}"
    )));
    // The image's default configuration is the example, which must load.
    assert!(text.contains("COPY examples/foresight.toml /etc/foresight/foresight.toml"));
    Ok(())
}
