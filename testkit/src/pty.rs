//! A socat pseudo-terminal pair: the two ends of a null-modem cable for serial M-Bus and
//! Modbus RTU tests (socat is in the base image).

use std::path::PathBuf;
use std::time::Duration;

/// Both ends of a running socat pair; socat is killed and the links removed on drop.
#[derive(Debug)]
pub struct PtyPair {
    /// One end (typically the gateway's master).
    pub a: PathBuf,
    /// The other end (typically the simulated slaves).
    pub b: PathBuf,
    _socat: tokio::process::Child,
    _dir: tempfile::TempDir,
}

/// How long socat may take to create the links.
pub const PTY_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts `socat pty,raw,echo=0 pty,raw,echo=0` with links in a fresh temporary directory and
/// waits until both exist.
///
/// # Panics
/// When socat is missing or the links do not appear within [`PTY_TIMEOUT`].
pub async fn pty_pair() -> PtyPair {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let socat = tokio::process::Command::new("socat")
        .arg(format!("pty,raw,echo=0,link={}", a.display()))
        .arg(format!("pty,raw,echo=0,link={}", b.display()))
        .kill_on_drop(true)
        .spawn()
        .expect("socat installed (apt-get install socat)");
    let deadline = tokio::time::Instant::now() + PTY_TIMEOUT;
    while !(a.try_exists().unwrap_or(false) && b.try_exists().unwrap_or(false)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "socat did not create {} and {} within {PTY_TIMEOUT:?}",
            a.display(),
            b.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    PtyPair {
        a,
        b,
        _socat: socat,
        _dir: dir,
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_cross_the_pair() {
        let p = super::pty_pair().await;
        let mut a = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p.a)
            .await
            .unwrap();
        let mut b = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p.b)
            .await
            .unwrap();
        a.write_all(b"\x10\x5b\xfe\x59\x16").await.unwrap();
        let mut buf = [0u8; 5];
        tokio::time::timeout(super::PTY_TIMEOUT, b.read_exact(&mut buf))
            .await
            .expect("bytes within 5 s")
            .unwrap();
        assert_eq!(&buf, b"\x10\x5b\xfe\x59\x16");
    }
}
