//! Extractors whose rejections are problem+json naming the field, and the bearer-token
//! extractor that fills the call log's caller and counts failures.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::auth::Principal;
use crate::calllog::CallCtx;
use crate::error::ApiError;

/// A JSON body; a rejection names what is wrong (`missing field ...`, `line 1 column 9`).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(e) => Err(json_rejection(&e)),
        }
    }
}

fn json_rejection(e: &JsonRejection) -> ApiError {
    match e {
        JsonRejection::JsonDataError(d) => ApiError::Invalid {
            field: None,
            detail: d.body_text(),
            status: StatusCode::UNPROCESSABLE_ENTITY,
        },
        JsonRejection::BytesRejection(b) if b.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::TooLarge("request body is larger than the configured limit".into())
        }
        other => ApiError::bad_request(other.body_text()),
    }
}

/// A query string.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Self(q.0))
            .map_err(|e: QueryRejection| ApiError::Invalid {
                field: None,
                detail: e.body_text(),
                status: StatusCode::BAD_REQUEST,
            })
    }
}

/// Path parameters.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Self(p.0))
            .map_err(|e: PathRejection| ApiError::Invalid {
                field: None,
                detail: e.body_text(),
                status: StatusCode::BAD_REQUEST,
            })
    }
}

/// The peer address of a request, when the server recorded it.
pub fn peer(parts: &Parts) -> String {
    parts
        .extensions
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "-".to_owned(), |c| c.0.ip().to_string())
}

/// A caller authenticated by a bearer JWT.
#[derive(Debug)]
pub struct Auth(pub Principal);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let ctx = parts.extensions.get::<CallCtx>().cloned();
        // A held request executed after its approval: the requester's identity comes from the
        // approval (this extension is only ever set in-process, never from the wire).
        if let Some(call) = parts.extensions.get::<crate::approvals::ApprovedCall>() {
            if let Some(ctx) = &ctx {
                ctx.set_caller(&call.principal.subject);
            }
            return Ok(Self(call.principal.clone()));
        }
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let result = match token {
            None => Err(ApiError::Unauthenticated {
                code: "missing_token",
                detail: "missing Authorization: Bearer <JWT>".into(),
            }),
            Some(t) => state.jwt.verify(t).await,
        };
        match result {
            Ok(p) => {
                if let Some(ctx) = &ctx {
                    ctx.set_caller(&p.subject);
                }
                Ok(Self(p))
            }
            Err(e) => {
                let code = e.error_code();
                if matches!(e, ApiError::Unauthenticated { .. } | ApiError::Forbidden(_)) {
                    let subject = token
                        .and_then(unverified_subject)
                        .unwrap_or_else(|| "-".into());
                    state.metrics.auth_failure(&subject, &peer(parts), code);
                }
                Err(e)
            }
        }
    }
}

/// The `sub` of a token that failed verification, for the failure counter only (never
/// trusted for anything else).
fn unverified_subject(token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let sub = v.get("sub")?.as_str()?;
    Some(sub.chars().take(64).collect())
}
