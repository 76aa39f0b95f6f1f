//! `ingest_progress`: the highest spool sequence stored per gateway, incarnation and
//! partition (what the worker acknowledges to gateways).

use sqlx::{PgConnection, PgPool};

use super::error::{StoreError, stage};

/// Records spool progress (one upsert; a sequence never goes back).
pub(super) async fn write_progress(
    conn: &mut PgConnection,
    progress: &[(String, String, u16, i64)],
) -> Result<(), StoreError> {
    if progress.is_empty() {
        return Ok(());
    }
    let gateways: Vec<&str> = progress.iter().map(|p| p.0.as_str()).collect();
    let incarnations: Vec<&str> = progress.iter().map(|p| p.1.as_str()).collect();
    let partitions: Vec<i32> = progress.iter().map(|p| i32::from(p.2)).collect();
    let seqs: Vec<i64> = progress.iter().map(|p| p.3).collect();
    sqlx::query(
        "INSERT INTO ingest_progress AS t (gateway_id, incarnation, partition, max_seq, updated_at)
         SELECT g, i, p, s, now()
           FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::int8[]) AS u(g, i, p, s)
         ON CONFLICT (gateway_id, incarnation, partition) DO UPDATE
             SET max_seq = greatest(t.max_seq, excluded.max_seq), updated_at = now()",
    )
    .bind(gateways)
    .bind(incarnations)
    .bind(partitions)
    .bind(seqs)
    .execute(&mut *conn)
    .await
    .map_err(stage("recording spool progress"))?;
    Ok(())
}

/// Every progress row as `(gateway, incarnation, partition, max_seq)`; rows whose partition does
/// not fit a `u16` (not written by this pipeline) are skipped.
///
/// # Errors
/// [`StoreError::Stage`] when the query fails.
pub async fn load_all(pool: &PgPool) -> Result<Vec<(String, String, u16, i64)>, StoreError> {
    let rows: Vec<(String, String, i32, i64)> =
        sqlx::query_as("SELECT gateway_id, incarnation, partition, max_seq FROM ingest_progress")
            .fetch_all(pool)
            .await
            .map_err(stage("loading spool progress"))?;
    Ok(rows
        .into_iter()
        .filter_map(|(g, i, p, s)| Some((g, i, u16::try_from(p).ok()?, s)))
        .collect())
}

/// The highest stored sequence of one gateway, incarnation and partition (`None`: none yet).
///
/// # Errors
/// [`StoreError::Stage`] when the query fails.
pub async fn max_seq(
    pool: &PgPool,
    gateway: &str,
    incarnation: &str,
    partition: u16,
) -> Result<Option<i64>, StoreError> {
    sqlx::query_scalar::<_, i64>(
        "SELECT max_seq FROM ingest_progress
          WHERE gateway_id = $1 AND incarnation = $2 AND partition = $3",
    )
    .bind(gateway)
    .bind(incarnation)
    .bind(i32::from(partition))
    .fetch_optional(pool)
    .await
    .map_err(stage("looking up spool progress"))
}
