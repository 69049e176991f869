//! Configuration: compiled-in defaults, then one TOML file, then `FORESIGHT_*` environment variables.
//!
//! Environment keys use `__` between levels: `FORESIGHT_KAFKA__BROKERS=host:9092` sets
//! `kafka.brokers`. Every problem is reported at once, each with the key it is about.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use foresight_actuators::ActuatorsConfig;
use foresight_allocator::AllocatorConfig;
use foresight_features::FeaturesConfig;
use foresight_ingest::{IngestConfig, Signal};
use foresight_scoring::ScoringConfig;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Kafka connection and topic layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated.
    pub brokers: String,
    /// Prefix of every topic name, so several pipelines can share a cluster.
    pub topic_prefix: String,
    /// Prefix of every consumer group id; the stage name is appended.
    pub group_prefix: String,
    /// Partitions of topics Foresight creates itself (`foresight topics create`).
    pub partitions: i32,
    /// Encryption and authentication of every client (consumers, producers, admin).
    pub security: KafkaSecurity,
    /// Extra librdkafka properties for every client (tuning; `security` covers TLS and SASL).
    pub client: BTreeMap<String, String>,
    /// Extra librdkafka properties for consumers only.
    pub consumer: BTreeMap<String, String>,
    /// Extra librdkafka properties for producers only.
    pub producer: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: "foresight.".into(),
            group_prefix: "foresight-".into(),
            partitions: 3,
            security: KafkaSecurity::default(),
            client: BTreeMap::new(),
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
        }
    }
}

/// A secret value (a password): never printed by `Debug`, and replaced by `***` in
/// [`Config::redacted`]. Set it from the environment (`FORESIGHT_..._PASSWORD`) or name a file
/// with the `*_file` key beside it rather than writing it into the configuration file.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Why a secret could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{key}: cannot read {}: {source}", path.display())]
pub struct SecretError {
    /// The configuration key that names the file.
    pub key: &'static str,
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub source: std::io::Error,
}

/// A secret given inline (from the environment) or in a file; the file wins, so a mounted
/// secret can replace one set at build time. A file's trailing newline is not part of it.
pub fn resolve_secret(
    inline: Option<&Secret>,
    file: Option<&Path>,
    key: &'static str,
) -> Result<Option<String>, SecretError> {
    match file {
        Some(path) => std::fs::read_to_string(path)
            .map(|s| Some(s.trim_end_matches(['\n', '\r']).to_owned()))
            .map_err(|source| SecretError {
                key,
                path: path.to_owned(),
                source,
            }),
        None => Ok(inline.map(|s| s.0.clone())),
    }
}

/// How Kafka clients reach the brokers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    /// No encryption, no authentication (a trusted network only).
    #[default]
    Plaintext,
    /// TLS.
    Ssl,
    /// SASL authentication without encryption.
    SaslPlaintext,
    /// SASL authentication over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// librdkafka's name of it.
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    fn tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    fn sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

/// A SASL mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SaslMechanism {
    /// User name and password in the clear (inside TLS only, please).
    #[serde(rename = "PLAIN")]
    Plain,
    /// Salted challenge-response, SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// Salted challenge-response, SHA-512.
    #[default]
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// librdkafka's (and Kafka's) name of it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// TLS and SASL settings shared by every Kafka client of the process.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSecurity {
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub protocol: SecurityProtocol,
    /// CA certificates (PEM) the brokers' certificates must chain to; the system's store if unset.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for brokers that require mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key_file: Option<PathBuf>,
    /// Skip the check that a broker's certificate names the host connected to. Only for brokers
    /// addressed by a name their certificate lacks; the chain is verified either way.
    pub skip_hostname_verification: bool,
    /// SASL mechanism (with a `sasl_*` protocol).
    pub sasl_mechanism: SaslMechanism,
    /// SASL user name.
    pub username: Option<String>,
    /// SASL password; set it as `FORESIGHT_KAFKA__SECURITY__PASSWORD`, or use `password_file`.
    pub password: Option<Secret>,
    /// File holding the SASL password (wins over `password`).
    pub password_file: Option<PathBuf>,
}

impl KafkaSecurity {
    /// The librdkafka properties these settings stand for (reading the password file).
    pub fn properties(&self) -> Result<Vec<(&'static str, String)>, SecretError> {
        let mut props = vec![(
            "security.protocol",
            self.protocol.as_librdkafka().to_owned(),
        )];
        let path = |p: &Path| p.display().to_string();
        if self.protocol.tls() {
            if let Some(ca) = &self.ca_file {
                props.push(("ssl.ca.location", path(ca)));
            }
            if let Some(cert) = &self.cert_file {
                props.push(("ssl.certificate.location", path(cert)));
            }
            if let Some(key) = &self.key_file {
                props.push(("ssl.key.location", path(key)));
            }
            props.push((
                "ssl.endpoint.identification.algorithm",
                if self.skip_hostname_verification {
                    "none"
                } else {
                    "https"
                }
                .to_owned(),
            ));
        }
        if self.protocol.sasl() {
            props.push(("sasl.mechanism", self.sasl_mechanism.as_str().to_owned()));
            if let Some(user) = &self.username {
                props.push(("sasl.username", user.clone()));
            }
            if let Some(password) = resolve_secret(
                self.password.as_ref(),
                self.password_file.as_deref(),
                "kafka.security.password_file",
            )? {
                props.push(("sasl.password", password));
            }
        }
        Ok(props)
    }

    fn issues(&self, add: &mut impl FnMut(&str, String)) {
        if self.protocol.sasl()
            && (self.username.is_none()
                || (self.password.is_none() && self.password_file.is_none()))
        {
            add(
                "kafka.security",
                format!(
                    "protocol {} needs username and password (or password_file)",
                    self.protocol.as_librdkafka()
                ),
            );
        }
        if !self.protocol.sasl()
            && (self.username.is_some() || self.password.is_some() || self.password_file.is_some())
        {
            add(
                "kafka.security.protocol",
                "SASL credentials are set but the protocol does not use SASL (sasl_ssl?)".into(),
            );
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            add(
                "kafka.security",
                "cert_file and key_file go together".into(),
            );
        }
        if !self.protocol.tls()
            && (self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some())
        {
            add(
                "kafka.security.protocol",
                "TLS files are set but the protocol does not use TLS (ssl or sasl_ssl?)".into(),
            );
        }
        for (key, file) in [
            ("kafka.security.ca_file", &self.ca_file),
            ("kafka.security.cert_file", &self.cert_file),
            ("kafka.security.key_file", &self.key_file),
            ("kafka.security.password_file", &self.password_file),
        ] {
            if let Some(file) = file
                && !file.is_file()
            {
                add(key, format!("{} is not a readable file", file.display()));
            }
        }
    }
}

/// TLS of the Postgres connection (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it, unverified.
    Prefer,
    /// TLS, unverified.
    Require,
    /// TLS, the certificate chain verified.
    VerifyCa,
    /// TLS, the chain and the host name verified.
    VerifyFull,
}

/// The audit database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection URL (credentials may come from `FORESIGHT_POSTGRES__URL` instead of the file).
    pub url: String,
    /// TLS mode. Unset: `verify-full` for any host but a local one (loopback or a Unix socket),
    /// for which `prefer`; an `sslmode` in the URL wins over the default, this key over both.
    pub sslmode: Option<SslMode>,
    /// CA certificates (PEM) the server's certificate must chain to; the system's store if unset.
    pub ca_file: Option<PathBuf>,
    /// Password (wins over one in the URL); set it as `FORESIGHT_POSTGRES__PASSWORD`, or use
    /// `password_file`.
    pub password: Option<Secret>,
    /// File holding the password (wins over `password` and the URL's).
    pub password_file: Option<PathBuf>,
    /// Most connections in the pool.
    pub max_connections: u32,
    /// Apply pending migrations at start-up.
    pub migrate: bool,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/foresight".into(),
            sslmode: None,
            ca_file: None,
            password: None,
            password_file: None,
            max_connections: 8,
            migrate: true,
        }
    }
}

/// Limits of the stage runner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunnerConfig {
    /// Most input messages whose outputs are not yet acknowledged, per stage: back-pressure.
    pub max_in_flight: usize,
    /// How often consumed offsets are stored (and so committed).
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// How often stateful stages (features) checkpoint their state with their input offsets
    /// to Postgres. A restart re-reads at most this much input (plus what was in flight).
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// How long a stopping stage waits for in-flight outputs before giving up on them.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// The watchdog: a consumer that has read nothing for this long while its partitions hold
    /// unread input (and back-pressure is not what holds it) is stalled; it is then replaced by
    /// a new one, which rejoins the group and resumes from the stored offsets. Outputs waiting
    /// this long for the broker's acknowledgement are reported. `0s` turns the watchdog off.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// How long a partition of a stage that waits for every partition (the fleet stage's
    /// event-time watermark) must stay read to its end before it stops holding the watermark
    /// back. An upstream stage that is briefly behind on a partition (starting, restarting,
    /// rebalancing) then does not close rounds without that partition's scores, which would make
    /// the rounds depend on timing rather than on the data. The cost: when a partition goes
    /// quiet, rounds wait this long for it.
    #[serde(with = "humantime_serde")]
    pub idle_grace: Duration,
    /// Most bytes of the original record a dead letter keeps (the rest is cut, and its reason
    /// says so), so that it fits the producer's `message.max.bytes` (librdkafka: 1 MB) with the
    /// original's headers.
    pub dead_letter_max_bytes: usize,
    /// Most events the recorder reads into one batch; each source partition's share is written in
    /// a transaction of its own, the partitions concurrently (bounded by `postgres.max_connections`).
    pub recorder_batch: usize,
    /// Longest the recorder waits to fill a batch.
    #[serde(with = "humantime_serde")]
    pub recorder_linger: Duration,
    /// Share of low-band scores the recorder keeps (chosen by event id, so the same scores in
    /// every replay). Moderate and high scores, and everything else, are always recorded.
    pub recorder_score_sample: f64,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 10_000,
            commit_interval: Duration::from_millis(500),
            checkpoint_interval: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(60),
            idle_grace: Duration::from_secs(30),
            dead_letter_max_bytes: 512 * 1024,
            recorder_batch: 4000,
            recorder_linger: Duration::from_millis(50),
            recorder_score_sample: 1.0,
        }
    }
}

/// An extra telemetry topic, e.g. where an OpenTelemetry Collector's Kafka exporter writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The topic's full name (no prefix is added).
    pub topic: String,
    /// Its wire format; `auto` decides per message from the content type and the bytes.
    #[serde(default)]
    pub format: foresight_ingest::Format,
    /// What OTLP protobuf messages on it hold (OTLP/JSON says so itself).
    #[serde(default)]
    pub signal: Signal,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Kafka connection and topics.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// Audit database.
    #[serde(default)]
    pub postgres: PostgresConfig,
    /// Stage runner limits.
    #[serde(default)]
    pub runner: RunnerConfig,
    /// Telemetry decoding limits and identity.
    #[serde(default)]
    pub ingest: IngestConfig,
    /// Telemetry topics read besides `<prefix>telemetry.{metrics,logs,traces}` (which are read in
    /// `auto` format as metrics, logs and traces).
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// Feature windows.
    #[serde(default)]
    pub features: FeaturesConfig,
    /// Risk scoring.
    #[serde(default)]
    pub scoring: ScoringConfig,
    /// The dependency graph: declared dependencies (observed ones come from traces).
    #[serde(default)]
    pub graph: foresight_events::GraphConfig,
    /// Allocation policy.
    #[serde(default)]
    pub allocator: AllocatorConfig,
    /// Actuation: actuators per action type, modes per policy, limits, kill switch.
    #[serde(default)]
    pub actuators: ActuatorsConfig,
    /// Training of the failure model (`foresight train`): data window, hold-out, promotion.
    #[serde(default)]
    pub training: crate::train::TrainingConfig,
    /// Observability of Foresight itself: health and metrics endpoints, OTLP export.
    #[serde(default)]
    pub observability: crate::telemetry::ObservabilityConfig,
}

/// One configuration problem, with the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key, e.g. `scoring.level`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} configuration error(s):\n{}", .0.len(), .0.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigIssue>);

const SECTIONS: [&str; 12] = [
    "kafka",
    "postgres",
    "runner",
    "ingest",
    "sources",
    "features",
    "scoring",
    "graph",
    "allocator",
    "actuators",
    "training",
    "observability",
];

impl Config {
    /// The built-in configuration: a demo-ready scoring setup with thresholds for common metrics.
    pub fn embedded() -> Self {
        let mut config = Self::default();
        config.features.window = Duration::from_secs(5 * 60);
        config.features.max_out_of_orderness = Duration::from_secs(45);
        config.features.allowed_lateness = Duration::from_secs(15);
        config.scoring.horizon = Duration::from_secs(2 * 3600);
        config.scoring.thresholds = ["cpu_pct", "mem_used_pct", "disk_used_pct"]
            .into_iter()
            .map(|m| foresight_scoring::Threshold {
                metric: m.into(),
                above: Some(97.0),
                below: None,
            })
            .chain([
                foresight_scoring::Threshold {
                    metric: "temperature_c".into(),
                    above: Some(85.0),
                    below: None,
                },
                foresight_scoring::Threshold {
                    metric: "p99_latency_ms".into(),
                    above: Some(500.0),
                    below: None,
                },
            ])
            .collect();
        config
    }

    /// Loads embedded defaults, then `file` (if any), then `FORESIGHT_*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigErrors> {
        let mut figment = Figment::from(Serialized::defaults(Self::embedded()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigErrors(vec![ConfigIssue {
                    key: file.display().to_string(),
                    message: "file not found".into(),
                }]));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        // Only variables that name a configuration section: others (FORESIGHT_CONFIG, the dev
        // scripts' FORESIGHT_DATA, ...) are not configuration.
        let env = Env::prefixed("FORESIGHT_").filter(|key| {
            let section = key.as_str().split("__").next().unwrap_or_default();
            SECTIONS.iter().any(|s| s.eq_ignore_ascii_case(section))
        });
        figment = figment.merge(env.split("__"));
        Self::extract(&figment)
    }

    /// Extracts each section on its own, so a mistake in one does not hide those in the others.
    fn extract(figment: &Figment) -> Result<Self, ConfigErrors> {
        let mut issues = Vec::new();
        match figment.find_value("") {
            Ok(figment::value::Value::Dict(_, dict)) => {
                for key in dict.keys() {
                    if !SECTIONS.contains(&key.as_str()) {
                        issues.push(ConfigIssue {
                            key: key.clone(),
                            message: format!(
                                "unknown section; expected one of {}",
                                SECTIONS.join(", ")
                            ),
                        });
                    }
                }
            }
            Ok(_) => {}
            Err(e) => issues.extend(figment_issues(e, None)),
        }
        fn section<T: DeserializeOwned + Default>(
            figment: &Figment,
            key: &str,
            issues: &mut Vec<ConfigIssue>,
        ) -> T {
            match figment.extract_inner::<T>(key) {
                Ok(v) => v,
                Err(e) => {
                    issues.extend(figment_issues(e, Some(key)));
                    T::default()
                }
            }
        }
        let config = Config {
            kafka: section(figment, "kafka", &mut issues),
            postgres: section(figment, "postgres", &mut issues),
            runner: section(figment, "runner", &mut issues),
            ingest: section(figment, "ingest", &mut issues),
            sources: section(figment, "sources", &mut issues),
            features: section(figment, "features", &mut issues),
            scoring: section(figment, "scoring", &mut issues),
            graph: section(figment, "graph", &mut issues),
            allocator: section(figment, "allocator", &mut issues),
            actuators: section(figment, "actuators", &mut issues),
            training: section(figment, "training", &mut issues),
            observability: section(figment, "observability", &mut issues),
        };
        // Values that parsed but cannot work, in the sections that parsed (a section that did not
        // parse holds defaults, which would only add noise).
        let unparsed: Vec<String> = issues
            .iter()
            .map(|i| i.key.split('.').next().unwrap_or_default().to_owned())
            .collect();
        issues.extend(config.semantic_issues().into_iter().filter(|i| {
            !unparsed
                .iter()
                .any(|s| i.key.split('.').next() == Some(s.as_str()))
        }));
        if issues.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(issues))
        }
    }

    /// Checks values that parse but cannot work.
    fn semantic_issues(&self) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        let mut add = |key: &str, message: String| {
            issues.push(ConfigIssue {
                key: key.into(),
                message,
            })
        };
        if self.kafka.brokers.trim().is_empty() {
            add("kafka.brokers", "must name at least one broker".into());
        }
        if self.kafka.partitions < 1 {
            add("kafka.partitions", "must be at least 1".into());
        }
        self.kafka.security.issues(&mut add);
        if self.postgres.ca_file.as_ref().is_some_and(|f| !f.is_file()) {
            add("postgres.ca_file", "is not a readable file".into());
        }
        if self
            .postgres
            .password_file
            .as_ref()
            .is_some_and(|f| !f.is_file())
        {
            add("postgres.password_file", "is not a readable file".into());
        }
        if self.runner.max_in_flight == 0 {
            add("runner.max_in_flight", "must be at least 1".into());
        }
        for (i, source) in self.sources.iter().enumerate() {
            if source.topic.trim().is_empty() {
                add(&format!("sources[{i}].topic"), "must not be empty".into());
            }
        }
        if self.ingest.entity_keys.is_empty() {
            add(
                "ingest.entity_keys",
                "must name at least one attribute".into(),
            );
        }
        if self.runner.recorder_batch == 0 {
            add("runner.recorder_batch", "must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.runner.recorder_score_sample) {
            add(
                "runner.recorder_score_sample",
                format!(
                    "must be between 0 and 1, not {}",
                    self.runner.recorder_score_sample
                ),
            );
        }
        if let Err(e) = self.features.validate() {
            add("features", e.to_string());
        }
        for e in self.scoring.validate() {
            add("scoring", e.to_string());
        }
        for e in self.allocator.validate() {
            add("allocator", e.to_string());
        }
        for e in self.actuators.validate() {
            add(&format!("actuators.{}", e.key), e.message);
        }
        for (key, message) in self.training.validate() {
            add(&format!("training.{key}"), message);
        }
        for (key, message) in self.observability.validate() {
            add(&format!("observability.{key}"), message);
        }
        issues
    }
}

/// Turns figment's errors into issues keyed by the full dotted path, e.g. `scoring.horizn`.
/// A URL with its password (and any query string, which may carry one) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, _)) => (b, "?***"),
        None => (url, ""),
    };
    let Some((scheme, rest)) = base.split_once("://") else {
        return format!("{base}{query}");
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    format!("{scheme}://{authority}{path}{query}")
}

impl Config {
    /// The configuration with secrets replaced by `***`, for printing and logging.
    pub fn redacted(&self) -> Self {
        let mut c = self.clone();
        c.postgres.url = redact_url(&c.postgres.url);
        let hide = |s: &mut Option<Secret>| {
            if let Some(s) = s {
                s.0 = "***".into();
            }
        };
        hide(&mut c.postgres.password);
        hide(&mut c.kafka.security.password);
        for v in c.observability.otlp_headers.values_mut() {
            *v = "***".into();
        }
        if let Some(e) = &mut c.observability.otlp_endpoint {
            *e = redact_url(e);
        }
        for props in [
            &mut c.kafka.client,
            &mut c.kafka.consumer,
            &mut c.kafka.producer,
        ] {
            for (k, v) in props.iter_mut() {
                if k.contains("password") || k.contains("secret") || k.ends_with(".key.pem") {
                    *v = "***".into();
                }
            }
        }
        c
    }
}

fn figment_issues(error: figment::Error, section: Option<&str>) -> Vec<ConfigIssue> {
    error
        .into_iter()
        .map(|e| {
            // `extract_inner` reports the path within the section, with the section's own key
            // appended; put the section first instead.
            let mut path: Vec<String> = e
                .path
                .iter()
                .filter(|p| Some(p.as_str()) != section)
                .cloned()
                .collect();
            if let Some(section) = section {
                path.insert(0, section.to_owned());
            }
            if let figment::error::Kind::UnknownField(field, _) = &e.kind
                && path.last() != Some(field)
            {
                path.push(field.clone());
            }
            let key = if path.is_empty() {
                e.metadata
                    .as_ref()
                    .map(|m| m.name.to_string())
                    .unwrap_or_else(|| "(root)".into())
            } else {
                path.join(".")
            };
            ConfigIssue {
                key,
                message: e.kind.to_string(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(toml: &str) -> Result<Config, ConfigErrors> {
        let figment =
            Figment::from(Serialized::defaults(Config::embedded())).merge(Toml::string(toml));
        Config::extract(&figment)
    }

    #[test]
    fn embedded_defaults_are_valid() {
        assert!(load_str("").is_ok());
    }

    #[test]
    fn the_example_file_is_valid_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/foresight.toml");
        let example = load_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(example, Config::embedded());
    }

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:s3cret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("postgres://h/db?password=x"),
            "postgres://h/db?***"
        );
    }

    #[test]
    fn reports_every_error_with_its_key() {
        let err = load_str(
            r#"
            bogus = 1
            [kafka]
            brokers = 5
            [features]
            window = "ten minutes"
            [runner]
            max_in_flight = "lots"
            "#,
        )
        .unwrap_err();
        let keys: Vec<_> = err.0.iter().map(|i| i.key.as_str()).collect();
        assert!(keys.contains(&"bogus"), "{err}");
        assert!(keys.contains(&"kafka.brokers"), "{err}");
        assert!(keys.contains(&"features.window"), "{err}");
        assert!(keys.contains(&"runner.max_in_flight"), "{err}");
    }

    #[test]
    fn kafka_security_maps_to_librdkafka_and_is_checked() {
        let security = KafkaSecurity {
            protocol: SecurityProtocol::SaslSsl,
            ca_file: Some("/etc/ca.pem".into()),
            username: Some("u".into()),
            password: Some(Secret("p".into())),
            ..KafkaSecurity::default()
        };
        let props: BTreeMap<_, _> = security.properties().unwrap().into_iter().collect();
        assert_eq!(props["security.protocol"], "sasl_ssl");
        assert_eq!(props["ssl.ca.location"], "/etc/ca.pem");
        assert_eq!(props["ssl.endpoint.identification.algorithm"], "https");
        assert_eq!(props["sasl.mechanism"], "SCRAM-SHA-512");
        assert_eq!(props["sasl.password"], "p");
        assert_eq!(format!("{security:?}").matches("***").count(), 1);
        let err =
            load_str("[kafka.security]\nprotocol = \"sasl_ssl\"\nusername = \"u\"\n").unwrap_err();
        assert!(
            err.to_string().contains("needs username and password"),
            "{err}"
        );
        let err = load_str("[kafka.security]\nca_file = \"/nonexistent/ca.pem\"\n").unwrap_err();
        let keys: Vec<_> = err.0.iter().map(|i| i.key.as_str()).collect();
        assert!(keys.contains(&"kafka.security.protocol"), "{err}");
        assert!(keys.contains(&"kafka.security.ca_file"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = load_str("[scoring]\nhorizn = \"1h\"\n").unwrap_err();
        assert_eq!(err.0[0].key, "scoring.horizn", "{err}");
        assert!(err.0[0].message.contains("horizn"), "{err}");
    }

    #[test]
    fn semantic_errors_are_reported() {
        let err = load_str("[scoring]\nlevel = 2.0\n[scoring.bands]\nmoderate = 0.9\nhigh = 0.5\n")
            .unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's test harness dictates the closure's error type.
    fn environment_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("f.toml", "[kafka]\nbrokers = \"file:9092\"\n")?;
            jail.set_env("FORESIGHT_KAFKA__BROKERS", "env:9092");
            jail.set_env("FORESIGHT_CONFIG", "f.toml"); // not configuration: ignored
            jail.set_env("FORESIGHT_PYTHON", "/usr/bin/python3");
            let config = Config::load(Some(Path::new("f.toml"))).unwrap();
            assert_eq!(config.kafka.brokers, "env:9092");
            Ok(())
        });
    }
}
