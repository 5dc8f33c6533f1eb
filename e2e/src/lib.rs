//! The test harness for agentgate's integration and end-to-end tests: a real
//! kube-apiserver and etcd, built from the upstream Go modules and started on loopback by
//! the scripts in `e2e/controlplane/`, with agentgate's CRDs applied.
//!
//! Each test binary shares one control plane ([`ControlPlane::shared`]) and each test
//! takes its own namespace ([`ControlPlane::namespace`]). The control plane stops by
//! itself when the test binary exits (a watchdog in `up.sh`), even when it panics.
//!
//! This crate is only ever a dev-dependency: nothing here ships.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

pub mod audit;
pub mod postgres;

/// The users of the control plane's token file, one kubeconfig context each.
pub mod users {
    /// `system:masters`.
    pub const ADMIN: &str = "admin";
    /// Groups `dba-oncall`.
    pub const ALICE: &str = "alice";
    /// Groups `developers`.
    pub const BOB: &str = "bob";
    /// Groups `dba-oncall`, `developers`.
    pub const CAROL: &str = "carol";
    /// carol as an OIDC-configured API server names her (`oidc:` + her e-mail); groups
    /// `dba-oncall`.
    pub const CAROL_OIDC: &str = "oidc:carol@example.com";
}

/// A running kube-apiserver + etcd pair.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    kubeconfig: PathBuf,
    bin: PathBuf,
}

static SHARED: OnceLock<ControlPlane> = OnceLock::new();
static NAMESPACES: AtomicUsize = AtomicUsize::new(0);

/// A loopback port that was free a moment ago, for a server a test starts.
pub fn free_port() -> u16 {
    // The kernel may hand a port it just gave (and that was released before its user
    // bound it) out again: never give the same one twice in this test process.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("the kernel hands out a free loopback port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e crate lives one level below the repository root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl ControlPlane {
    /// The control plane shared by every test of this test binary, started on first use
    /// with agentgate's CRDs (the committed `crds/manifests/`) applied and established.
    ///
    /// Panics with the reason (and the log location) when it cannot start: a test that
    /// needs the API server must fail, never skip, when there is none.
    pub fn shared() -> &'static ControlPlane {
        SHARED.get_or_init(|| {
            let cp =
                Self::start().unwrap_or_else(|e| panic!("cannot start the control plane: {e}"));
            cp.apply_crds()
                .unwrap_or_else(|e| panic!("cannot apply the CRDs: {e}"));
            cp
        })
    }

    /// Starts a new control plane in a fresh temporary directory, owned by this process.
    pub fn start() -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("agentgate-controlplane-")
            .tempdir()
            .map_err(|e| format!("cannot create a temp dir: {e}"))?
            .keep();
        let scripts = repo_root().join("e2e/controlplane");
        let bin = run(&mut Command::new(scripts.join("build.sh")))?;
        let bin = PathBuf::from(String::from_utf8_lossy(&bin.stdout).trim());
        let up = run(Command::new(scripts.join("up.sh"))
            .arg(&dir)
            .env("AGENTGATE_CP_OWNER_PID", std::process::id().to_string()))?;
        let kubeconfig = PathBuf::from(String::from_utf8_lossy(&up.stdout).trim());
        Ok(Self {
            dir,
            kubeconfig,
            bin,
        })
    }

    /// The admin kubeconfig (with a context per user of [`users`]).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL (`https://127.0.0.1:<port>`).
    pub fn server(&self) -> String {
        let kubeconfig = std::fs::read_to_string(&self.kubeconfig).unwrap_or_default();
        kubeconfig
            .split("server: \"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_default()
            .to_owned()
    }

    /// The CA certificate (PEM) that signed the API server's serving certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("pki/ca.crt")
    }

    /// Where the control plane keeps its state and logs (`apiserver.log`, `etcd.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `kubectl --kubeconfig <this control plane>`, as the admin unless `--context` is
    /// added.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }

    /// Runs kubectl with `args` and returns its stdout, or its stderr as the error.
    pub fn kubectl_output(&self, args: &[&str]) -> Result<String, String> {
        let out = run(self.kubectl().args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `helm --kubeconfig <this control plane>` (helm built by `e2e/controlplane/helm.sh`).
    pub fn helm(&self) -> Result<Command, String> {
        let out = run(&mut Command::new(
            repo_root().join("e2e/controlplane/helm.sh"),
        ))?;
        let mut cmd = Command::new(String::from_utf8_lossy(&out.stdout).trim());
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        Ok(cmd)
    }

    /// A client acting as the admin.
    pub async fn client(&self) -> Client {
        self.client_as(users::ADMIN).await
    }

    /// A client acting as `user` (one of [`users`]).
    pub async fn client_as(&self, user: &str) -> Client {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).expect("readable kubeconfig");
        let options = KubeConfigOptions {
            context: Some(user.to_owned()),
            ..Default::default()
        };
        let config = Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .unwrap_or_else(|e| panic!("no context {user} in the kubeconfig: {e}"));
        Client::try_from(config).expect("a client for the control plane")
    }

    /// Creates a namespace of its own for one test: `<prefix>-<pid>-<n>`.
    pub async fn namespace(&self, client: &Client, prefix: &str) -> String {
        let n = NAMESPACES.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("cannot create namespace {name}: {e}"));
        name
    }

    /// Waits until every agentgate CRD is Established.
    pub fn wait_for_crds(&self) -> Result<(), String> {
        let crds = agentgate_crds::all_crds().map_err(|e| e.to_string())?;
        let mut attempts = 0;
        loop {
            let mut wait = self.kubectl();
            wait.args(["wait", "--for=condition=Established", "--timeout=60s"]);
            for crd in &crds {
                wait.arg(format!(
                    "crd/{}",
                    crd.metadata.name.as_deref().unwrap_or_default()
                ));
            }
            match run(&mut wait) {
                // kubectl wait fails, instead of waiting, on a CRD so new that it has
                // no status conditions yet.
                Err(e) if e.contains(".status.conditions accessor error") && attempts < 10 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                result => return result.map(drop),
            }
        }
    }

    fn apply_crds(&self) -> Result<(), String> {
        let manifests = repo_root().join("crds/manifests");
        run(self
            .kubectl()
            .args(["apply", "--server-side", "-f"])
            .arg(&manifests))?;
        self.wait_for_crds()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The shared instance is never dropped; its watchdog stops it at exit.
        let _ = Command::new(repo_root().join("e2e/controlplane/down.sh"))
            .arg("--purge")
            .arg(&self.dir)
            .status();
    }
}
