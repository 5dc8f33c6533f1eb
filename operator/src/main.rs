//! `agentgate-operator`: see `--help`.

use std::process::ExitCode;

use agentgate_operator::config::Settings;
use clap::Parser as _;

/// Bad configuration (`EX_USAGE`).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let settings = match Settings::try_parse() {
        Ok(s) => s,
        Err(e) if e.use_stderr() => {
            let reason = e.to_string();
            eprintln!(
                "agentgate-operator: {}",
                reason.lines().next().unwrap_or("invalid arguments")
            );
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let filter = match tracing_subscriber::EnvFilter::try_new(&settings.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "agentgate-operator: --log {:?} is not a valid filter: {e}",
                settings.log
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
            eprintln!("agentgate-operator: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agentgate_operator::run(settings, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ agentgate_operator::RunError::LostLease(_)) => {
            eprintln!("agentgate-operator: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("agentgate-operator: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
