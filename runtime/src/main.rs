//! `foresight`: predict infrastructure failures and act before they happen.

use std::{path::PathBuf, time::Instant};

use anyhow::Context as _;
use chrono::Duration as Delta;
use clap::{Parser, Subcommand, ValueEnum as _};
use foresight::{
    Config, Stage,
    demo::{self, FleetSpec},
    pipeline::InProcess,
    replay,
    telemetry::LogFormat,
};
use foresight_events::{EventData, Origin};
use tokio_util::sync::CancellationToken;

/// Foresight: predicts infrastructure failures from telemetry and decides what to do before they happen.
///
/// First steps: `foresight demo` (no broker, no database); `foresight init` for a starter
/// configuration; on the local stack (`deploy/dev/stack.sh up`): `foresight run all`, then
/// `foresight simulate --rate 2000` and `foresight tail decisions`.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Configuration file (TOML). Embedded defaults apply without one; FORESIGHT_* variables
    /// override both (e.g. FORESIGHT_KAFKA__BROKERS=host:9092).
    #[arg(long, short, global = true, env = "FORESIGHT_CONFIG")]
    config: Option<PathBuf>,
    /// Log format (on stderr); `json` writes one object per line, for log collectors. The level
    /// comes from RUST_LOG (default: info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
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
        /// Also write the run's scores, decisions, outcomes and labels to this directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Write the backtest report (one self-contained HTML file) here.
        #[arg(long, value_name = "REPORT.html")]
        report: Option<PathBuf>,
    },
    /// Run pipeline stages live against Kafka (and Postgres for the recorder) until SIGINT/SIGTERM.
    ///
    /// Serves /healthz, /readyz and /metrics on observability.listen (default 127.0.0.1:9464)
    /// and exports traces and metrics over OTLP when observability.otlp_endpoint is set.
    Run {
        /// Stages to run in this process (features, scoring, fleet, allocator, actuator,
        /// recorder); `all` runs every stage.
        #[arg(required = true, value_parser = parse_stage)]
        stages: Vec<StageArg>,
    },
    /// Write a commented starter configuration (DIR/foresight.toml) and the policy of a scenario
    /// (DIR/policies/SCENARIO.yaml).
    Init {
        /// Directory to write to (created if missing).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// The scenario whose policy to start from.
        #[arg(long, default_value = "instances", value_parser = clap::builder::PossibleValuesParser::new(foresight::init::SCENARIOS.map(|s| s.0)))]
        scenario: String,
        /// Overwrite files that exist.
        #[arg(long)]
        force: bool,
    },
    /// Produce a simulated fleet's telemetry (the demo's, with injected degradations) to the
    /// metrics topic, live, until Ctrl-C or --duration. History from --backfill ago is produced
    /// as fast as --rate allows, then samples follow the clock.
    Simulate {
        /// Samples per second, at most.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Stop after this long (e.g. 30s, 5m); default: until Ctrl-C.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
        /// Nodes in the fleet (at least 7).
        #[arg(long, default_value_t = 10)]
        nodes: usize,
        /// How far back the simulated history starts (whole hours).
        #[arg(long, default_value = "12h", value_parser = humantime::parse_duration)]
        backfill: std::time::Duration,
        /// Random seed (same seed, same fleet).
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Print a topic's events as they arrive, one line each (no consumer group position is
    /// changed). Without --follow, prints what the topic held when the command started and
    /// stops there.
    Tail {
        /// What to print.
        #[arg(value_enum)]
        what: foresight::tail::TailTopic,
        /// Start from the beginning of the topic (default: the last --last messages of each
        /// partition).
        #[arg(long)]
        from_beginning: bool,
        /// Messages per partition from before the end to start with (without --from-beginning).
        #[arg(long, default_value_t = 10)]
        last: i64,
        /// Keep printing new messages until Ctrl-C.
        #[arg(long, short)]
        follow: bool,
        /// Print each message's JSON instead of a summary line.
        #[arg(long)]
        json: bool,
    },
    /// Replay recorded telemetry through the pipeline in-process (ingest, features, scoring,
    /// fleet, allocator, dry-run actuator) into a run directory: scores, decisions, outcomes,
    /// failures and dead letters as Parquet, and summary.json. Same inputs and configuration, same
    /// bytes.
    ///
    /// Inputs: JSON lines in any format ingest reads (native JSON, OTLP/JSON,
    /// prometheus-kafka-adapter JSON; detected per line), and CSV or Parquet tables (by file
    /// extension), long (timestamp, entity, metric, value[, labels]) or wide (timestamp[, entity],
    /// one column per metric), read through DataFusion.
    ///
    /// With --failures, the run is backtested against those failure reports: precision, recall,
    /// lead times, false alarms, NAB-style score, calibration, actions taken.
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
        /// A query over each tabular input, as the table `input`
        /// (e.g. "SELECT * FROM input WHERE entity LIKE 'node-%'").
        #[arg(long)]
        sql: Option<String>,
        /// The entity of wide tables without an `entity` column (default: the file name).
        #[arg(long)]
        entity: Option<String>,
        /// Failure reports (labels) to backtest against: JSON lines of FailureReport (bare or in
        /// event envelopes), or CSV/Parquet with entity, timestamp, kind[, detail].
        #[arg(long)]
        failures: Vec<PathBuf>,
        /// How long before a failure an alarm counts as seeing it coming (default: the scoring
        /// horizon).
        #[arg(long, value_parser = humantime::parse_duration)]
        lookback: Option<std::time::Duration>,
        /// Write the backtest report (one self-contained HTML file) here.
        #[arg(long, value_name = "REPORT.html")]
        report: Option<PathBuf>,
        /// Leave the last windows open at the end of the input, as a live pipeline that is still
        /// running has (to compare a replay with a live run).
        #[arg(long)]
        keep_open: bool,
        /// No progress bar (it is shown only when stderr is a terminal anyway).
        #[arg(long)]
        quiet: bool,
        /// Score a CSV series row by row and write its anomaly scores to this CSV file.
        #[arg(long, value_name = "OUT.csv")]
        anomaly_scores: Option<PathBuf>,
        /// With --anomaly-scores: the value columns, by header name (default: every column after
        /// the first).
        #[arg(long, value_delimiter = ',', requires = "anomaly_scores")]
        columns: Vec<String>,
    },
    /// Query a run directory's tables (scores, decisions, outcomes, failures, dead_letters) with
    /// SQL (DataFusion's dialect), e.g. `foresight sql runs/latest "SELECT rule, count(*) FROM
    /// decisions GROUP BY rule"`.
    Sql {
        /// The run directory.
        run_dir: PathBuf,
        /// The query.
        query: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = foresight::replay::SqlFormat::Table)]
        format: foresight::replay::SqlFormat,
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
    /// Print the effective configuration as TOML-compatible JSON (secrets replaced by ***).
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
    // Live commands export their telemetry as configured; the others only log.
    let observability = match &cli.command {
        Command::Run { .. } | Command::Simulate { .. } => load(cli.config.as_ref())?.observability,
        _ => foresight::telemetry::ObservabilityConfig {
            otlp_endpoint: None,
            ..Default::default()
        },
    };
    let telemetry = foresight::telemetry::init(&observability, cli.log_format)?;
    let result = run(cli).await;
    telemetry.shutdown();
    result
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init {
            dir,
            scenario,
            force,
        } => {
            let written = foresight::init::init(&dir, &scenario, force)?;
            println!(
                "Wrote {} and {}.
Next: `foresight config check {}`, then `foresight --config {} run all`                  on the local stack (deploy/dev/stack.sh up).",
                written.config.display(),
                written.policy.display(),
                written.config.display(),
                written.config.display()
            );
            Ok(())
        }
        Command::Simulate {
            rate,
            duration,
            nodes,
            backfill,
            seed,
        } => {
            let config = load(cli.config.as_ref())?;
            let options = foresight::simulate::SimulateOptions {
                rate,
                duration,
                nodes,
                backfill,
                seed,
            };
            let report =
                foresight::simulate::simulate(&config, &options, shutdown_on_signal()?).await?;
            println!(
                "Produced {} samples to {}telemetry.metrics.",
                report.produced, config.kafka.topic_prefix
            );
            Ok(())
        }
        Command::Tail {
            what,
            from_beginning,
            last,
            follow,
            json,
        } => {
            let config = load(cli.config.as_ref())?;
            let options = foresight::tail::TailOptions {
                from_beginning,
                last,
                follow,
                json,
            };
            let mut stdout = std::io::stdout();
            let n =
                foresight::tail::tail(&config, what, &options, &mut stdout, shutdown_on_signal()?)
                    .await?;
            if !follow {
                eprintln!("{n} message(s).");
            }
            Ok(())
        }
        Command::Demo {
            nodes,
            hours,
            seed,
            out,
            report,
        } => run_demo(&load(cli.config.as_ref())?, nodes, hours, seed, out, report).await,
        Command::Sql {
            run_dir,
            query,
            format,
        } => {
            print!("{}", replay::sql(&run_dir, &query, format).await?);
            Ok(())
        }
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
            ..
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
        Command::Replay {
            inputs,
            out,
            sql,
            entity,
            failures,
            lookback,
            report,
            keep_open,
            quiet,
            ..
        } => {
            let config = load(cli.config.as_ref())?;
            let started = Instant::now();
            let options = replay::ReplayOptions {
                sql,
                entity,
                failures,
                keep_open,
                progress: !quiet,
            };
            let run = replay::replay(&config, &inputs, &options).await?;
            let backtest = (!options.failures.is_empty() || report.is_some())
                .then(|| backtest_of(&config, &run, lookback));
            let summary = replay::write_run(&out, &run, backtest.as_ref())?;
            let elapsed = started.elapsed();
            println!(
                "Replayed {} records ({} samples) in {:.2?} ({:.0} samples/s): {} scores, {} decisions, {} outcomes, {} dead letters; outputs in {}.",
                summary.records,
                summary.samples,
                elapsed,
                summary.samples as f64 / elapsed.as_secs_f64().max(1e-9),
                summary.scores,
                summary.decisions,
                summary.outcomes,
                summary.dead_letters,
                out.display()
            );
            if let Some(b) = &backtest {
                print!("{b}");
            }
            if let Some(path) = report {
                let title = inputs
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                write_report(&config, &path, &title, &run, backtest.as_ref())?;
            }
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
            // Secrets (passwords, and the password in a URL) as `***`.
            println!(
                "{}",
                serde_json::to_string_pretty(&load(cli.config.as_ref())?.redacted())?
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

/// The backtest of a run against its labels.
fn backtest_of(
    config: &Config,
    run: &replay::Replay,
    lookback: Option<std::time::Duration>,
) -> foresight::backtest::Backtest {
    let lookback = lookback.unwrap_or(config.scoring.horizon);
    foresight::backtest::backtest(
        &run.outputs.scores,
        &run.outputs.decisions,
        &run.outputs.outcomes,
        &run.failures,
        &foresight::backtest::BacktestConfig {
            lookback: Delta::from_std(lookback).unwrap_or(Delta::MAX),
            threshold: foresight::train::operating_threshold(config),
        },
    )
}

fn write_report(
    config: &Config,
    path: &std::path::Path,
    title: &str,
    run: &replay::Replay,
    backtest: Option<&foresight::backtest::Backtest>,
) -> anyhow::Result<()> {
    let backtest = match backtest {
        Some(b) => b.clone(),
        None => backtest_of(config, run, None),
    };
    let html = foresight::report::render(&foresight::report::ReportInput {
        title,
        scores: &run.outputs.scores,
        decisions: &run.outputs.decisions,
        failures: &run.failures,
        backtest: &backtest,
        config,
    })?;
    std::fs::write(path, html).with_context(|| format!("writing {}", path.display()))?;
    println!("Report written to {}.", path.display());
    Ok(())
}

async fn run_demo(
    config: &Config,
    nodes: usize,
    hours: u32,
    seed: u64,
    out: Option<PathBuf>,
    report: Option<PathBuf>,
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
        "Fleet: {} entities ({} services on nodes; {}), {} samples and {} log/trace messages over {hours} h; injected: {}.",
        fleet.entities.len(),
        fleet.placement.len(),
        fleet
            .dependencies
            .iter()
            .map(|(a, b)| format!("{a} calls {b}"))
            .collect::<Vec<_>>()
            .join(", "),
        fleet.samples.len(),
        fleet.otlp.len(),
        fleet
            .injected
            .iter()
            .map(|(e, d, _)| format!("{e} {d:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let started = Instant::now();
    let mut pipeline = InProcess::new(config, false)?;
    for (i, line) in fleet.lines().iter().enumerate() {
        // Through the same ingest as live telemetry (native JSON and OTLP/JSON).
        pipeline.feed(
            line.as_bytes(),
            "demo",
            Origin {
                input: 0,
                partition: 0,
                offset: i as i64 + 1,
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
    let run = replay::Replay {
        records: (fleet.samples.len() + fleet.otlp.len()) as u64,
        failures: fleet.failures.clone(),
        outputs,
    };
    let lookback = Delta::hours(12);
    let eval = backtest_of(config, &run, lookback.to_std().ok());
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
    println!("\n{eval}");
    let c = &eval.calibration;
    println!("Reliability (predicted -> observed):");
    for b in &c.reliability {
        println!(
            "  [{:.1}, {:.1}): {:>5} scores, mean P {:.3}, failed {:.3}",
            b.bin as f64 / 10.0,
            (b.bin + 1) as f64 / 10.0,
            b.scores,
            b.predicted,
            b.observed
        );
    }
    if let Some(d) = run.outputs.decisions.first() {
        println!(
            "\nExample decision {}:\n{}",
            d.id(),
            serde_json::to_string_pretty(d)?
        );
    }
    if let Some(dir) = out {
        replay::write_run(&dir, &run, Some(&eval))?;
        println!("\nOutputs written to {}.", dir.display());
    }
    if let Some(path) = report {
        let title = format!("demo fleet ({nodes} nodes, {hours} h, seed {seed})");
        write_report(config, &path, &title, &run, Some(&eval))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Cli;

    /// Every subcommand and every argument of every subcommand says what it is for.
    #[test]
    fn every_command_and_argument_has_help() {
        fn check(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(name.clone());
                }
                check(sub, &name, missing);
            }
        }
        let cli = Cli::command();
        cli.clone().debug_assert();
        let mut missing = Vec::new();
        check(&cli, "foresight", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }
}
