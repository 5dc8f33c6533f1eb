use agentgate_crds::SqlStatementKind as K;
use proptest::prelude::*;

use super::*;

fn one(sql: &str) -> SqlStatement {
    let r = classify_sql(sql);
    assert_eq!(r.statements.len(), 1, "{sql}: {r:?}");
    r.statements.into_iter().next().unwrap()
}

#[test]
fn statement_kinds() {
    let cases = [
        ("SELECT 1", K::Select),
        ("select * from orders where id = 1", K::Select),
        ("INSERT INTO orders (id) VALUES (1)", K::Insert),
        ("UPDATE orders SET total = 0 WHERE id = 1", K::Update),
        ("DELETE FROM orders", K::Delete),
        (
            "MERGE INTO orders o USING staged s ON o.id = s.id WHEN MATCHED THEN DELETE",
            K::Merge,
        ),
        ("COPY orders FROM STDIN", K::Copy),
        ("COPY (SELECT * FROM orders) TO STDOUT", K::Copy),
        ("CREATE TABLE t (id int)", K::Ddl),
        ("DROP TABLE orders", K::Ddl),
        ("TRUNCATE orders", K::Ddl),
        ("ALTER TABLE orders ADD COLUMN x int", K::Ddl),
        ("CREATE INDEX ON orders (id)", K::Ddl),
        ("SELECT * INTO copy_of_orders FROM orders", K::Ddl),
        ("CREATE TABLE t2 AS SELECT * FROM orders", K::Ddl),
        ("GRANT SELECT ON orders TO bob", K::Dcl),
        ("CREATE ROLE mallory LOGIN", K::Dcl),
        ("ALTER ROLE app PASSWORD 'x'", K::Dcl),
        ("SET ROLE postgres", K::Dcl),
        ("SET SESSION AUTHORIZATION postgres", K::Dcl),
        ("BEGIN", K::Transaction),
        ("COMMIT", K::Transaction),
        ("ROLLBACK TO SAVEPOINT a", K::Transaction),
        ("PREPARE TRANSACTION 'x'", K::Other),
        ("SET statement_timeout = 1000", K::Set),
        ("SHOW server_version", K::Set),
        ("RESET ALL", K::Set),
        ("SET search_path = secret, public", K::Set),
        ("CALL do_things(1)", K::Call),
        ("DO $$ BEGIN PERFORM 1; END $$", K::Do),
        ("EXPLAIN SELECT * FROM orders", K::Explain),
        ("EXPLAIN DELETE FROM orders", K::Explain),
        ("EXPLAIN (ANALYZE) DELETE FROM orders", K::Delete),
        ("EXPLAIN ANALYZE SELECT 1", K::Select),
        ("DECLARE c CURSOR FOR SELECT * FROM orders", K::Select),
        ("FETCH 10 FROM c", K::Select),
        ("PREPARE p AS DELETE FROM orders", K::Delete),
        ("EXECUTE p", K::Other),
        ("ALTER SYSTEM SET work_mem = '1GB'", K::Other),
        ("LOAD 'plugin'", K::Other),
        ("LOCK TABLE orders", K::Other),
        // Writes hidden inside reads are writes.
        (
            "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
            K::Delete,
        ),
        (
            "WITH u AS (UPDATE orders SET total = 0 RETURNING *) SELECT 1",
            K::Update,
        ),
        (
            "WITH i AS (INSERT INTO orders VALUES (1) RETURNING *) SELECT * FROM i",
            K::Insert,
        ),
        (
            "EXPLAIN ANALYZE WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
            K::Delete,
        ),
        ("COPY (DELETE FROM orders RETURNING *) TO STDOUT", K::Delete),
        (
            "COPY (UPDATE orders SET total = 0 RETURNING *) TO STDOUT",
            K::Update,
        ),
        ("SELECT * FROM orders FOR UPDATE", K::Update),
        ("SELECT * FROM orders FOR SHARE SKIP LOCKED", K::Update),
        (
            "DECLARE c CURSOR FOR SELECT * FROM orders FOR UPDATE",
            K::Update,
        ),
        (
            "CREATE TABLE t AS WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
            K::Ddl,
        ),
        (
            "SELECT (SELECT 1 FROM (WITH d AS (DELETE FROM orders RETURNING 1) SELECT * FROM d) x)",
            K::Delete,
        ),
        (
            "SELECT 1 UNION ALL (WITH d AS (DELETE FROM orders RETURNING 1) SELECT * FROM d)",
            K::Delete,
        ),
        (
            "PREPARE p AS WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
            K::Delete,
        ),
    ];
    for (sql, kind) in cases {
        assert_eq!(one(sql).kind, kind, "{sql}");
    }
}

#[test]
fn tables_with_schemas_including_ctes_subqueries_and_returning() {
    assert_eq!(
        one("SELECT * FROM orders o JOIN sales.customers c ON c.id = o.customer_id").tables,
        ["public.orders", "sales.customers"]
    );
    // A CTE's name is not a table; what it reads is.
    assert_eq!(
        one("WITH recent AS (SELECT * FROM billing.invoices) SELECT * FROM recent").tables,
        ["billing.invoices"]
    );
    assert_eq!(
        one("SELECT * FROM orders WHERE customer_id IN (SELECT id FROM secret.customers)").tables,
        ["public.orders", "secret.customers"]
    );
    assert_eq!(
        one("WITH gone AS (DELETE FROM orders RETURNING *) INSERT INTO archive.orders SELECT * FROM gone")
            .tables,
        ["archive.orders", "public.orders"]
    );
    assert_eq!(
        one("UPDATE orders SET total = (SELECT max(x) FROM stats.t) RETURNING id").tables,
        ["public.orders", "stats.t"]
    );
}

#[test]
fn where_clauses_on_writes() {
    assert!(one("DELETE FROM orders WHERE id = 1").has_where);
    assert!(!one("DELETE FROM orders").has_where);
    assert!(one("UPDATE orders SET x = 1 WHERE id = 1").has_where);
    assert!(!one("UPDATE orders SET x = 1").has_where);
}

#[test]
fn multi_statement_strings_are_split_each_with_its_own_tables() {
    let r = classify_sql("SELECT * FROM a; DELETE FROM b; SELECT 1");
    let kinds: Vec<_> = r.statements.iter().map(|s| s.kind).collect();
    assert_eq!(kinds, [K::Select, K::Delete, K::Select]);
    assert_eq!(r.statements[0].tables, ["public.a"]);
    assert_eq!(r.statements[1].tables, ["public.b"]);
    assert!(r.statements[2].tables.is_empty());
}

#[test]
fn dangerous_functions_are_named() {
    assert_eq!(
        one("SELECT pg_read_file('/etc/passwd')").dangerous_functions,
        ["pg_read_file"]
    );
    assert_eq!(
        one("SELECT pg_catalog.PG_TERMINATE_BACKEND(pid) FROM pg_stat_activity")
            .dangerous_functions,
        [
            "pg_terminate_backend",
            "relation pg_catalog.pg_stat_activity"
        ]
    );
    assert_eq!(
        one("SELECT * FROM dblink('host=x', 'select 1') AS t(a int)").dangerous_functions,
        ["dblink"]
    );
    assert_eq!(
        one("COPY orders TO PROGRAM 'curl x'").dangerous_functions,
        ["copy program"]
    );
    assert!(
        one("SELECT lower(name) FROM t")
            .dangerous_functions
            .is_empty()
    );
}

#[test]
fn fingerprints_ignore_literals_but_not_tables() {
    let a = classify_sql("DELETE FROM orders WHERE id = 1");
    let b = classify_sql("delete from orders where id = 42");
    let c = classify_sql("DELETE FROM orders_archive WHERE id = 1");
    assert_eq!(a.fingerprint, b.fingerprint);
    assert_ne!(a.fingerprint, c.fingerprint);
    assert_eq!(
        a.normalized.as_deref(),
        Some("DELETE FROM orders WHERE id = $1")
    );
}

#[test]
fn unparsable_or_oversized_text_is_other() {
    for sql in [
        "SELEC * FROM orders",
        "SELECT 'unterminated",
        "SELECT 1\0",
        &format!(
            "SELECT {}1{}",
            "(".repeat(MAX_NESTING + 1),
            ")".repeat(MAX_NESTING + 1)
        ),
        &format!("SELECT '{}'", "x".repeat(MAX_SQL_BYTES)),
    ] {
        let r = classify_sql(sql);
        assert_eq!(r.statements.len(), 1);
        assert_eq!(r.statements[0].kind, K::Other, "{:.40}", sql);
        assert!(r.normalized.is_none());
        assert!(!r.fingerprint.is_empty());
    }
    // Right at the nesting limit it still parses.
    let deep = format!(
        "SELECT {}1{}",
        "(".repeat(MAX_NESTING),
        ")".repeat(MAX_NESTING)
    );
    assert_eq!(one(&deep).kind, K::Select);
}

#[test]
fn empty_text_has_no_statements() {
    assert!(classify_sql("").statements.is_empty());
    assert!(classify_sql(" ; -- nothing").statements.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any text: no panic, and either statements or one `other`.
    #[test]
    fn never_panics(text in ".{0,200}") {
        let r = classify_sql(&text);
        if r.normalized.is_none() {
            prop_assert_eq!(r.statements, vec![unclassifiable()]);
        }
    }

    /// SQL-shaped noise: keywords, quotes, brackets, semicolons in any order.
    #[test]
    fn sql_shaped_noise_is_classified(parts in proptest::collection::vec(
        prop_oneof![
            Just("SELECT"), Just("DELETE"), Just("FROM"), Just("WHERE"), Just("("), Just(")"),
            Just("'"), Just("$$"), Just(";"), Just("t"), Just("1"), Just("--"), Just("/*"),
            Just("*/"), Just("\""), Just("E'\\'"), Just("WITH x AS"), Just(","),
        ], 0..40)) {
        let text = parts.join(" ");
        let r = classify_sql(&text);
        for s in &r.statements {
            prop_assert!(s.tables.iter().all(|t| t.contains('.')));
        }
    }
}

#[test]
fn a_cte_name_is_a_table_where_the_server_reads_a_table() {
    // The target of a write is always a table, whatever CTE shares its name.
    assert_eq!(
        one("WITH orders AS (SELECT 1) DELETE FROM orders").tables,
        ["public.orders"]
    );
    // Out of the CTE's scope the name is a table again.
    assert_eq!(
        one("SELECT * FROM (WITH keys AS (SELECT 1) SELECT * FROM keys) a, keys").tables,
        ["public.keys"]
    );
    // A non-recursive CTE does not see itself or later CTEs: `b` in `a` is a table.
    assert_eq!(
        one("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a").tables,
        ["public.b"]
    );
    // Recursive: every CTE of the list is in scope in every body.
    assert!(
        one("WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 3) SELECT * FROM t")
            .tables
            .is_empty()
    );
    // Schema-qualified: never a CTE.
    assert_eq!(
        one("WITH keys AS (SELECT 1) SELECT * FROM secret.keys").tables,
        ["secret.keys"]
    );
}

#[test]
fn unqualified_names_resolve_through_the_pinned_search_path() {
    let ctx = SqlContext {
        search_path: vec!["sales".into(), "public".into()],
    };
    let r = classify_sql_in(
        "SELECT * FROM orders JOIN billing.invoices USING (id)",
        &ctx,
    );
    assert_eq!(
        r.statements[0].tables,
        ["billing.invoices", "public.orders", "sales.orders"]
    );
    // `pg_*` names may be the system catalog's, which is searched first.
    assert_eq!(
        one("SELECT * FROM pg_class").tables,
        ["pg_catalog.pg_class", "public.pg_class"]
    );
}

#[test]
fn settings_that_change_how_sql_is_read_are_named() {
    let settings = |sql: &str| one(sql).settings;
    assert_eq!(settings("SET search_path = secret"), ["search_path"]);
    assert_eq!(settings("SET SCHEMA 'secret'"), ["search_path"]);
    assert_eq!(
        settings("SET LOCAL search_path TO DEFAULT"),
        ["search_path"]
    );
    assert_eq!(settings("SET NAMES 'GBK'"), ["client_encoding"]);
    assert_eq!(settings("SET client_encoding = 'GBK'"), ["client_encoding"]);
    assert_eq!(
        settings("SET standard_conforming_strings = off"),
        ["standard_conforming_strings"]
    );
    assert_eq!(
        settings("SELECT set_config('search_path', 'secret', false)"),
        ["*"]
    );
    // Read-only: only turning it off counts.
    assert_eq!(
        settings("SET default_transaction_read_only = off"),
        ["default_transaction_read_only"]
    );
    assert!(settings("SET default_transaction_read_only = on").is_empty());
    assert_eq!(
        settings("SET transaction_read_only = false"),
        ["transaction_read_only"]
    );
    assert_eq!(settings("BEGIN READ WRITE"), ["transaction_read_only"]);
    assert_eq!(
        settings("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE"),
        ["transaction_read_only"]
    );
    assert_eq!(
        settings("SET TRANSACTION READ WRITE"),
        ["transaction_read_only"]
    );
    assert_eq!(
        settings("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE"),
        ["transaction_read_only"]
    );
    assert!(settings("BEGIN READ ONLY").is_empty());
    assert!(settings("SET TRANSACTION READ ONLY").is_empty());
    assert!(settings("BEGIN").is_empty());
    // A RESET returns to what the session started with (which the gateway pinned).
    assert!(settings("RESET search_path").is_empty());
    assert!(settings("RESET ALL").is_empty());
    assert_eq!(
        settings("SET statement_timeout = 1000"),
        ["statement_timeout"]
    );
}

#[test]
fn functions_and_cursors_are_named() {
    let s = one("SELECT lower(name), pg_catalog.count(*), app.report(1) FROM t");
    assert_eq!(s.functions, ["app.report", "lower", "pg_catalog.count"]);
    let s = one("SELECT table_to_xml('secret.keys', true, false, '')");
    assert_eq!(s.dangerous_functions, ["table_to_xml"]);
    assert_eq!(one("FETCH 10 FROM c").cursor.as_deref(), Some("c"));
    assert_eq!(one("MOVE NEXT IN c").cursor.as_deref(), Some("c"));
    let d = one("DECLARE c CURSOR WITH HOLD FOR SELECT * FROM secret.keys");
    assert_eq!(d.declares.as_deref(), Some("c"));
    assert_eq!(d.tables, ["secret.keys"]);
    assert!(SAFE_SORTED.windows(2).all(|w| w[0] < w[1]));
}

const SAFE_SORTED: &[&str] = functions::SAFE_FUNCTIONS;

#[test]
fn column_references_outside_plain_output_positions() {
    let cols = |sql: &str| one(sql).expression_columns;
    // Plain output columns (also through subqueries and CTEs) keep their origin.
    assert!(cols("SELECT email, c.ssn FROM customers c").is_empty());
    assert!(cols("SELECT * FROM customers").is_empty());
    assert!(cols("SELECT e FROM (SELECT email AS e FROM customers) s").is_empty());
    assert!(cols("WITH x AS (SELECT email FROM customers) SELECT email FROM x").is_empty());
    // In expressions, conditions, casts, functions and row values they do not.
    assert_eq!(cols("SELECT lower(email) FROM customers"), ["email"]);
    assert_eq!(cols("SELECT email::bytea FROM customers"), ["email"]);
    assert_eq!(
        cols("SELECT id FROM customers WHERE ssn LIKE '1%'"),
        ["id", "ssn"][1..]
    );
    assert_eq!(cols("SELECT ARRAY[email] FROM customers"), ["email"]);
    assert_eq!(cols("SELECT to_jsonb(c) FROM customers c"), ["*", "c"]);
    assert_eq!(cols("SELECT row(c.*) FROM customers c"), ["*"]);
    // Renamed through a derived table, the outer use still carries the column.
    assert!(
        cols("SELECT lower(x) FROM (SELECT email FROM customers) s(x)")
            .contains(&"email".to_owned())
    );
    assert!(
        cols("SELECT lower(e) FROM (SELECT email AS e FROM customers) s")
            .contains(&"email".to_owned())
    );
    assert!(
        cols("WITH w AS (SELECT email AS e FROM customers) SELECT upper(e) FROM w")
            .contains(&"email".to_owned())
    );
    // A set operation's output has no origin; a subquery in an expression is compared.
    assert_eq!(
        cols("SELECT email FROM customers UNION SELECT 'x'"),
        ["email"]
    );
    assert!(
        cols("SELECT 1 WHERE 'a' IN (SELECT email FROM customers)").contains(&"email".to_owned())
    );
    // Copied elsewhere, a value would lose its mask.
    assert!(
        cols("INSERT INTO orders (note) SELECT email FROM customers").contains(&"email".to_owned())
    );
    assert!(cols("UPDATE customers SET name = email").contains(&"email".to_owned()));
    assert!(cols("DELETE FROM customers RETURNING email").contains(&"email".to_owned()));
}

/// Every place a query may stand, with a hole for the query.
const QUERY_PLACES: &[&str] = &[
    "WITH x AS ({}) SELECT * FROM x",
    "WITH a AS (SELECT 1), x AS ({}) SELECT 1",
    "SELECT * FROM ({}) s",
    "SELECT (SELECT count(*) FROM ({}) s)",
    "SELECT 1 WHERE EXISTS (WITH x AS ({}) SELECT 1)",
    "EXPLAIN ANALYZE WITH x AS ({}) SELECT 1",
    "EXPLAIN (ANALYZE, BUFFERS) WITH x AS ({}) SELECT 1",
    "COPY ({}) TO STDOUT",
    "DECLARE c CURSOR FOR WITH x AS ({}) SELECT 1",
    "PREPARE p AS WITH x AS ({}) SELECT 1",
    "CREATE TABLE t AS WITH x AS ({}) SELECT 1",
    "SELECT 1 UNION SELECT * FROM (WITH x AS ({}) SELECT 1) s",
    "INSERT INTO log WITH x AS ({}) SELECT 1",
    "SELECT * FROM orders o JOIN LATERAL (WITH x AS ({}) SELECT 1) s ON true",
];

const WRITES: &[&str] = &[
    "DELETE FROM orders RETURNING *",
    "DELETE FROM orders WHERE id = 1 RETURNING id",
    "UPDATE orders SET total = 0 RETURNING *",
    "INSERT INTO orders VALUES (1) RETURNING *",
    "INSERT INTO orders SELECT * FROM orders RETURNING id",
    "MERGE INTO orders o USING staged s ON o.id = s.id WHEN MATCHED THEN DELETE RETURNING *",
    "SELECT * FROM orders FOR UPDATE",
    "SELECT * FROM orders FOR KEY SHARE",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A write nested anywhere a query may stand — at any depth — is never a read.
    #[test]
    fn a_nested_write_is_never_a_read(
        places in proptest::collection::vec(0..QUERY_PLACES.len(), 1..4),
        write in 0..WRITES.len(),
    ) {
        let mut sql = WRITES[write].to_owned();
        for p in &places {
            sql = QUERY_PLACES[*p].replace("{}", &sql);
        }
        let r = classify_sql(&sql);
        // Text the server would reject too (a write where only a SELECT may stand) is
        // `other`, which no read rule allows either.
        for s in &r.statements {
            prop_assert!(
                !matches!(s.kind, K::Select | K::Explain | K::Set | K::Transaction | K::Copy),
                "{} classified {:?}", sql, s.kind
            );
            if r.normalized.is_some() {
                prop_assert!(s.tables.contains(&"public.orders".to_owned()), "{}: {:?}", sql, s.tables);
            }
        }
    }
}

#[test]
fn what_the_adversary_found_is_classified() {
    // RESET of transaction_read_only goes to off, not to the pinned value.
    assert_eq!(
        one("RESET transaction_read_only").settings,
        ["transaction_read_only"]
    );
    // An upsert updates.
    assert_eq!(
        one("INSERT INTO orders VALUES (1) ON CONFLICT (id) DO UPDATE SET note = 'x'").kind,
        K::Update
    );
    assert_eq!(
        one("INSERT INTO orders VALUES (1) ON CONFLICT DO NOTHING").kind,
        K::Insert
    );
    // Columns compared by USING / NATURAL, whole rows of subqueries, positional ORDER BY.
    let cols = |sql: &str| one(sql).expression_columns;
    assert!(
        cols("SELECT name FROM customers JOIN (SELECT 'x' AS ssn) v USING (ssn)")
            .contains(&"ssn".to_owned())
    );
    assert!(
        cols("SELECT name FROM customers NATURAL JOIN (SELECT 'x' AS email) v")
            .contains(&"*".to_owned())
    );
    assert!(cols("SELECT s FROM (SELECT * FROM customers) s").contains(&"*".to_owned()));
    assert!(cols("SELECT c FROM customers c").contains(&"*".to_owned()));
    assert!(cols("SELECT name, email FROM customers ORDER BY 2").contains(&"email".to_owned()));
    assert!(
        cols("SELECT name, email FROM customers ORDER BY name").is_empty()
            || !cols("SELECT name, email FROM customers ORDER BY name")
                .contains(&"email".to_owned())
    );
    // However qualified, set_config is set_config.
    let s = one("SELECT postgres.pg_catalog.set_config('search_path', 'app', false)");
    assert_eq!(s.settings, ["*"]);
    assert_eq!(s.dangerous_functions, ["set_config"]);
    assert!(!is_safe("postgres.pg_catalog.lower"));
    assert!(is_safe("pg_catalog.lower"));
    // SQL/JSON syntax is a call of a function PostgreSQL 15 looks up by name.
    assert!(!one("SELECT json_value('{}', '$.a')").functions.is_empty());
    assert!(!one("SELECT json_scalar(1)").functions.is_empty());
    // Statistics samples and other sessions' SQL are exposing relations.
    assert_eq!(
        one("SELECT * FROM pg_stats").dangerous_functions,
        ["relation pg_catalog.pg_stats"]
    );
    // Writes the completion tag does not count.
    assert!(
        one("WITH i AS (INSERT INTO t VALUES (1) RETURNING 1) SELECT count(*) FROM i")
            .uncounted_writes
    );
    assert!(one("EXPLAIN ANALYZE DELETE FROM t").uncounted_writes);
    assert!(!one("DELETE FROM t").uncounted_writes);
    assert!(one("WITH d AS (DELETE FROM t RETURNING 1) DELETE FROM u").uncounted_writes);
}

#[test]
fn what_the_second_adversary_found_is_classified() {
    let cols = |sql: &str| one(sql).expression_columns;
    let any = |sql: &str| cols(sql).contains(&"*".to_owned());
    // A table's alias renames its columns: a renamed column may be any of them.
    assert!(any("SELECT s || '' FROM customers AS c(i, n, e, s)"));
    assert!(any(
        "SELECT n FROM customers AS c(i, n, e, s) WHERE s LIKE '1%'"
    ));
    assert!(any(
        "SELECT x || '' FROM (customers JOIN orders USING (id)) AS j(i, n, y, x)"
    ));
    // Attribute notation of a built-in is a call on the whole row.
    let s = one("SELECT c.to_jsonb FROM customers c");
    assert!(
        s.functions.contains(&"to_jsonb".to_owned())
            && s.expression_columns.contains(&"*".to_owned())
    );
    // A whole row of a join alias.
    assert!(any("SELECT j FROM (customers JOIN orders USING (id)) AS j"));
    // Output aliases and positions in ORDER BY, GROUP BY, DISTINCT ON, grouping sets.
    for sql in [
        "SELECT name, email AS e FROM customers ORDER BY e",
        "SELECT DISTINCT ON (2) name, email FROM customers",
        "SELECT email, count(*) FROM customers GROUP BY ROLLUP(1)",
        "SELECT email AS e, count(*) FROM customers GROUP BY e",
    ] {
        assert!(
            cols(sql).contains(&"email".to_owned()),
            "{sql}: {:?}",
            cols(sql)
        );
    }
    // Not positional: a constant inside an expression.
    assert!(!cols("SELECT id, email FROM customers ORDER BY id + 1").contains(&"email".to_owned()));
    // pg_stat_statements in whatever schema the extension was installed.
    assert!(
        !one("SELECT query FROM public.pg_stat_statements")
            .dangerous_functions
            .is_empty()
    );
    // any_value is not a PostgreSQL 15 built-in.
    assert!(!is_safe("any_value"));
}

#[test]
fn only_statements_that_end_a_transaction_drop_portals() {
    for sql in [
        "COMMIT",
        "ROLLBACK",
        "ROLLBACK TO SAVEPOINT a",
        "COMMIT AND CHAIN",
        "PREPARE TRANSACTION 'x'",
        "END",
    ] {
        assert!(one(sql).ends_transaction, "{sql}");
    }
    for sql in [
        "BEGIN",
        "START TRANSACTION",
        "SAVEPOINT a",
        "RELEASE SAVEPOINT a",
        "SELECT 1",
    ] {
        assert!(!one(sql).ends_transaction, "{sql}");
    }
}
