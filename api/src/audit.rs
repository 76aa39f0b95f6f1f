//! Verification of the hash-chained audit log (migration `0050_api.sql`): every row's hash
//! is recomputed from its fields and its predecessor's hash, positions must be contiguous, and
//! the chain head must name the last row, so a changed, deleted or inserted row is found.

use futures::TryStreamExt as _;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;

/// One finding of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Finding {
    /// Chain position where it was found (`None` for a row outside the chain).
    pub chain_seq: Option<i64>,
    /// The row (`None` when the finding is about missing rows).
    pub audit_id: Option<i64>,
    /// `changed`, `deleted`, `inserted` or `head_mismatch`.
    pub kind: String,
    /// What exactly.
    pub detail: String,
}

/// The result of a verification.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Report {
    /// Rows checked.
    pub rows: u64,
    /// True when nothing was found.
    pub intact: bool,
    /// What was found (at most 100).
    pub findings: Vec<Finding>,
}

const MAX_FINDINGS: usize = 100;

fn finding(chain_seq: Option<i64>, audit_id: Option<i64>, kind: &str, detail: String) -> Finding {
    Finding {
        chain_seq,
        audit_id,
        kind: kind.to_owned(),
        detail,
    }
}

/// Walks the whole chain.
///
/// # Errors
/// Database errors.
pub async fn verify(pool: &PgPool) -> Result<Report, sqlx::Error> {
    let mut findings = Vec::new();
    let mut rows = 0u64;
    let outside: Vec<(i64,)> = sqlx::query_as(
        "SELECT audit_id FROM audit_log WHERE chain_seq IS NULL OR row_hash IS NULL ORDER BY audit_id LIMIT 100",
    )
    .fetch_all(pool)
    .await?;
    for (id,) in outside {
        findings.push(finding(
            None,
            Some(id),
            "inserted",
            "row written outside the chain (no position or hash)".into(),
        ));
    }
    type Row = (i64, i64, Option<Vec<u8>>, Vec<u8>, Vec<u8>);
    let mut stream = sqlx::query_as::<_, Row>(
        "SELECT chain_seq, audit_id, prev_hash, row_hash,
                wm_audit_digest(coalesce(prev_hash, '\\x'::bytea), audit_id, at, actor, action, entity,
                                entity_id, detail) AS recomputed
         FROM audit_log WHERE chain_seq IS NOT NULL AND row_hash IS NOT NULL ORDER BY chain_seq",
    )
    .fetch(pool);
    let mut expected_seq = 1i64;
    let mut prev_hash: Vec<u8> = Vec::new();
    while let Some((seq, id, prev, hash, recomputed)) = stream.try_next().await? {
        rows += 1;
        if findings.len() < MAX_FINDINGS {
            if seq > expected_seq {
                findings.push(finding(
                    Some(seq),
                    None,
                    "deleted",
                    format!("chain positions {expected_seq}..{} are missing", seq - 1),
                ));
            }
            if prev.as_deref().unwrap_or_default() != prev_hash.as_slice() {
                findings.push(finding(
                    Some(seq),
                    Some(id),
                    if seq > expected_seq {
                        "deleted"
                    } else {
                        "inserted"
                    },
                    "previous-hash link does not match the row before it".into(),
                ));
            }
            if recomputed != hash {
                findings.push(finding(
                    Some(seq),
                    Some(id),
                    "changed",
                    "the row's fields do not hash to its stored hash".into(),
                ));
            }
        }
        expected_seq = seq + 1;
        prev_hash = hash;
    }
    drop(stream);
    let head: Option<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT last_seq, last_hash FROM audit_chain_head")
            .fetch_optional(pool)
            .await?;
    let (last_seq, last_hash) = head.unwrap_or((0, Vec::new()));
    if last_seq != expected_seq - 1 || last_hash != prev_hash {
        findings.push(finding(
            Some(last_seq),
            None,
            "head_mismatch",
            format!(
                "the chain head names position {last_seq}; the table ends at {}",
                expected_seq - 1
            ),
        ));
    }
    findings.truncate(MAX_FINDINGS);
    Ok(Report {
        rows,
        intact: findings.is_empty(),
        findings,
    })
}
