//! Evaluation: one request's attributes against the compiled policy.

use std::sync::Arc;

use agentgate_crds::SqlStatementKind;
use serde_json::json;

use crate::attrs::{KubernetesRequest, RequestAttrs, SqlStatement, Target};
use crate::compile::{
    ApprovalPolicy, CompiledAccessPolicy, CompiledAction, CompiledPolicy, CompiledRule,
    EffectiveLimits, Matcher,
};
use crate::glob::any_match;
use crate::masking::MaskingProfile;

/// The name under which the built-in discovery allowance appears in decisions and audit.
pub const DISCOVERY_RULE: &str = "builtin:kubernetes-discovery";

/// The outcome of evaluating one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Let it through.
    Allow {
        /// The rule that allowed it; `None` when the policy's default action did.
        rule: Option<String>,
    },
    /// Refuse it.
    Deny {
        /// The rule that denied it; `None` for a default action or a missing policy.
        rule: Option<String>,
        /// Why, in words an agent (a language model) can act on.
        reason: String,
    },
    /// Hold it for a human.
    RequireApproval {
        /// The rule that asked for approval; `None` for the default action.
        rule: Option<String>,
        /// Who approves, how long to wait, what the approval grants.
        approval: ApprovalPolicy,
    },
}

impl Decision {
    /// Deny > require approval > allow: when several policies or statements decide, the
    /// riskiest outcome wins.
    fn severity(&self) -> u8 {
        match self {
            Decision::Allow { .. } => 0,
            Decision::RequireApproval { .. } => 1,
            Decision::Deny { .. } => 2,
        }
    }

    /// The deciding rule's name, if a rule decided.
    pub fn rule(&self) -> Option<&str> {
        match self {
            Decision::Allow { rule }
            | Decision::Deny { rule, .. }
            | Decision::RequireApproval { rule, .. } => rule.as_deref(),
        }
    }

    /// `allow`, `deny` or `approve`: a label value for metrics and audit.
    pub fn label(&self) -> &'static str {
        match self {
            Decision::Allow { .. } => "allow",
            Decision::Deny { .. } => "deny",
            Decision::RequireApproval { .. } => "approve",
        }
    }
}

/// A decision together with the policy that made it and the masking and limits that
/// apply to the response.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// What to do.
    pub decision: Decision,
    /// The policy whose decision won, if any policy governed the request.
    pub policy: Option<String>,
    /// Masking for the response.
    pub masking: Arc<MaskingProfile>,
    /// Limits for the response and the session.
    pub limits: EffectiveLimits,
}

fn deny(rule: Option<String>, reason: impl Into<String>) -> Decision {
    Decision::Deny {
        rule,
        reason: reason.into(),
    }
}

/// Evaluates a request. Never fails: anything uncertain is a denial that says why.
pub fn evaluate(policy: &CompiledPolicy, attrs: &RequestAttrs) -> Evaluation {
    let Some(conn) = policy.connections.get(&attrs.connection) else {
        return Evaluation {
            decision: deny(
                None,
                format!(
                    "Connection {} is not configured for this pod; no request on it is allowed",
                    attrs.connection
                ),
            ),
            policy: None,
            masking: Arc::new(MaskingProfile::none()),
            limits: EffectiveLimits::default(),
        };
    };
    let outcome = |decision, policy| Evaluation {
        decision,
        policy,
        masking: conn.masking.clone(),
        limits: conn.limits,
    };
    if attrs.target.protocol() != conn.spec.protocol {
        return outcome(
            deny(
                None,
                "the request's protocol does not match the Connection's",
            ),
            None,
        );
    }
    if let Target::Postgres(sql) = &attrs.target
        && let Some(reason) = pinned_setting(policy, &attrs.connection, sql)
    {
        return outcome(deny(None, reason), None);
    }
    let mut best: Option<(Decision, String)> = None;
    for p in policy
        .policies
        .iter()
        .filter(|p| p.connections.contains(&attrs.connection))
    {
        let d = decide_policy(p, attrs);
        if best
            .as_ref()
            .is_none_or(|(b, _)| d.severity() > b.severity())
        {
            best = Some((d, p.name.clone()));
        }
    }
    match best {
        Some((decision, name)) => {
            let decision = match (&decision, &attrs.target) {
                (
                    Decision::Allow { rule } | Decision::RequireApproval { rule, .. },
                    Target::Postgres(sql),
                ) => {
                    match sql
                        .statements
                        .iter()
                        .find_map(|s| masked_in_expression(&conn.masking, s))
                    {
                        Some(reason) => deny(rule.clone(), reason),
                        None => decision,
                    }
                }
                _ => decision,
            };
            outcome(decision, Some(name))
        }
        None => outcome(
            deny(
                None,
                format!(
                    "no AgentAccessPolicy that selects this pod grants Connection {}; ask a platform engineer to add one",
                    attrs.connection
                ),
            ),
            None,
        ),
    }
}

fn decide_policy(p: &CompiledAccessPolicy, attrs: &RequestAttrs) -> Decision {
    if let Some(identity) = &p.identity {
        let valid = attrs
            .identity
            .as_ref()
            .is_some_and(|i| i.issuer == identity.issuer);
        if identity.required && !valid {
            return deny(
                None,
                format!(
                    "policy {} requires the launching user's token from {} (send it as `Proxy-Authorization: Bearer <token>`)",
                    p.name, identity.issuer
                ),
            );
        }
    }
    match &attrs.target {
        // A multi-statement string: each statement is decided, the riskiest wins. Text
        // with no statements is decided as one statement of kind `other`.
        Target::Postgres(sql) => {
            let other = [SqlStatement {
                kind: SqlStatementKind::Other,
                ..SqlStatement::default()
            }];
            let statements = if sql.statements.is_empty() {
                &other[..]
            } else {
                &sql.statements[..]
            };
            statements
                .iter()
                .map(|s| match decide_one(p, attrs, Some(s)) {
                    // No rule allows what reaches outside the tables (server files, other
                    // servers, other sessions); approve rules still can hold it for a human.
                    Decision::Allow { rule } if !s.dangerous_functions.is_empty() => deny(
                        rule,
                        format!(
                            "the statement calls {}, which agentgate never allows without approval",
                            s.dangerous_functions.join(", ")
                        ),
                    ),
                    d => d,
                })
                .max_by_key(Decision::severity)
                .unwrap_or_else(|| deny(None, "empty statement list"))
        }
        _ => decide_one(p, attrs, None),
    }
}

fn decide_one(
    p: &CompiledAccessPolicy,
    attrs: &RequestAttrs,
    statement: Option<&SqlStatement>,
) -> Decision {
    // An allow rule that matched but does not allow a function the statement calls:
    // named in the denial if nothing else decides.
    let mut passed_over: Option<(String, Vec<String>)> = None;
    for rule in &p.rules {
        if !rule.connections.is_empty() && !rule.connections.contains(&attrs.connection) {
            continue;
        }
        if !matches(&rule.matcher, &attrs.target, statement) {
            continue;
        }
        if rule.action == CompiledAction::Allow
            && let Some(s) = statement
        {
            let unlisted = functions_not_allowed(&rule.matcher, s);
            if !unlisted.is_empty() {
                passed_over.get_or_insert((rule.name.clone(), unlisted));
                continue;
            }
        }
        match condition_holds(rule, attrs) {
            Ok(true) => return action_decision(&rule.action, Some(rule.name.clone()), &p.name),
            Ok(false) => continue,
            Err(e) => {
                return deny(
                    Some(rule.name.clone()),
                    format!(
                        "the condition of rule {} could not be evaluated: {e}",
                        rule.name
                    ),
                );
            }
        }
    }
    if let Target::Kubernetes(k) = &attrs.target
        && is_discovery(k)
    {
        return Decision::Allow {
            rule: Some(DISCOVERY_RULE.to_owned()),
        };
    }
    match (
        action_decision(&p.default_action, None, &p.name),
        passed_over,
    ) {
        (Decision::Deny { rule: None, reason }, Some((rule, functions))) => Decision::Deny {
            rule: Some(rule.clone()),
            reason: format!(
                "{reason}: rule {rule} would allow it, but the statement calls {}, which is not on agentgate's list of side-effect-free functions; a rule must name it in sql.functions, or a human approve it",
                functions.join(", ")
            ),
        },
        (d, _) => d,
    }
}

/// The functions `statement` calls that an allow rule with `matcher` does not allow:
/// neither built-in side-effect-free ones nor named in the rule's `sql.functions`.
fn functions_not_allowed(matcher: &Matcher, statement: &SqlStatement) -> Vec<String> {
    let listed: &[crate::glob::Glob] = match matcher {
        Matcher::Sql { functions, .. } => functions,
        _ => &[],
    };
    statement
        .functions
        .iter()
        .filter(|f| !crate::classify::is_safe(f) && !listed.iter().any(|g| g.is_match(f)))
        .cloned()
        .collect()
}

/// Settings the Postgres gateway pins for the whole session, whatever the rules say:
/// they change how the server reads SQL text and names (so the classification would no
/// longer describe what runs) or who the session is.
const PINNED_SETTINGS: [&str; 6] = [
    "client_encoding",
    "standard_conforming_strings",
    "search_path",
    "role",
    "session_authorization",
    "*",
];

/// Why a statement of `sql` may not run whatever the rules say: it changes a pinned
/// setting, or turns read-only off in a session the policy lets write nothing.
fn pinned_setting(
    policy: &CompiledPolicy,
    connection: &str,
    sql: &crate::attrs::SqlRequest,
) -> Option<String> {
    let settings = || sql.statements.iter().flat_map(|s| s.settings.iter());
    if let Some(name) = settings().find(|n| PINNED_SETTINGS.contains(&n.as_str())) {
        return Some(if name == "*" {
            "set_config() may change any setting, including those agentgate pins for the whole session (it decides SQL as the server reads it); use SET for other settings".to_owned()
        } else {
            format!(
                "agentgate pins {name} for the whole session (it decides SQL as the server reads it); it cannot be changed through agentgate"
            )
        });
    }
    if let Some(name) = settings().find(|n| n.contains("read_only"))
        && session_is_read_only(policy, connection)
    {
        return Some(format!(
            "this session is read-only (no policy lets it write on Connection {connection}), and {name} cannot be turned off"
        ));
    }
    None
}

/// The kinds a read-only transaction can run.
const READ_KINDS: [SqlStatementKind; 4] = [
    SqlStatementKind::Select,
    SqlStatementKind::Explain,
    SqlStatementKind::Set,
    SqlStatementKind::Transaction,
];

/// Whether nothing any policy says about `connection` can let a statement write: every
/// policy's default is deny and every rule that allows or approves names only read
/// kinds. The Postgres gateway then runs the upstream session read-only, so a write the
/// classification missed still fails at the server.
pub fn session_is_read_only(policy: &CompiledPolicy, connection: &str) -> bool {
    policy
        .policies
        .iter()
        .filter(|p| p.connections.iter().any(|c| c == connection))
        .all(|p| {
            p.default_action == CompiledAction::Deny
                && p.rules.iter().all(|r| {
                    r.action == CompiledAction::Deny
                        || (!r.connections.is_empty()
                            && !r.connections.iter().any(|c| c == connection))
                        || matches!(&r.matcher, Matcher::Sql { statements, .. }
                            if !statements.is_empty() && statements.iter().all(|k| READ_KINDS.contains(k)))
                })
        })
}

/// Why `statement` may not run under `masking`: it uses a masked column other than as
/// a plain output column (where the server reports its origin and the gateway masks
/// it). In an expression, a condition, a cast, a function, a row value or a JSON
/// conversion it would reach the agent in another form, or answer questions about it.
fn masked_in_expression(masking: &MaskingProfile, statement: &SqlStatement) -> Option<String> {
    if !masking.masks_columns() || statement.expression_columns.is_empty() {
        return None;
    }
    let relations: Vec<&str> = statement
        .tables
        .iter()
        .map(|t| t.split_once('.').map_or(t.as_str(), |(_, r)| r))
        .collect();
    let found = statement.expression_columns.iter().find(|c| {
        relations.iter().any(|r| {
            if c.as_str() == "*" {
                masking.may_mask_columns_of(r)
            } else {
                masking.masks_column(&format!("{r}.{c}"))
            }
        })
    })?;
    let what = if found == "*" {
        "a whole row or a star of a table with masked columns".to_owned()
    } else {
        format!("column {found}, which this policy masks,")
    };
    Some(format!(
        "the statement uses {what} in an expression, condition, cast, function or row value; a masked column can only be selected as a plain column (it comes back masked)"
    ))
}

fn action_decision(action: &CompiledAction, rule: Option<String>, policy: &str) -> Decision {
    match action {
        CompiledAction::Allow => Decision::Allow { rule },
        CompiledAction::Deny => {
            let reason = match &rule {
                Some(r) => format!("rule {r} of policy {policy} denies this request"),
                None => format!(
                    "no rule of policy {policy} allows this request, and its default action is deny"
                ),
            };
            Decision::Deny { rule, reason }
        }
        CompiledAction::Approve(approval) => Decision::RequireApproval {
            rule,
            approval: approval.clone(),
        },
    }
}

/// Read-only API discovery (`/api`, `/apis`, `/openapi`, `/version`): kubectl cannot work
/// without it, and it reveals which APIs exist, not any object.
fn is_discovery(k: &KubernetesRequest) -> bool {
    !k.is_resource_request
        && k.verb == "get"
        && (["/api", "/apis", "/version"].contains(&k.path.trim_end_matches('/'))
            || k.path.starts_with("/api/")
            || k.path.starts_with("/apis/")
            || k.path.starts_with("/openapi/"))
}

fn matches(m: &Matcher, target: &Target, statement: Option<&SqlStatement>) -> bool {
    match (m, target) {
        (Matcher::Any, _) => true,
        (
            Matcher::Sql {
                statements, tables, ..
            },
            Target::Postgres(_),
        ) => statement.is_some_and(|s| {
            (statements.is_empty() || statements.contains(&s.kind))
                && s.tables.iter().all(|t| any_match(tables, t))
        }),
        (Matcher::Http { methods, paths }, Target::Http(h)) => {
            (methods.is_empty() || methods.contains(&h.method)) && any_match(paths, &h.path)
        }
        (
            Matcher::Kubernetes {
                verbs,
                api_groups,
                resources,
                namespaces,
                names,
            },
            Target::Kubernetes(k),
        ) => {
            let verb_ok = verbs.is_empty() || verbs.iter().any(|v| v == "*" || *v == k.verb);
            if !k.is_resource_request {
                return verb_ok
                    && api_groups.is_empty()
                    && resources.is_empty()
                    && namespaces.is_empty()
                    && names.is_empty();
            }
            let group_ok =
                api_groups.is_empty() || api_groups.iter().any(|g| g == "*" || *g == k.api_group);
            let resource_ok =
                resources.is_empty() || resources.iter().any(|r| resource_matches(r, k));
            let namespace_ok = namespaces.is_empty()
                || (!k.namespace.is_empty() && any_match(namespaces, &k.namespace));
            let name_ok = names.is_empty() || (!k.name.is_empty() && any_match(names, &k.name));
            verb_ok && group_ok && resource_ok && namespace_ok && name_ok
        }
        _ => false,
    }
}

/// RBAC's reading: `pods` is not `pods/exec`; `*` is any resource; `*/scale` any
/// resource's scale; `pods/*` any subresource of pods.
fn resource_matches(rule: &str, k: &KubernetesRequest) -> bool {
    let (res, sub) = rule.split_once('/').unwrap_or((rule, ""));
    let res_ok = res == "*" || res == k.resource;
    let sub_ok = if rule.contains('/') {
        sub == "*" && !k.subresource.is_empty() || sub == k.subresource
    } else {
        k.subresource.is_empty()
    };
    res_ok && sub_ok || rule == "*"
}

fn condition_holds(rule: &CompiledRule, attrs: &RequestAttrs) -> Result<bool, String> {
    let Some(program) = &rule.when else {
        return Ok(true);
    };
    let mut context = cel::Context::default();
    context
        .add_variable("request", cel_request(attrs))
        .map_err(|e| e.to_string())?;
    match program.execute(&context) {
        Ok(cel::Value::Bool(b)) => Ok(b),
        Ok(other) => Err(format!("it returned {other:?}, not a boolean")),
        Err(e) => Err(e.to_string()),
    }
}

/// The `request` variable of `when` conditions. Every field is always present (empty
/// when unknown), so conditions do not fail on a missing identity.
pub(crate) fn cel_request(attrs: &RequestAttrs) -> serde_json::Value {
    let identity = attrs.identity.clone().unwrap_or_default();
    let mut request = json!({
        "connection": attrs.connection,
        "protocol": attrs.target.protocol(),
        "identity": {
            "issuer": identity.issuer,
            "subject": identity.subject,
            "email": identity.email.unwrap_or_default(),
            "groups": identity.groups,
        },
    });
    let (key, value) = match &attrs.target {
        Target::Http(h) => ("http", serde_json::to_value(h)),
        Target::Kubernetes(k) => ("kubernetes", serde_json::to_value(k)),
        Target::Postgres(s) => ("sql", serde_json::to_value(s)),
    };
    request[key] = value.unwrap_or_default();
    request
}

#[cfg(test)]
mod tests;
