//! TLS inside the server (`api serve --tls-cert --tls-key`), for deployments without a
//! TLS-terminating proxy; plain HTTP stays the default for running behind one.
//!
//! Built on `native-tls` / `tokio-native-tls` (the system's OpenSSL), not rustls: they are
//! already in the dependency tree (the gateway's MQTT TLS, the API's JWKS client), while rustls
//! would add its crypto provider (aws-lc-rs needs cmake; ring is a second copy of the crypto).
//! The listener implements axum's [`axum::serve::Listener`], so `axum::serve`, graceful
//! shutdown and the peer address (`ConnectInfo`, via `tap_io`) work as on plain TCP.
//! Handshakes run in their own tasks with a deadline, so a slow or silent client never holds
//! up the accept loop.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_native_tls::{TlsAcceptor, TlsStream};

/// Longest a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Completed handshakes waiting for the server to take them.
const QUEUE: usize = 256;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The certificate chain or key was refused.
    #[error(
        "certificate/key refused: {0} (expected a PEM certificate chain and a PEM PKCS#8 private key, \
         `-----BEGIN PRIVATE KEY-----`; convert others with `openssl pkcs8 -topk8 -nocrypt`)"
    )]
    Identity(native_tls::Error),
}

/// A TLS acceptor from a PEM certificate chain and a PEM PKCS#8 key.
///
/// # Errors
/// [`TlsError::Identity`] when OpenSSL refuses them.
pub fn acceptor_from_pem(cert: &[u8], key: &[u8]) -> Result<TlsAcceptor, TlsError> {
    let identity = native_tls::Identity::from_pkcs8(cert, key).map_err(TlsError::Identity)?;
    let acceptor = native_tls::TlsAcceptor::builder(identity)
        .min_protocol_version(Some(native_tls::Protocol::Tlsv12))
        .build()
        .map_err(TlsError::Identity)?;
    Ok(TlsAcceptor::from(acceptor))
}

/// A TLS acceptor from certificate and key files.
///
/// # Errors
/// [`TlsError`] when a file cannot be read or is refused.
pub fn acceptor_from_files(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.display().to_string(),
            source,
        })
    };
    acceptor_from_pem(&read(cert)?, &read(key)?)
}

/// A listener that hands `axum::serve` connections whose TLS handshake completed.
#[derive(Debug)]
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `tcp`; the accept task ends when the listener is dropped.
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(QUEUE);
        tokio::spawn(accept_loop(tcp, acceptor, tx));
        Ok(Self { ready, local })
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            () = tx.closed() => return,
            r = tcp.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a TCP connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _closed = tx.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task only ends once this receiver is gone, so this cannot happen
            // while `self` exists; park rather than panic.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
