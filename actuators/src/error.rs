//! The crate's errors.

/// Why the actuators could not do their work. Classified as the style guide asks: whose fault,
/// and whether a retry can help.
#[derive(Debug, thiserror::Error)]
pub enum ActuatorError {
    /// The configuration cannot work (user's fault; a retry cannot help).
    #[error("actuator configuration: {0}")]
    Config(String),
    /// The ledger (Postgres) failed (external; retried with backoff by the caller).
    #[error("actuation ledger: {0}")]
    Ledger(#[from] sqlx::Error),
    /// A person asked for something the ledger does not allow (user's fault).
    #[error("{0}")]
    Refused(String),
    /// The ledger holds something this build cannot read (internal bug or a newer writer).
    #[error("actuation ledger holds an unreadable row for {id}: {reason}")]
    Corrupt {
        /// The decision.
        id: String,
        /// What was wrong.
        reason: String,
    },
}

impl ActuatorError {
    /// Whether retrying the same call later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ActuatorError::Ledger(_))
    }
}
