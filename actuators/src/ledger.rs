//! The actuation ledger in Postgres (`migrations/0003_actuations.sql`): claims, outcomes, group
//! usage and the kill switch.

use chrono::{DateTime, Utc};
use foresight_events::{ActuationOutcome, Decision, EventId};
use sqlx::{PgPool, Postgres, Row as _, pool::PoolConnection, types::Json};

use crate::{error::ActuatorError, plan::Usage};

/// Where a decision stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Shadow mode or a dry-run actuator: nothing was changed.
    DryRun,
    /// Waiting for `foresight approve`.
    Proposed,
    /// Not applied: kill switch, staleness, limits, or the target said not now.
    Deferred,
    /// Claimed; the action is being applied (or its instance crashed).
    Claimed,
    /// Applied.
    Applied,
    /// Tried and failed.
    Failed,
    /// Its inverse is being applied (or its instance crashed).
    RollingBack,
    /// Applied, then undone.
    RolledBack,
    /// Needs a person.
    Unknown,
}

impl State {
    /// The state's name in the ledger.
    pub fn as_str(&self) -> &'static str {
        match self {
            State::DryRun => "dry_run",
            State::Proposed => "proposed",
            State::Deferred => "deferred",
            State::Claimed => "claimed",
            State::Applied => "applied",
            State::Failed => "failed",
            State::RollingBack => "rolling_back",
            State::RolledBack => "rolled_back",
            State::Unknown => "unknown",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            State::DryRun,
            State::Proposed,
            State::Deferred,
            State::Claimed,
            State::Applied,
            State::Failed,
            State::RollingBack,
            State::RolledBack,
            State::Unknown,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    /// Whether an instance is (or was, before it crashed) in the middle of acting.
    pub fn in_progress(&self) -> bool {
        matches!(self, State::Claimed | State::RollingBack)
    }
}

/// One decision's row.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The decision's id.
    pub decision_id: EventId,
    /// The decision.
    pub decision: Decision,
    /// Where it stands.
    pub state: State,
    /// The latest detail.
    pub detail: String,
    /// The actuator's rollback memo.
    pub memo: Option<serde_json::Value>,
    /// Whether it no longer counts against the blast radius.
    pub settled: bool,
    /// Every outcome emitted, in order.
    pub outcomes: Vec<ActuationOutcome>,
}

/// The kill switch and what the ledger holds, for `foresight actuation status`.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// Whether actuation is stopped.
    pub stopped: bool,
    /// Why, as given to `stop`.
    pub reason: String,
    /// When the switch last changed.
    pub changed_at: DateTime<Utc>,
    /// Decisions per state.
    pub states: Vec<(String, i64)>,
}

/// A new row.
pub(crate) struct NewEntry<'a> {
    pub(crate) id: EventId,
    pub(crate) decision: &'a Decision,
    pub(crate) mode: &'a str,
    pub(crate) actuator: &'a str,
    pub(crate) group: &'a str,
    pub(crate) state: State,
    pub(crate) detail: &'a str,
    pub(crate) started: bool,
    pub(crate) outcome: Option<&'a ActuationOutcome>,
}

/// The advisory lock a session holds on a decision while acting on it. Dropped without
/// [`DecisionLock::release`] (an error, a cancelled future), it closes its connection, which
/// releases the lock: a pooled connection must never keep one.
pub(crate) struct DecisionLock {
    conn: Option<PoolConnection<Postgres>>,
    key: i64,
}

impl DecisionLock {
    pub(crate) fn conn(&mut self) -> &mut PoolConnection<Postgres> {
        self.conn.as_mut().expect("held until released")
    }

    /// Releases the lock and returns the connection to the pool.
    pub(crate) async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(self.key)
                .execute(&mut *conn)
                .await;
            if unlocked.is_err() {
                drop(conn.detach());
            }
        }
    }
}

impl Drop for DecisionLock {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            drop(conn.detach());
        }
    }
}

/// The advisory-lock key of a decision: the first 8 bytes of its (v5, hash-derived) id.
fn lock_key(id: &EventId) -> i64 {
    let b = id.as_bytes();
    i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

const COLUMNS: &str = "decision_id, decision, state, detail, memo, settled, outcomes";

/// The ledger.
#[derive(Debug, Clone)]
pub struct Ledger {
    pool: PgPool,
}

fn entry(row: &sqlx::postgres::PgRow) -> Result<Entry, ActuatorError> {
    let id: uuid::Uuid = row.try_get("decision_id")?;
    let corrupt = |reason: String| ActuatorError::Corrupt {
        id: id.to_string(),
        reason,
    };
    let state: String = row.try_get("state")?;
    let Json(decision): Json<Decision> = row
        .try_get("decision")
        .map_err(|e| corrupt(format!("decision: {e}")))?;
    let Json(outcomes): Json<Vec<ActuationOutcome>> = row
        .try_get("outcomes")
        .map_err(|e| corrupt(format!("outcomes: {e}")))?;
    Ok(Entry {
        decision_id: EventId(id),
        decision,
        state: State::parse(&state).ok_or_else(|| corrupt(format!("unknown state {state}")))?,
        detail: row.try_get("detail")?,
        memo: row
            .try_get::<Option<Json<serde_json::Value>>, _>("memo")?
            .map(|j| j.0),
        settled: row.try_get("settled")?,
        outcomes,
    })
}

impl Ledger {
    /// The ledger in `pool`'s database (migrated).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Whether the kill switch is engaged.
    pub async fn stopped(&self) -> Result<bool, ActuatorError> {
        Ok(
            sqlx::query_scalar("SELECT stopped FROM actuation_control WHERE id")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Engages or releases the kill switch. Waits for claims in progress (they hold the row
    /// FOR SHARE); once this returns, no further action starts.
    pub async fn set_stopped(&self, stopped: bool, reason: &str) -> Result<(), ActuatorError> {
        sqlx::query(
            "UPDATE actuation_control SET stopped = $1, reason = $2, changed_at = clock_timestamp() WHERE id",
        )
        .bind(stopped)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The switch and the count of decisions per state.
    pub async fn status(&self) -> Result<Status, ActuatorError> {
        let row = sqlx::query("SELECT stopped, reason, changed_at FROM actuation_control WHERE id")
            .fetch_one(&self.pool)
            .await?;
        let states: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM actuations GROUP BY state ORDER BY state")
                .fetch_all(&self.pool)
                .await?;
        Ok(Status {
            stopped: row.try_get("stopped")?,
            reason: row.try_get("reason")?,
            changed_at: row.try_get("changed_at")?,
            states,
        })
    }

    /// One decision's row.
    pub async fn get(&self, id: &EventId) -> Result<Option<Entry>, ActuatorError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM actuations WHERE decision_id = $1"
        )))
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(entry).transpose()
    }

    /// Takes the decision's advisory lock, waiting while another session holds it (it is
    /// acting on the same decision; its outcome is then in the row once we hold the lock).
    pub(crate) async fn lock(&self, id: &EventId) -> Result<DecisionLock, ActuatorError> {
        let mut conn = self.pool.acquire().await?;
        let key = lock_key(id);
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(key)
            .execute(&mut *conn)
            .await?;
        Ok(DecisionLock {
            conn: Some(conn),
            key,
        })
    }

    /// Takes the decision's advisory lock if it is free.
    pub(crate) async fn try_lock(
        &self,
        id: &EventId,
    ) -> Result<Option<DecisionLock>, ActuatorError> {
        let mut conn = self.pool.acquire().await?;
        let key = lock_key(id);
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut *conn)
            .await?;
        Ok(got.then_some(DecisionLock {
            conn: Some(conn),
            key,
        }))
    }

    /// Decisions some instance was acting on: claimed or rolling back without an outcome.
    pub(crate) async fn in_progress(&self) -> Result<Vec<EventId>, ActuatorError> {
        let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT decision_id FROM actuations WHERE state IN ('claimed', 'rolling_back') ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.into_iter().map(EventId).collect())
    }

    /// Applied actions still in their verification window.
    pub(crate) async fn verifying(
        &self,
    ) -> Result<Vec<(EventId, Decision, DateTime<Utc>)>, ActuatorError> {
        let rows = sqlx::query(
            "SELECT decision_id, decision, verify_until FROM actuations \
             WHERE state = 'applied' AND NOT settled AND verify_until IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for row in rows {
            let id: uuid::Uuid = row.try_get("decision_id")?;
            let Json(decision): Json<Decision> =
                row.try_get("decision")
                    .map_err(|e| ActuatorError::Corrupt {
                        id: id.to_string(),
                        reason: e.to_string(),
                    })?;
            out.push((EventId(id), decision, row.try_get("verify_until")?));
        }
        Ok(out)
    }

    /// Inserts a row unless the decision has one; returns the existing row if it has.
    pub(crate) async fn insert(
        &self,
        conn: &mut sqlx::PgConnection,
        e: NewEntry<'_>,
    ) -> Result<Option<Entry>, ActuatorError> {
        let outcomes: Vec<&ActuationOutcome> = e.outcome.into_iter().collect();
        let inserted = sqlx::query(
            "INSERT INTO actuations (decision_id, entity, target, action, policy, mode, actuator, grp, decision, state, detail, started_at, settled, outcomes) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, CASE WHEN $12 THEN clock_timestamp() END, NOT $12, $13) \
             ON CONFLICT (decision_id) DO NOTHING",
        )
        .bind(e.id.0)
        .bind(e.decision.entity.as_str())
        .bind(e.decision.action.target.as_str())
        .bind(e.decision.action.kind.as_str())
        .bind(&e.decision.policy)
        .bind(e.mode)
        .bind(e.actuator)
        .bind(e.group)
        .bind(Json(e.decision))
        .bind(e.state.as_str())
        .bind(e.detail)
        .bind(e.started)
        .bind(Json(&outcomes))
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(None);
        }
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM actuations WHERE decision_id = $1"
        )))
        .bind(e.id.0)
        .fetch_one(&mut *conn)
        .await?;
        entry(&row).map(Some)
    }

    /// The row, locked for update within `conn`'s transaction.
    pub(crate) async fn get_for_update(
        &self,
        conn: &mut sqlx::PgConnection,
        id: &EventId,
    ) -> Result<Option<Entry>, ActuatorError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM actuations WHERE decision_id = $1 FOR UPDATE"
        )))
        .bind(id.0)
        .fetch_optional(&mut *conn)
        .await?;
        row.as_ref().map(entry).transpose()
    }

    /// Within a claim's transaction: the kill switch (read FOR SHARE, so a concurrent `stop`
    /// waits for this claim and every later claim sees it), and the group, locked, with its usage.
    pub(crate) async fn gate(
        &self,
        conn: &mut sqlx::PgConnection,
        group: &str,
        per: std::time::Duration,
    ) -> Result<(bool, Usage), ActuatorError> {
        let stopped: bool =
            sqlx::query_scalar("SELECT stopped FROM actuation_control WHERE id FOR SHARE")
                .fetch_one(&mut *conn)
                .await?;
        sqlx::query("INSERT INTO actuation_groups (name) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(group)
            .execute(&mut *conn)
            .await?;
        sqlx::query("SELECT name FROM actuation_groups WHERE name = $1 FOR UPDATE")
            .bind(group)
            .execute(&mut *conn)
            .await?;
        let now: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&mut *conn)
            .await?;
        let since = now - chrono::Duration::from_std(per).unwrap_or(chrono::Duration::MAX);
        let recent_starts: Vec<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT started_at FROM actuations WHERE grp = $1 AND started_at > $2 ORDER BY started_at",
        )
        .bind(group)
        .bind(since)
        .fetch_all(&mut *conn)
        .await?;
        let open: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT target FROM actuations WHERE grp = $1 AND NOT settled ORDER BY target",
        )
        .bind(group)
        .fetch_all(&mut *conn)
        .await?;
        let open_targets = open
            .into_iter()
            .filter_map(|t| foresight_events::EntityId::new(t).ok())
            .collect();
        Ok((
            stopped,
            Usage {
                now,
                recent_starts,
                open_targets,
            },
        ))
    }

    /// Moves a row to `state`, appending `outcomes`.
    #[allow(clippy::too_many_arguments)] // One column each; a struct would only rename them.
    pub(crate) async fn update(
        &self,
        conn: &mut sqlx::PgConnection,
        id: &EventId,
        state: State,
        detail: &str,
        settled: bool,
        started: bool,
        verify_until: Option<DateTime<Utc>>,
        memo: Option<&serde_json::Value>,
        outcomes: &[ActuationOutcome],
    ) -> Result<(), ActuatorError> {
        sqlx::query(
            "UPDATE actuations SET state = $2, detail = $3, settled = $4, \
             started_at = CASE WHEN $5 THEN clock_timestamp() ELSE started_at END, \
             verify_until = COALESCE($6, verify_until), memo = COALESCE($7, memo), \
             outcomes = outcomes || $8, updated_at = clock_timestamp() \
             WHERE decision_id = $1",
        )
        .bind(id.0)
        .bind(state.as_str())
        .bind(detail)
        .bind(settled)
        .bind(started)
        .bind(verify_until)
        .bind(memo.map(Json))
        .bind(Json(outcomes))
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Marks an applied action verified (settled), noting why.
    pub(crate) async fn settle(&self, id: &EventId, note: &str) -> Result<(), ActuatorError> {
        sqlx::query(
            "UPDATE actuations SET settled = true, detail = detail || '; ' || $2, updated_at = clock_timestamp() \
             WHERE decision_id = $1 AND state = 'applied'",
        )
        .bind(id.0)
        .bind(note)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
