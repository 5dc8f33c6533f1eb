//! SQL classification with PostgreSQL's own parser (libpg_query): statement kinds, the
//! tables each statement touches, WHERE clauses, dangerous functions, and a fingerprint
//! of the normalized text.
//!
//! Text the parser rejects (or that is too large or too deeply nested to parse safely)
//! is one statement of kind `other`, which no select-only rule allows.

use agentgate_crds::SqlStatementKind;
use pg_query::protobuf::{TransactionStmtKind, VariableSetKind};
use pg_query::{FingerprintOptions, NodeEnum, ParserOptions};
use sha2::{Digest, Sha256};

use crate::attrs::{SqlRequest, SqlStatement};

/// The longest statement text classified; longer text is `other`.
pub const MAX_SQL_BYTES: usize = 1 << 20;

/// The deepest bracket nesting classified; deeper text is `other` (the parser and the
/// tree walk recurse, and a worker thread's stack is small).
pub const MAX_NESTING: usize = 200;

/// Functions that reach outside the database's tables — the server's files and
/// programs, other servers, other sessions, server configuration — or run SQL hidden in
/// a string, where classification cannot see it.
pub const DANGEROUS_FUNCTIONS: &[&str] = &[
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_stat_file",
    "pg_ls_logdir",
    "pg_ls_waldir",
    "pg_ls_tmpdir",
    "pg_ls_archive_statusdir",
    "pg_file_write",
    "pg_file_rename",
    "pg_file_unlink",
    "lo_import",
    "lo_export",
    "lo_unlink",
    "dblink",
    "dblink_exec",
    "dblink_connect",
    "dblink_connect_u",
    "dblink_send_query",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_promote",
    "pg_switch_wal",
    "pg_drop_replication_slot",
    "set_config",
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
];

/// Classifies one SQL text (a simple-protocol query string or one Parse).
pub fn classify_sql(text: &str) -> SqlRequest {
    let parsed = (text.len() <= MAX_SQL_BYTES && nesting(text) <= MAX_NESTING)
        .then(|| {
            // The parser is C behind a safe API; a panic in its Rust glue must not take
            // the session down, and means "could not classify".
            std::panic::catch_unwind(|| classify_parsed(text)).ok()
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
        tables: vec![],
        has_where: false,
        dangerous_functions: vec![],
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

fn classify_parsed(text: &str) -> Option<SqlRequest> {
    let whole = pg_query::parse(text, ParserOptions::DEFAULT).ok()?;
    let statements = if whole.protobuf.stmts.len() == 1 {
        // The common case: the whole text is the statement, already parsed.
        vec![classify_one(&whole)?]
    } else {
        let mut statements = Vec::with_capacity(whole.protobuf.stmts.len());
        for raw in &whole.protobuf.stmts {
            let start = usize::try_from(raw.stmt_location).ok()?;
            let slice = match usize::try_from(raw.stmt_len).ok()? {
                0 => text.get(start..)?,
                len => text.get(start..start.checked_add(len)?)?,
            };
            let parsed = pg_query::parse(slice, ParserOptions::DEFAULT).ok()?;
            statements.push(classify_one(&parsed)?);
        }
        statements
    };
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

/// One statement, parsed on its own so its tables and functions are its own.
fn classify_one(parsed: &pg_query::ParseResult) -> Option<SqlStatement> {
    let node = parsed
        .protobuf
        .stmts
        .first()?
        .stmt
        .as_ref()?
        .node
        .as_ref()?;
    let (kind, has_where) = kind_of(node);
    let mut tables: Vec<String> = parsed.tables().into_iter().map(qualify).collect();
    tables.sort();
    tables.dedup();
    let mut dangerous: Vec<String> = parsed
        .functions()
        .into_iter()
        .filter_map(|f| {
            let name = f.rsplit('.').next().unwrap_or(&f).to_ascii_lowercase();
            DANGEROUS_FUNCTIONS.contains(&name.as_str()).then_some(name)
        })
        .collect();
    if let NodeEnum::CopyStmt(c) = node
        && c.is_program
    {
        dangerous.push("copy program".to_owned());
    }
    dangerous.sort();
    dangerous.dedup();
    Some(SqlStatement {
        kind,
        tables,
        has_where,
        dangerous_functions: dangerous,
    })
}

/// Unqualified names are read as `public.<name>` — the default search path, which the
/// agent cannot change (`SET search_path` is classified `other`).
fn qualify(table: String) -> String {
    if table.contains('.') {
        table
    } else {
        format!("public.{table}")
    }
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
                // Changing who the session is, or where unqualified names resolve, would
                // change what the classified tables mean.
                (_, "role" | "session_authorization" | "session authorization") => K::Dcl,
                (_, "search_path") => K::Other,
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
