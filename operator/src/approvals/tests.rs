use agentgate_crds::ApprovalSpec;
use serde_json::json;

use super::*;

fn approval(decision: Option<&str>, decided_by: Option<&str>) -> Approval {
    approval_by(decision, decided_by, &["dba-oncall"])
}

fn approval_by(decision: Option<&str>, decided_by: Option<&str>, groups: &[&str]) -> Approval {
    let mut spec = json!({
        "connection": "orders-db", "policy": "prod-agents", "rule": "writes-need-a-dba",
        "agent": { "pod": "claude-7f9c", "serviceAccount": "claude", "namespace": "agents" },
        "requester": { "subject": "u-42", "email": "dev@example.com", "groups": ["developers"] },
        "request": { "protocol": "postgres", "summary": "DELETE FROM orders WHERE id = $1", "fingerprint": "4f1c",
                     "classification": { "statements": ["delete"], "tables": ["public.orders"] } },
        "approvers": { "groups": ["dba-oncall"] },
        "grant": "once",
        "expiresAt": "2030-01-01T00:00:00Z",
    });
    if let Some(d) = decision {
        spec["decision"] = json!(d);
    }
    if let Some(by) = decided_by {
        spec["decidedBy"] = json!(by);
        spec["decidedByGroups"] = json!(groups);
    }
    let spec: ApprovalSpec = serde_json::from_value(spec).unwrap();
    Approval::new("apr-x7k2", spec)
}

fn user(name: &str, groups: &[&str]) -> Decider {
    Decider {
        username: name.into(),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        namespace: "agents".into(),
    }
}

fn check(
    new: &Approval,
    old: Option<&Approval>,
    decider: &Decider,
    now: Timestamp,
) -> Result<(), String> {
    let model = IdentityModel {
        username_prefixes: vec!["aad-".into()],
    };
    super::check(new, old, decider, &model, now)
}

fn now() -> Timestamp {
    "2026-11-22T00:00:00Z".parse().unwrap()
}

#[test]
fn decided_by_is_stamped_from_the_request_user_only_when_deciding() {
    let alice = user("alice", &["dba-oncall"]);
    let pending = approval(None, None);
    let forged = approval(Some("Approved"), Some("someone-else"));
    let patch = stamp(&forged, Some(&pending), &alice).unwrap();
    assert_eq!(
        serde_json::to_value(&patch).unwrap(),
        json!([{ "op": "add", "path": "/spec/decidedBy", "value": "alice" },
               { "op": "add", "path": "/spec/decidedByGroups", "value": ["dba-oncall"] }])
    );
    assert!(
        stamp(&pending, None, &alice).is_none(),
        "creating a pending Approval"
    );
    assert!(
        stamp(&forged, Some(&forged), &alice).is_none(),
        "already decided"
    );
}

#[test]
fn separation_of_duties() {
    let pending = approval(None, None);
    let check_as = |d: &Decider| {
        let groups: Vec<&str> = d.groups.iter().map(String::as_str).collect();
        let decided = approval_by(Some("Approved"), Some(&d.username), &groups);
        check(&decided, Some(&pending), d, now())
    };
    assert_eq!(check_as(&user("alice", &["dba-oncall"])), Ok(()));
    let outsider = check_as(&user("bob", &["developers"])).unwrap_err();
    assert!(
        outsider.contains("not in the approver groups"),
        "{outsider}"
    );
    let requester = check_as(&user("dev@example.com", &["dba-oncall"])).unwrap_err();
    assert!(requester.contains("cannot decide"), "{requester}");
    let by_subject = check_as(&user("u-42", &["dba-oncall"])).unwrap_err();
    assert!(by_subject.contains("cannot decide"), "{by_subject}");
    let agent = check_as(&user(
        "system:serviceaccount:agents:agentgate-sidecar",
        &["dba-oncall"],
    ))
    .unwrap_err();
    assert!(agent.contains("service account"), "{agent}");
    // A service account elsewhere in the approver group may decide (an approval bot).
    assert_eq!(
        check_as(&user("system:serviceaccount:ops:bot", &["dba-oncall"])),
        Ok(())
    );
}

#[test]
fn decisions_are_final_expiry_holds_and_decided_by_must_be_the_decider() {
    let alice = user("alice", &["dba-oncall"]);
    let approved = approval(Some("Approved"), Some("alice"));
    let denied = approval(Some("Denied"), Some("alice"));
    assert!(
        check(&denied, Some(&approved), &alice, now())
            .unwrap_err()
            .contains("cannot be changed")
    );
    assert_eq!(
        check(&approved, Some(&approved), &alice, now()),
        Ok(()),
        "an unchanged decided object"
    );
    let late: Timestamp = "2031-01-01T00:00:00Z".parse().unwrap();
    let pending = approval(None, None);
    assert!(
        check(&approved, Some(&pending), &alice, late)
            .unwrap_err()
            .contains("expired")
    );
    assert_eq!(
        check(&denied, Some(&pending), &alice, late),
        Ok(()),
        "denying an expired request is fine"
    );
    let mut orphaned = approval(Some("Approved"), Some("alice"));
    orphaned.status = Some(agentgate_crds::ApprovalStatus {
        phase: Some(agentgate_crds::ApprovalPhase::Expired),
        ..Default::default()
    });
    assert!(
        check(&orphaned, Some(&pending), &alice, now())
            .unwrap_err()
            .contains("expired")
    );
    let forged = approval(Some("Approved"), Some("carol"));
    assert!(
        check(&forged, Some(&pending), &alice, now())
            .unwrap_err()
            .contains("decidedBy")
    );
}

#[test]
fn the_requester_is_recognized_under_every_spelling_of_their_name() {
    let pending = approval(None, None);
    for name in [
        "oidc:dev@example.com",
        "DEV@Example.com",
        "https://login.example/tenant/v2.0#u-42",
        "aad-u-42",
        "oidc:U-42",
    ] {
        let d = user(name, &["dba-oncall"]);
        let decided = approval_by(Some("Approved"), Some(name), &["dba-oncall"]);
        let err = check(&decided, Some(&pending), &d, now()).unwrap_err();
        assert!(err.contains("cannot decide"), "{name}: {err}");
    }
    // Someone else whose name merely ends alike is not the requester.
    let d = user("oidc:alice@example.com", &["dba-oncall"]);
    let decided = approval_by(
        Some("Approved"),
        Some("oidc:alice@example.com"),
        &["dba-oncall"],
    );
    assert_eq!(check(&decided, Some(&pending), &d, now()), Ok(()));
}

#[test]
fn approvals_are_created_undecided_by_the_agents_own_sidecar_in_its_own_namespace() {
    let sidecar = user(
        "system:serviceaccount:agents:claude",
        &["system:serviceaccounts"],
    );
    assert_eq!(check(&approval(None, None), None, &sidecar, now()), Ok(()));
    // Never created decided.
    let decided = approval(Some("Approved"), Some("alice"));
    assert!(
        check(&decided, None, &sidecar, now())
            .unwrap_err()
            .contains("undecided")
    );
    // Not for another namespace's agent: the object's own namespace decides.
    let elsewhere = Decider {
        namespace: "other".into(),
        ..user("system:serviceaccount:other:claude", &[])
    };
    let err = check(&approval(None, None), None, &elsewhere, now()).unwrap_err();
    assert!(err.contains("not this Approval's namespace"), "{err}");
    // Not by another account of the namespace, nor by a person.
    for name in ["system:serviceaccount:agents:other", "bob"] {
        let err = check(&approval(None, None), None, &user(name, &[]), now()).unwrap_err();
        assert!(err.contains("only the agent's sidecar"), "{name}: {err}");
    }
    // A cluster admin may (break-glass).
    let admin = user("admin", &["system:masters"]);
    assert_eq!(check(&approval(None, None), None, &admin, now()), Ok(()));
}

#[test]
fn the_stamp_must_carry_the_deciders_groups() {
    let pending = approval(None, None);
    let alice = user("alice", &["dba-oncall"]);
    let forged_groups = approval_by(Some("Approved"), Some("alice"), &["dba-oncall", "admins"]);
    assert!(
        check(&forged_groups, Some(&pending), &alice, now())
            .unwrap_err()
            .contains("decidedByGroups")
    );
}
