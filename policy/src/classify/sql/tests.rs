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
        ("SET search_path = secret, public", K::Other),
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
        ["pg_terminate_backend"]
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
