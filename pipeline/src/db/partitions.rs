//! Monthly partitions of `readings`.

use sqlx::PgPool;

use super::error::{StoreError, stage};

/// Creates monthly partitions of `readings` from last month to `months_ahead` months ahead
/// (no-op under TimescaleDB). Returns how many it created.
///
/// # Errors
/// Returns [`StoreError::Stage`] when the database refuses.
pub async fn ensure_partitions(pool: &PgPool, months_ahead: i32) -> Result<i32, StoreError> {
    let created: i32 = sqlx::query_scalar(
        "SELECT wm_ensure_reading_partitions(
             (date_trunc('month', now()) - interval '1 month')::date, $1 + 2)",
    )
    .bind(months_ahead)
    .fetch_one(pool)
    .await
    .map_err(stage("creating reading partitions"))?;
    Ok(created)
}
