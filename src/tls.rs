//! TLS pieces shared by the Redis and PostgreSQL connections (rustls on the
//! `ring` provider; no system OpenSSL).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{ConfigError, invalid};

/// Makes `ring` rustls's provider for the process; call once at start.
pub fn install_provider() {
    // Err: one is installed already (a second call), which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads a PEM file of certificates; errors name the field and the file.
pub fn read_certs(field: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let bad = |why: String| invalid(field, format!("{}: {why}", path.display()));
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad(
            "no certificate in it (expected PEM `BEGIN CERTIFICATE`)".into(),
        ));
    }
    Ok(pem)
}

/// Reads a PEM private key; errors name the field and the file, never the key.
pub fn read_key(field: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let bad = |why: String| invalid(field, format!("{}: {why}", path.display()));
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| bad(format!("no PEM private key: {e}")))?;
    Ok(pem)
}

/// The trust anchors: those in `ca_file` (field `field`), else the system's.
pub fn root_store(
    field: &str,
    ca_file: Option<&Path>,
) -> Result<rustls::RootCertStore, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = read_certs(field, path)?;
            for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
                roots
                    .add(cert)
                    .map_err(|e| invalid(field, format!("{}: {e}", path.display())))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(invalid(
                    field,
                    "no system root certificates found: give a CA file",
                ));
            }
        }
    }
    Ok(roots)
}

/// The reason, if `e` (any error that displays its cause) is this side
/// refusing the server's certificate. rustls's error reaches us wrapped in
/// `io::Error`s whose `source()` skips it, so it is found by its text.
pub fn certificate_rejected(e: &dyn std::fmt::Display) -> Option<String> {
    let text = e.to_string();
    let at = text.find("invalid peer certificate")?;
    Some(text[at..].to_owned())
}

/// The reason, if `e` is a TLS handshake that failed on either side (our
/// check of the server's certificate, or the server's alert, e.g. it
/// wanted a client certificate).
pub fn handshake_failed(e: &dyn std::fmt::Display) -> Option<String> {
    let text = e.to_string();
    let at = text
        .find("invalid peer certificate")
        .or_else(|| text.find("received fatal alert"))?;
    Some(text[at..].to_owned())
}

/// A verifier that accepts every certificate (PostgreSQL `sslmode=require`
/// and `prefer`, which encrypt without checking, as libpq does).
#[derive(Debug)]
pub struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl Default for AcceptAnyCertificate {
    fn default() -> Self {
        AcceptAnyCertificate(Arc::new(rustls::crypto::ring::default_provider()))
    }
}

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
