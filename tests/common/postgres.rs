//! A PostgreSQL server of our own (from Debian's packages): a fresh
//! cluster in a temp dir, on a Unix socket only, or also on 127.0.0.1
//! with TLS required. As root, it runs as the `postgres` user.
//! [`Postgres::stop`] shuts it down fast (SIGINT); dropping it kills it
//! (SIGKILL).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

use super::{Certs, SOON, free_port, wait_until_blocking};

pub struct Postgres {
    child: Option<Child>,
    dir: TempDir,
    pub port: u16,
    /// Listening on 127.0.0.1 with TLS too.
    tls: bool,
}

/// Over TCP: TLS and a password (scram) only, so a plain connection is
/// refused; over the Unix socket: trusted, for [`Postgres::psql`].
const TLS_HBA: &str = "local all all trust\n\
                       hostssl all all 127.0.0.1/32 scram-sha-256\n\
                       hostnossl all all 127.0.0.1/32 reject\n";

impl Postgres {
    pub fn start() -> Postgres {
        Postgres::start_with(None)
    }

    /// Also on 127.0.0.1:`port`, with `ssl = on` and `certs`' server
    /// certificate (for `127.0.0.1` and `localhost`); TCP clients need TLS
    /// and a password.
    pub fn start_tls(certs: &Certs) -> Postgres {
        Postgres::start_with(Some(certs))
    }

    /// Runs `initdb`, starts the server and waits until it answers.
    fn start_with(tls: Option<&Certs>) -> Postgres {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        if is_root() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&data)
                .status()
                .unwrap();
            assert!(status.success());
        }
        let out = as_postgres(&postgres_bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "quotad", "--no-sync"])
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(certs) = tls {
            for name in ["server.crt", "server.key"] {
                install(&data, name, &std::fs::read(certs.path(name)).unwrap());
            }
            install(&data, "pg_hba.conf", TLS_HBA.as_bytes());
        }
        let mut pg = Postgres {
            child: None,
            dir,
            port: free_port(),
            tls: tls.is_some(),
        };
        pg.spawn();
        pg
    }

    fn spawn(&mut self) {
        let mut cmd = as_postgres(&postgres_bin("postgres"));
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-k")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-c", "fsync=off"]);
        if self.tls {
            cmd.args(["-c", "listen_addresses=127.0.0.1", "-c", "ssl=on"])
                .args([
                    "-c",
                    "ssl_cert_file=server.crt",
                    "-c",
                    "ssl_key_file=server.key",
                ]);
        } else {
            cmd.args(["-c", "listen_addresses="]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting postgres");
        self.child = Some(child);
        wait_until_blocking("PostgreSQL", SOON, || self.psql("SELECT 1") == "1");
    }

    /// A libpq connection string for quotad.
    pub fn url(&self) -> String {
        format!(
            "host={} port={} user=quotad dbname=postgres",
            self.dir.path().display(),
            self.port
        )
    }

    /// Runs SQL through `psql`; returns its unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .arg("-h")
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "quotad",
                "-d",
                "postgres",
                "-At",
                "-c",
                sql,
            ])
            .output()
            .expect("running psql");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Shuts the server down (fast shutdown) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGINT);
            }
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same data, and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `name` from the newest installed PostgreSQL version.
fn postgres_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: run ./scripts/test.sh, which installs it")
        .map(|e| e.unwrap().path())
        .collect();
    versions.sort();
    versions
        .last()
        .expect("a PostgreSQL version")
        .join("bin")
        .join(name)
}

/// Writes the server's own copy of a file into its data directory:
/// private, and owned by it (PostgreSQL wants its key so).
fn install(data: &Path, name: &str, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let to = data.join(name);
    std::fs::write(&to, contents).unwrap();
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
    if is_root() {
        let status = Command::new("chown")
            .arg("postgres:postgres")
            .arg(&to)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// A command running `program` as the `postgres` user when we are root
/// (PostgreSQL refuses to run as root).
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        // setpriv execs (unlike runuser), so killing it kills PostgreSQL.
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(program);
        c
    } else {
        Command::new(program)
    }
}
