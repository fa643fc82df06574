//! The amqps listener's TLS side: loads the configured certificate chain and key into a
//! rustls server configuration (ring crypto, TLS 1.2 and 1.3), and the stream types the
//! connection driver (`connection`) runs over, plain TCP or TLS alike.
//!
//! `main` accepts TCP connections on the amqps addresses and hands them here for the
//! handshake, bounded by the AMQP handshake timeout, before the connection sees a byte.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

/// A client connection's byte stream, split into halves the connection's reader and writer
/// tasks own. Plain TCP splits without locking; TLS shares its session between the halves.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn split_owned(self) -> (Self::Read, Self::Write);
}

impl ClientStream for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn split_owned(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl ClientStream for tokio_rustls::server::TlsStream<TcpStream> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn split_owned(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// Builds the acceptor; errors name the file and say what is wrong with it. With `ca_file`,
/// clients must present a certificate chain that leads to one of its CAs; the handshake of
/// any other client fails before AMQP starts.
pub fn acceptor(
    cert_file: &Path,
    key_file: &Path,
    ca_file: Option<&Path>,
) -> Result<TlsAcceptor, String> {
    let certs = load_certs(cert_file)?;
    let key = load_key(key_file)?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let builder = match ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let mut roots = RootCertStore::empty();
            for ca in load_certs(ca_file)? {
                roots
                    .add(ca)
                    .map_err(|e| format!("{}: {e}", ca_file.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("{}: {e}", ca_file.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "{} does not go with {}: {e}",
            key_file.display(),
            cert_file.display()
        )
    })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|e| format!("{}: {e}", path.display()))?
        .ok_or_else(|| format!("{}: no PEM private key in it", path.display()))
}
