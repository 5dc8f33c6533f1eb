//! A real Azure Blob service for a test: Azurite (npm `azurite`, installed by
//! `e2e/deps.sh` under `~/.cache/agentgate/npm`), over HTTPS with the test's PKI, with an
//! account and key of the test's own, its data in a temp dir. It can be stopped, frozen
//! and started again on the same port and data. The test talks to it with a Shared Key
//! client of its own (written here from Azure's documentation, not the sidecar's).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::Request;
use sha2::Sha256;

use super::{Pki, free_port, full, https_request};

/// `azurite-blob`, where `e2e/deps.sh` installs it.
pub fn bin() -> PathBuf {
    let prefix = std::env::var_os("AGENTGATE_NPM_PREFIX")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/agentgate/npm")
        });
    prefix.join("bin/azurite-blob")
}

/// A running (or stopped) Azurite.
pub struct Azurite {
    pub port: u16,
    pub account: String,
    /// The account key, base64 (as `--audit-azure-key-file` holds it).
    pub key: String,
    ca_pem: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Azurite {
    /// Starts Azurite over HTTPS with `pki`'s certificate, with a random account key.
    pub fn start(pki: &Pki) -> Self {
        let bin = bin();
        assert!(
            bin.exists(),
            "Azurite is not installed at {} (run e2e/deps.sh)",
            bin.display()
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), &pki.cert_pem).unwrap();
        std::fs::write(dir.path().join("key.pem"), &pki.key_pem).unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        let mut raw = [0u8; 64];
        getrandom::fill(&mut raw).unwrap();
        let mut azurite = Self {
            port: free_port(),
            account: "agentgateaudit".into(),
            key: base64::engine::general_purpose::STANDARD.encode(raw),
            ca_pem: pki.ca_pem.clone(),
            dir,
            child: None,
        };
        azurite.start_again();
        azurite
    }

    /// Starts it (again) on the same port and data.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("azurite.log"))
            .unwrap();
        let child = Command::new(bin())
            .args(["--blobHost", "127.0.0.1", "--blobPort"])
            .arg(self.port.to_string())
            .arg("--location")
            .arg(d.join("data"))
            .arg("--cert")
            .arg(d.join("cert.pem"))
            .arg("--key")
            .arg(d.join("key.pem"))
            .args(["--skipApiVersionCheck", "--loose", "--disableTelemetry"])
            // Azure keeps an idle connection for minutes; Azurite's 5 s default would
            // close one the test holds up on purpose.
            .args(["--blobKeepAliveTimeout", "60"])
            .env("AZURITE_ACCOUNTS", format!("{}:{}", self.account, self.key))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
        // Node takes seconds to load Azurite, more on a busy machine.
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("Azurite exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "Azurite did not listen:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Stops it with SIGTERM, as a service is stopped, and waits for it. (Azurite keeps
    /// its metadata in memory and saves it every few seconds and when it stops: after a
    /// SIGKILL it would forget appends it had acknowledged, which Azure never does.)
    pub fn stop(&mut self) {
        self.signal("TERM");
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "Azurite did not stop:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Freezes it (SIGSTOP): connections stay open and nothing answers.
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    /// Lets a frozen Azurite go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal("CONT");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("azurite.log")).unwrap_or_default()
    }

    /// The sink's URL for `container` and `prefix` (path-style, as for an emulator).
    pub fn url(&self, container: &str, prefix: &str) -> String {
        format!(
            "https://127.0.0.1:{}/{}/{container}/{prefix}",
            self.port, self.account
        )
    }

    /// Writes the account key where `--audit-azure-key-file` reads it.
    pub fn write_key(&self, path: &Path) {
        std::fs::write(path, format!("{}\n", self.key)).unwrap();
    }

    /// A Shared Key request: `path` under the account, `query` with plain values (none
    /// needs encoding here). Returns status and body.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> (u16, Vec<u8>) {
        let path = format!("/{}{path}", self.account);
        let date = k8s_openapi::jiff::Timestamp::now()
            .strftime("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let mut ms: Vec<(String, String)> = vec![
            ("x-ms-date".into(), date.clone()),
            ("x-ms-version".into(), "2021-12-02".into()),
        ];
        let mut standard = std::collections::HashMap::new();
        for (name, value) in headers {
            if name.starts_with("x-ms-") {
                ms.push(((*name).into(), (*value).into()));
            } else {
                standard.insert(name.to_ascii_lowercase(), (*value).to_owned());
            }
        }
        ms.sort();
        // https://learn.microsoft.com/rest/api/storageservices/authorize-with-shared-key
        let mut to_sign = format!("{method}\n");
        for name in [
            "content-encoding",
            "content-language",
            "content-length",
            "content-md5",
            "content-type",
            "date",
            "if-modified-since",
            "if-match",
            "if-none-match",
            "if-unmodified-since",
            "range",
        ] {
            to_sign.push_str(standard.get(name).map_or("", String::as_str));
            to_sign.push('\n');
        }
        for (name, value) in &ms {
            to_sign.push_str(&format!("{name}:{value}\n"));
        }
        to_sign.push_str(&format!("/{}{path}", self.account));
        let mut sorted: Vec<_> = query.to_vec();
        sorted.sort();
        for (name, value) in &sorted {
            to_sign.push_str(&format!("\n{name}:{value}"));
        }
        let key = base64::engine::general_purpose::STANDARD
            .decode(&self.key)
            .unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(to_sign.as_bytes());
        let signature =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let uri = if query.is_empty() {
            path.clone()
        } else {
            format!("{path}?{}", query.join("&"))
        };
        let mut req = Request::builder().method(method).uri(uri).header(
            "authorization",
            format!("SharedKey {}:{signature}", self.account),
        );
        for (name, value) in ms.iter() {
            req = req.header(name.as_str(), value.as_str());
        }
        for (name, value) in &standard {
            req = req.header(name.as_str(), value.as_str());
        }
        let (status, _, body) = https_request(
            self.port,
            &self.ca_pem,
            req.body(full(Bytes::new())).unwrap(),
        )
        .await
        .unwrap();
        (status, body)
    }

    pub async fn create_container(&self, container: &str) {
        let (status, body) = self
            .request(
                "PUT",
                &format!("/{container}"),
                &[("restype", "container")],
                &[],
            )
            .await;
        assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    }

    /// The names of the blobs in `container` under `prefix`, in order.
    pub async fn list(&self, container: &str, prefix: &str) -> Vec<String> {
        let (status, body) = self
            .request(
                "GET",
                &format!("/{container}"),
                &[
                    ("comp", "list"),
                    ("prefix", prefix),
                    ("restype", "container"),
                ],
                &[],
            )
            .await;
        let xml = String::from_utf8(body).unwrap();
        assert_eq!(status, 200, "{xml}");
        let mut names: Vec<String> = xml
            .split("<Name>")
            .skip(1)
            .map(|s| s.split("</Name>").next().unwrap().to_owned())
            .collect();
        names.sort();
        names
    }

    pub async fn get(&self, container: &str, blob: &str) -> Vec<u8> {
        let (status, body) = self
            .request("GET", &format!("/{container}/{blob}"), &[], &[])
            .await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        body
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A frozen process does not die of SIGKILL until it is let go on.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
