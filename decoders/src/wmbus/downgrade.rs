//! The no-downgrade rule for meters with a key: their telegrams must arrive encrypted (TPL
//! security mode 5 or 7, or ELL AES-CTR) and decrypt under that key.
//!
//! [`super::parse`] accepts, for any meter, a plaintext telegram (mode 0) and a telegram marked
//! encrypted whose payload is already plaintext (a replayed receiver log). For a meter the
//! operator gave a key, either is what an attacker without the key would send to inject a
//! reading, so the receiver refuses them with [`check_keyed`] (counted as
//! `security_downgrade`).

use super::{ELL_MODE, Protection, Telegram};

/// Why a telegram of a meter with a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecurityDowngrade {
    /// The telegram was sent in clear (security mode 0).
    #[error("meter {meter} has a key but sent a plaintext telegram")]
    Plaintext {
        /// Meter id (`MAN12345678`).
        meter: String,
    },
    /// Marked encrypted (`mode`), but the payload did not decrypt under the key and is
    /// already plaintext.
    #[error("meter {meter}: telegram marked security mode {mode} carries plaintext")]
    FakeEncrypted {
        /// Meter id.
        meter: String,
        /// Announced mode (128 = ELL AES-CTR).
        mode: u8,
    },
}

impl SecurityDowngrade {
    /// The `kind` label of `wm_gateway_decode_errors_total`.
    pub fn code(&self) -> &'static str {
        "security_downgrade"
    }
}

/// Checks that `telegram` of a meter with a key was encrypted and decrypted under it.
///
/// # Errors
/// [`SecurityDowngrade`] for a plaintext or fake-encrypted telegram.
pub fn check_keyed(telegram: &Telegram) -> Result<(), SecurityDowngrade> {
    let meter = telegram.meter.meter_id();
    match telegram.protection {
        Protection::Decrypted => Ok(()),
        Protection::None => Err(SecurityDowngrade::Plaintext { meter }),
        Protection::AlreadyDecrypted => Err(SecurityDowngrade::FakeEncrypted {
            meter,
            mode: match telegram.tpl.security_mode() {
                0 => ELL_MODE,
                m => m,
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wmbus::encode::{WmbusMeter, telegram};
    use crate::wmbus::{FormatCache, manufacturer_from_code, parse};

    const KEY: [u8; 16] = *b"0123456789abcdef";

    #[test]
    fn keyed_meters_accept_only_what_decrypts_under_their_key() {
        let meter = WmbusMeter {
            manufacturer: manufacturer_from_code("KAM").unwrap(),
            id: 0x1234_5678,
            version: 1,
            device_type: 0x07,
        };
        let records = [0x0C, 0x13, 0x78, 0x56, 0x34, 0x12];
        let mut cache = FormatCache::new();
        let key = Some(KEY);
        let encrypted = telegram(&meter, &records, 3, Some(KEY));
        let t = parse(&encrypted, &key, &mut cache).unwrap();
        assert_eq!(check_keyed(&t), Ok(()));
        let plain = telegram(&meter, &records, 3, None);
        let t = parse(&plain, &key, &mut cache).unwrap();
        assert_eq!(
            check_keyed(&t).map_err(|e| e.code()),
            Err("security_downgrade")
        );
        // The header of a mode-5 telegram over the padded plaintext: a "replayed log".
        let mut fake = encrypted.get(..15).unwrap().to_vec();
        let mut body = vec![0x2F, 0x2F];
        body.extend_from_slice(&records);
        body.resize(16, 0x2F);
        fake.extend_from_slice(&body);
        let t = parse(&fake, &key, &mut cache).unwrap();
        assert!(
            matches!(
                check_keyed(&t),
                Err(SecurityDowngrade::FakeEncrypted { mode: 5, .. })
            ),
            "{:?}",
            check_keyed(&t)
        );
    }
}
