//! What processing a message came to, and how it can fail: shared by the
//! message runtime (which acts on them: store the offset, retry in place,
//! dead-letter) and the workflow (which decides them).

use crate::services::ServiceError;

/// What happened to a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The state change was applied and committed.
    Applied,
    /// The message had been applied before; nothing changed.
    Duplicate,
    /// The message went to the dead-letter topic (through the outbox).
    DeadLettered,
    /// The outside service accepted the step but has not settled it; the
    /// step is recorded in `pending_steps` for the settlement runner.
    Deferred,
}

impl Outcome {
    /// The outcome's name on metrics.
    pub fn as_label(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Duplicate => "duplicate",
            Self::DeadLettered => "dead_lettered",
            Self::Deferred => "deferred",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Another transaction changed a row we read. Retry the attempt at once.
    /// `unique_violation` marks an insert that lost; if that keeps happening
    /// it is not a race but a defect, and the message is dead-lettered.
    #[error("lost a race: {reason}")]
    Race { reason: String, unique_violation: bool },
    /// Database or outside service unavailable. Retry the message later; its
    /// partition waits, which keeps per-transfer order.
    #[error("transient failure: {0}")]
    Transient(String),
    /// This message can never be processed as it is. Dead-letter it.
    #[error("{class}: {message}")]
    Permanent { class: &'static str, message: String },
}

impl From<bridge_store::Error> for StageError {
    fn from(error: bridge_store::Error) -> Self {
        if error.is_race() {
            StageError::Race { reason: error.to_string(), unique_violation: error.is_unique_violation() }
        } else if error.is_retryable() {
            StageError::Transient(error.to_string())
        } else {
            StageError::Permanent { class: "processing_error", message: error.to_string() }
        }
    }
}

impl From<sqlx::Error> for StageError {
    fn from(error: sqlx::Error) -> Self {
        bridge_store::Error::from(error).into()
    }
}

impl From<ServiceError> for StageError {
    fn from(error: ServiceError) -> Self {
        if error.is_retryable() {
            StageError::Transient(error.to_string())
        } else {
            StageError::Permanent { class: "service_error", message: error.to_string() }
        }
    }
}
