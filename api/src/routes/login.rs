//! `POST /api/v1/auth/login`: a person's name and password (and TOTP code) for a short-lived
//! bearer token signed like `api dev-token`. Failures are counted per name and per address in
//! PostgreSQL (so the limit holds across API nodes), audited, and all look alike: an unknown
//! name, a wrong password, a disabled user and a wrong code get the same answer.

use axum::extract::State;
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::auth::Claims;
use crate::calllog::CallCtx;
use crate::error::{ApiError, Problem};
use crate::extract::{ApiJson, peer};
use crate::users;

/// Lifetime of a login token, seconds (the page logs in again after it).
pub const LOGIN_TTL_S: i64 = 1800;
/// Failed logins of one name within [`FAILURE_WINDOW_MIN`] after which the name is refused.
pub const MAX_FAILURES_PER_NAME: i64 = 5;
/// Failed logins from one address within the window after which the address is refused.
pub const MAX_FAILURES_PER_PEER: i64 = 20;
/// The counting window, minutes.
pub const FAILURE_WINDOW_MIN: i64 = 15;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(login))
}

/// Credentials.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// Login name.
    pub username: String,
    /// Password.
    pub password: String,
    /// The current 6-digit TOTP code, for users with a second factor (gives `amr` otp).
    #[serde(default)]
    pub otp: Option<String>,
}

/// A bearer token for the dashboard and every other `/api/v1` route.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LoginResponse {
    /// The JWT.
    pub token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until it expires.
    pub expires_in: i64,
    /// Login name (the token's `sub`).
    pub username: String,
    /// Role.
    pub role: String,
    /// Organisation or `*`.
    pub org: String,
    /// Areas.
    pub areas: Vec<String>,
    /// Authentication methods: `pwd`, and `otp` when a valid code was given.
    pub amr: Vec<String>,
}

fn refused() -> ApiError {
    ApiError::Unauthenticated {
        code: "bad_credentials",
        detail: "wrong username, password or code".into(),
    }
}

/// Log in with a name and password (and a TOTP code for a second factor).
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "AUTH", request_body = LoginRequest,
    responses((status = 200, body = LoginResponse), (status = 401, body = Problem),
        (status = 422, body = Problem), (status = 429, body = Problem)))]
async fn login(
    State(s): State<AppState>,
    parts: Parts,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<axum::Json<LoginResponse>, ApiError> {
    // Control characters (NUL above all, which PostgreSQL text refuses) are never in a name.
    if req.username.is_empty()
        || req.username.len() > 64
        || req.username.chars().any(char::is_control)
    {
        return Err(ApiError::field(
            "username",
            "1..64 characters, no control characters",
        ));
    }
    if req.password.len() > 1024 {
        return Err(ApiError::field("password", "at most 1024 bytes"));
    }
    let addr = peer(&parts);
    if let Some(ctx) = parts.extensions.get::<CallCtx>() {
        ctx.set_caller(&req.username);
    }
    let (by_name, by_peer): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE username = $1), count(*) FILTER (WHERE peer = $2) \
         FROM login_failures WHERE at > now() - make_interval(mins => $3::int) \
           AND (username = $1 OR peer = $2)",
    )
    .bind(&req.username)
    .bind(&addr)
    .bind(i32::try_from(FAILURE_WINDOW_MIN).unwrap_or(15))
    .fetch_one(&s.pool)
    .await
    .map_err(ApiError::db("counting failed logins"))?;
    if by_name >= MAX_FAILURES_PER_NAME || by_peer >= MAX_FAILURES_PER_PEER {
        s.metrics
            .auth_failure(&req.username, &addr, "too_many_requests");
        return Err(ApiError::TooManyRequests(format!(
            "too many failed logins; try again in {FAILURE_WINDOW_MIN} minutes"
        )));
    }
    let user = users::find_user(&s.pool, &req.username)
        .await
        .map_err(ApiError::db("looking up a user"))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    // The password is checked even for an unknown name, against a hash nobody's password
    // matches, so both cost one argon2 verification.
    let hash = user.as_ref().map_or_else(
        || users::dummy_hash().to_owned(),
        |u| u.password_hash.clone(),
    );
    let password = req.password.clone();
    let password_ok = tokio::task::spawn_blocking(move || users::verify_password(&password, &hash))
        .await
        .unwrap_or(false);
    let outcome = match &user {
        None => Err("unknown_user"),
        Some(_) if !password_ok => Err("bad_password"),
        Some(u) if u.disabled => Err("disabled"),
        Some(u) => match (&u.totp_secret, req.otp.as_deref()) {
            (_, None) => Ok(vec!["pwd".to_owned()]),
            (None, Some(_)) => Err("no_second_factor"),
            (Some(secret), Some(code)) => match users::base32_decode(secret) {
                Ok(key) if users::totp_matches(&key, code, now) => {
                    Ok(vec!["pwd".to_owned(), "otp".to_owned()])
                }
                _ => Err("bad_otp"),
            },
        },
    };
    let reason = match (outcome, user) {
        (Ok(amr), Some(u)) => {
            let claims = Claims {
                sub: u.username.clone(),
                iss: String::new(),
                aud: String::new(),
                exp: now + LOGIN_TTL_S,
                iat: now,
                roles: vec![u.role.clone()],
                org: Some(u.org.clone()),
                areas: u.areas.clone(),
                amr: amr.clone(),
            };
            let token = s.jwt.issue(claims)?;
            let mut tx = s.pool.begin().await.map_err(ApiError::db("beginning"))?;
            sqlx::query("UPDATE users SET last_login_at = now() WHERE username = $1")
                .bind(&u.username)
                .execute(&mut *tx)
                .await
                .map_err(ApiError::db("recording a login"))?;
            audit(
                &mut tx,
                &u.username,
                "auth.login",
                &addr,
                serde_json::json!(amr),
            )
            .await?;
            tx.commit().await.map_err(ApiError::db("committing"))?;
            return Ok(axum::Json(LoginResponse {
                token,
                token_type: "Bearer".into(),
                expires_in: LOGIN_TTL_S,
                username: u.username,
                role: u.role,
                org: u.org,
                areas: u.areas,
                amr,
            }));
        }
        (Ok(_), None) => "unknown_user",
        (Err(r), _) => r,
    };
    // The reason is kept for the audit row and the log, never sent to the caller.
    let mut tx = s.pool.begin().await.map_err(ApiError::db("beginning"))?;
    sqlx::query("INSERT INTO login_failures (username, peer, reason) VALUES ($1, $2, $3)")
        .bind(&req.username)
        .bind(&addr)
        .bind(reason)
        .execute(&mut *tx)
        .await
        .map_err(ApiError::db("counting a failed login"))?;
    audit(
        &mut tx,
        &req.username,
        "auth.login_failed",
        &addr,
        serde_json::json!(reason),
    )
    .await?;
    tx.commit().await.map_err(ApiError::db("committing"))?;
    s.metrics
        .auth_failure(&req.username, &addr, "bad_credentials");
    tracing::info!(user = %req.username, peer = %addr, reason, "login refused");
    Err(refused())
}

async fn audit(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    username: &str,
    action: &str,
    peer: &str,
    what: serde_json::Value,
) -> Result<(), ApiError> {
    let key = if action == "auth.login" {
        "amr"
    } else {
        "reason"
    };
    sqlx::query(
        "INSERT INTO audit_log (actor, action, entity, entity_id, detail) \
         VALUES ($1, $2, 'user', $3, $4)",
    )
    .bind(format!("api:{username}"))
    .bind(action)
    .bind(username)
    .bind(serde_json::json!({ "peer": peer, key: what }))
    .execute(&mut **tx)
    .await
    .map_err(ApiError::db("auditing a login"))?;
    Ok(())
}
