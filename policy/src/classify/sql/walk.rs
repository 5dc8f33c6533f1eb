//! One walk over a statement's whole parse tree, collecting what decides it.
//!
//! The walk is generic: it visits every field of every node (the tree as the parser's
//! protobuf serializes it), so a write nested anywhere a query may stand — a CTE at any
//! depth, COPY's query, EXPLAIN's target, a DECLARE or PREPARE body, CREATE TABLE AS, a
//! subquery in any expression — is seen without this file listing the places. Only
//! what needs a position is special-cased: which names in FROM may be CTEs, which
//! column references are plain output columns, and the scope of CTE names.

use std::collections::{BTreeMap, BTreeSet};

use agentgate_crds::SqlStatementKind as K;
use serde_json::{Map, Value};

/// Where a node stands, as far as the walk cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pos {
    /// Anywhere else.
    Other,
    /// A query whose output columns reach the result as they are (the statement
    /// itself, a subquery in FROM, a CTE's body, a cursor's or EXPLAIN's query): the
    /// server keeps each plain column's origin through it.
    Query,
    /// An item of a FROM list (or a join's side): a bare name there may be a CTE.
    From,
    /// An entry of a plain (not set-operation) SELECT's target list.
    SelectTarget,
    /// The value of such an entry: a column reference here is a plain output column.
    Plain,
}

/// What one statement's tree holds.
#[derive(Debug, Default)]
pub(super) struct Facts {
    /// Kinds found below the top-level statement (writes in CTEs, locking clauses, …).
    pub nested: Vec<K>,
    /// Tables, qualified with the search path (unqualified names: every candidate).
    pub tables: BTreeSet<String>,
    /// Every function called, as written (schema-qualified when it was).
    pub functions: BTreeSet<String>,
    /// UPDATE/DELETE nodes seen, and how many of them have a WHERE clause.
    pub writes_with_where: (usize, usize),
    /// Settings the statement changes (lower-case names; `*` for "any").
    pub settings: BTreeSet<String>,
    /// INSERT/UPDATE/DELETE/MERGE nodes anywhere in the tree (the statement's own one
    /// included).
    pub write_nodes: usize,
    /// Relations the statement reads that expose other tables' values or other
    /// sessions (`pg_stats`, `pg_stat_activity`, …).
    pub exposing_relations: BTreeSet<String>,
    /// Column references outside a plain output position: their names (`*` for a star
    /// or a whole-row reference).
    non_plain: Vec<Reference>,
    /// Single-name references in plain output positions (whole rows, if they name a
    /// relation).
    plain_bare: Vec<String>,
    /// Names relations are known by in this statement (tables, aliases, CTEs).
    relation_names: BTreeSet<String>,
    /// Derived tables (subqueries in FROM, CTEs): the names each defines, and every
    /// column name referenced inside it.
    derived: Vec<Derived>,
    /// Derived tables being walked (indexes into `derived`).
    open: Vec<usize>,
    /// CTE names in scope, innermost last.
    ctes: Vec<String>,
}

#[derive(Debug)]
struct Reference {
    name: String,
    /// A single-field reference: may name a relation (a whole-row reference).
    bare: bool,
}

#[derive(Debug, Default)]
struct Derived {
    defines: BTreeSet<String>,
    references: BTreeSet<String>,
}

/// The `SetOperation` value of a SELECT that is not UNION/INTERSECT/EXCEPT.
const SETOP_NONE: i64 = 1;
/// `OnConflictAction::OnconflictUpdate`.
const ONCONFLICT_UPDATE: i64 = 3;

/// Catalog relations whose rows are other tables' values (statistics samples), other
/// sessions' SQL, or credentials: no table rule should let them be read, however it
/// names `pg_catalog.*`.
const EXPOSING_RELATIONS: [&str; 14] = [
    "pg_stats",
    "pg_stats_ext",
    "pg_stats_ext_exprs",
    "pg_statistic",
    "pg_statistic_ext_data",
    "pg_stat_activity",
    "pg_stat_statements",
    "pg_stat_statements_info",
    "pg_prepared_statements",
    "pg_cursors",
    "pg_largeobject",
    "pg_authid",
    "pg_shadow",
    "pg_user_mappings",
];

/// Node types of SQL/JSON syntax that the parser (PostgreSQL 18's grammar) reads as
/// expressions, but that a PostgreSQL 15 server reads as ordinary calls of functions of
/// that name — resolved through the search path, so possibly a user's function. They
/// count as calls of functions no built-in list holds.
const SQL_JSON_CALLS: [(&str, &str); 10] = [
    ("JsonFuncExpr", "json_value/json_query/json_exists"),
    ("JsonScalarExpr", "json_scalar"),
    ("JsonSerializeExpr", "json_serialize"),
    ("JsonParseExpr", "json"),
    ("JsonObjectConstructor", "json_object"),
    ("JsonArrayConstructor", "json_array"),
    ("JsonArrayQueryConstructor", "json_array"),
    ("JsonObjectAgg", "json_objectagg"),
    ("JsonArrayAgg", "json_arrayagg"),
    ("JsonTable", "json_table"),
];

impl Facts {
    /// Walks one statement's tree (the `stmt` node of a raw statement, as JSON).
    pub(super) fn of(tree: &Value, search_path: &[String]) -> Facts {
        let mut facts = Facts::default();
        facts.value(tree, Pos::Query);
        facts.tables = std::mem::take(&mut facts.tables)
            .into_iter()
            .flat_map(|t| qualify(&t, search_path))
            .collect();
        facts
    }

    fn value(&mut self, v: &Value, pos: Pos) {
        match v {
            Value::Array(items) => items.iter().for_each(|i| self.value(i, pos)),
            Value::Object(map) => {
                // `{"node": {...}}` wraps a node; `{"SelectStmt": {...}}` names its type.
                if map.len() == 1 {
                    let (key, inner) = map.iter().next().unwrap_or_else(|| unreachable!());
                    if key == "node" {
                        return self.value(inner, pos);
                    }
                    if key.starts_with(|c: char| c.is_ascii_uppercase())
                        && let Value::Object(fields) = inner
                    {
                        return self.node(key, fields, pos);
                    }
                }
                self.fields("", map, pos);
            }
            _ => {}
        }
    }

    fn node(&mut self, ty: &str, f: &Map<String, Value>, pos: Pos) {
        match ty {
            "RangeVar" => self.range_var(f, pos),
            "SelectStmt" => self.select(f, pos),
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => {
                let kind = match ty {
                    "InsertStmt" => K::Insert,
                    "UpdateStmt" => K::Update,
                    "DeleteStmt" => K::Delete,
                    _ => K::Merge,
                };
                self.nested.push(kind);
                self.write_nodes += 1;
                // INSERT … ON CONFLICT DO UPDATE changes existing rows: an update too.
                if kind == K::Insert
                    && f.get("on_conflict_clause")
                        .and_then(|c| c.get("action"))
                        .and_then(Value::as_i64)
                        == Some(ONCONFLICT_UPDATE)
                {
                    self.nested.push(K::Update);
                }
                if matches!(kind, K::Update | K::Delete) {
                    self.writes_with_where.0 += 1;
                    if !is_null(f.get("where_clause")) {
                        self.writes_with_where.1 += 1;
                    }
                }
                self.fields(ty, f, pos);
            }
            "FuncCall" => {
                if let Some(name) = dotted(f.get("funcname")) {
                    self.functions.insert(name);
                }
                self.fields(ty, f, pos);
            }
            "ColumnRef" => self.column_ref(f, pos),
            "ResTarget" => {
                if let Some(Value::String(name)) = f.get("name")
                    && !name.is_empty()
                {
                    self.defined(name);
                }
                let val_pos = if pos == Pos::SelectTarget {
                    Pos::Plain
                } else {
                    Pos::Other
                };
                for (k, v) in f {
                    self.value(v, if k == "val" { val_pos } else { Pos::Other });
                }
            }
            "RangeSubselect" => {
                let i = self.open_derived();
                if let Some(alias) = f.get("alias") {
                    self.alias(alias);
                }
                self.fields(ty, f, Pos::Other);
                self.open.pop();
                debug_assert_eq!(self.open.len(), i);
            }
            "CommonTableExpr" => {
                let i = self.open_derived();
                if let Some(Value::String(name)) = f.get("ctename") {
                    self.defined(name);
                    self.relation_names.insert(name.clone());
                }
                for name in strings(f.get("aliascolnames")) {
                    self.defined(&name);
                }
                self.fields(ty, f, Pos::Other);
                self.open.pop();
                debug_assert_eq!(self.open.len(), i);
            }
            "RangeFunction" => {
                if let Some(alias) = f.get("alias") {
                    self.alias(alias);
                }
                self.fields(ty, f, pos);
            }
            "JoinExpr" => {
                if let Some(alias) = f.get("alias") {
                    self.renaming_alias(alias);
                }
                if let Some(alias) = f.get("join_using_alias") {
                    self.renaming_alias(alias);
                }
                // USING (a, b) and NATURAL compare columns without naming them in a
                // ColumnRef: each is a column used in a condition.
                for name in strings(f.get("using_clause")) {
                    self.reference(name, false, Pos::Other);
                }
                if f.get("is_natural").and_then(Value::as_bool) == Some(true) {
                    self.reference("*".into(), false, Pos::Other);
                }
                for (k, v) in f {
                    let p = if matches!(k.as_str(), "larg" | "rarg") {
                        Pos::From
                    } else {
                        Pos::Other
                    };
                    self.value(v, p);
                }
            }
            "VariableSetStmt" => {
                self.variable_set(f);
                self.fields(ty, f, pos);
            }
            "TransactionStmt" => {
                if turns_read_only_off(f.get("options")) {
                    self.settings.insert("transaction_read_only".into());
                }
                self.fields(ty, f, pos);
            }
            "MergeSupportFunc" => {
                self.functions.insert("merge_action".into());
            }
            _ => {
                if let Some((_, name)) = SQL_JSON_CALLS.iter().find(|(t, _)| *t == ty) {
                    self.functions.insert((*name).to_owned());
                }
                self.fields(ty, f, pos)
            }
        }
    }

    /// Every field of a node (or of an untagged struct), with its position.
    fn fields(&mut self, ty: &str, f: &Map<String, Value>, pos: Pos) {
        // An untagged table reference (`InsertStmt.relation`, `IntoClause.rel`, …).
        if f.contains_key("relname") && f.contains_key("inh") {
            return self.range_var(f, pos);
        }
        // CTE names are in scope for the statement that has the WITH clause.
        let pushed = match f.get("with_clause") {
            Some(Value::Object(w)) => self.with_clause(w),
            _ => 0,
        };
        for (k, v) in f {
            if k == "with_clause" {
                continue;
            }
            let p = match (ty, k.as_str()) {
                (_, "from_clause" | "using_clause" | "source_relation") => Pos::From,
                ("RangeSubselect", "subquery")
                | ("CommonTableExpr", "ctequery")
                | ("DeclareCursorStmt" | "ExplainStmt", "query") => Pos::Query,
                // Anything else that holds a query uses its output (INSERT … SELECT,
                // CREATE TABLE AS, COPY (…), a subquery in an expression): none of its
                // columns is plain.
                _ => Pos::Other,
            };
            self.value(v, p);
        }
        self.ctes.truncate(self.ctes.len().saturating_sub(pushed));
    }

    /// Walks a WITH clause's CTEs (each sees the ones before it, or all of them when
    /// RECURSIVE) and leaves every name in scope; returns how many it pushed.
    fn with_clause(&mut self, w: &Map<String, Value>) -> usize {
        let ctes: &[Value] = match w.get("ctes") {
            Some(Value::Array(c)) => c,
            _ => &[],
        };
        let names: Vec<String> = ctes
            .iter()
            .filter_map(|c| {
                c.pointer("/node/CommonTableExpr/ctename")
                    .or_else(|| c.pointer("/CommonTableExpr/ctename"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .collect();
        let recursive = w.get("recursive").and_then(Value::as_bool) == Some(true);
        let base = self.ctes.len();
        if recursive {
            self.ctes.extend(names.iter().cloned());
        }
        for (i, cte) in ctes.iter().enumerate() {
            if !recursive {
                self.ctes.truncate(base);
                self.ctes.extend(names.iter().take(i).cloned());
            }
            self.value(cte, Pos::Other);
        }
        self.ctes.truncate(base);
        self.ctes.extend(names.iter().cloned());
        names.len()
    }

    fn select(&mut self, f: &Map<String, Value>, pos: Pos) {
        if f.get("locking_clause").is_some_and(|l| !is_empty(l)) {
            // FOR UPDATE / NO KEY UPDATE / SHARE / KEY SHARE lock rows, and need UPDATE
            // privilege on the server.
            self.nested.push(K::Update);
        }
        if !is_null(f.get("into_clause")) {
            self.nested.push(K::Ddl);
        }
        // `ORDER BY 2`, `GROUP BY ROLLUP(1)`, `DISTINCT ON (e)` where `e` is an output
        // alias: an output column used by its position or alias is not only shown.
        let aliases: BTreeSet<&str> = match f.get("target_list") {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|i| i.pointer("/node/ResTarget/name").and_then(Value::as_str))
                .filter(|n| !n.is_empty())
                .collect(),
            _ => BTreeSet::new(),
        };
        let positional = ["sort_clause", "group_clause", "distinct_clause"]
            .iter()
            .filter_map(|k| f.get(*k))
            .any(|clause| refers_to_output(clause, &aliases));
        let plain = pos == Pos::Query
            && !positional
            && f.get("op").and_then(Value::as_i64) == Some(SETOP_NONE);
        let pushed = match f.get("with_clause") {
            Some(Value::Object(w)) => self.with_clause(w),
            _ => 0,
        };
        for (k, v) in f {
            match k.as_str() {
                "with_clause" => {}
                "target_list" => self.value(v, if plain { Pos::SelectTarget } else { Pos::Other }),
                "from_clause" => self.value(v, Pos::From),
                // The branches of UNION / INTERSECT / EXCEPT (untagged SELECTs): their
                // output columns lose their origin, so none is plain.
                "larg" | "rarg" => {
                    if let Value::Object(branch) = v {
                        self.select(branch, Pos::Other);
                    }
                }
                _ => self.value(v, Pos::Other),
            }
        }
        self.ctes.truncate(self.ctes.len().saturating_sub(pushed));
    }

    fn range_var(&mut self, f: &Map<String, Value>, pos: Pos) {
        let schema = f.get("schemaname").and_then(Value::as_str).unwrap_or("");
        let name = f.get("relname").and_then(Value::as_str).unwrap_or("");
        if let Some(alias) = f.get("alias") {
            self.renaming_alias(alias);
        }
        self.relation_names.insert(name.to_owned());
        if (schema.is_empty() || schema == "pg_catalog") && EXPOSING_RELATIONS.contains(&name) {
            self.exposing_relations.insert(format!("pg_catalog.{name}"));
        }
        // Extensions' views install into any schema.
        if name.starts_with("pg_stat_statements") {
            self.exposing_relations.insert(format!(
                "{}.{name}",
                if schema.is_empty() { "*" } else { schema }
            ));
        }
        // A bare name in FROM is a CTE when one of that name is in scope; a write's
        // target (`DELETE FROM x`) is always a table.
        if pos == Pos::From && schema.is_empty() && self.ctes.iter().any(|c| c == name) {
            return;
        }
        let table = if schema.is_empty() {
            name.to_owned()
        } else {
            format!("{schema}.{name}")
        };
        self.tables.insert(table);
    }

    fn alias(&mut self, alias: &Value) {
        if let Some(name) = alias.get("aliasname").and_then(Value::as_str) {
            self.relation_names.insert(name.to_owned());
            self.defined(name);
        }
        for name in strings(alias.get("colnames")) {
            self.defined(&name);
        }
    }

    /// The alias of a table or a join (`customers AS c(i, n, e, s)`): its column names
    /// rename the relation's columns, in an order the walk cannot see, so each may be
    /// any of them.
    fn renaming_alias(&mut self, alias: &Value) {
        self.alias(alias);
        let renamed = strings(alias.get("colnames"));
        if !renamed.is_empty() {
            self.derived.push(Derived {
                defines: renamed.into_iter().collect(),
                references: std::iter::once("*".to_owned()).collect(),
            });
        }
    }

    fn column_ref(&mut self, f: &Map<String, Value>, pos: Pos) {
        let fields: &[Value] = match f.get("fields") {
            Some(Value::Array(a)) => a,
            _ => &[],
        };
        let last = fields.last();
        let name =
            match last.and_then(|l| l.pointer("/node/String/sval").or(l.pointer("/String/sval"))) {
                Some(Value::String(s)) => s.clone(),
                // `*`, `t.*`
                _ => "*".to_owned(),
            };
        // `c.to_jsonb` is `to_jsonb(c)` when `c` has no column of that name (functional
        // notation): a built-in's name after a relation is read as that call on the
        // whole row.
        if fields.len() == 2
            && (super::functions::is_safe(&name) || super::functions::is_dangerous(&name))
        {
            self.functions.insert(name);
            self.reference("*".to_owned(), false, Pos::Other);
            return;
        }
        self.reference(name, fields.len() == 1, pos);
    }

    /// A column reference: `name` (`*` for a star), `bare` when written as one name
    /// (it may then be a whole row of a relation of that name).
    fn reference(&mut self, name: String, bare: bool, pos: Pos) {
        for &i in &self.open {
            self.derived[i].references.insert(name.clone());
        }
        if pos == Pos::Plain {
            // A plain output column of a derived table is a name the outer query sees.
            if name != "*" {
                self.defined(&name);
            }
            if bare {
                // Kept to check once every relation name is known: a whole row has no
                // column origin at the server, so it is never a plain column.
                self.plain_bare.push(name);
            }
            return;
        }
        self.non_plain.push(Reference { name, bare });
    }

    fn open_derived(&mut self) -> usize {
        let at = self.open.len();
        self.derived.push(Derived::default());
        self.open.push(self.derived.len() - 1);
        at
    }

    /// A name that the innermost derived table being walked makes visible outside.
    fn defined(&mut self, name: &str) {
        if let Some(&i) = self.open.last() {
            self.derived[i].defines.insert(name.to_owned());
        }
    }

    fn variable_set(&mut self, f: &Map<String, Value>) {
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_ascii_lowercase();
        // VariableSetKind: 1 SET value, 2 SET DEFAULT, 3 SET CURRENT, 4 SET MULTI
        // (SET TRANSACTION / SESSION CHARACTERISTICS), 5 RESET, 6 RESET ALL. A RESET
        // returns to the value the session started with, which the gateway pinned.
        let kind = f.get("kind").and_then(Value::as_i64).unwrap_or(0);
        let read_only_setting = matches!(
            name.as_str(),
            "default_transaction_read_only" | "transaction_read_only"
        );
        match kind {
            // `RESET transaction_read_only` goes to the built-in default (off), not to
            // what the session was pinned to.
            5 if read_only_setting => {
                self.settings.insert(name);
            }
            5 | 6 => {}
            4 => {
                if turns_read_only_off(f.get("args")) {
                    self.settings.insert("transaction_read_only".into());
                }
            }
            _ if read_only_setting => {
                if !setting_is_on(f.get("args")) {
                    self.settings.insert(name);
                }
            }
            _ => {
                self.settings.insert(name);
            }
        }
    }

    /// The column names, from those `masked` (globs over names) could match, that a
    /// column reference outside a plain output position may carry — through derived
    /// tables' renamings too. `*` means "any column".
    pub(super) fn expression_columns(&self) -> Vec<String> {
        // What each name a derived table defines may carry, to a fixed point.
        let mut carries: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for d in &self.derived {
            for name in &d.defines {
                carries
                    .entry(name)
                    .or_default()
                    .extend(d.references.iter().map(String::as_str));
            }
        }
        let mut out: BTreeSet<String> = BTreeSet::new();
        let whole_rows = self
            .plain_bare
            .iter()
            .filter(|n| self.relation_names.contains(*n))
            .map(|n| Reference {
                name: n.clone(),
                bare: true,
            });
        let whole_rows: Vec<Reference> = whole_rows.collect();
        for r in self.non_plain.iter().chain(&whole_rows) {
            let mut stack = vec![r.name.as_str()];
            let mut seen = BTreeSet::new();
            if r.bare && self.relation_names.contains(&r.name) {
                // A whole-row reference (`to_jsonb(c)`, `c::text`): every column.
                out.insert("*".into());
            }
            while let Some(n) = stack.pop() {
                if !seen.insert(n) {
                    continue;
                }
                out.insert(n.to_owned());
                if let Some(more) = carries.get(n) {
                    stack.extend(more.iter().copied());
                }
            }
        }
        out.into_iter().collect()
    }
}

/// `schema.table` for a name as written: unqualified names resolve through the search
/// path — every candidate is listed, so a rule must allow all of them — and names that
/// start with `pg_` may also be the system catalog's, which is searched first.
fn qualify(table: &str, search_path: &[String]) -> Vec<String> {
    if table.contains('.') {
        return vec![table.to_owned()];
    }
    let mut out: Vec<String> = Vec::new();
    if table.starts_with("pg_") {
        out.push(format!("pg_catalog.{table}"));
    }
    out.extend(search_path.iter().map(|s| format!("{s}.{table}")));
    if out.is_empty() {
        // No search path: the server finds nothing; name it under no schema the rules
        // could allow by accident.
        out.push(format!("\"\".{table}"));
    }
    out
}

fn is_null(v: Option<&Value>) -> bool {
    v.is_none_or(Value::is_null)
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Array(a) => a.is_empty(),
        Value::Null => true,
        _ => false,
    }
}

/// `["pg_catalog", "lower"]` as String nodes → `pg_catalog.lower`.
fn dotted(v: Option<&Value>) -> Option<String> {
    let parts = strings(v);
    (!parts.is_empty()).then(|| parts.join("."))
}

/// The `sval`s of a list of String nodes.
fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| {
                i.pointer("/node/String/sval")
                    .or_else(|| i.pointer("/String/sval"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Transaction options (`BEGIN READ WRITE`, `SET TRANSACTION READ WRITE`): whether one
/// sets `transaction_read_only` to anything but on.
fn turns_read_only_off(options: Option<&Value>) -> bool {
    let Some(Value::Array(items)) = options else {
        return false;
    };
    items.iter().any(|o| {
        let d = o.pointer("/node/DefElem").or_else(|| o.pointer("/DefElem"));
        d.is_some_and(|d| {
            d.get("defname").and_then(Value::as_str) == Some("transaction_read_only")
                && !const_is_on(d.get("arg"))
        })
    })
}

/// `SET x = on|true|yes|1` (any other value, or none, is not "on").
fn setting_is_on(args: Option<&Value>) -> bool {
    match args {
        Some(Value::Array(a)) if a.len() == 1 => const_is_on(a.first()),
        _ => false,
    }
}

fn const_is_on(v: Option<&Value>) -> bool {
    let Some(v) = v else { return false };
    let c = v
        .pointer("/node/A_Const")
        .or_else(|| v.pointer("/A_Const"))
        .or_else(|| v.pointer("/node/AConst"))
        .or_else(|| v.pointer("/AConst"));
    let Some(c) = c else { return false };
    if let Some(i) = c.pointer("/val/Ival/ival").and_then(Value::as_i64) {
        return i == 1;
    }
    if let Some(b) = c.pointer("/val/Boolval/boolval").and_then(Value::as_bool) {
        return b;
    }
    if let Some(s) = c.pointer("/val/Sval/sval").and_then(Value::as_str) {
        return matches!(s.to_ascii_lowercase().as_str(), "on" | "true" | "yes" | "1");
    }
    false
}

/// Whether a clause uses an output column by position (`ORDER BY 2`, `GROUP BY
/// ROLLUP(1)`) or by an output alias (`ORDER BY e`) — the forms the server reads as
/// output columns: a bare integer or name as an item, not inside an expression.
fn refers_to_output(v: &Value, aliases: &BTreeSet<&str>) -> bool {
    match v {
        Value::Array(items) => items.iter().any(|i| refers_to_output(i, aliases)),
        Value::Object(map) if map.len() == 1 => {
            let Some((key, inner)) = map.iter().next() else {
                return false;
            };
            match key.as_str() {
                "node" => refers_to_output(inner, aliases),
                "AConst" => inner.get("val").and_then(|v| v.get("Ival")).is_some(),
                "ColumnRef" => match &strings(inner.get("fields"))[..] {
                    [one] => aliases.contains(one.as_str()),
                    _ => false,
                },
                "SortBy" => inner
                    .get("node")
                    .is_some_and(|n| refers_to_output(n, aliases)),
                "GroupingSet" => inner
                    .get("content")
                    .is_some_and(|c| refers_to_output(c, aliases)),
                _ => false,
            }
        }
        _ => false,
    }
}
