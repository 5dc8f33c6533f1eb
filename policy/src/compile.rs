//! Compilation of policies and connections into a checked [`CompiledPolicy`]: every
//! glob, regex, JSON path, duration and CEL condition is compiled here, once, and every
//! mistake is reported with the object and rule it is in — never found at request time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use agentgate_crds::{
    Action, AgentAccessPolicySpec, ApprovalSettings, BundleEntry, ConnectionSpec, DetectorSet,
    IdentitySpec, Limits, Masking, PolicyRule, Protocol, Replacement, SqlStatementKind,
};

use crate::glob::{Glob, GlobKind};
use crate::masking::MaskingProfile;

/// Policies and connections, checked and compiled, ready for [`evaluate`](crate::evaluate).
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub(crate) connections: BTreeMap<String, CompiledConnection>,
    pub(crate) policies: Vec<CompiledAccessPolicy>,
}

/// A Connection, with the masking and limits of every policy that governs it merged.
#[derive(Debug, Clone)]
pub struct CompiledConnection {
    /// The Connection's name.
    pub name: String,
    /// Its spec.
    pub spec: ConnectionSpec,
    /// Masking applied to its responses: the union of its policies' masking.
    pub masking: Arc<MaskingProfile>,
    /// Its limits: the strictest of its policies' limits.
    pub limits: EffectiveLimits,
    /// The identity settings of the policies that govern it.
    pub identities: Vec<IdentitySpec>,
}

/// Limits in plain numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EffectiveLimits {
    /// Rows one query may return.
    pub max_rows_per_query: Option<u64>,
    /// Bytes one response may carry.
    pub max_response_bytes: Option<u64>,
    /// Rows one session may modify.
    pub max_rows_modified_per_session: Option<u64>,
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledAccessPolicy {
    pub(crate) name: String,
    pub(crate) connections: BTreeSet<String>,
    pub(crate) identity: Option<IdentitySpec>,
    pub(crate) default_action: CompiledAction,
    pub(crate) rules: Vec<CompiledRule>,
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledRule {
    pub(crate) name: String,
    pub(crate) connections: Vec<String>,
    pub(crate) matcher: Matcher,
    pub(crate) when: Option<Arc<cel::Program>>,
    pub(crate) action: CompiledAction,
}

#[derive(Debug, Clone)]
pub(crate) enum Matcher {
    Any,
    Sql {
        statements: Vec<SqlStatementKind>,
        tables: Vec<Glob>,
        /// Functions an allow rule allows beyond the built-in side-effect-free ones.
        functions: Vec<Glob>,
    },
    Kubernetes {
        verbs: Vec<String>,
        api_groups: Vec<String>,
        resources: Vec<String>,
        namespaces: Vec<Glob>,
        names: Vec<Glob>,
    },
    Http {
        methods: Vec<String>,
        paths: Vec<Glob>,
    },
}

/// What a rule (or a default action) does.
#[derive(Debug, Clone, PartialEq)]
pub enum CompiledAction {
    /// Let the request through.
    Allow,
    /// Refuse it.
    Deny,
    /// Hold it for a human.
    Approve(ApprovalPolicy),
}

/// Approval settings with durations parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalPolicy {
    /// The settings as written.
    pub settings: ApprovalSettings,
    /// How long to wait for a decision.
    pub timeout: Duration,
    /// How long a `fingerprint` or `session` grant lasts.
    pub grant_ttl: Duration,
}

/// A mistake in a policy or connection, naming where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}{}: {message}", rule.as_ref().map(|r| format!(", rule {r}")).unwrap_or_default())]
pub struct PolicyError {
    /// `AgentAccessPolicy/<name>` or `Connection/<name>`.
    pub object: String,
    /// The rule, when the mistake is in one.
    pub rule: Option<String>,
    /// What is wrong.
    pub message: String,
}

/// Every error, one after the other, for a status message or a log line.
pub fn describe(errors: &[PolicyError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

const KUBERNETES_VERBS: [&str; 10] = [
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "proxy",
    "*",
];
const MAX_APPROVAL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_GRANT_TTL: Duration = Duration::from_secs(30 * 60);

/// Compiles the policies and connections of one pod (already selected by its labels).
/// `hash_key` keys the `hash` masking replacement.
pub fn compile(
    policies: &[BundleEntry<AgentAccessPolicySpec>],
    connections: &[BundleEntry<ConnectionSpec>],
    hash_key: &[u8],
) -> Result<CompiledPolicy, Vec<PolicyError>> {
    let mut errors = Vec::new();
    let mut ports = BTreeMap::new();
    for c in connections {
        if let Some(other) = ports.insert(c.spec.listen.port, &c.name) {
            errors.push(PolicyError {
                object: format!("Connection/{}", c.name),
                rule: None,
                message: format!(
                    "listen.port {} is also used by Connection {other}",
                    c.spec.listen.port
                ),
            });
        }
    }
    let protocols: BTreeMap<&str, Protocol> = connections
        .iter()
        .map(|c| (c.name.as_str(), c.spec.protocol))
        .collect();
    let compiled: Vec<CompiledAccessPolicy> = policies
        .iter()
        .filter_map(|p| compile_policy(p, &protocols, &mut errors))
        .collect();

    let mut compiled_connections = BTreeMap::new();
    for c in connections {
        let governing: Vec<&BundleEntry<AgentAccessPolicySpec>> = policies
            .iter()
            .filter(|p| p.spec.connections.contains(&c.name))
            .collect();
        let masking = merge_masking(governing.iter().filter_map(|p| p.spec.masking.as_ref()));
        let masking = match MaskingProfile::compile(&masking, hash_key) {
            Ok(m) => m,
            Err(errs) => {
                // Attribute each error to the policies that carry masking for this connection.
                for e in errs {
                    for p in governing.iter().filter(|p| p.spec.masking.is_some()) {
                        let error = PolicyError {
                            object: format!("AgentAccessPolicy/{}", p.name),
                            rule: None,
                            message: e.to_string(),
                        };
                        if !errors.contains(&error) {
                            errors.push(error);
                        }
                    }
                }
                continue;
            }
        };
        let mut limits = EffectiveLimits::default();
        for p in &governing {
            if let Some(l) = &p.spec.limits {
                match effective_limits(l) {
                    Ok(l) => limits = strictest(limits, l),
                    Err(message) => errors.push(PolicyError {
                        object: format!("AgentAccessPolicy/{}", p.name),
                        rule: None,
                        message,
                    }),
                }
            }
        }
        compiled_connections.insert(
            c.name.clone(),
            CompiledConnection {
                name: c.name.clone(),
                spec: c.spec.clone(),
                masking: Arc::new(masking),
                limits,
                identities: governing
                    .iter()
                    .filter_map(|p| p.spec.identity.clone())
                    .collect(),
            },
        );
    }
    if errors.is_empty() {
        Ok(CompiledPolicy {
            connections: compiled_connections,
            policies: compiled,
        })
    } else {
        Err(errors)
    }
}

impl CompiledPolicy {
    /// A policy that denies everything: what a sidecar runs with before it has a valid
    /// bundle.
    pub fn deny_all() -> Self {
        Self {
            connections: BTreeMap::new(),
            policies: Vec::new(),
        }
    }

    /// The compiled Connection `name`.
    pub fn connection(&self, name: &str) -> Option<&CompiledConnection> {
        self.connections.get(name)
    }

    /// Every compiled Connection.
    pub fn connections(&self) -> impl Iterator<Item = &CompiledConnection> {
        self.connections.values()
    }
}

fn compile_policy(
    entry: &BundleEntry<AgentAccessPolicySpec>,
    protocols: &BTreeMap<&str, Protocol>,
    errors: &mut Vec<PolicyError>,
) -> Option<CompiledAccessPolicy> {
    let object = format!("AgentAccessPolicy/{}", entry.name);
    let before = errors.len();
    let mut err = |rule: Option<&str>, message: String| {
        errors.push(PolicyError {
            object: object.clone(),
            rule: rule.map(str::to_owned),
            message,
        })
    };
    let spec = &entry.spec;
    for c in &spec.connections {
        if !protocols.contains_key(c.as_str()) {
            err(
                None,
                format!("Connection {c} does not exist (or is not Ready)"),
            );
        }
    }
    if let Some(identity) = &spec.identity
        && (!identity.issuer.starts_with("https://") || identity.audiences.is_empty())
    {
        err(
            None,
            "identity needs an https issuer and at least one audience".to_owned(),
        );
    }
    let default_action = match (spec.default_action, &spec.default_approval) {
        (Action::Approve, None) => {
            err(
                None,
                "defaultAction approve needs defaultApproval".to_owned(),
            );
            CompiledAction::Deny
        }
        (action, approval) => compile_action(action, approval.as_ref()).unwrap_or_else(|m| {
            err(None, m);
            CompiledAction::Deny
        }),
    };
    let mut names = BTreeSet::new();
    let mut rules = Vec::new();
    for rule in &spec.rules {
        if !names.insert(rule.name.as_str()) {
            err(Some(&rule.name), "rule names must be unique".to_owned());
        }
        match compile_rule(rule, spec, protocols) {
            Ok(r) => rules.push(r),
            Err(messages) => messages.into_iter().for_each(|m| err(Some(&rule.name), m)),
        }
    }
    (errors.len() == before).then(|| CompiledAccessPolicy {
        name: entry.name.clone(),
        connections: spec.connections.iter().cloned().collect(),
        identity: spec.identity.clone(),
        default_action,
        rules,
    })
}

fn compile_rule(
    rule: &PolicyRule,
    policy: &AgentAccessPolicySpec,
    protocols: &BTreeMap<&str, Protocol>,
) -> Result<CompiledRule, Vec<String>> {
    let mut errors = Vec::new();
    for c in &rule.match_.connections {
        if !policy.connections.contains(c) {
            errors.push(format!(
                "match.connections names {c}, which is not in spec.connections"
            ));
        }
    }
    let applies_to: Vec<&String> = if rule.match_.connections.is_empty() {
        policy.connections.iter().collect()
    } else {
        rule.match_.connections.iter().collect()
    };
    let m = &rule.match_;
    let wanted = match (&m.sql, &m.kubernetes, &m.http) {
        (Some(_), None, None) => Some(Protocol::Postgres),
        (None, Some(_), None) => Some(Protocol::Kubernetes),
        (None, None, Some(_)) => Some(Protocol::Http),
        (None, None, None) => None,
        _ => {
            errors.push("match may hold only one of sql, kubernetes, http".to_owned());
            None
        }
    };
    if let Some(wanted) = wanted {
        let fits = |c: &&String| protocols.get(c.as_str()) == Some(&wanted);
        if !applies_to.iter().any(fits) {
            errors.push(format!("it matches {wanted:?} requests, but none of its connections is a {wanted:?} Connection"));
        }
        if !rule.match_.connections.is_empty() {
            for c in applies_to.iter().filter(|c| !fits(c)) {
                errors.push(format!("it matches {wanted:?} requests, but Connection {c} is not a {wanted:?} Connection"));
            }
        }
    }
    let mut globs = |patterns: &[String], kind| -> Vec<Glob> {
        patterns
            .iter()
            .filter_map(|p| {
                Glob::new(p, kind)
                    .map_err(|e| errors.push(format!("bad pattern {p:?}: {e}")))
                    .ok()
            })
            .collect()
    };
    let matcher = if let Some(sql) = &m.sql {
        let matcher = Matcher::Sql {
            statements: sql.statements.clone(),
            tables: globs(&sql.tables, GlobKind::Dotted),
            functions: globs(&sql.functions, GlobKind::Dotted),
        };
        if !sql.functions.is_empty() && !matches!(rule.action, Action::Allow) {
            errors.push(
                "sql.functions only widens action: allow (approve and deny rules match whatever functions a statement calls)".to_owned(),
            );
        }
        matcher
    } else if let Some(k) = &m.kubernetes {
        let namespaces = globs(&k.namespaces, GlobKind::Plain);
        let names = globs(&k.names, GlobKind::Plain);
        for verb in &k.verbs {
            if !KUBERNETES_VERBS.contains(&verb.as_str()) {
                errors.push(format!(
                    "unknown Kubernetes verb {verb:?} (one of {})",
                    KUBERNETES_VERBS.join(", ")
                ));
            }
        }
        Matcher::Kubernetes {
            verbs: k.verbs.clone(),
            api_groups: k.api_groups.clone(),
            resources: k.resources.clone(),
            namespaces,
            names,
        }
    } else if let Some(h) = &m.http {
        Matcher::Http {
            methods: h.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
            paths: globs(&h.paths, GlobKind::Path),
        }
    } else {
        Matcher::Any
    };
    let when = rule
        .when
        .as_deref()
        .and_then(|expr| match cel::Program::compile(expr) {
            Ok(program) => match undeclared_reference(&program) {
                Some(name) => {
                    errors.push(format!(
                        "when refers to {name:?}, which is not defined (only `request` is)"
                    ));
                    None
                }
                None => Some(Arc::new(program)),
            },
            Err(e) => {
                errors.push(format!("when is not valid CEL: {e}"));
                None
            }
        });
    let action = match compile_action(rule.action, rule.approval.as_ref()) {
        Ok(a) => a,
        Err(e) => {
            errors.push(e);
            CompiledAction::Deny
        }
    };
    if errors.is_empty() {
        Ok(CompiledRule {
            name: rule.name.clone(),
            connections: rule.match_.connections.clone(),
            matcher,
            when,
            action,
        })
    } else {
        Err(errors)
    }
}

/// Runs a condition once against an empty request to find names it uses that do not
/// exist (other evaluation errors depend on the request and are decided per request).
fn undeclared_reference(program: &cel::Program) -> Option<String> {
    let mut context = cel::Context::default();
    context
        .add_variable(
            "request",
            crate::evaluate::cel_request(&crate::RequestAttrs::empty()),
        )
        .ok()?;
    match program.execute(&context) {
        Err(cel::ExecutionError::UndeclaredReference(name)) => Some(name.to_string()),
        _ => None,
    }
}

fn compile_action(
    action: Action,
    approval: Option<&ApprovalSettings>,
) -> Result<CompiledAction, String> {
    Ok(match (action, approval) {
        (Action::Allow, None) => CompiledAction::Allow,
        (Action::Deny, None) => CompiledAction::Deny,
        (Action::Approve, Some(settings)) => {
            let timeout =
                parse_duration(&settings.timeout).map_err(|e| format!("approval.timeout: {e}"))?;
            if timeout.is_zero() || timeout > MAX_APPROVAL_TIMEOUT {
                return Err("approval.timeout must be more than 0s and at most 24h".to_owned());
            }
            if settings.approvers.groups.is_empty() {
                return Err("approval.approvers.groups must name at least one group".to_owned());
            }
            let grant_ttl = match &settings.grant_ttl {
                Some(ttl) => parse_duration(ttl).map_err(|e| format!("approval.grantTTL: {e}"))?,
                None => DEFAULT_GRANT_TTL,
            };
            CompiledAction::Approve(ApprovalPolicy {
                settings: settings.clone(),
                timeout,
                grant_ttl,
            })
        }
        (Action::Approve, None) => return Err("action approve needs approval settings".to_owned()),
        (_, Some(_)) => {
            return Err("approval settings are only allowed with action approve".to_owned());
        }
    })
}

/// Parses a Go-style duration: `90s`, `10m`, `1h30m`, `1.5h`, `500ms`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration like 30s, 10m or 1h30m");
    if text.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..number_len].parse().map_err(|_| bad())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * seconds;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

/// Parses a Kubernetes quantity of bytes: `500`, `64Ki`, `10Mi`, `1G`.
pub fn parse_quantity(text: &str) -> Result<u64, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a whole quantity like 64Ki or 10Mi"))?;
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => {
            return Err(format!(
                "{text:?} has an unknown suffix (use Ki, Mi, Gi, k, M, G)"
            ));
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn effective_limits(l: &Limits) -> Result<EffectiveLimits, String> {
    let non_negative = |v: Option<i64>, field: &str| -> Result<Option<u64>, String> {
        v.map(|n| u64::try_from(n).map_err(|_| format!("limits.{field} must not be negative")))
            .transpose()
    };
    Ok(EffectiveLimits {
        max_rows_per_query: non_negative(l.max_rows_per_query, "maxRowsPerQuery")?,
        max_response_bytes: l
            .max_response_bytes
            .as_ref()
            .map(|q| parse_quantity(&q.0).map_err(|e| format!("limits.maxResponseBytes: {e}")))
            .transpose()?,
        max_rows_modified_per_session: non_negative(
            l.max_rows_modified_per_session,
            "maxRowsModifiedPerSession",
        )?,
    })
}

fn strictest(a: EffectiveLimits, b: EffectiveLimits) -> EffectiveLimits {
    let min = |x: Option<u64>, y: Option<u64>| match (x, y) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    };
    EffectiveLimits {
        max_rows_per_query: min(a.max_rows_per_query, b.max_rows_per_query),
        max_response_bytes: min(a.max_response_bytes, b.max_response_bytes),
        max_rows_modified_per_session: min(
            a.max_rows_modified_per_session,
            b.max_rows_modified_per_session,
        ),
    }
}

/// The union of several policies' masking: every detector, column, path and pattern of
/// any of them, and the strongest replacement (redact over hash over partial).
fn merge_masking<'a>(sections: impl Iterator<Item = &'a Masking>) -> Masking {
    let mut merged = Masking::default();
    let mut detectors = BTreeSet::<DetectorSet>::new();
    let mut replacements = Vec::new();
    for m in sections {
        detectors.extend(m.detectors.iter().copied());
        merged.columns.extend(m.columns.iter().cloned());
        merged.json_paths.extend(m.json_paths.iter().cloned());
        merged.patterns.extend(m.patterns.iter().cloned());
        replacements.push(m.replacement);
    }
    merged.detectors = detectors.into_iter().collect();
    merged.replacement = if replacements.is_empty() || replacements.contains(&Replacement::Redact) {
        Replacement::Redact
    } else if replacements.contains(&Replacement::Hash) {
        Replacement::Hash
    } else {
        Replacement::Partial
    };
    merged
}
