//! A throwaway CA and certificates for the TLS tests, made with the
//! `openssl` command; the Redis, Cluster, Sentinel and PostgreSQL
//! harnesses take a [`Certs`] to speak TLS.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use tempfile::TempDir;

use super::require;

/// `ca.crt`, `server.{crt,key}` and `client.{crt,key}` signed by it, and
/// `other-ca.crt`, a CA that signed nothing here. The server certificate
/// is for `127.0.0.1` and `localhost`. Clones share the files.
#[derive(Clone)]
pub struct Certs {
    dir: Arc<TempDir>,
}

impl Certs {
    pub fn generate() -> Certs {
        Certs::generate_for("IP:127.0.0.1,DNS:localhost")
    }

    /// The same with a server certificate for `names` only (a
    /// `subjectAltName`, e.g. `DNS:redis.test`).
    pub fn generate_for(names: &str) -> Certs {
        let c = Certs {
            dir: Arc::new(tempfile::tempdir().unwrap()),
        };
        c.ca("ca");
        c.ca("other-ca");
        c.leaf(
            "server",
            &format!("subjectAltName={names}\nextendedKeyUsage=serverAuth,clientAuth\n"),
        );
        c.leaf("client", "extendedKeyUsage=clientAuth\n");

        c
    }

    /// The path of one of the files, e.g. `ca.crt`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The path as a TOML string.
    pub fn toml(&self, name: &str) -> String {
        format!("{:?}", self.path(name).display().to_string())
    }

    fn ca(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=quotad test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ]);
    }

    fn leaf(&self, name: &str, ext: &str) {
        std::fs::write(self.path(&format!("{name}.ext")), ext).unwrap();
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.crt"),
        ]);
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new(require("openssl"))
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("running openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `redis-server` arguments for TLS on `port` (its bus and replication
    /// too); clients must show a certificate if `auth_clients`.
    pub fn redis_args(&self, port: u16, auth_clients: bool) -> Vec<String> {
        let p = |n: &str| self.path(n).display().to_string();
        vec![
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            p("server.crt"),
            "--tls-key-file".into(),
            p("server.key"),
            "--tls-ca-cert-file".into(),
            p("ca.crt"),
            "--tls-auth-clients".into(),
            yes_no(auth_clients).into(),
            "--tls-replication".into(),
            "yes".into(),
            "--tls-cluster".into(),
            "yes".into(),
        ]
    }

    /// `redis-cli` arguments for TLS with the CA and the client certificate.
    pub fn cli_args(&self) -> Vec<String> {
        let mut args = vec!["--tls".to_owned()];
        for (flag, file) in [
            ("--cacert", "ca.crt"),
            ("--cert", "client.crt"),
            ("--key", "client.key"),
        ] {
            args.push(flag.to_owned());
            args.push(self.path(file).display().to_string());
        }
        args
    }
}

pub fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}
