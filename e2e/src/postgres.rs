//! A real PostgreSQL server for a test: Debian's `postgresql` package (installed by
//! `e2e/deps.sh`), a fresh cluster in a temp dir, on a loopback port, with SCRAM
//! passwords. PostgreSQL refuses to run as root, so as root the server runs as `nobody`.
//! It is stopped when the value is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// The superuser's name and password.
pub const SUPERUSER: (&str, &str) = ("postgres", "superuser-password-9c1f");

/// A running server.
#[derive(Debug)]
pub struct Postgres {
    /// Its loopback port.
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    child: Child,
}

/// The directory of the installed server's programs (`initdb`, `postgres`, `pgbench`).
pub fn bin_dir() -> Result<PathBuf, String> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| format!("PostgreSQL is not installed (run e2e/deps.sh): {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found
        .pop()
        .ok_or_else(|| "PostgreSQL is not installed (run e2e/deps.sh)".into())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// `program` run as the server's user (`nobody` when this process is root).
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

impl Postgres {
    /// Initializes and starts a server; `setup_sql` then runs as the superuser.
    pub fn start(setup_sql: &str) -> Result<Self, String> {
        Self::start_with(setup_sql, None)
    }

    /// The same, serving TLS with this certificate and key (PEM) as well as plain text.
    pub fn start_with_tls(setup_sql: &str, cert_pem: &str, key_pem: &str) -> Result<Self, String> {
        Self::start_with(setup_sql, Some((cert_pem, key_pem)))
    }

    fn start_with(setup_sql: &str, tls: Option<(&str, &str)>) -> Result<Self, String> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("agentgate-pg")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, SUPERUSER.1).map_err(|e| e.to_string())?;
        let mut tls_args = Vec::new();
        if let Some((cert, key)) = tls {
            let (cert_file, key_file) =
                (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::write(&cert_file, cert).map_err(|e| e.to_string())?;
            std::fs::write(&key_file, key).map_err(|e| e.to_string())?;
            // The server refuses a key others can read.
            std::fs::set_permissions(
                &key_file,
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .map_err(|e| e.to_string())?;
            tls_args = vec![
                "-c".to_owned(),
                "ssl=on".to_owned(),
                "-c".to_owned(),
                format!("ssl_cert_file={}", cert_file.display()),
                "-c".to_owned(),
                format!("ssl_key_file={}", key_file.display()),
            ];
        }
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "nobody:nogroup"])
                .arg(dir.path())
                .status()
                .map_err(|e| e.to_string())?;
            if !status.success() {
                return Err("cannot hand the data directory to nobody".into());
            }
        }
        let out = as_server_user(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "--username",
                SUPERUSER.0,
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let port = free_port();
        let log =
            std::fs::File::create(dir.path().join("server.log")).map_err(|e| e.to_string())?;
        let child = as_server_user(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args([
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
            ])
            .arg(format!("unix_socket_directories={}", dir.path().display()))
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .args(&tls_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("postgres: {e}"))?;
        let server = Self {
            port,
            dir,
            bin,
            child,
        };
        server.wait_ready()?;
        if !setup_sql.is_empty() {
            server.psql_as(SUPERUSER, &["-v", "ON_ERROR_STOP=1", "-c", setup_sql])?;
        }
        Ok(server)
    }

    fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.psql_as(SUPERUSER, &["-c", "SELECT 1"]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("PostgreSQL did not start:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The installed server's program directory (for `pgbench`).
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Runs `psql` directly against the server as `(user, password)`, returning stdout.
    pub fn psql_as(&self, login: (&str, &str), args: &[&str]) -> Result<String, String> {
        let out = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                login.0,
                "-d",
                "postgres",
                "-X",
                "-A",
                "-t",
            ])
            .args(args)
            .env("PGPASSWORD", login.1)
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGKILL leaves shared memory to the OS; fine for a throwaway cluster.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
