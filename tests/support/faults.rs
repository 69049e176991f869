//! The fault suite's parts: the checker that compares every input with what the pipeline made of
//! it, child `foresight` processes, a tansu broker of a test's own, and a TCP proxy that can cut
//! a connection (a database or broker made unreachable without stopping the shared server).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use foresight::{Config, kafka::Topics, pipeline::Outputs};
use foresight_events::{
    ActuationOutcome, DeadLetter, Decision, ErrorClass, Event, EventData, EventId, FeatureWindow,
    RiskScore,
};
use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::{binary, read_all_at};

/// One kind of record, expected (from the in-process replay of the same input) against observed.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Count {
    /// Distinct records the replay made.
    pub expected: usize,
    /// Distinct records found.
    pub observed: usize,
    /// Expected but not found.
    pub lost: usize,
    /// Found more than once with different content (or acted on more than once).
    pub duplicated: usize,
    /// Found but not expected.
    pub unexplained: usize,
    /// Expected and found, but never with the expected content (the replay's, where that is
    /// what is expected).
    pub differs: usize,
    /// For the first record found with two contents: where the two differ (JSON paths), to say
    /// what varies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conflict: Option<String>,
}

impl Count {
    fn of<K: Ord + Clone + std::fmt::Debug, V: PartialEq + Serialize>(
        expected: &BTreeMap<K, V>,
        observed: &[(K, V)],
    ) -> Self {
        let mut seen: BTreeMap<K, Vec<&V>> = BTreeMap::new();
        for (k, v) in observed {
            let versions = seen.entry(k.clone()).or_default();
            if !versions.contains(&v) {
                versions.push(v);
            }
        }
        Self {
            expected: expected.len(),
            observed: seen.len(),
            lost: expected.keys().filter(|k| !seen.contains_key(*k)).count(),
            duplicated: seen.values().filter(|v| v.len() > 1).count(),
            unexplained: seen.keys().filter(|k| !expected.contains_key(*k)).count(),
            differs: seen
                .iter()
                .filter(|(k, v)| expected.get(*k).is_some_and(|want| !v.contains(&want)))
                .count(),
            conflict: seen
                .iter()
                .find(|(_, v)| v.len() > 1)
                .map(|(k, v)| format!("{k:?}: {}", json_diff(v[0], v[1]))),
        }
    }

    fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.unexplained == 0
    }
}

/// What the checker found: every count must be zero for a run to pass.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Tally {
    /// The scenario.
    pub scenario: String,
    /// Input records produced (good ones; each is unique by entity, metric and time).
    pub inputs: usize,
    /// Good input samples not in any window as the replay has them.
    pub samples_lost: u64,
    /// Good input samples counted more than once.
    pub samples_doubled: u64,
    /// Feature windows.
    pub windows: Count,
    /// Risk scores (public topic).
    pub scores: Count,
    /// Decisions (public topic): `duplicated` is an id with two contents, or one score, rule
    /// and action decided under two ids; `unexplained` a decision about a score the replay did
    /// not make.
    pub decisions: Count,
    /// Decisions as published against the replay's, id for id and content for content: every
    /// one the replay made, none other, each with the replay's content. The allocator decides
    /// each round once every partition of `scores` has passed it (holding the partitions read
    /// ahead), so how a live run reads its partitions cannot change a decision (see
    /// docs/reliability.md).
    pub decisions_vs_replay: Count,
    /// Published decisions that got an outcome (by decision id); `duplicated`: an outcome id
    /// with two contents.
    pub outcomes: Count,
    /// Audit rows of decisions, against the decisions published.
    pub audit_decisions: Count,
    /// Audit rows of scores, against the scores expected.
    pub audit_scores: Count,
    /// Decisions published on the topic without an audit row.
    pub decisions_unrecorded: usize,
    /// Audit rows stored twice under one id.
    pub audit_rows_doubled: i64,
    /// Calls of the command actuator: `duplicated` is decisions acted on more than once,
    /// `lost` decisions whose outcome says applied but that were never called.
    pub actuations: Count,
    /// Dead letters, by the source record they stand for.
    pub dead_letters: Count,
    /// Records seen again on a topic with the same id and content (at-least-once delivery's
    /// harmless redeliveries, deduplicated downstream by id): reported, not a failure.
    pub redelivered: usize,
    /// Measurements of the scenario (kills, outage, catch-up time, memory...).
    pub measured: BTreeMap<String, f64>,
    /// Input records the broker holds twice (same partition and content): not Foresight's
    /// doing, reported.
    pub input_copies: usize,
    /// Of those, copies read after their window had closed and so dead-lettered as late (the
    /// first copy counted): explained, reported.
    pub late_copies: usize,
    /// Input records the broker serves after a later sample of the same series (same
    /// partition): not Foresight's doing, reported.
    pub input_inverted: usize,
    /// The first dead letters of records that are not poison (late or duplicate input: no
    /// scenario produces any), with where they came from, to trace them in the stages' logs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unexpected_dead_letters: Vec<String>,
    /// The first windows expected but never published, with where their input is, to trace
    /// them in the stages' logs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lost_windows: Vec<LostWindow>,
}

/// A window expected but never published, and the input it should have been made of.
#[derive(Debug, Clone, Serialize)]
pub struct LostWindow {
    /// Its entity.
    pub entity: String,
    /// Its start.
    pub start: chrono::DateTime<chrono::Utc>,
    /// The partition of the metrics topic its samples are on.
    pub partition: i32,
    /// Offsets of its first and last sample there.
    pub offsets: (i64, i64),
}

/// Most lost windows a tally lists.
const LOST_LISTED: usize = 10;
/// Decisions and scores printed that differ from the replay's, of each kind.
const DIFFERENCES_LISTED: usize = 3;

impl Tally {
    /// Whether nothing was lost, duplicated or unexplained.
    pub fn clean(&self) -> bool {
        self.faults().is_empty()
    }

    /// What was lost, duplicated or unexplained, one line per kind of record.
    pub fn faults(&self) -> Vec<String> {
        let mut faults = Vec::new();
        for (what, n) in [
            ("samples lost", self.samples_lost),
            ("samples doubled", self.samples_doubled),
            (
                "decisions without an audit row",
                self.decisions_unrecorded as u64,
            ),
            (
                "audit rows stored twice",
                self.audit_rows_doubled.max(0) as u64,
            ),
        ] {
            if n > 0 {
                faults.push(format!("{what}: {n}"));
            }
        }
        // The live scores and decisions are the replay's, content for content (the fleet
        // stage's and the allocator's rounds do not depend on how partitions are read).
        // (Windows are not held to it yet: reported.)
        for (what, c) in [
            ("scores", &self.scores),
            ("decisions", &self.decisions_vs_replay),
        ] {
            if c.differs > 0 {
                faults.push(format!(
                    "{what}: {} of {} published with other content than the replay's",
                    c.differs, c.expected
                ));
            }
        }
        let d = &self.decisions_vs_replay;
        if d.lost > 0 || d.unexplained > 0 {
            faults.push(format!(
                "decisions against the replay's: {} of {} not made live, {} made live only",
                d.lost, d.expected, d.unexplained
            ));
        }
        for (what, c) in [
            ("windows", &self.windows),
            ("scores", &self.scores),
            ("decisions", &self.decisions),
            ("outcomes", &self.outcomes),
            ("audit rows of decisions", &self.audit_decisions),
            ("audit rows of scores", &self.audit_scores),
            ("actuations", &self.actuations),
            ("dead letters", &self.dead_letters),
        ] {
            if !c.clean() {
                faults.push(format!(
                    "{what}: {} lost, {} duplicated, {} unexplained of {} expected{}",
                    c.lost,
                    c.duplicated,
                    c.unexplained,
                    c.expected,
                    c.conflict
                        .as_deref()
                        .map(|d| format!(" (first with two contents: {d})"))
                        .unwrap_or_default()
                ));
            }
        }
        faults
    }

    /// Prints the tally, writes it to `$FORESIGHT_RELIABILITY_DIR/<scenario>.json` (default
    /// `<tmp>/foresight-reliability`; the numbers docs/reliability.md quotes) and fails unless it
    /// is clean.
    pub fn report(&self) -> anyhow::Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        eprintln!("reliability {}: {json}", self.scenario);
        let dir = std::env::var_os("FORESIGHT_RELIABILITY_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("foresight-reliability"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("{}.json", self.scenario)), &json)?;
        let faults = self.faults();
        if !faults.is_empty() {
            bail!(
                "{}: records lost, duplicated or unexplained:\n- {}\n{json}",
                self.scenario,
                faults.join("\n- ")
            );
        }
        Ok(())
    }
}

/// What a clean run over the input must produce: the in-process replay's outputs.
#[derive(Debug)]
pub struct Reference {
    /// Good input records.
    pub inputs: usize,
    /// Windows by id.
    pub windows: BTreeMap<EventId, FeatureWindow>,
    /// Scores by id.
    pub scores: BTreeMap<EventId, RiskScore>,
    /// Decisions by id.
    pub decisions: BTreeMap<EventId, Decision>,
    /// Poison records, by (partition-free) content: each must become one dead letter.
    pub poison: usize,
}

impl Reference {
    /// The reference of `outputs` (the replay of `inputs` good records and `poison` bad ones).
    pub fn new(outputs: &Outputs, inputs: usize, poison: usize) -> Self {
        Self {
            inputs,
            windows: outputs
                .windows
                .iter()
                .map(|w| (w.id(), w.clone()))
                .collect(),
            scores: outputs.scores.iter().map(|s| (s.id(), s.clone())).collect(),
            decisions: outputs
                .decisions
                .iter()
                .map(|d| (d.id(), d.clone()))
                .collect(),
            poison,
        }
    }

    /// Samples in the windows expected.
    pub fn samples(&self) -> u64 {
        self.windows.values().map(samples).sum()
    }
}

fn samples(w: &FeatureWindow) -> u64 {
    w.metrics.values().map(|m| m.count).sum()
}

fn decode<T: EventData>(brokers: &str, topic: &str) -> anyhow::Result<Vec<T>> {
    read_all_at(
        brokers,
        topic,
        Duration::from_secs(3),
        Duration::from_secs(120),
    )?
    .into_iter()
    .map(|m| {
        Event::<T>::from_json(&m.payload)
            .map(|e| e.data)
            .with_context(|| format!("a record on {topic}"))
    })
    .collect()
}

/// Where on the metrics topic the samples of each of `windows` are.
fn locate(
    brokers: &str,
    metrics: &str,
    windows: &[&FeatureWindow],
) -> anyhow::Result<Vec<LostWindow>> {
    #[derive(serde::Deserialize)]
    struct Sample {
        entity: String,
        time: chrono::DateTime<chrono::Utc>,
    }
    let input = read_all_at(
        brokers,
        metrics,
        Duration::from_secs(3),
        Duration::from_secs(120),
    )?;
    let mut out: Vec<LostWindow> = windows
        .iter()
        .map(|w| LostWindow {
            entity: w.entity.as_str().to_owned(),
            start: w.start,
            partition: -1,
            offsets: (i64::MAX, i64::MIN),
        })
        .collect();
    for m in &input {
        let Ok(s) = serde_json::from_slice::<Sample>(&m.payload) else {
            continue;
        };
        for (w, l) in windows.iter().zip(&mut out) {
            if s.entity == l.entity && w.start <= s.time && s.time < w.end {
                l.partition = m.partition;
                l.offsets = (l.offsets.0.min(m.offset), l.offsets.1.max(m.offset));
            }
        }
    }
    Ok(out)
}

/// Reads every output topic, the audit log and the actuator's call log (`calls`: lines of
/// `<operation> <decision id>`, when the command actuator is configured) and compares them with
/// `reference`.
pub async fn check(
    scenario: &str,
    reference: &Reference,
    brokers: &str,
    topics: &Topics,
    pool: &sqlx::PgPool,
    calls: Option<&Path>,
) -> anyhow::Result<Tally> {
    let mut t = Tally {
        scenario: scenario.to_owned(),
        inputs: reference.inputs,
        ..Tally::default()
    };
    let mut redelivered = 0;
    let mut keyed = |items: Vec<(EventId, String)>| {
        let distinct: BTreeSet<&(EventId, String)> = items.iter().collect();
        redelivered += items.len() - distinct.len();
        items
    };

    let windows: Vec<FeatureWindow> = decode(brokers, &topics.features)?;
    let by_id: Vec<(EventId, FeatureWindow)> =
        windows.iter().map(|w| (w.id(), w.clone())).collect();
    t.windows = Count::of(&reference.windows, &by_id);
    keyed(
        by_id
            .iter()
            .map(|(id, w)| (*id, serde_json::to_string(w).unwrap_or_default()))
            .collect(),
    );
    let mut observed: BTreeMap<EventId, Vec<&FeatureWindow>> = BTreeMap::new();
    for (id, w) in &by_id {
        let v = observed.entry(*id).or_default();
        if !v.contains(&w) {
            v.push(w);
        }
    }
    let mut lost: Vec<&FeatureWindow> = Vec::new();
    for (id, want) in &reference.windows {
        let n = samples(want);
        match observed.get(id).map(Vec::as_slice) {
            None => {
                t.samples_lost += n;
                lost.push(want);
            }
            Some([got]) => {
                let m = samples(got);
                t.samples_lost += n.saturating_sub(m);
                t.samples_doubled += m.saturating_sub(n);
            }
            Some(versions) => {
                t.samples_doubled += versions.iter().map(|w| samples(w)).sum::<u64>() - n;
            }
        }
    }
    for (id, versions) in &observed {
        if !reference.windows.contains_key(id) {
            t.samples_doubled += versions.iter().map(|w| samples(w)).sum::<u64>();
        }
    }
    if !lost.is_empty() {
        lost.sort_by_key(|w| (w.start, w.entity.clone()));
        lost.truncate(LOST_LISTED);
        t.lost_windows = locate(brokers, &topics.metrics, &lost)?;
    }

    let scores: Vec<(EventId, String)> = decode::<RiskScore>(brokers, &topics.scores)?
        .iter()
        .map(|s| (s.id(), serde_json::to_string(s).unwrap_or_default()))
        .collect();
    let want_scores: BTreeMap<EventId, String> = reference
        .scores
        .iter()
        .map(|(id, s)| (*id, serde_json::to_string(s).unwrap_or_default()))
        .collect();
    // The first few published with other content than the replay's, both versions, to say why.
    for (id, live) in scores
        .iter()
        .filter(|(id, live)| want_scores.get(id).is_some_and(|want| want != live))
        .take(DIFFERENCES_LISTED)
    {
        eprintln!("{scenario}: score {id} published as {live}");
        eprintln!("{scenario}: score {id} in the replay {}", want_scores[id]);
    }
    t.scores = Count::of(&want_scores, &keyed(scores));

    let decisions: Vec<Decision> = decode(brokers, &topics.decisions)?;
    let published: BTreeSet<EventId> = decisions.iter().map(EventData::id).collect();
    // What differs from the replay, to say why: the first few of each, so that a log cut short
    // keeps the tally.
    let unexpected: Vec<&Decision> = decisions
        .iter()
        .filter(|d| !reference.decisions.contains_key(&d.id()))
        .collect();
    let missing: Vec<&Decision> = reference
        .decisions
        .values()
        .filter(|d| !published.contains(&d.id()))
        .collect();
    for (what, list) in [("unexpected", &unexpected), ("missing", &missing)] {
        for d in list.iter().take(DIFFERENCES_LISTED) {
            eprintln!("{scenario}: {what} decision {}", serde_json::to_string(d)?);
        }
        if list.len() > DIFFERENCES_LISTED {
            eprintln!(
                "{scenario}: ... {} more {what} decisions",
                list.len() - DIFFERENCES_LISTED
            );
        }
    }
    let want_decisions: BTreeMap<EventId, String> = reference
        .decisions
        .iter()
        .map(|(id, d)| (*id, serde_json::to_string(d).unwrap_or_default()))
        .collect();
    let live = keyed(
        decisions
            .iter()
            .map(|d| (d.id(), serde_json::to_string(d).unwrap_or_default()))
            .collect(),
    );
    t.decisions_vs_replay = Count::of(&want_decisions, &live);
    // Against the scores: a decision is unexplained if the score it is about is not one the
    // replay made, duplicated if its id has two contents or its score, rule and action were
    // decided twice under different ids (the replay's own decisions: `decisions_vs_replay`).
    let as_published: BTreeMap<EventId, String> = live.iter().cloned().collect();
    let mut per_score: BTreeMap<(EventId, String, String), BTreeSet<EventId>> = BTreeMap::new();
    for d in &decisions {
        per_score
            .entry((d.score_id, d.rule.clone(), format!("{:?}", d.action)))
            .or_default()
            .insert(d.id());
    }
    let by_content = Count::of(&as_published, &live);
    t.decisions = Count {
        expected: published.len(),
        observed: published.len(),
        lost: 0,
        duplicated: by_content.duplicated + per_score.values().filter(|ids| ids.len() > 1).count(),
        unexplained: decisions
            .iter()
            .filter(|d| !reference.scores.contains_key(&d.score_id))
            .map(EventData::id)
            .collect::<BTreeSet<_>>()
            .len(),
        differs: 0,
        conflict: None,
    };

    let outcomes: Vec<ActuationOutcome> = decode(brokers, &topics.outcomes)?;
    let outcome_ids = keyed(
        outcomes
            .iter()
            .map(|o| (o.id(), serde_json::to_string(o).unwrap_or_default()))
            .collect(),
    );
    let mut versions: BTreeMap<EventId, BTreeSet<&str>> = BTreeMap::new();
    for (id, json) in &outcome_ids {
        versions.entry(*id).or_default().insert(json);
    }
    let decided: BTreeSet<EventId> = outcomes.iter().map(|o| o.decision_id).collect();
    t.outcomes = Count {
        expected: published.len(),
        observed: decided.len(),
        lost: published.iter().filter(|d| !decided.contains(d)).count(),
        duplicated: versions.values().filter(|v| v.len() > 1).count(),
        unexplained: decided.iter().filter(|d| !published.contains(d)).count(),
        differs: 0,
        conflict: None,
    };

    let rows = |view: &'static str| async move {
        let ids: Vec<uuid::Uuid> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT id FROM {view}")))
                .fetch_all(pool)
                .await?;
        anyhow::Ok(ids.into_iter().map(EventId).collect::<Vec<_>>())
    };
    let audit_decisions = rows("decisions").await?;
    t.decisions_unrecorded = published
        .iter()
        .filter(|id| !audit_decisions.contains(id))
        .count();
    let published_ids: BTreeMap<EventId, String> =
        published.iter().map(|id| (*id, String::new())).collect();
    t.audit_decisions = Count::of(
        &published_ids,
        &audit_decisions
            .iter()
            .map(|id| (*id, String::new()))
            .collect::<Vec<_>>(),
    );
    let want_score_ids: BTreeMap<EventId, String> =
        want_scores.keys().map(|id| (*id, String::new())).collect();
    t.audit_scores = Count::of(
        &want_score_ids,
        &rows("scores")
            .await?
            .into_iter()
            .map(|id| (id, String::new()))
            .collect::<Vec<_>>(),
    );
    t.audit_rows_doubled = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT id FROM events GROUP BY id HAVING count(*) > 1) d",
    )
    .fetch_one(pool)
    .await?;

    if let Some(calls) = calls {
        let text = std::fs::read_to_string(calls).unwrap_or_default();
        let mut per: BTreeMap<EventId, usize> = BTreeMap::new();
        for line in text.lines() {
            if let Some(("apply", id)) = line.split_once(' ') {
                *per.entry(id.parse().context("a decision id")?).or_default() += 1;
            }
        }
        let applied: BTreeSet<EventId> = outcomes
            .iter()
            .filter(|o| o.status == foresight_events::OutcomeStatus::Applied)
            .map(|o| o.decision_id)
            .collect();
        t.actuations = Count {
            expected: applied.len(),
            observed: per.len(),
            lost: applied.iter().filter(|d| !per.contains_key(d)).count(),
            duplicated: per.values().filter(|&&n| n > 1).count(),
            unexplained: per.keys().filter(|d| !published.contains(d)).count(),
            differs: 0,
            conflict: None,
        };
    }

    let dead = read_all_at(
        brokers,
        &topics.dead_letters,
        Duration::from_secs(3),
        Duration::from_secs(60),
    )?;
    // Input records the broker holds twice (a producer's retry it stored again): a copy read
    // after its window closed is rightly dead-lettered as late, with nothing lost (the first
    // copy was counted), and is counted apart, not as unexplained.
    let input = read_all_at(
        brokers,
        &topics.metrics,
        Duration::from_secs(3),
        Duration::from_secs(60),
    )?;
    let mut first_seen: BTreeMap<(i32, &[u8]), i64> = BTreeMap::new();
    let mut copies: BTreeSet<(i32, i64)> = BTreeSet::new();
    for m in &input {
        let first = *first_seen
            .entry((m.partition, m.payload.as_slice()))
            .or_insert(m.offset);
        if first < m.offset {
            copies.insert((m.partition, m.offset));
        }
    }
    t.input_copies = copies.len();
    // Input the broker serves out of the order it was produced in: a sample of a series after a
    // later one of the same series on its partition (the producer sends each series in time order).
    let mut newest: BTreeMap<(i32, String, String), String> = BTreeMap::new();
    let mut inverted: BTreeSet<(i32, i64)> = BTreeSet::new();
    for m in &input {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload) else {
            continue;
        };
        let field = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        let (series, time) = (
            (m.partition, field("entity"), field("metric")),
            field("time"),
        );
        match newest.get(&series) {
            Some(before) if *before > time => {
                inverted.insert((m.partition, m.offset));
            }
            _ => {
                newest.insert(series, time);
            }
        }
    }
    t.input_inverted = inverted.len();
    let mut late_copies = BTreeSet::new();
    let mut sources = Vec::new();
    for m in &dead {
        let dl = DeadLetter::from_headers(
            m.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())),
            m.key.clone(),
            m.payload.clone(),
        )
        .context("dead-letter headers")?;
        if dl.reason.is_empty() {
            bail!("a dead letter without a reason: {dl:?}");
        }
        *t.measured
            .entry(format!(
                "dead_letters_{}_{}",
                dl.stage,
                dl.error_class.as_str()
            ))
            .or_default() += 1.0;
        if dl.error_class == ErrorClass::Late
            && dl.source_topic == topics.metrics
            && copies.contains(&(dl.partition, dl.offset))
        {
            late_copies.insert((dl.partition, dl.offset));
            continue;
        }
        if dl.error_class == ErrorClass::Late && t.unexpected_dead_letters.len() < LOST_LISTED {
            t.unexpected_dead_letters.push(format!(
                "{} {} {}[{}]@{}: {}",
                dl.stage,
                dl.error_class.as_str(),
                dl.source_topic,
                dl.partition,
                dl.offset,
                dl.reason
            ));
        }
        sources.push(((dl.source_topic, dl.partition, dl.offset), ()));
    }
    t.late_copies = late_copies.len();
    let distinct: BTreeSet<_> = sources.iter().map(|(k, _)| k.clone()).collect();
    t.redelivered = redelivered + (sources.len() - distinct.len());
    t.dead_letters = Count {
        expected: reference.poison,
        observed: distinct.len(),
        lost: reference.poison.saturating_sub(distinct.len()),
        duplicated: 0,
        unexplained: distinct.len().saturating_sub(reference.poison),
        differs: 0,
        conflict: None,
    };
    Ok(t)
}

/// Writes `config` as a TOML file the `foresight` binary reads (`--config`).
pub fn write_config(config: &Config, path: &Path) -> anyhow::Result<()> {
    let value = serde_json::to_value(config)?;
    let toml = toml::to_string(&strip_nulls(value)).context("configuration as TOML")?;
    std::fs::write(path, toml)?;
    Ok(())
}

/// TOML has no null: unset options are left out.
fn strip_nulls(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => map
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k, strip_nulls(v)))
            .collect(),
        serde_json::Value::Array(items) => items.into_iter().map(strip_nulls).collect(),
        v => v,
    }
}

/// A `foresight run ...` child process; killed (SIGKILL) when dropped.
pub struct Process {
    /// The child.
    pub child: Child,
    /// Its log (stderr), for reading after it ends.
    pub log: PathBuf,
}

impl Process {
    /// Starts `foresight run <stages>` with `config_file`, logging to `log` (appended).
    pub fn start(
        config_file: &Path,
        stages: &[&str],
        log: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut cmd = Command::new(binary()?);
        cmd.arg("--config")
            .arg(config_file)
            .arg("run")
            .args(stages)
            .env("RUST_LOG", "warn,foresight=info")
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Ok(Self {
            child: cmd.spawn().context("starting foresight")?,
            log: log.to_owned(),
        })
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM; then waits up to `limit` for it to exit, returning its exit status and how long
    /// it took.
    pub fn terminate(
        &mut self,
        limit: Duration,
    ) -> anyhow::Result<(std::process::ExitStatus, Duration)> {
        signal(self.child.id(), "TERM")?;
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((status, started.elapsed()));
            }
            if started.elapsed() > limit {
                self.kill()?;
                bail!("foresight did not exit within {limit:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory, in bytes (Linux).
    pub fn rss(&self) -> Option<u64> {
        rss(self.child.id())
    }

    /// Fails if the process has exited.
    pub fn alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            bail!(
                "foresight exited ({status}); its log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a signal by name (`TERM`, `KILL`, `STOP`, `CONT`) with the `kill` command.
pub fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        bail!("kill -{name} {pid} failed");
    }
    Ok(())
}

/// Resident memory of a process, in bytes (from /proc).
pub fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The tansu binary (installed by `deploy/dev/stack.sh`).
pub fn tansu_binary() -> anyhow::Result<PathBuf> {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let bin = std::env::var_os("FORESIGHT_TANSU")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&home).join(".cargo/bin/tansu"));
    if !bin.exists() {
        bail!(
            "{} not found (deploy/dev/stack.sh installs it)",
            bin.display()
        );
    }
    Ok(bin)
}

/// A tansu broker of one test's own, on its own port, with durable (sqlite) storage in a
/// directory, so it can be stopped and started again with its data.
pub struct Tansu {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its storage URL (a sqlite file is relative to `dir`).
    pub storage: String,
    dir: PathBuf,
    /// Extra arguments (`--authentication`).
    pub args: Vec<String>,
    /// The address advertised to clients, when they reach it through something in front of
    /// it (a TLS terminator); its own by default.
    pub advertised: Option<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Tansu {
    /// A broker (not yet started) keeping its data in memory only.
    pub fn in_memory(dir: &Path) -> anyhow::Result<Self> {
        let mut t = Self::new(dir)?;
        t.storage = "memory://tansu/".into();
        Ok(t)
    }

    /// A broker (not yet started) with its storage under `dir`.
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            port: free_port()?,
            storage: "sqlite://tansu.db".into(),
            dir: dir.to_owned(),
            args: Vec::new(),
            advertised: None,
            log: dir.join("tansu.log"),
            child: None,
        })
    }

    /// `127.0.0.1:<port>`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts it and waits until it accepts connections.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = match &self.advertised {
            Some(a) => format!("tcp://{a}"),
            None => url.clone(),
        };
        let child = Command::new(tansu_binary()?)
            .arg("broker")
            .args([
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", &self.storage])
            .args(&self.args)
            .arg("--silent")
            .current_dir(&self.dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting tansu")?;
        self.child = Some(child);
        let address = self.address();
        let listening = crate::eventually("tansu to listen", Duration::from_secs(30), || {
            let address = address.clone();
            async move { Ok(TcpStream::connect(&address).await.ok().map(|_| ())) }
        })
        .await;
        listening.with_context(|| format!("tansu on {address}; its log:\n{}", self.log()))
    }

    /// Stops it (SIGTERM, then SIGKILL after 10 s).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "TERM")?;
            let started = Instant::now();
            while child.try_wait()?.is_none() {
                if started.elapsed() > Duration::from_secs(10) {
                    child.kill()?;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            child.wait()?;
        }
        Ok(())
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TCP proxy in front of a server that can be cut (every connection closed, new ones refused
/// at once) and restored: the server made unreachable without stopping it, which other users of
/// a shared server would notice.
pub struct Proxy {
    /// Where clients connect.
    pub address: SocketAddr,
    cut: watch::Sender<bool>,
    refusing: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// A proxy on a free local port forwarding to `upstream`.
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (cut, watch) = watch::channel(false);
        let refusing = Arc::new(AtomicBool::new(false));
        let upstream = upstream.to_owned();
        let refuse = refusing.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if refuse.load(Ordering::SeqCst) {
                    drop(client); // Closed at once: the client sees the server go away.
                    continue;
                }
                let upstream = upstream.clone();
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = watch.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Ok(Self {
            address,
            cut,
            refusing,
            task,
        })
    }

    /// Closes every connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.refusing.store(true, Ordering::SeqCst);
        let _ = self.cut.send(true);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        let _ = self.cut.send(false);
        self.refusing.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The fault suite's telemetry: `entities` nodes, one `disk_used_pct` and one `cpu_pct` sample
/// every 10 s for `steps` steps ending at `end` (so `2 * entities * steps` samples, each unique
/// by entity, metric and time). Every fifth node's disk fills toward its limit, so the pipeline
/// has decisions to make; the others are steady. (key, payload) in production order.
pub fn telemetry(
    entities: usize,
    steps: i64,
    end: chrono::DateTime<chrono::Utc>,
) -> Vec<(String, Vec<u8>)> {
    let start = end - chrono::Duration::seconds(10 * steps);
    let mut out = Vec::with_capacity(2 * entities * steps as usize);
    for step in 0..steps {
        let time = (start + chrono::Duration::seconds(10 * step)).to_rfc3339();
        for e in 0..entities {
            let entity = format!("node-{e:03}");
            let wiggle = ((step * 7919 + e as i64 * 104_729) % 13) as f64 / 13.0 - 0.5;
            let disk = if e % 5 == 0 {
                40.0 + 58.0 * step as f64 / steps as f64 + wiggle
            } else {
                45.0 + wiggle
            };
            for (metric, value) in [("disk_used_pct", disk), ("cpu_pct", 30.0 + 3.0 * wiggle)] {
                let sample = serde_json::json!({
                    "entity": entity, "metric": metric, "time": time, "value": value,
                });
                out.push((entity.clone(), serde_json::to_vec(&sample).expect("json")));
            }
        }
    }
    out
}

/// Where two JSON renderings of a record differ: up to 8 paths, each with both values (cut short).
fn json_diff<V: Serialize>(a: &V, b: &V) -> String {
    fn walk(path: String, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        use serde_json::Value::{Array, Object};
        if out.len() >= 8 || a == b {
            return;
        }
        match (a, b) {
            (Object(x), Object(y)) => {
                for k in x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))) {
                    let null = serde_json::Value::Null;
                    let (va, vb) = (x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null));
                    walk(format!("{path}.{k}"), va, vb, out);
                }
            }
            (Array(x), Array(y)) if x.len() == y.len() => {
                for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                    walk(format!("{path}[{i}]"), va, vb, out);
                }
            }
            _ => {
                let cut =
                    |v: &serde_json::Value| v.to_string().chars().take(120).collect::<String>();
                out.push(format!("{path}: {} vs {}", cut(a), cut(b)));
            }
        }
    }
    let parse = |v: &V| {
        let v = serde_json::to_value(v).unwrap_or_default();
        // Records kept as their JSON text are compared as the JSON they hold.
        match &v {
            serde_json::Value::String(s) => serde_json::from_str(s).unwrap_or(v),
            _ => v,
        }
    };
    let mut out = Vec::new();
    walk(String::new(), &parse(a), &parse(b), &mut out);
    out.join("; ")
}
