//! The audit log's integrity: appending rows to their hash chains, and verifying the chains.
//!
//! Every row of `events` belongs to the chain of the source partition it was read from
//! (`<topic>/<partition>`, written by one recorder at a time), numbered 1, 2, ... in recording
//! order. Its `hash` is `sha256(prev_hash || digest)`, where `prev_hash` is the previous row's
//! hash (empty for the first) and `digest` is `foresight_row_digest(...)` over the row's columns,
//! computed by Postgres from the stored values (so that verification needs nothing but the table).
//! An edited row no longer matches its hash; a removed or inserted row breaks the numbering or the
//! link to its predecessor. [`verify`] walks every chain and names the first row that is wrong.

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

/// Appends `rows` to the audit log in the caller's transaction: rows already recorded (same id and
/// event time, e.g. a redelivery) and repeats within the batch are skipped; the rest are chained
/// after the newest row of their chain. Returns how many rows were inserted.
///
/// Chain heads are locked (in chain order, so concurrent recorders cannot deadlock) before the
/// check for rows already recorded, so two recorders overlapping during a rebalance cannot both
/// append the same row.
pub async fn append(tx: &mut PgConnection, rows: &[(Row, Position)]) -> Result<u64, sqlx::Error> {
    let mut seen = HashSet::new();
    let rows: Vec<&(Row, Position)> = rows
        .iter()
        .filter(|(r, _)| seen.insert((r.id, r.time)))
        .collect();
    if rows.is_empty() {
        return Ok(0);
    }
    // Each month's partition exists before its rows arrive.
    let mut months: Vec<DateTime<Utc>> = rows
        .iter()
        .map(|(r, _)| {
            Utc.with_ymd_and_hms(r.time.year(), r.time.month(), 1, 0, 0, 0)
                .single()
                .expect("the first of a month at midnight UTC exists")
        })
        .collect();
    months.sort_unstable();
    months.dedup();
    sqlx::query("SELECT foresight_ensure_month(m) FROM UNNEST($1::timestamptz[]) AS m")
        .bind(&months)
        .execute(&mut *tx)
        .await?;

    let chains: Vec<String> = rows
        .iter()
        .map(|(_, p)| chain_of(&p.topic, p.partition))
        .collect();
    let mut distinct: Vec<String> = chains.clone();
    distinct.sort_unstable();
    distinct.dedup();
    sqlx::query(
        "INSERT INTO audit_chain_heads (chain, seq, hash) \
         SELECT c, 0, '\\x'::bytea FROM UNNEST($1::text[]) AS c ON CONFLICT (chain) DO NOTHING",
    )
    .bind(&distinct)
    .execute(&mut *tx)
    .await?;
    let heads: Vec<(String, i64, Vec<u8>)> = sqlx::query_as(
        "SELECT chain, seq, hash FROM audit_chain_heads WHERE chain = ANY($1) ORDER BY chain FOR UPDATE",
    )
    .bind(&distinct)
    .fetch_all(&mut *tx)
    .await?;
    let mut heads: BTreeMap<String, (i64, Vec<u8>)> =
        heads.into_iter().map(|(c, s, h)| (c, (s, h))).collect();

    // Digests of the rows not yet recorded, computed by Postgres from the values as stored.
    let new: Vec<(i64, Vec<u8>)> = sqlx::query_as(
        "SELECT u.ord, foresight_row_digest(u.id, u.ty, u.entity, u.t, u.v, u.payload, u.topic, u.part, u.off) \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::int[], $6::jsonb[], $7::text[], $8::int[], $9::bigint[]) \
              WITH ORDINALITY AS u(id, ty, entity, t, v, payload, topic, part, off, ord) \
         WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.id = u.id AND e.event_time = u.t) \
         ORDER BY u.ord",
    )
    .bind(rows.iter().map(|(r, _)| r.id).collect::<Vec<_>>())
    .bind(rows.iter().map(|(r, _)| r.ty.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(r, _)| r.entity.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(r, _)| r.time).collect::<Vec<_>>())
    .bind(rows.iter().map(|(r, _)| r.schema_version).collect::<Vec<_>>())
    .bind(rows.iter().map(|(r, _)| &r.payload).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, p)| p.topic.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, p)| p.partition).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, p)| p.offset).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await?;
    if new.is_empty() {
        return Ok(0);
    }

    let n = new.len();
    let (mut ids, mut tys, mut entities, mut times, mut versions, mut payloads) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut topics, mut partitions, mut offsets, mut row_chains, mut seqs, mut prevs, mut hashes) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (ord, digest) in new {
        let i = (ord - 1) as usize;
        let (r, p) = rows[i];
        let chain = &chains[i];
        let head = heads.get_mut(chain).expect("every chain's head is locked");
        let hash = link(&head.1, &digest);
        ids.push(r.id);
        tys.push(r.ty.as_str());
        entities.push(r.entity.as_str());
        times.push(r.time);
        versions.push(r.schema_version);
        payloads.push(&r.payload);
        topics.push(p.topic.as_str());
        partitions.push(p.partition);
        offsets.push(p.offset);
        row_chains.push(chain.as_str());
        seqs.push(head.0 + 1);
        prevs.push(std::mem::replace(&mut head.1, hash.clone()));
        hashes.push(hash);
        head.0 += 1;
    }
    let inserted = sqlx::query(
        "INSERT INTO events (id, type, entity, event_time, schema_version, payload, source_topic, source_partition, source_offset, chain, seq, prev_hash, hash) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::int[], $6::jsonb[], $7::text[], $8::int[], $9::bigint[], $10::text[], $11::bigint[], $12::bytea[], $13::bytea[])",
    )
    .bind(&ids)
    .bind(&tys)
    .bind(&entities)
    .bind(&times)
    .bind(&versions)
    .bind(&payloads)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&row_chains)
    .bind(&seqs)
    .bind(&prevs)
    .bind(&hashes)
    .execute(&mut *tx)
    .await?
    .rows_affected();
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
