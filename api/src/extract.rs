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
        let (parts, body) = req.into_parts();
        let bytes =
            axum::body::Bytes::from_request(Request::from_parts(parts.clone(), body), state)
                .await
                .map_err(|e| {
                    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                        ApiError::TooLarge(
                            "request body is larger than the configured limit".into(),
                        )
                    } else {
                        ApiError::bad_request(e.body_text())
                    }
                })?;
        // Name the field when the body parses; otherwise the JSON error below says why not.
        if json_nul_escape(&bytes).is_some()
            && let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes)
            && let Some(path) = nul_string_path(&value, String::new())
        {
            return Err(ApiError::field(path, NUL_DETAIL));
        }
        let req = Request::from_parts(parts, axum::body::Body::from(bytes));
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(e) => Err(json_rejection(&e)),
        }
    }
}

/// The byte offset of a `\u0000` escape in a JSON text, if any. PostgreSQL text cannot hold a NUL,
/// so a string carrying one would fail at the database as a 500; it is refused up front instead.
/// A backslash only occurs inside JSON strings, so walking escapes pairwise is exact.
fn json_nul_escape(bytes: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes.get(i + 1) == Some(&b'u') && bytes.get(i + 2..i + 6) == Some(b"0000") {
                return Some(i);
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    None
}

const NUL_DETAIL: &str = "contains a NUL character, which no field accepts";

/// The path (`reads[2].meter`) of the first string, key or value, holding a NUL.
fn nul_string_path(value: &serde_json::Value, at: String) -> Option<String> {
    use serde_json::Value;
    match value {
        Value::String(s) if s.contains('\0') => {
            Some(if at.is_empty() { "body".into() } else { at })
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_string_path(v, format!("{at}[{i}]"))),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            let path = if at.is_empty() {
                k.clone()
            } else {
                format!("{at}.{k}")
            };
            if k.contains('\0') {
                Some(path)
            } else {
                nul_string_path(v, path)
            }
        }),
        _ => None,
    }
}

/// A NUL can only reach a query or path percent-encoded; decoded it would fail at PostgreSQL.
fn has_encoded_nul(raw: &str) -> bool {
    raw.as_bytes().windows(3).any(|w| w == b"%00")
}

/// The query parameter whose name or value holds a NUL, as a 422 naming it.
fn query_nul_refused(uri: &axum::http::Uri) -> ApiError {
    let pairs = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(uri)
        .map(|q| q.0)
        .unwrap_or_default();
    match pairs
        .into_iter()
        .find(|(k, v)| k.contains('\0') || v.contains('\0'))
    {
        Some((key, _)) => ApiError::field(key.replace('\0', "\\0"), NUL_DETAIL),
        None => ApiError::bad_request(format!("query string {NUL_DETAIL}")),
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
        if parts.uri.query().is_some_and(has_encoded_nul) {
            return Err(query_nul_refused(&parts.uri));
        }
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
        if has_encoded_nul(parts.uri.path()) {
            return Err(ApiError::bad_request(format!("path {NUL_DETAIL}")));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_escapes_are_found_only_as_escapes() {
        assert_eq!(json_nul_escape(br#"{"a":"x\u0000"}"#), Some(7));
        assert_eq!(json_nul_escape(br#"{"a":"x\\u0000"}"#), None);
        assert_eq!(json_nul_escape(br#"{"a":"\u0001"}"#), None);
        assert!(has_encoded_nul("actor=%C2%81%00T"));
        assert!(!has_encoded_nul("actor=%C2%81%100"));
        let body = serde_json::json!({"reads": [{"meter": "a"}, {"meter": "b\0"}]});
        assert_eq!(
            nul_string_path(&body, String::new()).as_deref(),
            Some("reads[1].meter")
        );
        let uri: axum::http::Uri = "/x?state=%00&y=1".parse().unwrap();
        match query_nul_refused(&uri) {
            ApiError::Invalid { field, status, .. } => {
                assert_eq!(
                    (field.as_deref(), status),
                    (Some("state"), StatusCode::UNPROCESSABLE_ENTITY)
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
