//! `foresight`: predict infrastructure failures and act before they happen.

use std::{path::PathBuf, time::Instant};

use anyhow::Context as _;
use chrono::Duration as Delta;
use clap::{Parser, Subcommand, ValueEnum};
use foresight::{
    Config, Stage,
    demo::{self, FleetSpec},
    pipeline::InProcess,
    replay,
};
use foresight_events::{EventData, Origin};
use tokio_util::sync::CancellationToken;

/// Foresight: predicts infrastructure failures from telemetry and decides what to do before they happen.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Configuration file (TOML). Embedded defaults apply without one; FORESIGHT_* variables
    /// override both (e.g. FORESIGHT_KAFKA__BROKERS=host:9092).
    #[arg(long, short, global = true, env = "FORESIGHT_CONFIG")]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a fleet with injected degradations, replay it in-process and print what Foresight
    /// predicted and decided. Needs no broker and no database.
    Demo {
        /// Nodes in the fleet.
        #[arg(long, default_value_t = 10)]
        nodes: usize,
        /// Hours of telemetry.
        #[arg(long, default_value_t = 48)]
        hours: u32,
        /// Random seed (same seed, same fleet, same output).
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Also write the run's scores, decisions and outcomes to this directory.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run pipeline stages live against Kafka (and Postgres for the recorder) until SIGINT/SIGTERM.
    Run {
        /// Stages to run in this process; `all` runs every stage.
        #[arg(required = true, value_parser = parse_stage)]
        stages: Vec<StageArg>,
    },
    /// Replay telemetry files through the pipeline in-process: one message per line, in native
    /// JSON, OTLP/JSON or prometheus-kafka-adapter JSON (detected per line).
    ///
    /// With --anomaly-scores, the input is instead one entity's series as CSV
    /// (`timestamp,value[,value...]`, comma or semicolon separated) and every row gets the
    /// within-series anomaly score in [0, 1), computed online (each from the rows up to it),
    /// written as `timestamp,anomaly_score`.
    Replay {
        /// Input files.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Run directory for the outputs.
        #[arg(long, default_value = "runs/latest")]
        out: PathBuf,
        /// Score a CSV series row by row and write its anomaly scores to this CSV file.
        #[arg(long, value_name = "OUT.csv")]
        anomaly_scores: Option<PathBuf>,
        /// With --anomaly-scores: the value columns, by header name (default: every column after
        /// the first).
        #[arg(long, value_delimiter = ',', requires = "anomaly_scores")]
        columns: Vec<String>,
    },
    /// Allocation policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Create the pipeline's topics on the broker (idempotent).
    Topics,
    /// Apply a decision that waits for approval (its policy is in `propose` mode). The kill
    /// switch and the group's limits still apply.
    Approve {
        /// The decision's id.
        decision_id: foresight_events::EventId,
    },
    /// Undo an applied (or failed) action: apply its decision's recorded inverse.
    Rollback {
        /// The decision's id.
        decision_id: foresight_events::EventId,
        /// Why, for the outcome.
        #[arg(long, default_value = "requested by hand")]
        reason: String,
    },
    /// The global kill switch of actuation.
    Actuation {
        #[command(subcommand)]
        command: ActuationCommand,
    },
    /// Train the failure model on the recorded scores and failure reports, compare it with the
    /// model in use on a time-based hold-out, record it in Postgres (table `models`) and promote
    /// it if it is not worse. Not promoting, or too few labels yet, is a normal outcome (exit 0).
    Train(foresight::train::TrainArgs),
    /// The audit log's tamper evidence.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Write the JSON Schemas of the public events.
    Schema {
        /// Directory to write them to.
        #[arg(long, default_value = "docs/schemas")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Walk every hash chain of the audit log and name the first broken row of each broken
    /// chain. Exits non-zero if any chain is broken.
    Verify,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate a policy file (every error with its location) and, with --scores, print what it
    /// would decide on those scores (one line per decision, the alternatives it rejected below).
    /// Exits non-zero if the policy is invalid.
    Check {
        /// The policy (YAML).
        file: PathBuf,
        /// Scores to decide on: one per line, event envelopes (as in a replay's scores.jsonl) or
        /// bare RiskScore JSON; failure reports and inventory updates may be interleaved.
        #[arg(long)]
        scores: Option<PathBuf>,
        /// The resource pool (YAML or JSON inventory); default: the configuration's
        /// allocator.inventory_file, else an empty pool.
        #[arg(long)]
        inventory: Option<PathBuf>,
        /// Print the decisions as JSON lines instead.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file (plus FORESIGHT_* overrides) and report every error with its key.
    Check {
        /// The file (defaults to --config).
        file: Option<PathBuf>,
    },
    /// Print the effective configuration as TOML-compatible JSON.
    Show,
}

#[derive(Debug, Subcommand)]
enum ActuationCommand {
    /// Stop all actuation (every instance, within a second); decisions are deferred meanwhile.
    Stop {
        /// Why, for the record.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Resume actuation.
    Start,
    /// Show the kill switch and the actuation ledger's counts.
    Status,
}

#[derive(Debug, Clone)]
enum StageArg {
    All,
    One(Stage),
}

fn parse_stage(s: &str) -> Result<StageArg, String> {
    if s == "all" {
        return Ok(StageArg::All);
    }
    Stage::from_str(s, true).map(StageArg::One).map_err(|_| {
        let names: Vec<_> = Stage::ALL.iter().map(|s| s.name()).collect();
        format!(
            "unknown stage {s:?}; expected all or one of {}",
            names.join(", ")
        )
    })
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,librdkafka=warn,rdkafka=warn,sqlx=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Config::load(path.map(PathBuf::as_path)).map_err(|e| {
        anyhow::anyhow!("{e}\nFix the keys above, then run `foresight config check` again.")
    })
}

/// One shutdown signal for the whole process: SIGINT or SIGTERM cancel the token every stage watches.
fn shutdown_on_signal() -> anyhow::Result<CancellationToken> {
    let token = CancellationToken::new();
    // Install the handlers now, before any work starts, so an early signal is not lost.
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("Shutdown requested; draining.");
        t.cancel();
    });
    Ok(token)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match cli.command {
        Command::Demo {
            nodes,
            hours,
            seed,
            out,
        } => run_demo(&load(cli.config.as_ref())?, nodes, hours, seed, out),
        Command::Run { stages } => {
            let config = load(cli.config.as_ref())?;
            let stages: Vec<Stage> = if stages.iter().any(|s| matches!(s, StageArg::All)) {
                Stage::ALL.to_vec()
            } else {
                stages
                    .into_iter()
                    .filter_map(|s| match s {
                        StageArg::One(s) => Some(s),
                        StageArg::All => None,
                    })
                    .collect()
            };
            let reports = foresight::run_stages(&stages, &config, shutdown_on_signal()?).await?;
            for (stage, r) in reports {
                println!(
                    "{}: {} messages, {} events, {} dead letters",
                    stage.name(),
                    r.messages,
                    r.events,
                    r.dead_letters
                );
            }
            Ok(())
        }
        Command::Replay {
            inputs,
            out: _,
            anomaly_scores: Some(scores),
            columns,
        } => {
            let config = load(cli.config.as_ref())?;
            let [input] = inputs.as_slice() else {
                anyhow::bail!("--anomaly-scores scores one CSV series: give exactly one input");
            };
            let columns = if columns.is_empty() {
                foresight::anomaly::Columns::AllButFirst
            } else {
                foresight::anomaly::Columns::Named(columns)
            };
            let rows = foresight::anomaly::score_csv_file(
                input,
                &scores,
                &columns,
                &config.scoring.anomaly,
            )?;
            eprintln!(
                "Scored {rows} rows of {}; scores in {}.",
                input.display(),
                scores.display()
            );
            Ok(())
        }
        Command::Replay { inputs, out, .. } => {
            let config = load(cli.config.as_ref())?;
            let started = Instant::now();
            let (outputs, records) = replay::replay_files(&config, &inputs)?;
            let summary = replay::write_run(&out, &outputs, records)?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            eprintln!(
                "Replayed {} records in {:.2?}; outputs in {}.",
                records,
                started.elapsed(),
                out.display()
            );
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            let file = file.or(cli.config);
            let config = load(file.as_ref())?;
            foresight::pipeline::Processors::new(&config)?;
            println!(
                "Configuration OK{}.",
                file.map(|f| format!(": {}", f.display()))
                    .unwrap_or_default()
            );
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Show,
        } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&load(cli.config.as_ref())?)?
            );
            Ok(())
        }
        Command::Topics => {
            let config = load(cli.config.as_ref())?;
            let topics = foresight::kafka::Topics::new(&config.kafka.topic_prefix);
            foresight::kafka::create_topics(&config.kafka, &topics)
                .await
                .with_context(|| {
                    format!(
                        "is the broker at {} up? (deploy/dev/stack.sh up)",
                        config.kafka.brokers
                    )
                })?;
            for t in topics.all() {
                println!("{t}");
            }
            Ok(())
        }
        Command::Approve { decision_id } => {
            by_hand(
                &load(cli.config.as_ref())?,
                foresight::actuator::ByHand::Approve(decision_id),
            )
            .await
        }
        Command::Rollback {
            decision_id,
            reason,
        } => {
            by_hand(
                &load(cli.config.as_ref())?,
                foresight::actuator::ByHand::Rollback(decision_id, reason),
            )
            .await
        }
        Command::Actuation { command } => {
            let change = match command {
                ActuationCommand::Stop { reason } => Some((true, reason)),
                ActuationCommand::Start => Some((false, String::new())),
                ActuationCommand::Status => None,
            };
            let text = foresight::actuator::switch(&load(cli.config.as_ref())?, change).await?;
            println!("{text}");
            Ok(())
        }
        Command::Audit {
            command: AuditCommand::Verify,
        } => {
            let config = load(cli.config.as_ref())?;
            let pool = foresight::db::connect(&config.postgres)
                .await
                .context("connecting to Postgres; is it up? (deploy/dev/stack.sh up)")?;
            let started = std::time::Instant::now();
            let v = foresight::audit::verify(&pool).await?;
            println!(
                "{} rows in {} chains checked in {:.1}s: {}",
                v.rows,
                v.chains,
                started.elapsed().as_secs_f64(),
                if v.breaks.is_empty() {
                    "intact"
                } else {
                    "BROKEN"
                }
            );
            for b in &v.breaks {
                println!("  {b}");
            }
            if v.breaks.is_empty() {
                Ok(())
            } else {
                anyhow::bail!("{} chain(s) broken", v.breaks.len())
            }
        }
        Command::Train(args) => {
            let config = load(cli.config.as_ref())?;
            let (training, window) = args
                .apply(&config.training, chrono::Utc::now())
                .map_err(anyhow::Error::msg)?;
            let pool = foresight::db::connect(&config.postgres)
                .await
                .context("connecting to Postgres; is it up? (deploy/dev/stack.sh up)")?;
            let threshold = foresight::train::operating_threshold(&config);
            let report = foresight::train::train(&pool, &training, threshold, window).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{report}");
            }
            Ok(())
        }
        Command::Policy {
            command:
                PolicyCommand::Check {
                    file,
                    scores,
                    inventory,
                    json,
                },
        } => {
            let config = load(cli.config.as_ref())?;
            let inventory = match inventory.or(config.allocator.inventory_file.clone()) {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    foresight_allocator::parse_inventory(&text)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
                }
                None => Default::default(),
            };
            let report = foresight::policy::check(
                &file,
                scores.as_deref(),
                &inventory,
                config.graph.clone(),
            )?;
            if json {
                for d in &report.decisions {
                    println!("{}", serde_json::to_string(d)?);
                }
                for e in &report.errors {
                    eprintln!("error: {e}");
                }
            } else {
                print!("{}", foresight::policy::render(&report));
            }
            if !report.errors.is_empty() {
                anyhow::bail!("{} problem(s) in {}", report.errors.len(), file.display());
            }
            eprintln!(
                "Policy {} is valid; {} decision(s) on {} input(s).",
                file.display(),
                report.decisions.len(),
                report.inputs
            );
            Ok(())
        }
        Command::Schema { out } => {
            std::fs::create_dir_all(&out)?;
            for (kind, schema) in foresight_events::public_schemas() {
                let path = out.join(format!("{kind}.json"));
                std::fs::write(&path, serde_json::to_string_pretty(&schema)? + "\n")?;
                println!("{}", path.display());
            }
            Ok(())
        }
    }
}

async fn by_hand(config: &Config, what: foresight::actuator::ByHand) -> anyhow::Result<()> {
    for o in foresight::actuator::by_hand(config, what).await? {
        println!(
            "{} {} {}: {}",
            o.decision_id,
            o.actuator,
            o.status.as_str(),
            o.detail
        );
    }
    Ok(())
}

fn run_demo(
    config: &Config,
    nodes: usize,
    hours: u32,
    seed: u64,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        nodes >= 7,
        "--nodes must be at least 7 (the demo injects degradations into nodes 3, 5 and 7)"
    );
    anyhow::ensure!(hours >= 12, "--hours must be at least 12");
    let spec = FleetSpec {
        nodes,
        hours,
        seed,
        ..FleetSpec::default()
    };
    let fleet = demo::generate(&spec);
    println!(
        "Fleet: {} entities, {} samples over {hours} h; injected: {}.",
        fleet.entities.len(),
        fleet.samples.len(),
        fleet
            .injected
            .iter()
            .map(|(e, d, _)| format!("{e} {d:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let started = Instant::now();
    let mut pipeline = InProcess::new(config, false)?;
    for (i, sample) in fleet.samples.iter().enumerate() {
        // Through the same JSON ingest as live telemetry.
        let bytes = serde_json::to_vec(sample)?;
        pipeline.feed(
            &bytes,
            "demo",
            Origin {
                input: 0,
                partition: 0,
                offset: i as i64,
            },
            None,
        );
    }
    let outputs = pipeline.finish();
    let elapsed = started.elapsed();
    println!(
        "Pipeline: {} samples -> {} scores -> {} decisions -> {} dry-run outcomes, {} dead letters, in {:.1?} ({:.0} samples/s).",
        outputs.samples,
        outputs.scores.len(),
        outputs.decisions.len(),
        outputs.outcomes.len(),
        outputs.dead_letters.len(),
        elapsed,
        outputs.samples as f64 / elapsed.as_secs_f64()
    );
    let lookback = Delta::hours(12);
    let eval = demo::evaluate(
        &outputs.scores,
        &outputs.decisions,
        &fleet.failures,
        lookback,
        fleet.entities.len(),
        hours as f64 / 24.0,
    );
    println!(
        "\nFailures and how early they were seen (high band within {} h before):",
        lookback.num_hours()
    );
    for c in &eval.catches {
        let lead = c
            .lead_time()
            .map(|d| format!("{}h{:02}m ahead", d.num_hours(), d.num_minutes() % 60))
            .unwrap_or_else(|| "not predicted".into());
        let decision = c
            .first_decision
            .as_ref()
            .map(|d| {
                format!(
                    "{} ({}, P={:.2} [{:.2}, {:.2}])",
                    d.action.kind.as_str(),
                    d.rule,
                    d.probability,
                    d.interval[0],
                    d.interval[1]
                )
            })
            .unwrap_or_else(|| "no decision".into());
        println!(
            "  {:<14} {:<18} at {}: {lead}; first decision: {decision}",
            c.failure.entity,
            c.failure.kind,
            c.failure.time.format("%Y-%m-%d %H:%M")
        );
    }
    println!(
        "\nFalse alarms: {} decisions about entities that did not fail ({:.2} per entity per day).",
        eval.false_alarm_decisions, eval.false_alarms_per_entity_day
    );
    let c = &eval.calibration;
    println!(
        "\nCalibration over {} scores (failure within the horizon): Brier score {:.4} (always \
         predicting the base rate: {:.4}). Reliability (predicted -> observed):",
        c.scores, c.brier, c.brier_base_rate
    );
    for (bin, n, predicted, observed) in &c.reliability {
        println!(
            "  [{:.1}, {:.1}): {n:>5} scores, mean P {predicted:.3}, failed {observed:.3}",
            *bin as f64 / 10.0,
            (*bin + 1) as f64 / 10.0
        );
    }
    if let Some(d) = outputs.decisions.first() {
        println!(
            "\nExample decision {}:\n{}",
            d.id(),
            serde_json::to_string_pretty(d)?
        );
    }
    if let Some(dir) = out {
        replay::write_run(&dir, &outputs, fleet.samples.len() as u64)?;
        println!("\nOutputs written to {}.", dir.display());
    }
    Ok(())
}
