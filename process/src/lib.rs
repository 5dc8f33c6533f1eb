//! What every agentgate binary does at its edge, in one place: parse flags (bad ones exit
//! with code 64 and a one-line reason), log JSON to stderr, run on a multi-threaded tokio
//! runtime until SIGTERM or Ctrl-C, accept connections without spinning on errors, and
//! register Prometheus metrics.
//!
//! It holds no agentgate logic: the binaries' own crates decide what runs.

use std::future::Future;
use std::process::ExitCode;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// The exit code of bad configuration (`EX_USAGE`).
pub const EXIT_CONFIG: u8 = 64;

/// Settings that name a log filter.
pub trait LogFilter {
    /// The `tracing` filter (`info`, `agentgate_sidecar=debug,info`).
    fn log_filter(&self) -> &str;
}

/// Why a binary stopped: the exit code and a one-line reason.
#[derive(Debug)]
pub struct Failure {
    /// The process exit code.
    pub code: u8,
    /// What to print.
    pub reason: String,
}

impl Failure {
    /// A configuration problem (exit code 64).
    pub fn config(reason: impl std::fmt::Display) -> Self {
        Self {
            code: EXIT_CONFIG,
            reason: reason.to_string(),
        }
    }
}

/// Parses `S` from the command line and environment, sets up logging, and runs `run`
/// with a future that completes on SIGTERM or Ctrl-C.
pub fn main<S, F, Fut>(name: &str, run: F) -> ExitCode
where
    S: clap::Parser + LogFilter,
    F: FnOnce(S, std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>>) -> Fut,
    Fut: Future<Output = Result<(), Failure>>,
{
    let settings = match S::try_parse() {
        Ok(s) => s,
        Err(e) if e.use_stderr() => {
            let reason = e.to_string();
            eprintln!(
                "{name}: {}",
                reason.lines().next().unwrap_or("invalid arguments")
            );
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let filter = match tracing_subscriber::EnvFilter::try_new(settings.log_filter()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "{name}: --log {:?} is not a valid filter: {e}",
                settings.log_filter()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings, Box::pin(shutdown_signal()))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("{name}: {}", failure.reason);
            ExitCode::from(failure.code)
        }
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Registers a counter vector. Names and labels are constants of the binaries, so a
/// failure here is a programming error.
pub fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable!("{name}: {e}"));
    registry
        .register(Box::new(c.clone()))
        .unwrap_or_else(|e| unreachable!("{name}: {e}"));
    c
}

/// Registers a histogram vector with `buckets` (in seconds).
pub fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
    labels: &[&str],
) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .unwrap_or_else(|e| unreachable!("{name}: {e}"));
    registry
        .register(Box::new(h.clone()))
        .unwrap_or_else(|e| unreachable!("{name}: {e}"));
    h
}

/// Registers a gauge.
pub fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| unreachable!("{name}: {e}"));
    registry
        .register(Box::new(g.clone()))
        .unwrap_or_else(|e| unreachable!("{name}: {e}"));
    g
}

/// The text exposition of every metric in `registry`.
pub fn render(registry: &Registry) -> String {
    use prometheus::Encoder as _;
    let mut out = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The next connection on `listener` (`what` names it in the log). An accept error —
/// out of file descriptors (EMFILE, ENFILE), out of memory — is logged and retried after
/// a pause that doubles up to a second, instead of spinning on a core.
pub async fn accept(listener: &tokio::net::TcpListener, what: &str) -> tokio::net::TcpStream {
    let mut pause = std::time::Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => return stream,
            Err(e) => {
                tracing::warn!(listener = what, error = %e, pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX), "accept failed; retrying after a pause");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
            }
        }
    }
}
