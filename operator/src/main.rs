//! `agentgate-operator`: see `--help`.

use std::process::ExitCode;

use agentgate_operator::RunError;
use agentgate_operator::config::Settings;
use agentgate_process::Failure;

fn main() -> ExitCode {
    agentgate_process::main(
        "agentgate-operator",
        |settings: Settings, shutdown| async move {
            agentgate_operator::run(settings, shutdown)
                .await
                .map_err(|e| match e {
                    // Not a configuration problem: exit so the replica restarts as a candidate.
                    RunError::LostLease(_) => Failure {
                        code: 1,
                        reason: e.to_string(),
                    },
                    e => Failure::config(e),
                })
        },
    )
}
