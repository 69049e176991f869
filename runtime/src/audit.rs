//! The audit log's integrity: appending rows to their hash chains, and verifying the chains.
//!
//! Every row of `events` belongs to the chain of the source partition it was read from
//! (`<topic>/<partition>`, written by one recorder at a time), numbered 1, 2, ... in recording
//! order. Its `hash` is `sha256(prev_hash || digest)`, where `prev_hash` is the previous row's
//! hash (empty for the first) and `digest` is `foresight_row_digest(...)` over the row's columns.
//! Verification recomputes the digest in Postgres from the stored values, so it needs nothing but
//! the table; appending computes the same bytes here from the values it is about to store (the
//! jsonb text form reproduced exactly, see [`jsonb_text`]), so each payload crosses the wire once,
//! in a `COPY`. An edited row no longer matches its hash; a removed or inserted row breaks the
//! numbering or the link to its predecessor. [`verify`] walks every chain and names the first row
//! that is wrong.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Datelike, TimeZone, Utc};
use futures::TryStreamExt;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool, Row as _};
use uuid::Uuid;

use crate::recorder::{Position, Row};

/// The chain a source partition's rows belong to.
pub fn chain_of(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

fn link(prev: &[u8], digest: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(digest);
    h.finalize().to_vec()
}

/// An event time as Postgres stores it: whole microseconds, counted from 2000-01-01 the way the
/// driver encodes it (so the text forms below match the stored value exactly).
fn stored_time(t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let epoch = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).single()?;
    let micros = (t - epoch).num_microseconds()?;
    Some(epoch + chrono::TimeDelta::microseconds(micros))
}

/// `payload::text` of a jsonb value: what Postgres prints for it, byte for byte (keys ordered by
/// length, then bytes; `", "` and `": "` between items; numbers as `numeric` prints them).
pub fn jsonb_text(v: &serde_json::Value) -> String {
    let mut out = String::new();
    write_jsonb(v, &mut out);
    out
}

fn write_jsonb(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => push_numeric(&n.to_string(), out),
        Value::String(s) => push_json_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_jsonb(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                push_json_string(k, out);
                out.push_str(": ");
                write_jsonb(&map[k], out);
            }
            out.push('}');
        }
    }
}

/// A JSON string as Postgres escapes it (`escape_json`).
fn push_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A JSON number literal as `numeric` prints it: plain decimal (no exponent) with as many
/// decimals as the literal carries after its exponent is applied, and no sign on zero.
fn push_numeric(literal: &str, out: &mut String) {
    let (negative, rest) = match literal.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, literal),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (
            &rest[..i],
            rest[i + 1..]
                .parse::<i64>()
                .expect("a JSON exponent is an integer"),
        ),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits: String = format!("{int}{frac}");
    // value = digits × 10^shift, printed with `scale` decimals.
    let shift = exponent - frac.len() as i64;
    let scale = (-shift).max(0) as usize;
    let mut text = digits;
    if shift > 0 {
        text.extend(std::iter::repeat_n('0', shift as usize));
    }
    if text.len() <= scale {
        let pad = scale + 1 - text.len();
        text.insert_str(0, &"0".repeat(pad));
    }
    let (int, frac) = text.split_at(text.len() - scale);
    let int = int.trim_start_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let zero = int == "0" && frac.bytes().all(|b| b == b'0');
    if negative && !zero {
        out.push('-');
    }
    out.push_str(int);
    if scale > 0 {
        out.push('.');
        out.push_str(frac);
    }
}

/// Whether an event time can be recorded: Postgres and this module agree on its text form.
pub fn recordable(t: DateTime<Utc>) -> bool {
    stored_time(t).is_some_and(|t| (1..=9999).contains(&t.year()))
}

/// `foresight_row_digest` of a row, computed here from the values it will be stored as; `None`
/// when its event time is not [`recordable`].
fn row_digest(r: &Row, p: &Position, payload: &str) -> Option<Vec<u8>> {
    use std::fmt::Write as _;
    if !recordable(r.time) {
        return None;
    }
    let t = stored_time(r.time)?;
    // The columns' text forms joined by U+001F, as `foresight_row_digest` joins them; the
    // numbers and the time are formatted into one scratch string.
    const SEP: &[u8] = "\u{1f}".as_bytes();
    let mut scratch = String::with_capacity(64);
    let mut h = Sha256::new();
    let _ = write!(scratch, "{}", r.id);
    h.update(scratch.as_bytes());
    for s in [r.ty.as_str(), r.entity.as_str()] {
        h.update(SEP);
        h.update(s.as_bytes());
    }
    scratch.clear();
    let _ = write!(
        scratch,
        "\u{1f}{}\u{1f}{}\u{1f}",
        t.format("%Y-%m-%dT%H:%M:%S%.6f"),
        r.schema_version
    );
    h.update(scratch.as_bytes());
    h.update(payload.as_bytes());
    h.update(SEP);
    h.update(p.topic.as_bytes());
    scratch.clear();
    let _ = write!(scratch, "\u{1f}{}\u{1f}{}", p.partition, p.offset);
    h.update(scratch.as_bytes());
    Some(h.finalize().to_vec())
}

/// One row of `COPY events (...) FROM STDIN` (text format).
#[allow(clippy::too_many_arguments)] // One argument per column group of the row.
fn copy_row(
    out: &mut String,
    r: &Row,
    p: &Position,
    chain: &str,
    seq: i64,
    prev: &[u8],
    hash: &[u8],
    payload: &str,
) {
    use std::fmt::Write as _;
    let field = |out: &mut String, s: &str| {
        // Runs without a character COPY escapes are copied whole.
        let mut rest = s;
        while let Some(i) = rest.find(['\\', '\t', '\n', '\r']) {
            out.push_str(&rest[..i]);
            out.push_str(match rest.as_bytes()[i] {
                b'\\' => "\\\\",
                b'\t' => "\\t",
                b'\n' => "\\n",
                _ => "\\r",
            });
            rest = &rest[i + 1..];
        }
        out.push_str(rest);
        out.push('\t');
    };
    let bytea = |out: &mut String, b: &[u8]| {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        out.push_str("\\\\x");
        for x in b {
            out.push(char::from(HEX[usize::from(x >> 4)]));
            out.push(char::from(HEX[usize::from(x & 15)]));
        }
    };
    let _ = write!(out, "{}\t", r.id);
    field(out, &r.ty);
    field(out, &r.entity);
    let t = stored_time(r.time).unwrap_or(r.time);
    let _ = write!(
        out,
        "{}\t{}\t",
        t.format("%Y-%m-%d %H:%M:%S%.6f+00"),
        r.schema_version
    );
    field(out, payload);
    field(out, &p.topic);
    let _ = write!(out, "{}\t{}\t", p.partition, p.offset);
    field(out, chain);
    let _ = write!(out, "{seq}\t");
    bytea(out, prev);
    out.push('\t');
    bytea(out, hash);
    out.push('\n');
}

/// The first instants of the months of `times`, each once, in order.
fn months_of(times: impl IntoIterator<Item = DateTime<Utc>>) -> Vec<DateTime<Utc>> {
    let mut months: Vec<DateTime<Utc>> = times
        .into_iter()
        .map(|t| {
            Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
                .single()
                .expect("the first of a month at midnight UTC exists")
        })
        .collect();
    months.sort_unstable();
    months.dedup();
    months
}

/// Creates the monthly partitions of `events` that rows at `times` go into, if they do not exist.
pub async fn ensure_months<'c>(
    db: impl sqlx::PgExecutor<'c>,
    times: impl IntoIterator<Item = DateTime<Utc>>,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT foresight_ensure_month(m) FROM UNNEST($1::timestamptz[]) AS m")
        .bind(months_of(times))
        .execute(db)
        .await?;
    Ok(())
}

/// Appends `rows` to the audit log in the caller's transaction: rows already recorded (same id and
/// event time, e.g. a redelivery) and repeats within the batch are skipped; the rest are chained
/// after the newest row of their chain. Returns how many rows were inserted.
///
/// Chain heads are locked (in chain order, so concurrent recorders cannot deadlock) before any
/// row is written, so two recorders overlapping during a rebalance cannot both append the same
/// row. The rows are written on the assumption that none is recorded yet (the usual case: a
/// recorder reads each offset once), with no lookup per row; a row already there fails the
/// `COPY` on the primary key, and then the batch is written again without the rows recorded.
pub async fn append(tx: &mut PgConnection, rows: &[(Row, Position)]) -> Result<u64, sqlx::Error> {
    let mut seen = HashSet::new();
    let rows: Vec<&(Row, Position)> = rows
        .iter()
        .filter(|(r, _)| seen.insert((r.id, r.time)))
        .collect();
    if rows.is_empty() {
        return Ok(0);
    }
    let chains: Vec<String> = rows
        .iter()
        .map(|(_, p)| chain_of(&p.topic, p.partition))
        .collect();
    let mut distinct: Vec<String> = chains.clone();
    distinct.sort_unstable();
    distinct.dedup();
    // One round trip: each month's partition exists, each chain's head exists and is locked.
    let heads: Vec<(String, i64, Vec<u8>)> =
        sqlx::query_as("SELECT head_chain, head_seq, head_hash FROM foresight_lock_chains($1, $2)")
            .bind(&distinct)
            .bind(months_of(rows.iter().map(|(r, _)| r.time)))
            .fetch_all(&mut *tx)
            .await?;
    let heads: BTreeMap<String, (i64, Vec<u8>)> =
        heads.into_iter().map(|(c, s, h)| (c, (s, h))).collect();

    // Each row's digest, as Postgres' `foresight_row_digest` computes it from the stored values
    // (`verify` recomputes it there), and its payload's text.
    let mut digests: Vec<Vec<u8>> = Vec::with_capacity(rows.len());
    let mut texts: Vec<String> = Vec::with_capacity(rows.len());
    for (r, p) in &rows {
        let payload = jsonb_text(&r.payload);
        let digest = row_digest(r, p, &payload).ok_or_else(|| {
            sqlx::Error::Encode(
                format!(
                    "event {} has a time ({}) outside the audit log's years 1-9999",
                    r.id, r.time
                )
                .into(),
            )
        })?;
        digests.push(digest);
        texts.push(payload);
    }
    let batch = Batch {
        rows: &rows,
        chains: &chains,
        digests: &digests,
        texts: &texts,
    };

    sqlx::query("SAVEPOINT foresight_append")
        .execute(&mut *tx)
        .await?;
    let all: Vec<usize> = (0..rows.len()).collect();
    let (inserted, heads) = match batch.copy(tx, &all, heads.clone()).await {
        Ok(done) => done,
        Err(e) if is_unique_violation(&e) => {
            // Some rows are recorded already (a redelivery): write only the others.
            sqlx::query("ROLLBACK TO SAVEPOINT foresight_append")
                .execute(&mut *tx)
                .await?;
            let fresh: Vec<i64> = sqlx::query_scalar(
                "SELECT u.ord FROM UNNEST($1::uuid[], $2::timestamptz[]) WITH ORDINALITY AS u(id, t, ord) \
                 WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.id = u.id AND e.event_time = u.t) \
                 ORDER BY u.ord",
            )
            .bind(rows.iter().map(|(r, _)| r.id).collect::<Vec<_>>())
            .bind(rows.iter().map(|(r, _)| r.time).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await?;
            if fresh.is_empty() {
                return Ok(0);
            }
            let fresh: Vec<usize> = fresh.into_iter().map(|ord| (ord - 1) as usize).collect();
            batch.copy(tx, &fresh, heads).await?
        }
        Err(e) => return Err(e),
    };
    let (c, s, h): (Vec<&str>, Vec<i64>, Vec<&[u8]>) = heads
        .iter()
        .map(|(c, (s, h))| (c.as_str(), *s, h.as_slice()))
        .fold((vec![], vec![], vec![]), |(mut c, mut s, mut h), x| {
            c.push(x.0);
            s.push(x.1);
            h.push(x.2);
            (c, s, h)
        });
    sqlx::query(
        "UPDATE audit_chain_heads h SET seq = u.seq, hash = u.hash \
         FROM UNNEST($1::text[], $2::bigint[], $3::bytea[]) AS u(chain, seq, hash) WHERE h.chain = u.chain",
    )
    .bind(&c)
    .bind(&s)
    .bind(&h)
    .execute(&mut *tx)
    .await?;
    Ok(inserted)
}

/// Whether a write failed on a unique key (a row recorded already).
fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

/// A batch of rows to append, with what was computed for each row once.
struct Batch<'a> {
    rows: &'a [&'a (Row, Position)],
    chains: &'a [String],
    digests: &'a [Vec<u8>],
    texts: &'a [String],
}

impl Batch<'_> {
    /// Chains the rows at `which` (in order) after `heads` and writes them in one `COPY`, so each
    /// payload crosses the wire once; the rows are sent as they are prepared, a chunk at a time,
    /// so Postgres stores a chunk while the next is prepared. Returns the rows inserted and the
    /// chains' new heads.
    async fn copy(
        &self,
        tx: &mut PgConnection,
        which: &[usize],
        mut heads: BTreeMap<String, (i64, Vec<u8>)>,
    ) -> Result<(u64, BTreeMap<String, (i64, Vec<u8>)>), sqlx::Error> {
        const CHUNK: usize = 128 * 1024;
        let mut copy = tx
            .copy_in_raw(
                "COPY events (id, type, entity, event_time, schema_version, payload, source_topic, \
                 source_partition, source_offset, chain, seq, prev_hash, hash) FROM STDIN",
            )
            .await?;
        let mut data = String::with_capacity(CHUNK + 4096);
        for &i in which {
            let (r, p) = self.rows[i];
            let chain = self.chains[i].as_str();
            let head = heads.get_mut(chain).expect("every chain's head is locked");
            let hash = link(&head.1, &self.digests[i]);
            head.0 += 1;
            copy_row(
                &mut data,
                r,
                p,
                chain,
                head.0,
                &head.1,
                &hash,
                &self.texts[i],
            );
            head.1 = hash;
            if data.len() >= CHUNK {
                copy.send(std::mem::take(&mut data).into_bytes()).await?;
                data.reserve(CHUNK + 4096);
            }
        }
        if !data.is_empty() {
            copy.send(data.into_bytes()).await?;
        }
        let inserted = copy.finish().await?;
        Ok((inserted, heads))
    }
}

/// The first thing wrong with a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// The chain.
    pub chain: String,
    /// Position in the chain where it breaks.
    pub seq: i64,
    /// The row there (absent when the row expected there is missing).
    pub id: Option<Uuid>,
    /// Its event time.
    pub event_time: Option<DateTime<Utc>>,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "chain {} breaks at row {}", self.chain, self.seq)?;
        if let (Some(id), Some(t)) = (self.id, self.event_time) {
            write!(f, " (event {id} at {t})")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verification {
    /// Rows checked.
    pub rows: u64,
    /// Chains checked.
    pub chains: u64,
    /// The first break of each broken chain, in chain order.
    pub breaks: Vec<Break>,
}

/// Walks every chain of the audit log in order, recomputing each row's digest (in Postgres, from
/// the stored values) and hash, and checking the numbering, the links and the chain heads.
pub async fn verify(pool: &PgPool) -> Result<Verification, sqlx::Error> {
    let mut report = Verification::default();
    let mut rows = sqlx::query(
        "SELECT chain, seq, id, event_time, prev_hash, hash, \
                foresight_row_digest(id, type, entity, event_time, schema_version, payload, source_topic, source_partition, source_offset) AS digest \
         FROM events ORDER BY chain, seq",
    )
    .fetch(pool);
    struct At {
        chain: String,
        seq: i64,
        hash: Vec<u8>,
        broken: bool,
    }
    let mut at: Option<At> = None;
    let mut ends: BTreeMap<String, (i64, Vec<u8>)> = BTreeMap::new();
    while let Some(row) = rows.try_next().await? {
        report.rows += 1;
        let chain: String = row.get("chain");
        let seq: i64 = row.get("seq");
        let id: Uuid = row.get("id");
        let time: DateTime<Utc> = row.get("event_time");
        let prev: Vec<u8> = row.get("prev_hash");
        let hash: Vec<u8> = row.get("hash");
        let digest: Vec<u8> = row.get("digest");
        if at.as_ref().is_none_or(|a| a.chain != chain) {
            if let Some(a) = at.take() {
                ends.insert(a.chain, (a.seq, a.hash));
            }
            report.chains += 1;
            at = Some(At {
                chain: chain.clone(),
                seq: 0,
                hash: Vec::new(),
                broken: false,
            });
        }
        let a = at.as_mut().expect("set above");
        if !a.broken {
            let reason = if seq != a.seq + 1 {
                Some(format!(
                    "row {} expected, found row {seq} (rows missing or renumbered)",
                    a.seq + 1
                ))
            } else if prev != a.hash {
                Some("does not link to the row before it".to_owned())
            } else if link(&prev, &digest) != hash {
                Some("its content does not match its hash (edited)".to_owned())
            } else {
                None
            };
            if let Some(reason) = reason {
                a.broken = true;
                report.breaks.push(Break {
                    chain: chain.clone(),
                    seq: a.seq + 1,
                    id: Some(id),
                    event_time: Some(time),
                    reason,
                });
            }
        }
        a.seq = seq;
        a.hash = hash;
    }
    if let Some(a) = at.take() {
        ends.insert(a.chain, (a.seq, a.hash));
    }
    drop(rows);
    // Rows removed from the end show against the chain heads.
    let heads: Vec<(String, i64, Vec<u8>)> =
        sqlx::query_as("SELECT chain, seq, hash FROM audit_chain_heads ORDER BY chain")
            .fetch_all(pool)
            .await?;
    for (chain, seq, hash) in heads {
        if report.breaks.iter().any(|b| b.chain == chain) {
            continue;
        }
        let (last, last_hash) = ends.get(&chain).cloned().unwrap_or((0, Vec::new()));
        if last != seq || (seq > 0 && last_hash != hash) {
            report.breaks.push(Break {
                chain,
                seq: last + 1,
                id: None,
                event_time: None,
                reason: format!("the chain ends at row {last}, its head says {seq} (rows removed)"),
            });
        }
    }
    report.breaks.sort_by(|a, b| a.chain.cmp(&b.chain));
    Ok(report)
}
