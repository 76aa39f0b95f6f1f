//! Bearer JWTs (HS256 with a shared secret, RS256 with keys from a JWKS URL), the six roles,
//! data scope and the second-factor rule for high-risk actions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::error::ApiError;

/// The six roles of seed §11.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Meter department operator (表务操作员): registry, alarms, manual reads.
    MeterOperator,
    /// Meter department administrator (表务管理员): everything of the operator, and more.
    MeterAdmin,
    /// Meter reader (抄表员): manual reads, meter lookup.
    MeterReader,
    /// Billing (营收): bill runs, bills, arrears, quotes.
    Billing,
    /// Auditor (审计): read-only, audit log and its verification.
    Auditor,
    /// Integration client (external system): pushes and reads.
    Integration,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 6] = [
        Role::MeterOperator,
        Role::MeterAdmin,
        Role::MeterReader,
        Role::Billing,
        Role::Auditor,
        Role::Integration,
    ];

    /// The claim spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::MeterOperator => "meter_operator",
            Role::MeterAdmin => "meter_admin",
            Role::MeterReader => "meter_reader",
            Role::Billing => "billing",
            Role::Auditor => "auditor",
            Role::Integration => "integration",
        }
    }

    /// Parses the claim spelling.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// High-risk actions (seed §11) that need a second factor when configured so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Retiring a meter.
    MeterRetire,
    /// Running a bill cycle that already ran.
    BillRerun,
    /// Editing a stored read.
    ReadEdit,
    /// Clearing the arrears of more than one meter in one request.
    ArrearsBulkClear,
    /// Closing a valve (cuts a customer's water).
    ValveClose,
    /// Opening a valve.
    ValveOpen,
    /// Unlocking a hydrant outlet.
    HydrantUnlock,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 7] = [
        Action::MeterRetire,
        Action::BillRerun,
        Action::ReadEdit,
        Action::ArrearsBulkClear,
        Action::ValveClose,
        Action::ValveOpen,
        Action::HydrantUnlock,
    ];

    /// Configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::MeterRetire => "meter_retire",
            Action::BillRerun => "bill_rerun",
            Action::ReadEdit => "read_edit",
            Action::ArrearsBulkClear => "arrears_bulk_clear",
            Action::ValveClose => "valve_close",
            Action::ValveOpen => "valve_open",
            Action::HydrantUnlock => "hydrant_unlock",
        }
    }

    /// Parses the configuration spelling.
    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// The claims the API reads from a bearer token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Subject: the user or client id (audit actor).
    pub sub: String,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Expiry, unix seconds.
    pub exp: i64,
    /// Issued at, unix seconds.
    #[serde(default)]
    pub iat: i64,
    /// Roles (claim spellings of [`Role`]).
    #[serde(default)]
    pub roles: Vec<String>,
    /// Organisation whose meters the caller may see; `*` for every organisation.
    #[serde(default)]
    pub org: Option<String>,
    /// Areas within the organisation; empty for all of them.
    #[serde(default)]
    pub areas: Vec<String>,
    /// Authentication methods (RFC 8176): `mfa` or `otp` count as a second factor.
    #[serde(default)]
    pub amr: Vec<String>,
}

/// Which meters a caller may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// `None`: every organisation.
    pub org: Option<String>,
    /// Empty: every area of the organisation.
    pub areas: Vec<String>,
}

impl Scope {
    /// Every meter.
    pub fn all() -> Self {
        Self {
            org: None,
            areas: Vec::new(),
        }
    }

    /// The `$n::text[]` bind value of the area filter (`None`: no filter).
    pub fn areas_param(&self) -> Option<Vec<String>> {
        (!self.areas.is_empty()).then(|| self.areas.clone())
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Who (token subject or signing client id); the audit actor.
    pub subject: String,
    /// Roles held.
    pub roles: Vec<Role>,
    /// Data scope.
    pub scope: Scope,
    /// Whether the token carries a second factor.
    pub second_factor: bool,
}

impl Principal {
    /// Refuses unless the caller holds one of `allowed`.
    ///
    /// # Errors
    /// [`ApiError::Forbidden`] naming the roles that would do.
    pub fn require(&self, allowed: &[Role]) -> Result<(), ApiError> {
        if self.roles.iter().any(|r| allowed.contains(r)) {
            return Ok(());
        }
        Err(ApiError::Forbidden(format!(
            "this operation needs one of the roles {}",
            allowed
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    /// Refuses a high-risk `action` without a second factor when `policy` demands one.
    ///
    /// # Errors
    /// [`ApiError::SecondFactorRequired`].
    pub fn require_second_factor(&self, action: Action, policy: &[Action]) -> Result<(), ApiError> {
        if policy.contains(&action) && !self.second_factor {
            return Err(ApiError::SecondFactorRequired {
                action: action.as_str(),
            });
        }
        Ok(())
    }

    /// The actor name written to the audit log.
    pub fn actor(&self) -> String {
        format!("api:{}", self.subject)
    }
}

/// Bearer-token settings.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud`.
    pub audience: String,
    /// HS256 shared secret (also what `dev-token` signs with).
    pub hs256_secret: Option<Vec<u8>>,
    /// JWKS URL for RS256 keys (looked up by `kid`, refreshed when an unknown `kid` arrives,
    /// at most once per `jwks_min_refresh`).
    pub jwks_url: Option<String>,
    /// Least time between two JWKS fetches.
    pub jwks_min_refresh: Duration,
}

#[derive(Default)]
struct JwksCache {
    keys: HashMap<String, Arc<DecodingKey>>,
    fetched: Option<Instant>,
}

/// Verifies bearer tokens.
pub struct JwtVerifier {
    config: JwtConfig,
    hs: Option<DecodingKey>,
    jwks: RwLock<JwksCache>,
    http: reqwest::Client,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.config.issuer)
            .field("audience", &self.config.audience)
            .field("hs256", &self.hs.is_some())
            .field("jwks_url", &self.config.jwks_url)
            .finish()
    }
}

fn unauth(code: &'static str, detail: impl Into<String>) -> ApiError {
    ApiError::Unauthenticated {
        code,
        detail: detail.into(),
    }
}

impl JwtVerifier {
    /// A verifier for `config`.
    pub fn new(config: JwtConfig) -> Self {
        let hs = config.hs256_secret.as_deref().map(DecodingKey::from_secret);
        Self {
            config,
            hs,
            jwks: RwLock::new(JwksCache::default()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
        }
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.set_issuer(&[&self.config.issuer]);
        v.set_audience(&[&self.config.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = 30;
        v
    }

    /// Verifies `token` and returns the caller.
    ///
    /// # Errors
    /// [`ApiError::Unauthenticated`] with a reason code.
    pub async fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| unauth("bad_token", format!("not a JWT: {e}")))?;
        let claims = match header.alg {
            Algorithm::HS256 => {
                let key = self
                    .hs
                    .as_ref()
                    .ok_or_else(|| unauth("bad_token", "HS256 tokens are not accepted here"))?;
                decode(token, key, &self.validation(Algorithm::HS256))?
            }
            Algorithm::RS256 => {
                let kid = header
                    .kid
                    .ok_or_else(|| unauth("bad_token", "RS256 token without kid"))?;
                let key = self.jwks_key(&kid).await?;
                decode(token, &key, &self.validation(Algorithm::RS256))?
            }
            other => {
                return Err(unauth(
                    "bad_token",
                    format!("algorithm {other:?} is not accepted (HS256 or RS256)"),
                ));
            }
        };
        principal_of(claims)
    }

    /// Signs a token for a person who logged in (`POST /api/v1/auth/login`): HS256 with the
    /// configured secret, like `api dev-token`, with this verifier's issuer and audience.
    ///
    /// # Errors
    /// [`ApiError::Unavailable`] when no HS256 secret is configured (RS256-only deployments take
    /// their tokens from the identity provider).
    pub fn issue(&self, mut claims: Claims) -> Result<String, ApiError> {
        let secret = self.config.hs256_secret.as_deref().ok_or_else(|| {
            ApiError::Unavailable("logins need API_JWT_SECRET (HS256) on this node".into())
        })?;
        claims.iss.clone_from(&self.config.issuer);
        claims.aud.clone_from(&self.config.audience);
        sign_hs256(secret, &claims).map_err(|e| ApiError::Internal(format!("signing: {e}")))
    }

    async fn jwks_key(&self, kid: &str) -> Result<Arc<DecodingKey>, ApiError> {
        if let Some(k) = self.jwks.read().await.keys.get(kid) {
            return Ok(Arc::clone(k));
        }
        let url = self.config.jwks_url.as_deref().ok_or_else(|| {
            unauth(
                "bad_token",
                "RS256 tokens are not accepted here (no JWKS URL)",
            )
        })?;
        let mut cache = self.jwks.write().await;
        if let Some(k) = cache.keys.get(kid) {
            return Ok(Arc::clone(k));
        }
        if cache
            .fetched
            .is_some_and(|t| t.elapsed() < self.config.jwks_min_refresh)
        {
            return Err(unauth("unknown_key", format!("no key {kid:?} in the JWKS")));
        }
        cache.fetched = Some(Instant::now());
        let text = self
            .http
            .get(url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| ApiError::Unavailable(format!("cannot fetch the JWKS: {e}")))?
            .text()
            .await
            .map_err(|e| ApiError::Unavailable(format!("cannot read the JWKS: {e}")))?;
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&text)
            .map_err(|e| ApiError::Unavailable(format!("the JWKS is not a key set: {e}")))?;
        cache.keys.clear();
        for jwk in &set.keys {
            if let (Some(id), Ok(key)) = (jwk.common.key_id.clone(), DecodingKey::from_jwk(jwk)) {
                cache.keys.insert(id, Arc::new(key));
            }
        }
        cache
            .keys
            .get(kid)
            .cloned()
            .ok_or_else(|| unauth("unknown_key", format!("no key {kid:?} in the JWKS")))
    }
}

fn decode(token: &str, key: &DecodingKey, v: &Validation) -> Result<Claims, ApiError> {
    use jsonwebtoken::errors::ErrorKind as K;
    jsonwebtoken::decode::<Claims>(token, key, v)
        .map(|d| d.claims)
        .map_err(|e| match e.kind() {
            K::ExpiredSignature => unauth("expired_token", "the token has expired"),
            K::InvalidIssuer => unauth("bad_token", "wrong issuer (iss)"),
            K::InvalidAudience => unauth("bad_token", "wrong audience (aud)"),
            K::InvalidSignature => unauth("bad_token", "bad token signature"),
            K::MissingRequiredClaim(c) => unauth("bad_token", format!("missing claim {c}")),
            _ => unauth("bad_token", format!("token refused: {e}")),
        })
}

fn principal_of(c: Claims) -> Result<Principal, ApiError> {
    let mut roles = Vec::new();
    for r in &c.roles {
        // Unknown roles (from a shared identity provider) grant nothing.
        if let Some(role) = Role::parse(r) {
            roles.push(role);
        }
    }
    let scope = match c.org.as_deref() {
        Some("*") => Scope::all(),
        Some(org) if !org.is_empty() => Scope {
            org: Some(org.to_owned()),
            areas: c.areas.clone(),
        },
        _ => {
            return Err(ApiError::Forbidden(
                "the token has no org claim (an organisation, or * for all)".into(),
            ));
        }
    };
    Ok(Principal {
        second_factor: c.amr.iter().any(|m| m == "mfa" || m == "otp"),
        subject: c.sub,
        roles,
        scope,
    })
}

/// Signs an HS256 token (the `dev-token` command and tests).
///
/// # Errors
/// Only if the claims cannot be serialised.
pub fn sign_hs256(secret: &[u8], claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(second_factor: bool) -> Principal {
        Principal {
            subject: "t".into(),
            roles: vec![Role::MeterOperator],
            scope: Scope::all(),
            second_factor,
        }
    }

    #[test]
    fn every_action_round_trips_its_configuration_spelling() {
        for a in Action::ALL {
            assert_eq!(Action::parse(a.as_str()), Some(a));
        }
        assert_eq!(Action::parse("valve_close"), Some(Action::ValveClose));
        assert_eq!(Action::parse("hydrant_unlock"), Some(Action::HydrantUnlock));
    }

    #[test]
    fn the_second_factor_rule_follows_the_per_action_policy() {
        let policy = [Action::ValveClose, Action::HydrantUnlock];
        let err = caller(false)
            .require_second_factor(Action::ValveClose, &policy)
            .unwrap_err();
        assert_eq!(err.error_code(), "second_factor_required");
        assert!(
            err.to_string()
                .starts_with("valve_close is a high-risk action")
        );
        // Not in the policy: no second factor needed.
        assert!(
            caller(false)
                .require_second_factor(Action::ValveOpen, &policy)
                .is_ok()
        );
        assert!(
            caller(true)
                .require_second_factor(Action::HydrantUnlock, &policy)
                .is_ok()
        );
    }
}
