//! One error type for every handler, rendered as RFC 9457 `application/problem+json`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// Why a request was refused or failed. Internal details are logged, never sent.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or a field is invalid (400; 422 for a well-formed request
    /// whose content is refused).
    #[error("{detail}")]
    Invalid {
        /// The field at fault (`reads[3].value`), when one is.
        field: Option<String>,
        /// What is wrong and what was expected.
        detail: String,
        /// 400 or 422.
        status: StatusCode,
    },
    /// No or bad credentials (401).
    #[error("{detail}")]
    Unauthenticated {
        /// Stable reason code (`missing_token`, `bad_signature`, `replay`...).
        code: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The caller's roles or scope do not allow this (403).
    #[error("{0}")]
    Forbidden(String),
    /// A high-risk action needs a second factor (`amr` with `mfa` or `otp`) (403).
    #[error("{action} is a high-risk action: it needs a token whose amr claim holds mfa or otp")]
    SecondFactorRequired {
        /// The action.
        action: &'static str,
    },
    /// Nothing at that address (or outside the caller's scope) (404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// The body or batch is larger than allowed (413).
    #[error("{0}")]
    TooLarge(String),
    /// Too many failed attempts; try again later (429).
    #[error("{0}")]
    TooManyRequests(String),
    /// A dependency (database, broker, tariff) is not available (503).
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected database error (500); `0` is logged only.
    #[error("internal error")]
    Internal(String),
}

/// The problem+json body.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// `urn:wm:problem:<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the kind of problem.
    pub title: String,
    /// HTTP status.
    pub status: u16,
    /// What happened, for this request.
    pub detail: String,
    /// Stable machine-readable code.
    pub code: String,
    /// The offending field, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    /// A 422 naming `field`.
    pub fn field(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Invalid {
            field: Some(field.into()),
            detail: detail.into(),
            status: StatusCode::UNPROCESSABLE_ENTITY,
        }
    }

    /// A 400 about the request as a whole (syntax, headers).
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::Invalid {
            field: None,
            detail: detail.into(),
            status: StatusCode::BAD_REQUEST,
        }
    }

    /// A database failure: logged with `stage`, answered as a 500 without detail.
    pub fn db(stage: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |e| Self::Internal(format!("{stage}: {e}"))
    }

    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid { status, .. } => *status,
            Self::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) | Self::SecondFactorRequired { .. } => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable snake_case code (problem `code`, call-log error code, metric label).
    pub fn error_code(&self) -> &'static str {
        match self {
            Self::Invalid { status, .. } if *status == StatusCode::BAD_REQUEST => "bad_request",
            Self::Invalid { .. } => "invalid_field",
            Self::Unauthenticated { code, .. } => code,
            Self::Forbidden(_) => "forbidden",
            Self::SecondFactorRequired { .. } => "second_factor_required",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::TooLarge(_) => "too_large",
            Self::TooManyRequests(_) => "too_many_requests",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    /// The problem body.
    pub fn problem(&self) -> Problem {
        let status = self.status();
        let code = self.error_code();
        let detail = match self {
            Self::Internal(_) => "an internal error occurred; it has been logged".to_owned(),
            other => other.to_string(),
        };
        Problem {
            kind: format!("urn:wm:problem:{code}"),
            title: status.canonical_reason().unwrap_or("error").to_owned(),
            status: status.as_u16(),
            detail,
            code: code.to_owned(),
            field: match self {
                Self::Invalid { field, .. } => field.clone(),
                _ => None,
            },
        }
    }
}

/// On a `second_factor_required` answer: the action refused, so the four-eyes middleware
/// ([`crate::approvals`]) can hold the request for a second approver instead.
#[derive(Debug, Clone, Copy)]
pub struct SecondFactorAction(pub crate::auth::Action);

/// The error code of a response, carried to the call log and metrics middleware.
#[derive(Debug, Clone)]
pub struct ErrorCode(pub &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(detail) = &self {
            tracing::error!(%detail, "internal error answered as 500");
        }
        let problem = self.problem();
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut resp = (self.status(), body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if matches!(self, Self::Unauthenticated { .. }) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp.extensions_mut().insert(ErrorCode(self.error_code()));
        if let Self::SecondFactorRequired { action } = &self
            && let Some(a) = crate::auth::Action::parse(action)
        {
            resp.extensions_mut().insert(SecondFactorAction(a));
        }
        resp
    }
}

impl From<pipeline::registry::RegistryError> for ApiError {
    fn from(e: pipeline::registry::RegistryError) -> Self {
        use pipeline::registry::RegistryError as R;
        match e {
            R::NotFound(m) => Self::NotFound(format!("no meter {m:?}")),
            R::IllegalTransition { .. } => Self::Conflict(e.to_string()),
            R::Invalid { field, message } => Self::field(field, message),
            R::Duplicate { .. } => Self::Conflict(e.to_string()),
            R::Unknown { what, value } => Self::field(what, format!("unknown {what} {value:?}")),
            R::Db { .. } | R::Store(_) => Self::Internal(format!("registry: {e:?}")),
        }
    }
}

impl From<pipeline::billing::BillingRunError> for ApiError {
    fn from(e: pipeline::billing::BillingRunError) -> Self {
        use pipeline::billing::BillingRunError as B;
        match e {
            B::BadArrears { reason, .. } => Self::field("amount_overdue", reason),
            other => Self::Internal(format!("billing: {other:?}")),
        }
    }
}
