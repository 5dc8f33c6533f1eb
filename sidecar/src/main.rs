//! `agentgate-sidecar`: see `--help`.

use std::process::ExitCode;

use agentgate_process::Failure;
use agentgate_sidecar::config::Settings;

fn main() -> ExitCode {
    agentgate_process::main(
        "agentgate-sidecar",
        |settings: Settings, shutdown| async move {
            agentgate_sidecar::run(settings, shutdown)
                .await
                .map_err(Failure::config)
        },
    )
}
