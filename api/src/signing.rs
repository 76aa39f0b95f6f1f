//! Signed requests of external systems (IF-METER-004): `model::auth`'s canonical string
//! (method, path, timestamp, nonce, body hash) under a per-client HMAC secret, a ±skew window,
//! and a nonce store in PostgreSQL shared by every API node, so a captured request cannot be
//! replayed on this node or another.

use axum::http::{HeaderMap, Method};
use model::auth::{RequestAuthError, SignedHeaders, verify_request};
use sqlx::PgPool;
use time::OffsetDateTime;

use crate::auth::{Principal, Role, Scope};
use crate::error::ApiError;

/// `X-Client-Id`: the signing client.
pub const CLIENT_HEADER: &str = "x-client-id";

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Why a signed request failed, with the client it claimed to be (for the failure counter).
#[derive(Debug)]
pub struct SignFailure {
    /// The claimed client id (`-` when none).
    pub client: String,
    /// The refusal.
    pub error: ApiError,
}

fn refuse(client: &str, code: &'static str, detail: impl Into<String>) -> SignFailure {
    SignFailure {
        client: client.to_owned(),
        error: ApiError::Unauthenticated {
            code,
            detail: detail.into(),
        },
    }
}

/// Checks a signed request and records its nonce; returns the client as a principal with the
/// integration role and the client's organisation as scope.
///
/// # Errors
/// [`SignFailure`] for an unknown or disabled client, a bad or stale signature, or a replayed
/// nonce; database failures are internal errors.
pub async fn verify(
    pool: &PgPool,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
    max_skew_s: u64,
) -> Result<Principal, SignFailure> {
    let client = header(headers, CLIENT_HEADER).unwrap_or("-").to_owned();
    if client == "-" {
        return Err(refuse(&client, "missing_header", "missing X-Client-Id"));
    }
    let row: Option<(String, Option<String>, bool)> =
        sqlx::query_as("SELECT secret, org, enabled FROM api_clients WHERE client_id = $1")
            .bind(&client)
            .fetch_optional(pool)
            .await
            .map_err(|e| SignFailure {
                client: client.clone(),
                error: ApiError::Internal(format!("reading api_clients: {e}")),
            })?;
    let Some((secret, org, enabled)) = row else {
        return Err(refuse(
            &client,
            "unknown_client",
            format!("unknown client {client:?}"),
        ));
    };
    if !enabled {
        return Err(refuse(
            &client,
            "unknown_client",
            format!("client {client:?} is disabled"),
        ));
    }
    let signed = SignedHeaders {
        timestamp: header(headers, "x-timestamp"),
        nonce: header(headers, "x-nonce"),
        signature: header(headers, "x-signature"),
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let ts = verify_request(
        secret.as_bytes(),
        method.as_str(),
        path,
        signed,
        body,
        now,
        max_skew_s,
    )
    .map_err(|e| refuse(&client, e.code(), e.to_string()))?;
    let nonce = signed.nonce.unwrap_or_default();
    let skew = i64::try_from(max_skew_s).unwrap_or(i64::MAX);
    let expires = OffsetDateTime::from_unix_timestamp(ts.saturating_add(skew))
        .unwrap_or(OffsetDateTime::now_utc());
    // The insert is the check: the primary key makes a nonce usable once across every node.
    // A nonce whose window has passed may be reused (its request fails the skew check anyway).
    let inserted = sqlx::query(
        "INSERT INTO api_nonces (client_id, nonce, expires_at) VALUES ($1, $2, $3)
         ON CONFLICT (client_id, nonce) DO UPDATE SET expires_at = EXCLUDED.expires_at
             WHERE api_nonces.expires_at < now()",
    )
    .bind(&client)
    .bind(nonce)
    .bind(expires)
    .execute(pool)
    .await
    .map_err(|e| SignFailure {
        client: client.clone(),
        error: ApiError::Internal(format!("recording a nonce: {e}")),
    })?;
    if inserted.rows_affected() == 0 {
        let e = RequestAuthError::Replay;
        return Err(refuse(
            &client,
            e.code(),
            "nonce already used: replayed request refused",
        ));
    }
    Ok(Principal {
        subject: client,
        roles: vec![Role::Integration],
        scope: match org {
            Some(org) => Scope {
                org: Some(org),
                areas: Vec::new(),
            },
            None => Scope::all(),
        },
        second_factor: false,
    })
}

/// Deletes nonces whose window has passed (called periodically by every node; idempotent).
///
/// # Errors
/// Database errors.
pub async fn purge_nonces(pool: &PgPool) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("DELETE FROM api_nonces WHERE expires_at < now() - interval '1 minute'")
            .execute(pool)
            .await?
            .rows_affected(),
    )
}

/// Registers (or replaces the secret of) a signing client.
///
/// # Errors
/// Database errors (a client id or secret the table's checks refuse).
pub async fn upsert_client(
    pool: &PgPool,
    client: &str,
    secret: &str,
    org: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO api_clients (client_id, secret, org) VALUES ($1, $2, $3)
         ON CONFLICT (client_id) DO UPDATE SET secret = EXCLUDED.secret, org = EXCLUDED.org,
             enabled = true",
    )
    .bind(client)
    .bind(secret)
    .bind(org)
    .execute(pool)
    .await?;
    Ok(())
}
