//! People who log in to the dashboard (migration `0070_dashboard.sql`): argon2id password
//! hashes, an optional RFC 6238 TOTP second factor, and the failed-login bookkeeping that
//! rate-limits guessing across API nodes.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use hmac::{Hmac, Mac};
use sqlx::PgPool;

use crate::auth::Role;

/// Why a user could not be added or a secret could not be used.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// A field is not acceptable.
    #[error("{field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Hashing failed (argon2 parameters or salt).
    #[error("password hashing failed: {0}")]
    Hash(String),
    /// The database refused.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

fn invalid(field: &'static str, message: impl Into<String>) -> UserError {
    UserError::Invalid {
        field,
        message: message.into(),
    }
}

/// A user to create or update.
#[derive(Debug, Clone)]
pub struct NewUser {
    /// Login name (`[A-Za-z0-9._@-]{1,64}`).
    pub username: String,
    /// Plain password (at least 8 characters); only its hash is stored.
    pub password: String,
    /// The one role the user's tokens carry.
    pub role: Role,
    /// Organisation, `*` for all.
    pub org: String,
    /// Areas (empty: all of the organisation).
    pub areas: Vec<String>,
    /// RFC 6238 secret, base32 (RFC 4648, padding optional).
    pub totp_secret: Option<String>,
}

/// A stored user, as the login needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRow {
    /// Login name.
    pub username: String,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Role (claim spelling).
    pub role: String,
    /// Organisation or `*`.
    pub org: String,
    /// Areas.
    pub areas: Vec<String>,
    /// TOTP secret (base32).
    pub totp_secret: Option<String>,
    /// Disabled users cannot log in.
    pub disabled: bool,
}

/// Hashes `password` with argon2id (the crate's default parameters, random 16-byte salt).
///
/// # Errors
/// [`UserError::Hash`].
pub fn hash_password(password: &str) -> Result<String, UserError> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| UserError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| UserError::Hash(e.to_string()))
}

/// Whether `password` matches the PHC string `hash` (false for a malformed hash).
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// A hash of a password nobody has, verified against when the user does not exist, so a login
/// for an unknown name costs the same time as one for a known name (no enumeration by timing).
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("not-a-password-of-anyone").unwrap_or_default())
}

/// Decodes RFC 4648 base32 (upper or lower case, spaces and `=` padding ignored).
///
/// # Errors
/// [`UserError::Invalid`] on a character outside the alphabet or an empty secret.
pub fn base32_decode(s: &str) -> Result<Vec<u8>, UserError> {
    let mut out = Vec::new();
    let mut buf: u64 = 0;
    let mut bits = 0u32;
    for c in s.chars().filter(|c| !c.is_whitespace() && *c != '=') {
        let v = match c.to_ascii_uppercase() {
            u @ 'A'..='Z' => u as u64 - 'A' as u64,
            d @ '2'..='7' => d as u64 - '2' as u64 + 26,
            other => return Err(invalid("totp_secret", format!("{other:?} is not base32"))),
        };
        buf = (buf << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push(((buf >> bits) & 0xff) as u8);
        }
    }
    if out.len() < 10 {
        return Err(invalid(
            "totp_secret",
            "at least 80 bits (16 base32 characters) are needed",
        ));
    }
    Ok(out)
}

/// The RFC 6238 code (HMAC-SHA1, 30-second steps, 6 digits) of `secret` at unix time `t`.
pub fn totp_at(secret: &[u8], t: i64) -> u32 {
    hotp(secret, (t.max(0) / 30) as u64, 6)
}

/// RFC 4226 HOTP with `digits` digits.
fn hotp(secret: &[u8], counter: u64, digits: u32) -> u32 {
    let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(secret) else {
        return u32::MAX; // HMAC takes keys of any length; never reached.
    };
    mac.update(&counter.to_be_bytes());
    let h = mac.finalize().into_bytes();
    let off = usize::from(h[h.len() - 1] & 0x0f);
    let bin = (u32::from(h[off]) & 0x7f) << 24
        | u32::from(h[off + 1]) << 16
        | u32::from(h[off + 2]) << 8
        | u32::from(h[off + 3]);
    bin % 10u32.pow(digits)
}

/// Whether `code` is the TOTP code of `secret` at `now`, or one step before or after (clock
/// drift of the phone).
pub fn totp_matches(secret: &[u8], code: &str, now: i64) -> bool {
    let code = code.trim();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let Ok(n) = code.parse::<u32>() else {
        return false;
    };
    [-30, 0, 30].iter().any(|d| totp_at(secret, now + d) == n)
}

/// Creates the user or replaces its password, role, scope and secret (and enables it).
///
/// # Errors
/// [`UserError::Invalid`] for a bad name, short password or bad secret; database errors.
pub async fn upsert_user(pool: &PgPool, u: &NewUser) -> Result<(), UserError> {
    let name_ok = !u.username.is_empty()
        && u.username.len() <= 64
        && u.username
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b));
    if !name_ok {
        return Err(invalid("username", "1..64 of A-Z a-z 0-9 . _ @ -"));
    }
    if u.password.chars().count() < 8 {
        return Err(invalid("password", "at least 8 characters"));
    }
    if u.org.trim().is_empty() {
        return Err(invalid("org", "an organisation, or * for all"));
    }
    let secret = match &u.totp_secret {
        Some(s) => {
            base32_decode(s)?;
            Some(s.replace([' ', '='], "").to_ascii_uppercase())
        }
        None => None,
    };
    let hash = hash_password(&u.password)?;
    sqlx::query(
        "INSERT INTO users (username, password_hash, role, org, areas, totp_secret) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (username) DO UPDATE SET password_hash = EXCLUDED.password_hash, \
             role = EXCLUDED.role, org = EXCLUDED.org, areas = EXCLUDED.areas, \
             totp_secret = EXCLUDED.totp_secret, disabled = false, updated_at = now()",
    )
    .bind(&u.username)
    .bind(&hash)
    .bind(u.role.as_str())
    .bind(&u.org)
    .bind(&u.areas)
    .bind(&secret)
    .execute(pool)
    .await?;
    Ok(())
}

/// Looks a user up by name.
///
/// # Errors
/// Database errors.
pub async fn find_user(pool: &PgPool, username: &str) -> Result<Option<UserRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT username, password_hash, role, org, areas, totp_secret, disabled \
         FROM users WHERE username = $1",
    )
    .bind(username)
    .fetch_optional(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1 rows (8 digits there; the same HOTP truncated to 8).
    #[test]
    fn totp_matches_the_rfc_6238_test_vectors() {
        let secret = b"12345678901234567890";
        for (t, want) in [
            (59i64, 94_287_082u32),
            (1_111_111_109, 7_081_804),
            (1_111_111_111, 14_050_471),
            (1_234_567_890, 89_005_924),
            (2_000_000_000, 69_279_037),
        ] {
            assert_eq!(hotp(secret, (t / 30) as u64, 8), want, "t = {t}");
            assert_eq!(totp_at(secret, t), want % 1_000_000, "t = {t}");
        }
    }

    #[test]
    fn base32_decodes_the_rfc_4648_vectors_and_refuses_others() {
        // "12345678901234567890" in base32.
        let s = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";
        assert_eq!(base32_decode(s).unwrap(), b"12345678901234567890");
        assert_eq!(
            base32_decode(&s.to_ascii_lowercase()).unwrap(),
            b"12345678901234567890"
        );
        assert!(base32_decode("GEZDGNBV1Y3TQOJQ").is_err());
        assert!(base32_decode("GEZDG").is_err());
    }

    #[test]
    fn a_code_is_accepted_one_step_off_and_refused_further() {
        let secret = b"12345678901234567890";
        let now = 1_234_567_890;
        let code = format!("{:06}", totp_at(secret, now));
        assert!(totp_matches(secret, &code, now));
        assert!(totp_matches(secret, &code, now + 30));
        assert!(!totp_matches(secret, &code, now + 90));
        assert!(!totp_matches(secret, "12345", now));
        assert!(!totp_matches(secret, "abcdef", now));
    }

    #[test]
    fn passwords_verify_against_their_hash_only() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("correct hors", &h));
        assert!(!verify_password("correct horse", "not a hash"));
    }
}
