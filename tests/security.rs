//! Security against real parts: Kafka over TLS with SASL/SCRAM (a tansu broker of the test's own
//! with `--authentication`, behind a TLS terminator), wrong credentials and wrong certificates
//! refused with a clear error, secrets never in the logs, Postgres `verify-full` refusing a
//! server it cannot verify, and the command actuator never handing event data to a shell.
//!
//! Why a TLS terminator: tansu 0.6.0 cannot serve TLS. Its command line refuses `--cert` and
//! `--key` together (both are in one exclusive argument group), and its broker builds the TLS
//! acceptor but never uses it (`tansu-broker/src/broker.rs`, `let _acceptor`). So `socat`
//! (OpenSSL) terminates TLS in front of it with the test's certificate, and tansu advertises the
//! terminator's address, so every client connection goes through TLS; SASL/SCRAM is tansu's own
//! (`--authentication`, users created with `tansu user create`).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use chrono::{Duration as Delta, DurationRound as _, Utc};
use foresight::{
    Config, Stage,
    config::{KafkaSecurity, SaslMechanism, SecurityProtocol},
    kafka::Topics,
};
use foresight_actuators::{
    Engine, KillSignal,
    config::{ActionConfig, ActuatorConfig, CommandConfig, GroupLimits, Mode, VerificationConfig},
};
use foresight_events::{Action, ActionKind, Band, Decision, EntityId, EventId, OutcomeStatus};
use foresight_tests::{
    TestDb, eventually,
    faults::{Process, Tansu, free_port, tansu_binary, write_config},
    tag,
};
use rdkafka::{
    ClientConfig, Message as _,
    consumer::{BaseConsumer, Consumer as _},
    producer::{FutureProducer, FutureRecord},
};
use tokio_util::sync::CancellationToken;

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A CA (`<name>-ca.pem`) and, if `server`, a server certificate it signed for 127.0.0.1 and
/// localhost (`<name>-server.pem`, key `<name>-server.key`).
fn certificates(dir: &Path, name: &str, server: bool) -> anyhow::Result<()> {
    let ca_key = format!("{name}-ca.key");
    let ca = format!("{name}-ca.pem");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} test CA"),
            "-keyout",
            &ca_key,
            "-out",
            &ca,
        ],
    )?;
    if server {
        let key = format!("{name}-server.key");
        let csr = format!("{name}-server.csr");
        let cert = format!("{name}-server.pem");
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=localhost",
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
        )?;
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "san.ext",
                "-out",
                &cert,
            ],
        )?;
    }
    Ok(())
}

/// `socat` terminating TLS on `port` in front of `upstream`; killed when dropped.
struct Terminator(Child);

impl Terminator {
    fn start(dir: &Path, port: u16, upstream: &str) -> anyhow::Result<Self> {
        let listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={},key={}",
            dir.join("good-server.pem").display(),
            dir.join("good-server.key").display()
        );
        let child = Command::new("socat")
            .arg(listen)
            .arg(format!("TCP:{upstream}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting socat (the TLS terminator in front of tansu)")?;
        Ok(Self(child))
    }
}

impl Drop for Terminator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// librdkafka properties of a test client with `security`.
fn client(brokers: &str, security: &KafkaSecurity) -> anyhow::Result<ClientConfig> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in security.properties()? {
        c.set(k, v);
    }
    Ok(c)
}

/// The error of running the feature stage with `config` (it must fail, within 60 s).
async fn refusal(config: &Config) -> String {
    let run = foresight::run_stages(&[Stage::Features], config, CancellationToken::new());
    match tokio::time::timeout(Duration::from_secs(60), run).await {
        Ok(Err(e)) => format!("{e:#}"),
        Ok(Ok(_)) => "ran without error".into(),
        Err(_) => "still trying after 60 s (no clear error)".into(),
    }
}

/// The authenticated, encrypted broker; wrong password, unknown user, untrusted CA and a
/// plaintext client all refused with a clear reason; the right credentials run the feature
/// stage end to end (also as the binary, whose log must hold no secret).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_tls_and_scram_refuse_the_wrong_credentials_and_certificates() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    certificates(d, "good", true)?;
    certificates(d, "other", false)?;
    let kafka_secret = format!("kafka-{}", tag());
    let pg_secret = format!("pg-{}", tag());
    std::fs::write(d.join("kafka-password"), format!("{kafka_secret}\n"))?;

    // The user is created while the broker runs without authentication, then the broker is
    // restarted with it (over the same sqlite storage, which keeps the SCRAM credential).
    let mut tansu = Tansu::new(d)?;
    tansu.start().await?;
    let created = Command::new(tansu_binary()?)
        .args(["user", "create", "--broker"])
        .arg(format!("tcp://{}", tansu.address()))
        .args(["alice", &kafka_secret, "--mechanism", "scram512"])
        .output()?;
    anyhow::ensure!(
        created.status.success(),
        "tansu user create: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    tansu.stop()?;
    let tls_port = free_port()?;
    let tls_address = format!("127.0.0.1:{tls_port}");
    tansu.args = vec!["--authentication".into()];
    tansu.advertised = Some(tls_address.clone());
    tansu.start().await?;
    let _tls = Terminator::start(d, tls_port, &tansu.address())?;

    let db = TestDb::create().await?;
    let prefix = format!("sec-{}", tag());
    let mut config = foresight_tests::config(&prefix, &db);
    config.kafka.brokers = tls_address.clone();
    config.features.window = Duration::from_secs(60);
    config.features.max_out_of_orderness = Duration::ZERO;
    config.features.allowed_lateness = Duration::ZERO;
    let good = KafkaSecurity {
        protocol: SecurityProtocol::SaslSsl,
        ca_file: Some(d.join("good-ca.pem")),
        sasl_mechanism: SaslMechanism::ScramSha512,
        username: Some("alice".into()),
        password_file: Some(d.join("kafka-password")),
        ..KafkaSecurity::default()
    };
    config.kafka.security = good.clone();
    eventually("the TLS terminator", Duration::from_secs(10), || async {
        Ok(tokio::net::TcpStream::connect(&tls_address).await.ok())
    })
    .await?;

    // Refusals, each with librdkafka's reason.
    let mut wrong = config.clone();
    wrong.kafka.security.password_file = None;
    wrong.kafka.security.password = Some(foresight::config::Secret("not-the-password".into()));
    let e = refusal(&wrong).await;
    eprintln!("wrong password: {e}");
    assert!(
        e.contains("refused") && e.contains("SASL authentication error"),
        "{e}"
    );
    let mut unknown = config.clone();
    unknown.kafka.security.username = Some("mallory".into());
    let e = refusal(&unknown).await;
    eprintln!("unknown user: {e}");
    assert!(
        e.contains("refused") && e.contains("SASL authentication error"),
        "{e}"
    );
    let mut untrusted = config.clone();
    untrusted.kafka.security.ca_file = Some(d.join("other-ca.pem"));
    let e = refusal(&untrusted).await;
    eprintln!("untrusted CA: {e}");
    assert!(
        e.contains("refused") && e.contains("certificate verify failed"),
        "{e}"
    );
    let mut plaintext = config.clone();
    plaintext.kafka.security = KafkaSecurity::default();
    let e = refusal(&plaintext).await;
    eprintln!("plaintext client: {e}");
    assert!(e.contains("checking the Kafka connection"), "{e}");

    // The right ones: the feature stage, as the binary, turns samples into windows.
    let topics = Topics::new(&config.kafka.topic_prefix);
    foresight::kafka::create_topics(&config.kafka, &topics).await?;
    let producer: FutureProducer = client(&tls_address, &good)?.create()?;
    let start = Utc::now().duration_trunc(Delta::minutes(1))? - Delta::minutes(30);
    for minute in 0..20 {
        let sample = serde_json::json!({"entity": "n-1", "metric": "cpu_pct",
            "time": (start + Delta::minutes(minute)).to_rfc3339(), "value": 40.0});
        let payload = serde_json::to_vec(&sample)?;
        producer
            .send(
                FutureRecord::to(&topics.metrics)
                    .key("n-1")
                    .payload(&payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    // The Postgres password comes from the environment: the server trusts local connections,
    // so any value works, and it must not show up anywhere either.
    let file = d.join("foresight.toml");
    write_config(&config, &file)?;
    let log = d.join("features.log");
    let mut process = Process::start(
        &file,
        &["features"],
        &log,
        &[
            ("FORESIGHT_POSTGRES__PASSWORD", pg_secret.as_str()),
            ("RUST_LOG", "debug"),
        ],
    )?;
    let reader: BaseConsumer = client(&tls_address, &good)?
        .set("group.id", format!("reader-{}", tag()))
        .set("auto.offset.reset", "earliest")
        .create()?;
    reader.subscribe(&[&topics.features])?;
    let mut windows = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while windows < 19 && std::time::Instant::now() < deadline {
        process.alive()?;
        if let Some(m) = reader.poll(Duration::from_millis(200)) {
            let m = m?;
            anyhow::ensure!(m.payload().is_some());
            windows += 1;
        }
    }
    let (status, _) = process.terminate(Duration::from_secs(30))?;
    assert!(status.success(), "{status}");
    assert_eq!(windows, 19, "every closed window over TLS + SCRAM");

    // No secret in the log of a whole run at debug level, nor in `config show`.
    let text = std::fs::read_to_string(&log)?;
    assert!(text.contains("Stage started."), "{text}");
    assert!(
        !text.contains(&kafka_secret),
        "the Kafka password is in the log"
    );
    assert!(
        !text.contains(&pg_secret),
        "the Postgres password is in the log"
    );
    let shown = Command::new(foresight_tests::binary()?)
        .arg("--config")
        .arg(&file)
        .args(["config", "show"])
        .env("FORESIGHT_POSTGRES__PASSWORD", &pg_secret)
        .env("FORESIGHT_KAFKA__SECURITY__PASSWORD", &kafka_secret)
        .output()?;
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned()
        + &String::from_utf8_lossy(&shown.stderr);
    assert!(shown.contains("\"password\": \"***\""), "{shown}");
    assert!(
        !shown.contains(&kafka_secret) && !shown.contains(&pg_secret),
        "{shown}"
    );
    drop(tansu);
    db.drop_db().await
}

/// `verify-full` (the default for a remote host) refuses a server it cannot verify: the local
/// test server offers no TLS, or none with a certificate this machine trusts for 127.0.0.1.
/// It never falls back to an unencrypted connection.
#[tokio::test]
async fn postgres_verify_full_refuses_an_unverifiable_server() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let mut config = foresight::config::PostgresConfig {
        url: db.url.clone(),
        ..Default::default()
    };
    // Local host: `prefer`, connects.
    foresight::db::connect(&config).await?.close().await;
    config.sslmode = Some(foresight::config::SslMode::VerifyFull);
    let e = foresight::db::connect(&config)
        .await
        .expect_err("verify-full must refuse this server");
    let e = format!("{e:#}").to_lowercase();
    assert!(
        e.contains("tls") || e.contains("ssl") || e.contains("certificate"),
        "{e}"
    );
    db.drop_db().await
}

/// Event data reaches the command actuator's program only on stdin (as JSON) and in fixed
/// environment variables, never through a shell: payloads written to run commands run nothing.
#[tokio::test]
async fn the_command_actuator_never_interprets_event_data() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let markers: Vec<PathBuf> = (0..4).map(|i| d.join(format!("pwned-{i}"))).collect();
    let payloads: Vec<String> = vec![
        format!("$(touch {})", markers[0].display()),
        format!("`touch {}`", markers[1].display()),
        format!("x; touch {}", markers[2].display()),
        format!("x | touch {} && echo", markers[3].display()),
    ];
    let stdin = d.join("stdin.json");
    let argv = d.join("argv.txt");
    let program = d.join("act.sh");
    std::fs::write(
        &program,
        format!(
            "#!/bin/sh\ncat > {}\nprintf '%s\\n' \"$@\" > {}\n",
            stdin.display(),
            argv.display()
        ),
    )?;
    let mut perms = std::fs::metadata(&program)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&program, perms)?;

    let db = TestDb::create().await?;
    let pool = db.pool().await?;
    foresight::db::MIGRATOR.run(&pool).await?;
    let mut c = foresight_actuators::ActuatorsConfig {
        default_mode: Mode::Auto,
        ..Default::default()
    };
    c.groups.insert(
        "default".into(),
        GroupLimits {
            max_actions: 100,
            per: Duration::from_secs(60),
            max_targets: 100,
        },
    );
    c.actions.insert(
        ActionKind::Migrate,
        ActionConfig {
            actuator: ActuatorConfig::Command(CommandConfig {
                program: program.clone(),
                args: vec!["--fixed".into()],
                timeout: Duration::from_secs(10),
                max_output: 1024,
                env: BTreeMap::new(),
            }),
            group: "default".into(),
            verification: VerificationConfig {
                window: Duration::ZERO,
                margin: 0.1,
                sustained: 2,
            },
            rollback_on_failure: false,
        },
    );
    let mut engine = Engine::new(c, pool.clone(), KillSignal::never())?;
    let entity = EntityId::new("node-1")?;
    let params: BTreeMap<String, serde_json::Value> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("p{i}"), serde_json::Value::from(p.as_str())))
        .collect();
    let decision = Decision {
        entity: entity.clone(),
        time: Utc::now(),
        score_id: EventId::derive("test-score", &[b"injection"]),
        probability: 0.9,
        interval: [0.8, 0.95],
        band: Band::High,
        policy: payloads[0].clone(),
        rule: payloads[1].clone(),
        action: Action {
            kind: ActionKind::Migrate,
            target: entity,
            params,
        },
        reason: payloads[2].clone(),
        expected_effect: payloads[3].clone(),
        inverse: None,
        alternatives: vec![],
    };
    let outcomes = engine.decide(&decision).await?;
    assert_eq!(outcomes[0].status, OutcomeStatus::Applied, "{outcomes:?}");
    for m in &markers {
        assert!(
            !m.exists(),
            "{} was created: event data was run",
            m.display()
        );
    }
    let got = std::fs::read_to_string(&stdin)?;
    for p in &payloads {
        let quoted = serde_json::to_string(p)?;
        assert!(
            got.contains(&quoted),
            "{p} not passed verbatim on stdin: {got}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(&argv)?,
        "--fixed\n",
        "arguments are the configured ones only"
    );
    pool.close().await;
    db.drop_db().await
}
