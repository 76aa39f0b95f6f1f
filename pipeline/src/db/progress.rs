//! `ingest_progress`: the highest spool sequence stored per gateway, incarnation and
//! partition (what the worker acknowledges to gateways).

use sqlx::PgConnection;

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
