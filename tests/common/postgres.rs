//! A PostgreSQL server of our own (from Debian's packages): a fresh
//! cluster in a temp dir, on a Unix socket only. As root, it runs as the
//! `postgres` user. [`Postgres::stop`] shuts it down fast (SIGINT);
//! dropping it kills it (SIGKILL).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

use super::{SOON, free_port, wait_until_blocking};

pub struct Postgres {
    child: Option<Child>,
    dir: TempDir,
    pub port: u16,
}

impl Postgres {
    /// Runs `initdb`, starts the server and waits until it answers.
    pub fn start() -> Postgres {
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
        let mut pg = Postgres {
            child: None,
            dir,
            port: free_port(),
        };
        pg.spawn();
        pg
    }

    fn spawn(&mut self) {
        let child = as_postgres(&postgres_bin("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-k")
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=",
                "-c",
                "fsync=off",
            ])
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
