//! The pipeline's order, with a front end that says what each step sees: a denial is
//! never asked about, a limit refuses before a human is asked, a deferred hold is not
//! held, and only an approved request is recorded as allowed.

use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use agentgate_policy::classify::classify_http;
use agentgate_policy::{ApprovalPolicy, EffectiveLimits};

use super::*;
use crate::audit::{AuditSettings, Fsync, Sink};

#[test]
fn request_ids_are_ulids_that_differ_and_sort_by_time() {
    let ids = RequestIds::default();
    let a = ids.next();
    let b = ids.next();
    assert_eq!(a.len(), 26);
    assert_ne!(a, b);
    assert!(
        a.chars()
            .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
    );
    // The same millisecond prefix or a later one: never earlier.
    assert!(a[..10] <= b[..10]);
    // Another process draws another nonce.
    assert_ne!(RequestIds::default().next()[10..], a[10..]);
}

/// An approval hook that counts how often it is asked, and answers `approve`.
#[derive(Debug)]
struct Hook {
    asked: AtomicUsize,
    approve: bool,
}

impl ApprovalHook for Hook {
    fn decide<'a>(
        &'a self,
        _request: HeldRequest<'a>,
    ) -> std::pin::Pin<Box<dyn Future<Output = ApprovalOutcome> + Send + 'a>> {
        self.asked.fetch_add(1, Ordering::Relaxed);
        Box::pin(std::future::ready(if self.approve {
            ApprovalOutcome::Approved {
                approval: "apr-test".into(),
                by_grant: false,
            }
        } else {
            ApprovalOutcome::Refused {
                reason: "denied by a human".into(),
            }
        }))
    }
}

/// A front end whose verdict, deferral and limit are set by the test.
struct Fake {
    attrs: RequestAttrs,
    decision: Decision,
    defers: bool,
    limit: Option<&'static str>,
    previews: usize,
}

impl FrontEnd for Fake {
    fn attrs(&self) -> &RequestAttrs {
        &self.attrs
    }

    fn evaluate(&self, _policy: &CompiledPolicy) -> Evaluation {
        Evaluation {
            decision: self.decision.clone(),
            policy: Some("p".into()),
            masking: Arc::new(MaskingProfile::none()),
            limits: EffectiveLimits::default(),
        }
    }

    fn defers_approval(&self) -> bool {
        self.defers
    }

    fn limits(&self, _evaluation: &Evaluation) -> Result<(), Refusal> {
        match self.limit {
            Some(reason) => Err(Refusal::Limit {
                rule: None,
                policy: None,
                reason: reason.into(),
            }),
            None => Ok(()),
        }
    }

    async fn preview(&mut self, _evaluation: &Evaluation) -> Result<Option<Impact>, Refusal> {
        self.previews += 1;
        Ok(None)
    }

    fn summary(&self, _evaluation: &Evaluation) -> String {
        "GET /".into()
    }
}

fn held() -> Decision {
    let settings =
        serde_json::from_value(serde_json::json!({ "approvers": { "groups": ["dba"] } })).unwrap();
    Decision::RequireApproval {
        rule: Some("writes".into()),
        approval: ApprovalPolicy {
            settings,
            timeout: Duration::from_secs(60),
            grant_ttl: Duration::from_secs(60),
        },
    }
}

fn fake(decision: Decision) -> Fake {
    Fake {
        attrs: RequestAttrs {
            connection: "api".into(),
            identity: None,
            target: agentgate_policy::Target::Http(classify_http("GET", "h", "/", "").unwrap()),
        },
        decision,
        defers: false,
        limit: None,
        previews: 0,
    }
}

/// A gateway auditing to a file in `dir`, asking `hook`.
fn gateway(dir: &std::path::Path, hook: Arc<Hook>) -> Gateway {
    let client = crate::tls::http_client(
        rustls::RootCertStore::empty(),
        agentgate_crds::TlsMode::VerifyFull,
        None,
        Duration::from_secs(1),
    )
    .unwrap();
    let metrics = Metrics::new();
    Gateway {
        pod: "pod".into(),
        namespace: "ns".into(),
        config: Arc::new(ArcSwap::from_pointee(Runtime::deny_all())),
        identity: IdentityValidator::new(client),
        audit: Audit::open(
            &AuditSettings {
                sinks: vec![Sink::File(dir.join("audit.jsonl"))],
                spool: dir.join("spool"),
                max_spool_bytes: 1 << 20,
                segment_bytes: 1 << 16,
                fsync: Fsync::Never,
                remote: Default::default(),
            },
            None,
            &metrics,
            AuditEvent::default(),
            None,
        )
        .unwrap(),
        metrics,
        approvals: hook,
        audit_masking: audit_masking(),
        ids: RequestIds::default(),
    }
}

fn hook(approve: bool) -> Arc<Hook> {
    Arc::new(Hook {
        asked: AtomicUsize::new(0),
        approve,
    })
}

/// The audit events' kinds and decisions, in order.
fn trail(dir: &std::path::Path) -> Vec<(String, String)> {
    std::fs::read_to_string(dir.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["kind"].as_str().unwrap().to_owned(),
                v["decision"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn each_step_sees_only_what_the_steps_before_it_let_through() {
    let runtime = Runtime::deny_all();
    let dir = tempfile::tempdir().unwrap();
    let asked = hook(true);
    let gw = gateway(dir.path(), asked.clone());
    let decide = |mut front: Fake| {
        let gw = &gw;
        let runtime = &runtime;
        async move {
            let mut record = gw.record("api", serde_json::json!({}));
            let decided = gw.decide(runtime, &mut front, &mut record).await;
            if let Err(refusal) = &decided {
                gw.refuse(&mut record, refusal);
            }
            (decided.map(|_| ()), front.previews, record)
        }
    };

    // A denial: no preview, no one asked, recorded as denied.
    let (decided, previews, _) = decide(fake(Decision::Deny {
        rule: Some("no".into()),
        reason: "not this".into(),
    }))
    .await;
    assert!(matches!(decided, Err(Refusal::Denied { .. })));
    assert_eq!((previews, asked.asked.load(Ordering::Relaxed)), (0, 0));

    // A hold over a limit: refused before a preview is made or a human asked.
    let mut over = fake(held());
    over.limit = Some("the session's write budget is spent");
    let (decided, previews, _) = decide(over).await;
    assert!(matches!(decided, Err(Refusal::Limit { .. })));
    assert_eq!((previews, asked.asked.load(Ordering::Relaxed)), (0, 0));

    // A hold deferred (a Postgres Parse): not held now, recorded as allowed, saying so.
    let mut parse = fake(held());
    parse.defers = true;
    let (decided, previews, record) = decide(parse).await;
    assert!(decided.is_ok());
    assert_eq!((previews, asked.asked.load(Ordering::Relaxed)), (0, 0));
    assert!(
        record
            .event
            .reason
            .unwrap()
            .contains("asked when the statement is executed")
    );

    // A hold: previewed, recorded as held, asked once, then recorded as allowed.
    let (decided, previews, record) = decide(fake(held())).await;
    assert!(decided.is_ok());
    assert_eq!((previews, asked.asked.load(Ordering::Relaxed)), (1, 1));
    assert_eq!(record.approval.as_deref(), Some("apr-test"));

    // A human's refusal.
    let dir2 = tempfile::tempdir().unwrap();
    let refusing = gateway(dir2.path(), hook(false));
    let mut record = refusing.record("api", serde_json::json!({}));
    let decided = refusing
        .decide(&runtime, &mut fake(held()), &mut record)
        .await;
    assert!(matches!(decided, Err(Refusal::NotApproved { .. })));

    let kinds: Vec<(String, String)> = trail(dir.path());
    let expected = [
        ("decision", "deny"),
        ("decision", "deny"),
        ("decision", "allow"),
        ("held", "approve"),
        ("decision", "allow"),
    ];
    assert_eq!(
        kinds,
        expected
            .iter()
            .map(|(k, d)| ((*k).to_owned(), (*d).to_owned()))
            .collect::<Vec<_>>()
    );
}
