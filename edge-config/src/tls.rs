//! TLS settings of an MQTT connection (uplink, concentrator source, hydrant bridge).
//!
//! Only paths are checked here (present, PEM-looking); the gateway parses the certificates when
//! it builds its TLS connector, so a bad certificate fails the start with the file named.

use std::path::{Path, PathBuf};

/// TLS material of one MQTT connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MqttTls {
    /// CA bundle (PEM) that signed the broker's certificate; `None` trusts the system's roots.
    pub ca: Option<PathBuf>,
    /// Client certificate and PKCS#8 key (PEM) for mutual TLS.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl MqttTls {
    /// The TLS settings of a connection, `None` when it is plain TCP.
    pub fn from_fields(
        enabled: bool,
        ca: &Option<PathBuf>,
        cert: &Option<PathBuf>,
        key: &Option<PathBuf>,
    ) -> Option<Self> {
        enabled.then(|| Self {
            ca: ca.clone(),
            client: cert.clone().zip(key.clone()),
        })
    }
}

/// Problems with the `tls_*` fields of one connection, as (field suffix, message).
///
/// `scheme_hint` says how TLS is switched on for this connection (shown when files are given
/// for a plain connection).
pub(crate) fn field_problems(
    enabled: bool,
    ca: &Option<PathBuf>,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
    scheme_hint: &str,
) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    if !enabled && (ca.is_some() || cert.is_some() || key.is_some()) {
        problems.push((
            "tls_ca",
            format!("TLS files are given but the connection is plain TCP; {scheme_hint}"),
        ));
    }
    if cert.is_some() != key.is_some() {
        problems.push((
            "tls_key",
            "tls_cert and tls_key must be given together".into(),
        ));
    }
    problems
}

/// Makes relative TLS paths relative to the configuration file's folder.
pub(crate) fn resolve(base: &Path, paths: [&mut Option<PathBuf>; 3]) {
    for p in paths.into_iter().flatten() {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
}

/// Checks that a TLS file can be read and holds a PEM block.
pub(crate) fn check_pem(path: &Path) -> Result<(), String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    if text.windows(11).any(|w| w == b"-----BEGIN ") {
        Ok(())
    } else {
        Err(format!(
            "{}: not a PEM file (no `-----BEGIN ` line)",
            path.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_on_a_plain_connection_and_half_a_key_pair_are_refused() {
        let some = Some(PathBuf::from("x.pem"));
        let p = field_problems(false, &some, &None, &None, "use mqtts://");
        assert_eq!(p.len(), 1);
        assert!(p[0].1.contains("use mqtts://"), "{p:?}");
        let p = field_problems(true, &None, &some, &None, "");
        assert_eq!(
            p,
            vec![(
                "tls_key",
                "tls_cert and tls_key must be given together".into()
            )]
        );
        assert!(field_problems(true, &some, &some, &some, "").is_empty());
    }

    #[test]
    fn tls_settings_only_exist_when_enabled() {
        let ca = Some(PathBuf::from("ca.pem"));
        assert_eq!(MqttTls::from_fields(false, &ca, &None, &None), None);
        let cert = Some(PathBuf::from("c.pem"));
        let key = Some(PathBuf::from("k.pem"));
        let tls = MqttTls::from_fields(true, &ca, &cert, &key).unwrap();
        assert_eq!(tls.ca, ca);
        assert_eq!(
            tls.client,
            Some((PathBuf::from("c.pem"), PathBuf::from("k.pem")))
        );
    }

    #[test]
    fn a_pem_file_is_recognised() {
        let dir = std::env::temp_dir().join(format!("edge-config-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.pem");
        std::fs::write(
            &good,
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let bad = dir.join("bad.pem");
        std::fs::write(&bad, "not a certificate").unwrap();
        assert_eq!(check_pem(&good), Ok(()));
        assert!(check_pem(&bad).unwrap_err().contains("not a PEM file"));
        assert!(
            check_pem(&dir.join("missing.pem"))
                .unwrap_err()
                .contains("cannot read")
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
