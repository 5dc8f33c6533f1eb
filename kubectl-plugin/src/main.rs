//! `kubectl agentgate`: the approver's side of agentgate. It lists the requests agents'
//! sidecars hold for a human and records decisions by patching the `Approval` — the API
//! server and agentgate's admission webhooks do all the enforcing (who may decide,
//! `decidedBy`, finality), so `kubectl patch` works the same.

use std::process::ExitCode;

use agentgate_crds::audit::Head;
use agentgate_crds::{AgentSession, Approval, ApprovalPhase};
use agentgate_process::{Failure, LogFilter};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Api, Client, Config};
use serde_json::json;

/// List, approve and deny the agent requests agentgate holds for a human.
#[derive(Debug, Parser)]
#[command(name = "kubectl agentgate", version)]
struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
    /// The kubeconfig file (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<std::path::PathBuf>,
    /// Log filter for diagnostics on stderr.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List held requests: pending ones, or all with --all.
    Approvals {
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Every phase, not only Pending.
        #[arg(long)]
        all: bool,
        /// Keep listing new and changed Approvals as they come.
        #[arg(short, long)]
        watch: bool,
    },
    /// Approve a held request.
    Approve {
        /// The Approval's name (`apr-…`).
        name: String,
        /// Why (kept on the Approval and in the audit trail).
        #[arg(long)]
        reason: String,
    },
    /// Deny a held request.
    Deny {
        /// The Approval's name (`apr-…`).
        name: String,
        /// Why (the agent is told).
        #[arg(long)]
        reason: String,
    },
    /// List agent sessions: who used which agent pod, what was decided, the head of the
    /// audit chain as etcd holds it.
    Sessions {
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Work with a sidecar's audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Verify a trail (a file sink, or the spool's segments concatenated in order): every
    /// event's hash, its link to the one before, no sequence missing or out of order.
    /// Exits 1 naming the first bad event and what is wrong with it.
    Verify {
        /// The trail: JSON lines as the sidecar writes them.
        file: std::path::PathBuf,
        /// A head the trail must hold, as `SEQ:HASH`: events cut off before it, or
        /// rewritten up to it, are found too.
        #[arg(long, value_parser = parse_head, conflicts_with = "session")]
        head: Option<Head>,
        /// Take that head from this AgentSession's `status.audit` (as etcd holds it).
        #[arg(long)]
        session: Option<String>,
    },
    /// A readable timeline of a trail, verified first: what the agent asked, what was
    /// decided and by which rule or approver, what came back.
    Replay {
        /// The trail: JSON lines as the sidecar writes them.
        file: std::path::PathBuf,
        /// Only the events of this request id.
        #[arg(long)]
        request_id: Option<String>,
        /// Only the events of this identity (its subject or e-mail).
        #[arg(long)]
        identity: Option<String>,
    },
}

fn parse_head(s: &str) -> Result<Head, String> {
    let (seq, hash) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not SEQ:HASH"))?;
    Ok(Head {
        seq: seq
            .parse()
            .map_err(|_| format!("{seq:?} is not a sequence number"))?,
        hash: hash.to_owned(),
    })
}

fn session_header(all_namespaces: bool) -> String {
    let ns = if all_namespaces { "NAMESPACE  " } else { "" };
    format!(
        "{ns}NAME  POD  SUBJECT  PHASE  REQUESTS  ALLOWED  DENIED  APPROVALS  ROWS-MODIFIED  LAST-ACTIVITY  AUDIT-HEAD"
    )
}

fn session_row(s: &AgentSession, all_namespaces: bool) -> String {
    let status = s.status.clone().unwrap_or_default();
    let c = &status.counters;
    let ns = if all_namespaces {
        format!("{}  ", s.metadata.namespace.as_deref().unwrap_or("-"))
    } else {
        String::new()
    };
    let subject = s.spec.identity.as_ref().map_or("-".to_owned(), |i| {
        i.email.clone().unwrap_or(i.subject.clone())
    });
    let phase = status.phase.map_or("-".to_owned(), |p| format!("{p:?}"));
    let last = status
        .last_activity
        .map_or("-".to_owned(), |t| t.0.to_string());
    let head = status.audit.map_or("-".to_owned(), |a| {
        format!(
            "{}:{}",
            a.last_seq,
            a.chain_head.chars().take(12).collect::<String>()
        )
    });
    format!(
        "{ns}{}  {}  {subject}  {phase}  {}  {}  {}  {}/{}  {}  {last}  {head}",
        s.metadata.name.as_deref().unwrap_or("-"),
        s.spec.agent.pod,
        c.requests,
        c.allowed,
        c.denied,
        c.approvals_granted,
        c.approvals_requested,
        c.rows_modified
    )
}

/// One line per event of a verified trail, filtered by request id or identity.
fn timeline(
    verified: &agentgate_crds::audit::Verified,
    request_id: Option<&str>,
    identity: Option<&str>,
) -> Vec<String> {
    use agentgate_crds::audit::EventKind;
    verified
        .events
        .iter()
        .map(|l| (&l.envelope, &l.envelope.event))
        .filter(|(_, e)| request_id.is_none_or(|id| e.request_id == id))
        .filter(|(_, e)| {
            identity.is_none_or(|who| {
                e.identity.as_ref().is_some_and(|i| {
                    i["subject"].as_str() == Some(who) || i["email"].as_str() == Some(who)
                })
            })
        })
        .map(|(envelope, e)| {
            let r = &e.request;
            let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
            let what = if let Some(sql) = r["sql"].as_str() {
                sql.to_owned()
            } else if r["verb"].is_string() {
                format!(
                    "{} {} {}",
                    text(&r["verb"]),
                    text(&r["resource"]),
                    text(&r["name"])
                )
            } else if r["path"].is_string() {
                format!("{} {}", text(&r["method"]), text(&r["path"]))
            } else if r["startup"] == true {
                "session start".to_owned()
            } else {
                String::new()
            };
            let who = e
                .identity
                .as_ref()
                .and_then(|i| i["email"].as_str().or(i["subject"].as_str()))
                .unwrap_or("-");
            let mut outcome = match e.kind {
                EventKind::Decision | EventKind::Held => e.decision.clone(),
                EventKind::Completed => match (e.status, e.rows_affected, e.rows_returned) {
                    (Some(status), _, _) => format!("done {status}"),
                    (None, Some(n), _) => format!("done, {n} rows changed"),
                    (None, None, Some(n)) => format!("done, {n} rows"),
                    _ => "done".to_owned(),
                },
                EventKind::Restart => match &e.resumed {
                    Some(r) if r.clean => "after a clean stop".to_owned(),
                    _ => "after a crash".to_owned(),
                },
                _ => String::new(),
            };
            if let Some(rule) = &e.rule {
                outcome.push_str(&format!(" rule {rule}"));
            }
            if let Some(approval) = &e.approval {
                outcome.push_str(&format!(" ({approval})"));
            }
            if let Some(reason) = &e.reason {
                outcome.push_str(&format!(": {reason}"));
            }
            let masked: u64 = e.masked.values().sum();
            if masked > 0 {
                outcome.push_str(&format!(" [{masked} values masked]"));
            }
            format!(
                "{}  #{}  {:<9}  {}  {who}  {what}  -> {outcome}",
                envelope.time,
                envelope.seq,
                format!("{:?}", e.kind).to_lowercase(),
                if e.connection.is_empty() {
                    "-"
                } else {
                    &e.connection
                },
            )
        })
        .collect()
}

/// What `audit verify` prints for a trail that verifies, or why it does not.
fn verify_report(text: &str, head: Option<&Head>) -> Result<String, Failure> {
    let verified = agentgate_crds::audit::verify(text, head).map_err(|e| Failure {
        code: 1,
        reason: format!("the trail does not verify: {e}"),
    })?;
    Ok(format!(
        "verified: {} events, seq {}..{}, head {}:{}, {} crash boundaries",
        verified.events.len(),
        verified.first_seq,
        verified.head.seq,
        verified.head.seq,
        verified.head.hash,
        verified.crashes
    ))
}

impl LogFilter for Cli {
    fn log_filter(&self) -> &str {
        &self.log
    }
}

fn main() -> ExitCode {
    agentgate_process::main("kubectl-agentgate", |cli: Cli, _shutdown| run(cli))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    // Reading a trail needs no cluster.
    if let Command::Audit {
        command:
            AuditCommand::Replay {
                file,
                request_id,
                identity,
            },
    } = &cli.command
    {
        let text = std::fs::read_to_string(file)
            .map_err(|e| Failure::config(format!("cannot read {}: {e}", file.display())))?;
        let verified = agentgate_crds::audit::verify(&text, None).map_err(|e| Failure {
            code: 1,
            reason: format!("the trail does not verify, so it is not replayed: {e}"),
        })?;
        for line in timeline(&verified, request_id.as_deref(), identity.as_deref()) {
            println!("{line}");
        }
        return Ok(());
    }
    if let Command::Audit {
        command:
            AuditCommand::Verify {
                file,
                head,
                session: None,
            },
    } = &cli.command
    {
        let text = std::fs::read_to_string(file)
            .map_err(|e| Failure::config(format!("cannot read {}: {e}", file.display())))?;
        println!("{}", verify_report(&text, head.as_ref())?);
        return Ok(());
    }
    let options = KubeConfigOptions {
        context: cli.context.clone(),
        ..Default::default()
    };
    let config = match &cli.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(Failure::config)?;
            Config::from_custom_kubeconfig(kubeconfig, &options).await
        }
        None => Config::from_kubeconfig(&options).await,
    }
    .map_err(|e| Failure::config(format!("no usable kubeconfig: {e}")))?;
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(Failure::config)?;
    let failed = |e: kube::Error| Failure {
        code: 1,
        reason: match e {
            kube::Error::Api(status) => status.message,
            other => other.to_string(),
        },
    };
    match cli.command {
        Command::Approvals {
            all_namespaces,
            all,
            watch,
        } => {
            let api: Api<Approval> = if all_namespaces {
                Api::all(client)
            } else {
                Api::namespaced(client, &namespace)
            };
            println!("{}", header(all_namespaces));
            if watch {
                let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
                while let Some(event) = events.next().await {
                    match event {
                        Ok(watcher::Event::Apply(a) | watcher::Event::InitApply(a))
                            if all || is_pending(&a) =>
                        {
                            println!("{}", row(&a, all_namespaces));
                        }
                        Ok(_) => {}
                        Err(e) => eprintln!("kubectl-agentgate: watch: {e}"),
                    }
                }
                return Ok(());
            }
            let mut list = api.list(&Default::default()).await.map_err(failed)?.items;
            list.sort_by_key(|a| a.metadata.creation_timestamp.clone().map(|t| t.0));
            for a in list.iter().filter(|a| all || is_pending(a)) {
                println!("{}", row(a, all_namespaces));
            }
            Ok(())
        }
        Command::Approve { name, reason } => decide(client, &namespace, &name, "Approved", &reason)
            .await
            .map_err(failed),
        Command::Deny { name, reason } => decide(client, &namespace, &name, "Denied", &reason)
            .await
            .map_err(failed),
        Command::Sessions { all_namespaces } => {
            let api: Api<AgentSession> = if all_namespaces {
                Api::all(client)
            } else {
                Api::namespaced(client, &namespace)
            };
            let mut list = api.list(&Default::default()).await.map_err(failed)?.items;
            list.sort_by_key(|s| s.metadata.creation_timestamp.clone().map(|t| t.0));
            println!("{}", session_header(all_namespaces));
            for s in &list {
                println!("{}", session_row(s, all_namespaces));
            }
            Ok(())
        }
        Command::Audit {
            command:
                AuditCommand::Verify {
                    file,
                    session: Some(session),
                    ..
                },
        } => {
            let found = Api::<AgentSession>::namespaced(client, &namespace)
                .get(&session)
                .await
                .map_err(failed)?;
            let audit = found.status.and_then(|s| s.audit).ok_or_else(|| Failure {
                code: 1,
                reason: format!("AgentSession {session} records no audit head yet"),
            })?;
            let head = Head {
                seq: u64::try_from(audit.last_seq).unwrap_or(0),
                hash: audit.chain_head,
            };
            let text = std::fs::read_to_string(&file)
                .map_err(|e| Failure::config(format!("cannot read {}: {e}", file.display())))?;
            println!("{}", verify_report(&text, Some(&head))?);
            Ok(())
        }
        Command::Audit { .. } => unreachable!("answered without a cluster above"),
    }
}

async fn decide(
    client: Client,
    namespace: &str,
    name: &str,
    decision: &str,
    reason: &str,
) -> Result<(), kube::Error> {
    let api: Api<Approval> = Api::namespaced(client, namespace);
    let patch = json!({ "spec": { "decision": decision, "reason": reason } });
    let decided = api
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    println!(
        "approval.agentgate.dev/{name} {} by {}",
        decision.to_lowercase(),
        decided.spec.decided_by.as_deref().unwrap_or("?")
    );
    Ok(())
}

fn is_pending(a: &Approval) -> bool {
    a.spec.decision.is_none()
        && a.status
            .as_ref()
            .and_then(|s| s.phase)
            .is_none_or(|p| p == ApprovalPhase::Pending)
}

fn header(namespaces: bool) -> String {
    let ns = if namespaces {
        format!("{:<20} ", "NAMESPACE")
    } else {
        String::new()
    };
    format!(
        "{ns}{:<12} {:<9} {:<6} {:<24} {:<16} {:<20} {:<9} SUMMARY",
        "NAME", "PHASE", "AGE", "REQUESTER", "CONNECTION", "RULE", "EST-ROWS"
    )
}

fn row(a: &Approval, namespaces: bool) -> String {
    let ns = if namespaces {
        format!("{:<20} ", a.metadata.namespace.as_deref().unwrap_or(""))
    } else {
        String::new()
    };
    let phase = a
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .map_or_else(|| "Pending".to_owned(), |p| format!("{p:?}"));
    let age = a.metadata.creation_timestamp.as_ref().map_or_else(
        || "?".to_owned(),
        |t| age(Timestamp::now().duration_since(t.0).as_secs()),
    );
    let requester = a
        .spec
        .requester
        .email
        .clone()
        .unwrap_or_else(|| a.spec.requester.subject.clone());
    let summary: String = a
        .spec
        .request
        .summary
        .replace('\n', " ")
        .chars()
        .take(80)
        .collect();
    // The planner's estimate of the rows a held UPDATE/DELETE changes, or the objects a
    // Kubernetes deletecollection deletes.
    let estimate = a
        .spec
        .request
        .impact
        .as_ref()
        .and_then(|i| i.estimated_rows)
        .map_or_else(|| "-".to_owned(), |n| n.to_string());
    let mut row = format!(
        "{ns}{:<12} {:<9} {:<6} {:<24} {:<16} {:<20} {:<9} {summary}",
        a.metadata.name.as_deref().unwrap_or(""),
        phase,
        age,
        requester,
        a.spec.connection,
        a.spec.rule,
        estimate
    );
    // What the preview says the request would do (the planner's basis, the API server's
    // dry run), on its own line: too long for a column.
    if let Some(impact) = a
        .spec
        .request
        .impact
        .as_ref()
        .filter(|i| !i.detail.is_empty())
    {
        row.push_str(&format!(
            "\n    impact: {}",
            impact.detail.replace('\n', " ")
        ));
    }
    row
}

/// `42s`, `7m`, `3h`, `2d`, as kubectl shows ages.
fn age(seconds: i64) -> String {
    match seconds.max(0) {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentgate_crds::audit::{AuditEvent, chain_line};

    #[test]
    fn audit_verify_names_the_first_bad_event() {
        let mut head = Head::genesis();
        let mut trail = String::new();
        for i in 0..3 {
            let event = AuditEvent {
                request_id: format!("r{i}"),
                ..Default::default()
            };
            let (line, next) = chain_line(&head, "2026-12-06T00:00:00Z".into(), &event).unwrap();
            trail.push_str(&line);
            head = next;
        }
        let report = verify_report(&trail, Some(&head)).unwrap();
        assert!(
            report.starts_with("verified: 3 events, seq 1..3"),
            "{report}"
        );
        let given = parse_head(&format!("{}:{}", head.seq, head.hash)).unwrap();
        assert_eq!(given, head);
        let cut: String = trail.lines().take(2).map(|l| format!("{l}\n")).collect();
        let failure = verify_report(&cut, Some(&head)).unwrap_err();
        assert!(
            verify_report(
                &trail,
                Some(&Head {
                    seq: 2,
                    hash: head.hash.clone()
                })
            )
            .is_err(),
            "a rewritten event"
        );
        assert_eq!(failure.code, 1);
        assert!(
            failure.reason.contains("removed from its end"),
            "{}",
            failure.reason
        );
        let edited = trail.replacen("r1", "r9", 1);
        let failure = verify_report(&edited, None).unwrap_err();
        assert!(failure.reason.contains("line 2 (seq"), "{}", failure.reason);
        assert!(parse_head("12").is_err());
    }

    #[test]
    fn replay_tells_each_event_in_words() {
        let mut head = Head::genesis();
        let mut trail = String::new();
        let events = [
            serde_json::json!({ "kind": "decision", "requestId": "r1", "connection": "db",
                "identity": { "subject": "u1", "email": "carol@example.com" },
                "request": { "sql": "DELETE FROM orders WHERE id = $1" },
                "decision": "allow", "rule": "deletes", "approval": "apr-x", "reason": "approved in apr-x" }),
            serde_json::json!({ "kind": "completed", "requestId": "r1", "connection": "db",
                "identity": { "subject": "u1", "email": "carol@example.com" },
                "request": { "sql": "DELETE FROM orders WHERE id = $1" }, "rowsAffected": 1 }),
            serde_json::json!({ "kind": "decision", "requestId": "r2", "connection": "api",
                "request": { "method": "GET", "path": "/x" }, "decision": "deny", "reason": "no rule" }),
        ];
        for e in events {
            let event: AuditEvent = serde_json::from_value(e).unwrap();
            let (line, next) = chain_line(&head, "2026-12-06T00:00:00Z".into(), &event).unwrap();
            trail.push_str(&line);
            head = next;
        }
        let verified = agentgate_crds::audit::verify(&trail, None).unwrap();
        let all = timeline(&verified, None, None);
        assert_eq!(all.len(), 3);
        assert!(
            all[0].contains("carol@example.com")
                && all[0].contains("DELETE FROM orders")
                && all[0].contains("allow rule deletes (apr-x)"),
            "{}",
            all[0]
        );
        assert!(all[1].contains("1 rows changed"), "{}", all[1]);
        assert!(
            all[2].contains("GET /x") && all[2].contains("deny: no rule"),
            "{}",
            all[2]
        );
        assert_eq!(timeline(&verified, Some("r2"), None).len(), 1);
        assert_eq!(
            timeline(&verified, None, Some("carol@example.com")).len(),
            2
        );
    }
}
