//! SQL classification with PostgreSQL's own parser (libpg_query): statement kinds, the
//! tables each statement touches, WHERE clauses, dangerous functions, and a fingerprint
//! of the normalized text.
//!
//! Text the parser rejects (or that is too large or too deeply nested to parse safely)
//! is one statement of kind `other`, which no select-only rule allows.

mod functions;
mod walk;

use agentgate_crds::SqlStatementKind;
use pg_query::protobuf::{TransactionStmtKind, VariableSetKind};
use pg_query::{FingerprintOptions, NodeEnum, ParserOptions};
use sha2::{Digest, Sha256};

use crate::attrs::{SqlRequest, SqlStatement};
use functions::is_dangerous;
pub use functions::is_safe;

/// The longest statement text classified; longer text is `other`.
pub const MAX_SQL_BYTES: usize = 1 << 20;

/// The deepest bracket nesting classified; deeper text is `other` (the parser and the
/// tree walk recurse, and a worker thread's stack is small).
pub const MAX_NESTING: usize = 200;

/// The session state that changes what a statement's names mean. The Postgres gateway
/// pins it at login (`search_path`, with `client_encoding` UTF8 and
/// `standard_conforming_strings` on, which is how the parser reads text) and refuses
/// every way to change it, so the classification holds for the whole session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlContext {
    /// The schemas an unqualified table name is looked up in, in order (`pg_catalog`
    /// is implicitly first for `pg_*` names).
    pub search_path: Vec<String>,
}

impl Default for SqlContext {
    fn default() -> Self {
        Self {
            search_path: vec!["public".into()],
        }
    }
}

/// Classifies one SQL text (a simple-protocol query string or one Parse) read with the
/// default search path (`public`).
pub fn classify_sql(text: &str) -> SqlRequest {
    classify_sql_in(text, &SqlContext::default())
}

/// Classifies one SQL text as a session with `context` reads it.
pub fn classify_sql_in(text: &str, context: &SqlContext) -> SqlRequest {
    let parsed = (text.len() <= MAX_SQL_BYTES && nesting(text) <= MAX_NESTING)
        .then(|| {
            // The parser is C behind a safe API; a panic in its Rust glue must not take
            // the session down, and means "could not classify".
            std::panic::catch_unwind(|| classify_parsed(text, context)).ok()
        })
        .flatten()
        .flatten();
    parsed.unwrap_or_else(|| SqlRequest {
        statements: vec![unclassifiable()],
        fingerprint: hex::encode(&Sha256::digest(text.as_bytes())[..8]),
        normalized: None,
    })
}

fn unclassifiable() -> SqlStatement {
    SqlStatement {
        kind: SqlStatementKind::Other,
        ..SqlStatement::default()
    }
}

/// The deepest nesting of `(` and `[` anywhere in the text (quotes are not skipped: an
/// overestimate only refuses more).
fn nesting(text: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    for b in text.bytes() {
        match b {
            b'(' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b')' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

fn classify_parsed(text: &str, context: &SqlContext) -> Option<SqlRequest> {
    let whole = pg_query::parse(text, ParserOptions::DEFAULT).ok()?;
    let mut statements = Vec::with_capacity(whole.protobuf.stmts.len());
    for raw in &whole.protobuf.stmts {
        statements.push(classify_one(raw.stmt.as_deref()?, context)?);
    }
    // Schemas and full relation names count: a grant for `orders_2024_01` is not one
    // for `orders_2024_02`.
    let options = FingerprintOptions::RANGEVAR_PG17_COMPAT | FingerprintOptions::FULL_RELNAME;
    let fingerprint = pg_query::fingerprint(text, ParserOptions::DEFAULT, options)
        .ok()?
        .hex;
    Some(SqlRequest {
        statements,
        fingerprint,
        normalized: pg_query::normalize(text).ok(),
    })
}

/// `into` widened by `other`, as if one statement did both: the riskier kind, every
/// table, function, setting and column use of either. What a `FETCH` is decided as when
/// its name may be more than one thing (a declared cursor, a protocol portal).
pub fn merge_statements(into: &mut SqlStatement, other: &SqlStatement) {
    fn union(a: &mut Vec<String>, b: &[String]) {
        a.extend(b.iter().cloned());
        a.sort();
        a.dedup();
    }
    if risk(other.kind) > risk(into.kind) {
        into.kind = other.kind;
        into.has_where = other.has_where;
    }
    union(&mut into.tables, &other.tables);
    union(&mut into.functions, &other.functions);
    union(&mut into.dangerous_functions, &other.dangerous_functions);
    union(&mut into.settings, &other.settings);
    union(&mut into.expression_columns, &other.expression_columns);
    into.uncounted_writes |= other.uncounted_writes;
}

/// How risky a kind is when one statement holds several: the riskiest names it.
fn risk(kind: SqlStatementKind) -> u8 {
    use SqlStatementKind as K;
    match kind {
        K::Select | K::Explain => 0,
        K::Set | K::Transaction => 1,
        K::Copy => 2,
        K::Insert => 3,
        K::Update => 4,
        K::Merge | K::Delete => 5,
        K::Call | K::Do => 6,
        K::Ddl => 7,
        K::Dcl => 8,
        K::Other => 9,
    }
}

/// One statement: its own kind, then the whole tree walked for what is nested in it.
fn classify_one(stmt: &pg_query::protobuf::Node, context: &SqlContext) -> Option<SqlStatement> {
    let node = stmt.node.as_ref()?;
    let tree = serde_json::to_value(stmt).ok()?;
    let facts = walk::Facts::of(&tree, &context.search_path);
    let (top, _) = kind_of(node);
    let kind = facts
        .nested
        .iter()
        .copied()
        .chain(std::iter::once(top))
        // EXPLAIN without ANALYZE runs nothing it explains.
        .filter(|k| top != SqlStatementKind::Explain || *k == top)
        .max_by_key(|k| risk(*k))
        .unwrap_or(top);
    let (writes, with_where) = facts.writes_with_where;
    // The server's CommandComplete tag counts the rows of the statement's own write
    // only: a write nested in a CTE, EXPLAIN ANALYZE or COPY reports none.
    let own_write = usize::from(matches!(
        node,
        NodeEnum::InsertStmt(_)
            | NodeEnum::UpdateStmt(_)
            | NodeEnum::DeleteStmt(_)
            | NodeEnum::MergeStmt(_)
    ));
    let uncounted_writes = facts.write_nodes > own_write;
    let mut dangerous: Vec<String> = facts
        .functions
        .iter()
        .filter(|f| is_dangerous(f))
        .map(|f| functions::bare_name(f))
        .chain(
            facts
                .exposing_relations
                .iter()
                .map(|r| format!("relation {r}")),
        )
        .collect();
    if let NodeEnum::CopyStmt(c) = node
        && c.is_program
    {
        dangerous.push("copy program".to_owned());
    }
    let mut settings: Vec<String> = facts.settings.iter().cloned().collect();
    if facts
        .functions
        .iter()
        .any(|f| functions::bare_name(f) == "set_config")
    {
        settings.push("*".to_owned());
    }
    dangerous.sort();
    dangerous.dedup();
    Some(SqlStatement {
        kind,
        tables: facts.tables.iter().cloned().collect(),
        has_where: writes > 0 && writes == with_where,
        functions: facts.functions.iter().cloned().collect(),
        dangerous_functions: dangerous,
        settings,
        cursor: match node {
            NodeEnum::FetchStmt(f) => Some(f.portalname.clone()),
            _ => None,
        },
        declares: match node {
            NodeEnum::DeclareCursorStmt(d) => Some(d.portalname.clone()),
            _ => None,
        },
        prepared_statement: match node {
            NodeEnum::PrepareStmt(p) => Some(p.name.clone()),
            NodeEnum::DeallocateStmt(d) if d.isall || d.name.is_empty() => Some("*".into()),
            NodeEnum::DeallocateStmt(d) => Some(d.name.clone()),
            NodeEnum::DiscardStmt(_) => Some("*".into()),
            _ => None,
        },
        ends_transaction: matches!(node, NodeEnum::TransactionStmt(t) if !matches!(
            t.kind(),
            TransactionStmtKind::TransStmtBegin
                | TransactionStmtKind::TransStmtStart
                | TransactionStmtKind::TransStmtSavepoint
                | TransactionStmtKind::TransStmtRelease
        )),
        closes: match node {
            NodeEnum::ClosePortalStmt(c) if c.portalname.is_empty() => Some("*".into()),
            NodeEnum::ClosePortalStmt(c) => Some(c.portalname.clone()),
            NodeEnum::DiscardStmt(_) => Some("*".into()),
            _ => None,
        },
        expression_columns: facts.expression_columns(),
        uncounted_writes,
    })
}

/// The statement kind, and for UPDATE/DELETE whether a WHERE clause limits it.
fn kind_of(node: &NodeEnum) -> (SqlStatementKind, bool) {
    use SqlStatementKind as K;
    let kind = match node {
        NodeEnum::SelectStmt(s) if s.into_clause.is_some() => K::Ddl,
        NodeEnum::SelectStmt(_) | NodeEnum::FetchStmt(_) | NodeEnum::ClosePortalStmt(_) => {
            K::Select
        }
        NodeEnum::InsertStmt(_) => K::Insert,
        NodeEnum::UpdateStmt(u) => return (K::Update, u.where_clause.is_some()),
        NodeEnum::DeleteStmt(d) => return (K::Delete, d.where_clause.is_some()),
        NodeEnum::MergeStmt(_) => K::Merge,
        NodeEnum::CopyStmt(_) => K::Copy,
        NodeEnum::ExplainStmt(e) => {
            // EXPLAIN ANALYZE runs the statement: it is what it explains.
            let analyze = e.options.iter().any(|o| {
                matches!(&o.node, Some(NodeEnum::DefElem(d)) if d.defname.eq_ignore_ascii_case("analyze"))
            });
            match e.query.as_ref().and_then(|q| q.node.as_ref()) {
                Some(inner) if analyze => return kind_of(inner),
                _ => K::Explain,
            }
        }
        NodeEnum::DeclareCursorStmt(d) => match d.query.as_ref().and_then(|q| q.node.as_ref()) {
            Some(inner) => return kind_of(inner),
            None => K::Other,
        },
        NodeEnum::PrepareStmt(p) => match p.query.as_ref().and_then(|q| q.node.as_ref()) {
            Some(inner) => return kind_of(inner),
            None => K::Other,
        },
        NodeEnum::TransactionStmt(t) => match t.kind() {
            // Two-phase commit hands the transaction to whoever commits it later.
            TransactionStmtKind::TransStmtPrepare
            | TransactionStmtKind::TransStmtCommitPrepared
            | TransactionStmtKind::TransStmtRollbackPrepared => K::Other,
            _ => K::Transaction,
        },
        NodeEnum::VariableSetStmt(v) => {
            let name = v.name.to_ascii_lowercase();
            match (v.kind(), name.as_str()) {
                (VariableSetKind::VarResetAll, _) => K::Set,
                // Changing who the session is changes what its privileges are.
                (_, "role" | "session_authorization" | "session authorization") => K::Dcl,
                // What the gateway pins (`search_path`, encodings, read-only) is in
                // `settings`, and refused whatever the rules say.
                _ => K::Set,
            }
        }
        NodeEnum::VariableShowStmt(_) | NodeEnum::DiscardStmt(_) | NodeEnum::DeallocateStmt(_) => {
            K::Set
        }
        NodeEnum::CallStmt(_) => K::Call,
        NodeEnum::DoStmt(_) => K::Do,
        NodeEnum::GrantStmt(_)
        | NodeEnum::GrantRoleStmt(_)
        | NodeEnum::AlterDefaultPrivilegesStmt(_)
        | NodeEnum::CreateRoleStmt(_)
        | NodeEnum::AlterRoleStmt(_)
        | NodeEnum::AlterRoleSetStmt(_)
        | NodeEnum::DropRoleStmt(_)
        | NodeEnum::ReassignOwnedStmt(_)
        | NodeEnum::DropOwnedStmt(_)
        | NodeEnum::CreateUserMappingStmt(_)
        | NodeEnum::AlterUserMappingStmt(_)
        | NodeEnum::DropUserMappingStmt(_) => K::Dcl,
        NodeEnum::CreateSchemaStmt(_)
        | NodeEnum::AlterTableStmt(_)
        | NodeEnum::AlterDomainStmt(_)
        | NodeEnum::CreateStmt(_)
        | NodeEnum::CreateExtensionStmt(_)
        | NodeEnum::AlterExtensionStmt(_)
        | NodeEnum::CreateForeignTableStmt(_)
        | NodeEnum::CreatePolicyStmt(_)
        | NodeEnum::AlterPolicyStmt(_)
        | NodeEnum::CreateTrigStmt(_)
        | NodeEnum::CreateEventTrigStmt(_)
        | NodeEnum::CreateSeqStmt(_)
        | NodeEnum::AlterSeqStmt(_)
        | NodeEnum::DefineStmt(_)
        | NodeEnum::CreateDomainStmt(_)
        | NodeEnum::DropStmt(_)
        | NodeEnum::TruncateStmt(_)
        | NodeEnum::CommentStmt(_)
        | NodeEnum::IndexStmt(_)
        | NodeEnum::CreateStatsStmt(_)
        | NodeEnum::CreateFunctionStmt(_)
        | NodeEnum::AlterFunctionStmt(_)
        | NodeEnum::RenameStmt(_)
        | NodeEnum::AlterObjectSchemaStmt(_)
        | NodeEnum::AlterOwnerStmt(_)
        | NodeEnum::AlterTypeStmt(_)
        | NodeEnum::RuleStmt(_)
        | NodeEnum::CompositeTypeStmt(_)
        | NodeEnum::CreateEnumStmt(_)
        | NodeEnum::CreateRangeStmt(_)
        | NodeEnum::AlterEnumStmt(_)
        | NodeEnum::ViewStmt(_)
        | NodeEnum::CreatedbStmt(_)
        | NodeEnum::AlterDatabaseStmt(_)
        | NodeEnum::AlterDatabaseSetStmt(_)
        | NodeEnum::DropdbStmt(_)
        | NodeEnum::CreateTableAsStmt(_)
        | NodeEnum::RefreshMatViewStmt(_)
        | NodeEnum::ClusterStmt(_)
        | NodeEnum::VacuumStmt(_)
        | NodeEnum::ReindexStmt(_)
        | NodeEnum::CreateTableSpaceStmt(_)
        | NodeEnum::DropTableSpaceStmt(_) => K::Ddl,
        // Everything else — ALTER SYSTEM, LOAD, LOCK, CHECKPOINT, LISTEN/NOTIFY,
        // EXECUTE of a SQL-level prepared statement, publications, … — is `other`.
        _ => K::Other,
    };
    (kind, false)
}

#[cfg(test)]
#[path = "sql/tests.rs"]
mod tests;
