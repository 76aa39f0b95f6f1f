//! The one error type of the database layer and how to classify database errors.

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or could not be reached.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// A statement of the ingest transaction failed.
    #[error("database error while {stage}")]
    Stage {
        /// What was being done.
        stage: &'static str,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },
    /// An ingest journal record cannot be read back (it is left in place).
    #[error("ingest journal record {id} is unreadable")]
    Journal {
        /// `ingest_journal.journal_id`.
        id: i64,
        /// What is wrong with it.
        #[source]
        source: super::journal::JournalError,
    },
    /// A value could not be encoded for storage.
    #[error("cannot encode {field} for meter {meter}")]
    Encode {
        /// Field that failed.
        field: &'static str,
        /// Meter of the reading.
        meter: String,
    },
}

/// Maps a database error to [`StoreError::Stage`] naming what was being done.
pub(crate) fn stage(stage: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Stage { stage, source }
}

/// Returns true for a unique-key violation (SQLSTATE 23505).
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "23505")
}
