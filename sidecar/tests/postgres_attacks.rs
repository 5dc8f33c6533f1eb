//! Attacks on the Postgres gate, each against a real PostgreSQL server with its
//! control: the server does the harmful thing when asked directly (as the Connection's
//! login role), and through the sidecar it does not — rows still there, nothing
//! returned. Clients: `psql`, `tokio-postgres` and a raw v3 client for what drivers
//! never send (a re-Parse of a name that exists, a batch without a Sync).

#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Command, Output};

use agentgate_e2e::postgres::Postgres;
use agentgate_sidecar::postgres::codec::{Frame, decode_frame, startup_message};
use bytes::{BufMut, BytesMut};
use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP_PASSWORD: &str = "app-pw-Xk3-never-shown";
const SECRET: &str = "top-secret-value-Q7";
const INVOICE_SECRET: &str = "invoice-secret-K2";
const EMAIL: &str = "jane@example.com";
const SSN: &str = "123-45-6789";
/// A bare Azure storage account key (64 bytes, base64).
const STORAGE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn setup_sql() -> String {
    format!(
        "
CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}';
CREATE SCHEMA secret;
CREATE SCHEMA app AUTHORIZATION app;
CREATE TABLE public.orders (id int PRIMARY KEY, total numeric, note text);
INSERT INTO public.orders SELECT g, g * 10, 'order ' || g FROM generate_series(1, 40) g;
CREATE TABLE public.customers (id int, name text, email text, ssn text, api_key text);
INSERT INTO public.customers VALUES (1, 'Jane', '{EMAIL}', '{SSN}', '{STORAGE_KEY}'),
  (2, 'Bob', 'bob.private@example.org', '987-65-4321', 'none');
CREATE TABLE secret.keys (id int, value text);
INSERT INTO secret.keys VALUES (1, '{SECRET}'), (2, 'second-secret-Z9');
CREATE TABLE app.invoices (secret text);
INSERT INTO app.invoices VALUES ('{INVOICE_SECRET}');
CREATE FUNCTION public.bump() RETURNS int LANGUAGE sql
  AS $$ INSERT INTO public.orders VALUES (999, 0, 'bumped') RETURNING id $$;
GRANT ALL ON ALL TABLES IN SCHEMA public TO app;
GRANT USAGE ON SCHEMA secret TO app;
GRANT ALL ON ALL TABLES IN SCHEMA secret TO app;
GRANT ALL ON ALL TABLES IN SCHEMA app TO app;
ANALYZE;
"
    )
}

/// Two Connections to the same server: `ro-db`, which no rule lets write (its sessions
/// are read-only at the server), and `rw-db`, which may insert and holds deletes for
/// approval (approvals are off here, so a held statement is refused).
fn bundle(db_port: u16, ro_port: u16, rw_port: u16, issuer: &str, masking: Value) -> Value {
    let conn = |name: &str, port: u16| {
        json!({ "name": name, "generation": 1, "spec": {
            "protocol": "postgres",
            "upstream": { "address": format!("127.0.0.1:{db_port}"), "database": "postgres",
                          "tls": { "mode": "disable" } },
            "credentials": { "secretRef": { "name": "db-creds" } },
            "listen": { "port": port } } })
    };
    json!({
        "namespace": "agents",
        "connections": [conn("ro-db", ro_port), conn("rw-db", rw_port)],
        "policies": [{ "name": "agents", "generation": 1, "spec": {
            "agentSelector": {},
            "identity": { "issuer": issuer, "audiences": [AUDIENCE] },
            "connections": ["ro-db", "rw-db"],
            "rules": [
                { "name": "reads", "match": { "sql": { "statements": ["select", "explain"], "tables": ["public.*", "pg_catalog.*"] } }, "action": "allow" },
                { "name": "sessions", "match": { "sql": { "statements": ["transaction", "set"] } }, "action": "allow" },
                { "name": "bump", "match": { "connections": ["ro-db"], "sql": { "statements": ["select"], "tables": ["public.*"], "functions": ["bump"] } }, "action": "allow" },
                { "name": "inserts", "match": { "connections": ["rw-db"], "sql": { "statements": ["insert"], "tables": ["public.orders"] } }, "action": "allow" },
                { "name": "deletes", "match": { "connections": ["rw-db"], "sql": { "statements": ["delete"] } }, "action": "approve",
                  "approval": { "approvers": { "groups": ["dba"] } } }
            ],
            "masking": masking,
            "limits": { "maxRowsPerQuery": 50, "maxRowsModifiedPerSession": 5 } } }]
    })
}

struct Setup {
    db: Postgres,
    sidecar: Sidecar,
    issuer: OidcIssuer,
    ro: u16,
    rw: u16,
}

async fn setup() -> Setup {
    setup_with(json!({ "detectors": ["secrets", "pii"], "columns": ["customers.email", "*.ssn"] }))
        .await
}

async fn setup_with(masking: Value) -> Setup {
    let sql = setup_sql();
    let db = tokio::task::spawn_blocking(move || Postgres::start(&sql).unwrap())
        .await
        .unwrap();
    let pki = Pki::new();
    let issuer = OidcIssuer::start(&pki).await;
    let (ro, rw) = (free_port(), free_port());
    let sidecar = Sidecar::start(
        &bundle(db.port, ro, rw, &issuer.url, masking),
        "app=\"agent\"\n",
        |dir| {
            pki.write_ca(&dir.join("extra-ca.pem"));
            write_secret(
                dir,
                "db-creds",
                &[("username", "app"), ("password", APP_PASSWORD)],
            );
        },
    )
    .await;
    Setup {
        db,
        sidecar,
        issuer,
        ro,
        rw,
    }
}

impl Setup {
    fn token(&self) -> String {
        self.issuer.token(&["developers"], json!({}))
    }

    /// `psql` through the sidecar on `port`; `encoding` sets PGCLIENTENCODING.
    fn gate(&self, port: u16, sql: &str, encoding: &str) -> Output {
        psql(port, &self.token(), sql, encoding)
    }

    /// `psql` straight to the server as the Connection's login role: the control.
    fn direct(&self, sql: &str, encoding: &str) -> Output {
        psql(self.db.port, APP_PASSWORD, sql, encoding)
    }

    fn direct_ok(&self, sql: &str) -> String {
        let o = self.direct(sql, "UTF8");
        assert!(o.status.success(), "direct {sql}: {}", text(&o.stderr));
        text(&o.stdout).trim().to_owned()
    }

    /// Whether order `id` is still there, unchanged.
    fn intact(&self, id: u32) -> bool {
        self.direct_ok(&format!(
            "SELECT count(*) FROM orders WHERE id = {id} AND note = 'order {id}'"
        )) == "1"
    }

    /// Nothing the agent, the log or the audit trail saw holds a protected value.
    fn assert_nothing_leaked(&self, seen: &str) {
        for (what, text) in [
            ("agent", seen.to_owned()),
            ("log", self.sidecar.log()),
            ("audit", self.sidecar.audit()),
        ] {
            for secret in [
                APP_PASSWORD,
                SECRET,
                INVOICE_SECRET,
                EMAIL,
                SSN,
                STORAGE_KEY,
            ] {
                assert!(
                    !text.contains(secret),
                    "{secret} reached the {what}:\n{text}"
                );
            }
        }
    }
}

fn psql(port: u16, password: &str, sql: &str, encoding: &str) -> Output {
    Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "app",
            "-d",
            "postgres",
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .env("PGPASSWORD", password)
        .env("PGCLIENTENCODING", encoding)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap()
}

/// `psql` with several commands in one session (each its own query string).
fn psql_many(port: u16, password: &str, commands: &[&str]) -> Output {
    let mut cmd = Command::new("psql");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "app",
        "-d",
        "postgres",
    ])
    .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The gate refused: psql failed with agentgate's reason.
fn refused(o: &Output, why: &str) -> String {
    let err = text(&o.stderr);
    assert!(
        !o.status.success(),
        "expected a refusal ({why}), got: {}",
        text(&o.stdout)
    );
    assert!(err.contains(why), "expected {why:?} in: {err}");
    text(&o.stdout) + &err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_hidden_inside_reads_never_run() {
    let s = setup().await;
    let mut seen = String::new();
    let attacks = [
        "WITH d AS (DELETE FROM orders WHERE id = {id} RETURNING *) SELECT count(*) FROM d",
        "WITH u AS (UPDATE orders SET note = 'pwned' WHERE id = {id} RETURNING *) SELECT count(*) FROM u",
        "WITH i AS (INSERT INTO orders VALUES ({id} + 100, 0, 'x') RETURNING *), d AS (DELETE FROM orders WHERE id = {id} RETURNING *) SELECT 1",
        "EXPLAIN ANALYZE WITH d AS (DELETE FROM orders WHERE id = {id} RETURNING *) SELECT * FROM d",
        "COPY (DELETE FROM orders WHERE id = {id} RETURNING *) TO STDOUT",
        "COPY (UPDATE orders SET note = 'pwned' WHERE id = {id} RETURNING *) TO STDOUT",
        "WITH d AS (DELETE FROM orders WHERE id = {id} RETURNING id) SELECT count(*) FROM orders o JOIN d USING (id)",
        "PREPARE p{id} AS WITH d AS (DELETE FROM orders WHERE id = {id} RETURNING *) SELECT count(*) FROM d; EXECUTE p{id}",
    ];
    for (i, attack) in attacks.iter().enumerate() {
        let (control, target) = (21 + i as u32, 1 + i as u32);
        // Control: the server runs the hidden write.
        s.direct_ok(&attack.replace("{id}", &control.to_string()));
        assert!(
            !s.intact(control),
            "control: {attack} did not write directly"
        );
        // Through the gate: refused on the select-only Connection, and the row is there.
        let o = s.gate(s.ro, &attack.replace("{id}", &target.to_string()), "UTF8");
        seen += &refused(&o, "agentgate");
        assert!(s.intact(target), "{attack} wrote through the gate");
    }
    // Row locks are an update: the server takes them directly, the gate refuses them.
    s.direct_ok("SELECT id FROM orders WHERE id = 30 FOR UPDATE");
    seen += &refused(
        &s.gate(
            s.ro,
            "SELECT id FROM orders WHERE id = 30 FOR UPDATE",
            "UTF8",
        ),
        "agentgate",
    );
    s.assert_nothing_leaked(&seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_session_stops_writes_the_rules_let_through() {
    let s = setup().await;
    // Control: `bump()` inserts a row when called directly.
    assert_eq!(s.direct_ok("SELECT bump()"), "999");
    s.direct_ok("DELETE FROM orders WHERE id = 999");
    // The rule names bump() (a function it trusts): the classification lets it
    // through, and the server's read-only session refuses the write inside it.
    let o = s.gate(s.ro, "SELECT bump()", "UTF8");
    let err = text(&o.stderr);
    assert!(
        !o.status.success() && err.contains("read-only transaction"),
        "{err}"
    );
    assert_eq!(
        s.direct_ok("SELECT count(*) FROM orders WHERE id = 999"),
        "0"
    );
    let o = s.gate(s.ro, "SHOW default_transaction_read_only", "UTF8");
    assert_eq!(text(&o.stdout).trim(), "on", "{}", text(&o.stderr));
    // No way of turning it off is let through.
    for sql in [
        "BEGIN READ WRITE",
        "START TRANSACTION READ WRITE",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        "SET default_transaction_read_only = off",
        "BEGIN; SET TRANSACTION READ WRITE; SELECT bump(); COMMIT",
    ] {
        refused(&s.gate(s.ro, sql, "UTF8"), "read-only");
    }
    assert_eq!(
        s.direct_ok("SELECT count(*) FROM orders WHERE id = 999"),
        "0"
    );
    // A Connection whose policy may write is not read-only.
    let o = s.gate(s.rw, "SHOW default_transaction_read_only", "UTF8");
    assert_eq!(text(&o.stdout).trim(), "off", "{}", text(&o.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_is_read_as_the_server_reads_it() {
    let s = setup().await;
    let mut seen = String::new();
    // GBK: the UTF-8 bytes of 丁 (E4 B8 81) read in GBK as E4B8 and 81 5C — the
    // backslash after it is swallowed into a character, so the server ends the literal
    // at the next quote and runs the DELETE hidden in what UTF-8 reads as one string.
    let gbk = |id: u32| format!("SELECT E'丁\\'; DELETE FROM orders WHERE id = {id}; --'");
    let o = s.direct(&gbk(3), "GBK");
    assert!(o.status.success(), "control: {}", text(&o.stderr));
    assert!(
        !s.intact(3),
        "control: the GBK-hidden DELETE did not run directly"
    );
    seen += &refused(&s.gate(s.ro, &gbk(4), "GBK"), "client_encoding");
    refused(
        &s.gate(s.ro, "SET client_encoding = 'GBK'", "UTF8"),
        "pins client_encoding",
    );
    refused(
        &s.gate(s.ro, "SET NAMES 'SJIS'", "UTF8"),
        "pins client_encoding",
    );
    // In UTF-8 (pinned) the server reads it as the gate does: one SELECT of a string.
    let o = s.gate(s.ro, &gbk(4), "UTF8");
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(s.intact(4));

    // standard_conforming_strings off: a backslash escapes the quote, so what reads
    // (standard strings on, as the gate reads) as one SELECT of two literals, the
    // server reads as a literal, a DELETE and a comment. The setting counts from the
    // next query string on; through the gate it cannot be set.
    let scs = |id: u32| format!("SELECT 'a\\', '; DELETE FROM orders WHERE id = {id}; --'");
    let o = psql_many(
        s.db.port,
        APP_PASSWORD,
        &["SET standard_conforming_strings = off", &scs(5)],
    );
    assert!(o.status.success(), "control: {}", text(&o.stderr));
    assert!(
        !s.intact(5),
        "control: the hidden DELETE did not run directly"
    );
    let o = psql_many(
        s.ro,
        &s.token(),
        &["SET standard_conforming_strings = off", &scs(6)],
    );
    refused(&o, "pins standard_conforming_strings");
    let o = s.gate(s.ro, &scs(6), "UTF8");
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(s.intact(6));

    // search_path: directly, `invoices` is the login role's own schema's table ("$user"
    // comes first). Through the gate the path is pinned to public, where it is not.
    assert_eq!(s.direct_ok("SELECT secret FROM invoices"), INVOICE_SECRET);
    let o = s.gate(s.ro, "SELECT * FROM invoices", "UTF8");
    seen += &text(&o.stdout);
    assert!(
        text(&o.stderr).contains("does not exist"),
        "{}",
        text(&o.stderr)
    );
    for sql in [
        "SET search_path = app, public",
        "SET SCHEMA 'app'",
        "SELECT set_config('search_path', 'app', false)",
        "BEGIN; SET LOCAL search_path = app; SELECT * FROM invoices; COMMIT",
    ] {
        seen += &refused(&s.gate(s.ro, sql, "UTF8"), "pins");
    }
    s.assert_nothing_leaked(&seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_read_by_name_or_through_a_cursor_stay_forbidden() {
    let s = setup().await;
    let mut seen = String::new();
    let attacks = [
        "SELECT table_to_xml('secret.keys', true, false, '')",
        "SELECT query_to_xml('SELECT * FROM secret.keys', true, false, '')",
        "SELECT schema_to_xml('secret', true, false, '')",
        "SELECT * FROM ts_stat('SELECT to_tsvector(value) FROM secret.keys')",
    ];
    for attack in attacks {
        // Control: each reads the forbidden table directly.
        let out = s.direct_ok(attack);
        assert!(
            out.contains(SECRET) || out.contains("top") || out.contains("secret"),
            "control: {attack}: {out}"
        );
        seen += &refused(&s.gate(s.ro, attack, "UTF8"), "agentgate");
    }
    // A cursor over a forbidden table: its DECLARE is decided by what it reads, and a
    // FETCH by its DECLARE.
    let out = s.direct_ok(
        "BEGIN; DECLARE c CURSOR FOR SELECT value FROM secret.keys; FETCH ALL FROM c; COMMIT",
    );
    assert!(out.contains(SECRET), "control: {out}");
    seen += &refused(
        &s.gate(
            s.ro,
            "BEGIN; DECLARE c CURSOR FOR SELECT value FROM secret.keys; FETCH ALL FROM c; COMMIT",
            "UTF8",
        ),
        "agentgate",
    );
    seen += &refused(&s.gate(s.ro, "FETCH ALL FROM c", "UTF8"), "not declared");
    // A cursor over an allowed table works.
    let o = s.gate(
        s.ro,
        "BEGIN; DECLARE c CURSOR FOR SELECT id FROM orders ORDER BY id; FETCH 2 FROM c; COMMIT",
        "UTF8",
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("1\n2"), "{}", text(&o.stdout));
    s.assert_nothing_leaked(&seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_values_stay_masked_in_every_form() {
    let s = setup().await;
    let mut seen = String::new();
    // Control: directly, a cast shows the masked value in hex.
    let hex_email = hex::encode(EMAIL);
    assert!(
        s.direct_ok("SELECT email::bytea FROM customers")
            .contains(&hex_email)
    );
    for attack in [
        "SELECT email::bytea FROM customers",
        "SELECT convert_to(ssn, 'UTF8') FROM customers",
        "SELECT lower(email) FROM customers",
        "SELECT ARRAY[email] FROM customers",
        "SELECT row(c.*) FROM customers c",
        "SELECT to_jsonb(c) FROM customers c",
        "SELECT upper(x) FROM (SELECT email FROM customers) s(x)",
        "SELECT email FROM customers UNION ALL SELECT 'x'",
        "SELECT name FROM customers WHERE ssn LIKE '123%'",
        "SELECT count(*) FROM customers WHERE email = 'jane@example.com'",
    ] {
        let o = s.gate(s.ro, attack, "UTF8");
        // Refused as a masked column's use, or for the function that converts it.
        seen += &refused(&o, "agentgate");
        let err = text(&o.stderr);
        assert!(
            err.contains("masked") || err.contains("side-effect-free"),
            "{attack}: {err}"
        );
    }
    // A whole row has no column origins at the server: refused, however plainly selected.
    seen += &refused(
        &s.gate(s.ro, "SELECT c FROM customers c", "UTF8"),
        "whole row",
    );
    // A bare storage account key is found by the detectors.
    let o = s.gate(s.ro, "SELECT api_key FROM customers", "UTF8");
    assert!(o.status.success(), "{}", text(&o.stderr));
    seen += &text(&o.stdout);
    assert!(
        text(&o.stdout).contains("[masked:azure-storage-key]"),
        "{}",
        text(&o.stdout)
    );

    // Binary results (tokio-postgres asks for them): a value the sidecar cannot scan
    // (an array of text) is masked, never passed. Control: directly it is the key.
    let direct = tokio_postgres(s.db.port, "app", APP_PASSWORD).await;
    let row = direct
        .query_one("SELECT ARRAY[api_key] FROM customers WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, Option<Vec<String>>>(0),
        Some(vec![STORAGE_KEY.to_owned()])
    );
    let gated = tokio_postgres(s.ro, "app", &s.token()).await;
    let row = gated
        .query_one("SELECT ARRAY[api_key] FROM customers WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<Vec<String>>>(0), None);
    let row = gated
        .query_one("SELECT email, name FROM customers WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("Jane"));
    s.assert_nothing_leaked(&seen);
}

async fn tokio_postgres(port: u16, user: &str, password: &str) -> tokio_postgres::Client {
    let config =
        format!("host=127.0.0.1 port={port} user={user} dbname=postgres password={password}");
    let (client, connection) = tokio_postgres::connect(&config, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// A raw v3 client: startup with the token as the password, then frames as given.
struct Raw {
    stream: tokio::net::TcpStream,
    buf: BytesMut,
}

impl Raw {
    async fn connect(port: u16, token: &str) -> Raw {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        stream
            .write_all(&startup_message(&[
                ("user", "app"),
                ("database", "postgres"),
            ]))
            .await
            .unwrap();
        let mut raw = Raw {
            stream,
            buf: BytesMut::new(),
        };
        let auth = raw.frame().await;
        assert_eq!(auth.tag, b'R');
        let mut password = token.as_bytes().to_vec();
        password.push(0);
        raw.ask(&[Frame::new(b'p', password)]).await;
        raw
    }

    async fn send(&mut self, frames: &[Frame]) {
        let mut out = BytesMut::new();
        for f in frames {
            f.encode(&mut out);
        }
        self.stream.write_all(&out).await.unwrap();
    }

    async fn frame(&mut self) -> Frame {
        loop {
            if let Some(f) = decode_frame(&mut self.buf, 1 << 24).unwrap() {
                return f;
            }
            let read = tokio::time::timeout(
                std::time::Duration::from_secs(20),
                self.stream.read_buf(&mut self.buf),
            )
            .await
            .expect("the gateway answers")
            .unwrap();
            assert!(read > 0, "the gateway closed the connection");
        }
    }

    /// Sends `frames` and returns the answer up to and including `ReadyForQuery`.
    async fn ask(&mut self, frames: &[Frame]) -> Vec<Frame> {
        self.send(frames).await;
        self.until_ready().await
    }

    /// Frames up to and including `ReadyForQuery`.
    async fn until_ready(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        loop {
            let f = self.frame().await;
            let done = f.tag == b'Z';
            frames.push(f);
            if done {
                return frames;
            }
        }
    }
}

fn cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

fn parse(name: &str, sql: &str) -> Frame {
    let mut b = BytesMut::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.put_i16(0);
    Frame::new(b'P', b)
}

fn bind(portal: &str, statement: &str) -> Frame {
    let mut b = BytesMut::new();
    cstr(&mut b, portal);
    cstr(&mut b, statement);
    b.put_i16(0);
    b.put_i16(0);
    b.put_i16(0);
    Frame::new(b'B', b)
}

fn execute(portal: &str) -> Frame {
    let mut b = BytesMut::new();
    cstr(&mut b, portal);
    b.put_i32(0);
    Frame::new(b'E', b)
}

fn sync() -> Frame {
    Frame::new(b'S', Vec::new())
}

fn close_statement(name: &str) -> Frame {
    let mut b = BytesMut::new();
    b.put_u8(b'S');
    cstr(&mut b, name);
    Frame::new(b'C', b)
}

fn query(sql: &str) -> Frame {
    let mut b = BytesMut::new();
    cstr(&mut b, sql);
    Frame::new(b'Q', b)
}

/// The SQLSTATEs and messages of the errors among `frames`.
fn errors(frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f.tag == b'E')
        .map(|f| text(&f.body))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_is_decided_on_what_the_server_holds() {
    let s = setup().await;
    // Control: a failed re-prepare keeps the old statement, and running it deletes.
    let o = s.direct("PREPARE s1 AS DELETE FROM orders WHERE id = 31", "UTF8");
    assert!(o.status.success());
    let o = psql(
        s.db.port,
        APP_PASSWORD,
        "PREPARE s1 AS DELETE FROM orders WHERE id = 31; PREPARE s1 AS SELECT 1",
        "UTF8",
    );
    assert!(
        text(&o.stderr).contains("already exists"),
        "{}",
        text(&o.stderr)
    );
    s.direct_ok("PREPARE s1 AS DELETE FROM orders WHERE id = 31; EXECUTE s1");
    assert!(!s.intact(31));

    // A named statement re-parsed while it exists: the server refuses the Parse and
    // keeps the DELETE; the gate decides the Execute on the DELETE, not on the SELECT.
    let mut raw = Raw::connect(s.rw, &s.token()).await;
    assert!(
        errors(
            &raw.ask(&[parse("s1", "DELETE FROM orders WHERE id = 7"), sync()])
                .await
        )
        .is_empty()
    );
    let e = errors(&raw.ask(&[parse("s1", "SELECT 1"), sync()]).await);
    assert!(e.iter().any(|m| m.contains("42P05")), "{e:?}");
    let e = errors(&raw.ask(&[bind("", "s1"), execute(""), sync()]).await);
    assert!(
        e.iter()
            .any(|m| m.contains("42501") && m.contains("deletes")),
        "{e:?}"
    );
    assert!(s.intact(7), "the held DELETE ran");

    // A portal bound to the unnamed statement keeps it after the unnamed statement is
    // replaced.
    raw.ask(&[query("BEGIN")]).await;
    assert!(
        errors(
            &raw.ask(&[
                parse("", "DELETE FROM orders WHERE id = 8"),
                bind("p1", ""),
                sync(),
            ])
            .await
        )
        .is_empty()
    );
    let e = errors(
        &raw.ask(&[parse("", "SELECT 1"), execute("p1"), sync()])
            .await,
    );
    assert!(e.iter().any(|m| m.contains("deletes")), "{e:?}");
    raw.ask(&[query("ROLLBACK")]).await;
    assert!(s.intact(8), "the portal's DELETE ran");
    // The audit trail names what was decided: the DELETE, refused.
    let audit = s.sidecar.audit();
    assert!(
        audit.contains("DELETE FROM orders WHERE id = $1"),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_runs_unseen_after_a_cut_off() {
    let s = setup().await;
    // Control: the server runs the rest of a string (and of a batch) whatever the
    // client makes of an earlier result.
    s.direct_ok("SELECT g FROM generate_series(1, 100) g; INSERT INTO orders VALUES (550, 1, 'x')");
    assert_eq!(
        s.direct_ok("SELECT count(*) FROM orders WHERE id = 550"),
        "1"
    );

    // Extended protocol: a result the row limit cuts off holds back the rest of its
    // batch, which then never reaches the server.
    let mut raw = Raw::connect(s.rw, &s.token()).await;
    let frames = raw
        .ask(&[
            parse("", "SELECT g FROM generate_series(1, 1000) g"),
            bind("", ""),
            execute(""),
            parse("", "INSERT INTO orders VALUES (555, 1, 'after the cut')"),
            bind("", ""),
            execute(""),
            sync(),
        ])
        .await;
    let e = errors(&frames);
    assert!(e.len() == 1 && e[0].contains("maxRowsPerQuery"), "{e:?}");
    assert!(
        !frames.iter().any(|f| f.tag == b'C'),
        "nothing else completed"
    );
    assert_eq!(
        s.direct_ok("SELECT count(*) FROM orders WHERE id = 555"),
        "0"
    );
    // The session goes on.
    assert!(
        errors(
            &raw.ask(&[query("SELECT count(*) FROM orders WHERE id < 5")])
                .await
        )
        .is_empty()
    );

    // A simple query string runs whole at the server: what ran after the cut-off is
    // reported to the agent, recorded, and charged to the write limit.
    let o = s.gate(
        s.rw,
        "SELECT g FROM generate_series(1, 100) g; INSERT INTO orders VALUES (556, 1, 'a'), (557, 1, 'b'), (558, 1, 'c'), (559, 1, 'd'), (560, 1, 'e')",
        "UTF8",
    );
    let err = text(&o.stderr);
    assert!(err.contains("maxRowsPerQuery"), "{err}");
    assert!(
        err.contains("INSERT 0 5") && err.contains("cut off"),
        "{err}"
    );
    assert_eq!(
        s.direct_ok("SELECT count(*) FROM orders WHERE id BETWEEN 556 AND 560"),
        "5"
    );
    let audit = s.sidecar.audit();
    assert!(audit.contains("rowsAffected\":5"), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_texts_reach_the_record_masked_whatever_the_policy_masks() {
    // This policy masks one column and runs no detectors: what the agent reads is its
    // choice, but records (audit trail, log) always get the audit profile.
    let s = setup_with(json!({ "columns": ["customers.email"] })).await;
    const GITHUB: &str = "ghp_abcdefghijklmnopqrstuvwxyz0123456789";
    for (sql, secret) in [
        (
            "SELECT api_key::int FROM customers WHERE id = 1",
            STORAGE_KEY,
        ),
        (
            "SELECT 'ghp_abcdefghijklmnopqrstuvwxyz0123456789'::int",
            GITHUB,
        ),
        (
            "SELECT 'AKIAIOSFODNN7EXAMPLE'::numeric",
            "AKIAIOSFODNN7EXAMPLE",
        ),
    ] {
        // Control: the server's error quotes the value.
        let o = s.direct(sql, "UTF8");
        assert!(
            text(&o.stderr).contains(secret),
            "control: {}",
            text(&o.stderr)
        );
        let o = s.gate(s.ro, sql, "UTF8");
        assert!(
            text(&o.stderr).contains("invalid input syntax"),
            "{}",
            text(&o.stderr)
        );
        for (what, record) in [("audit", s.sidecar.audit()), ("log", s.sidecar.log())] {
            assert!(
                !record.contains(secret),
                "{secret} reached the {what}:\n{record}"
            );
        }
    }
    assert!(s.sidecar.audit().contains("invalid input syntax"));
}

/// Frames as a raw client sees them: the SQLSTATEs and messages, and data rows' text.
fn shown(frames: &[Frame]) -> String {
    frames
        .iter()
        .filter(|f| matches!(f.tag, b'E' | b'D' | b'C'))
        .map(|f| text(&f.body))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_is_decided_as_everything_it_may_be_at_the_server() {
    let s = setup().await;
    let mut seen = String::new();
    let mut raw = Raw::connect(s.rw, &s.token()).await;
    // Control: SQL FETCH runs a protocol portal — with a SELECT it returns its rows.
    raw.ask(&[query("BEGIN")]).await;
    raw.ask(&[
        parse("", "SELECT id FROM orders WHERE id = 12"),
        bind("c", ""),
        sync(),
    ])
    .await;
    let out = shown(&raw.ask(&[query("FETCH ALL FROM c")]).await);
    assert!(out.contains("12"), "control: {out}");
    raw.ask(&[query("ROLLBACK")]).await;
    // A portal bound to a held DELETE, run by FETCH: decided as the DELETE. (A DECLARE
    // the server refused, outside a transaction, registers nothing.)
    raw.ask(&[query("DECLARE c CURSOR FOR SELECT 1")]).await;
    raw.ask(&[query("BEGIN")]).await;
    raw.ask(&[
        parse("", "DELETE FROM orders WHERE id = 13 RETURNING id, note"),
        bind("c", ""),
        sync(),
    ])
    .await;
    let out = shown(&raw.ask(&[query("FETCH ALL FROM c")]).await);
    assert!(out.contains("deletes"), "{out}");
    raw.ask(&[query("COMMIT")]).await;
    assert!(s.intact(13), "the held DELETE ran through FETCH");

    // A portal the server dropped at Sync (autocommit), replaced by a SQL cursor of
    // the same name over masked columns: the gate no longer knows the name.
    let mut raw = Raw::connect(s.ro, &s.token()).await;
    raw.ask(&[
        parse("s1", "SELECT 1::int4 AS a, 2::int4 AS b, 3::int4 AS c"),
        bind("p1", "s1"),
        sync(),
    ])
    .await;
    raw.ask(&[query("BEGIN")]).await;
    raw.ask(&[query(
        "DECLARE p1 CURSOR FOR SELECT email, ssn, api_key FROM customers",
    )])
    .await;
    seen += &shown(&raw.ask(&[execute("p1"), sync()]).await);
    raw.ask(&[query("ROLLBACK")]).await;
    // A statement DEALLOCATEd and PREPAREd again at SQL level under its name.
    raw.ask(&[parse("s2", "SELECT 1::int4 AS a, 2::int4 AS b"), sync()])
        .await;
    raw.ask(&[query(
        "DEALLOCATE s2; PREPARE s2 AS SELECT api_key, name FROM customers",
    )])
    .await;
    seen += &shown(&raw.ask(&[bind("", "s2"), execute(""), sync()]).await);
    // A prepared FETCH (its columns change with the cursor) is refused.
    let out = shown(&raw.ask(&[parse("f", "FETCH ALL FROM c"), sync()]).await);
    assert!(out.contains("FETCH and MOVE are not taken"), "{out}");
    // The hang: a Query inside a batch the server failed is ignored by the server; the
    // gate still answers the next batch at once.
    raw.ask(&[
        parse("bad", "SELECT * FROM no_such_table"),
        query("SELECT 1"),
        parse("s3", "SELECT 2"),
        sync(),
    ])
    .await;
    let out = shown(&raw.ask(&[bind("", "s3"), execute(""), sync()]).await);
    assert!(
        out.contains("26000") || out.contains("does not exist"),
        "{out}"
    );
    s.assert_nothing_leaked(&seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_compared_joined_or_summarized_stay_masked() {
    let s = setup().await;
    let mut seen = String::new();
    for (attack, control_shows) in [
        (
            "SELECT name FROM customers JOIN (SELECT '987-65-4321' AS ssn) v USING (ssn)",
            "Bob",
        ),
        (
            "SELECT name FROM customers NATURAL JOIN (SELECT 'bob.private@example.org' AS email) v",
            "Bob",
        ),
        (
            "SELECT s FROM (SELECT * FROM customers) s",
            "bob.private@example.org",
        ),
        ("SELECT name, email FROM customers ORDER BY 2", "Bob"),
    ] {
        assert!(
            s.direct_ok(attack).contains(control_shows),
            "control: {attack}"
        );
        seen += &refused(&s.gate(s.ro, attack, "UTF8"), "masked");
    }
    // Statistics samples expose other tables' and masked columns' values.
    let stats = "SELECT tablename, attname, most_common_vals::text, histogram_bounds::text FROM pg_stats WHERE schemaname IN ('secret', 'public')";
    let control = s.direct_ok(stats);
    if control.contains("second-secret-Z9") || control.contains("bob.private") {
        seen += &refused(&s.gate(s.ro, stats, "UTF8"), "pg_stats");
    } else {
        panic!("control: pg_stats shows no samples: {control}");
    }
    seen += &refused(
        &s.gate(s.ro, "SELECT query FROM pg_stat_activity", "UTF8"),
        "pg_stat_activity",
    );
    s.assert_nothing_leaked(&seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_write_is_decided_and_counted() {
    let s = setup().await;
    // RESET transaction_read_only turns read-only off (control: directly, with the
    // setting pinned as the gate pins it, the write then goes through).
    let o = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &s.db.port.to_string(),
            "-U",
            "app",
            "-d",
            "postgres",
            "-X",
            "-A",
            "-t",
        ])
        .args([
            "-c",
            "BEGIN; RESET transaction_read_only; SELECT bump(); ROLLBACK",
        ])
        .env("PGPASSWORD", APP_PASSWORD)
        .env("PGOPTIONS", "-c default_transaction_read_only=on")
        .output()
        .unwrap();
    assert!(
        text(&o.stdout).contains("999"),
        "control: {}",
        text(&o.stderr)
    );
    refused(
        &s.gate(
            s.ro,
            "BEGIN; RESET transaction_read_only; SELECT bump(); COMMIT",
            "UTF8",
        ),
        "read-only",
    );
    assert_eq!(
        s.direct_ok("SELECT count(*) FROM orders WHERE id = 999"),
        "0"
    );
    // However qualified, set_config is pinned (control: the server takes the name).
    let qualified = "SELECT postgres.pg_catalog.set_config('search_path', 'app', false)";
    assert_eq!(s.direct_ok(qualified), "app");
    refused(&s.gate(s.ro, qualified, "UTF8"), "pins");
    // An upsert updates: an insert-only rule does not allow it (control: directly it
    // changes an existing row).
    let upsert = |id: u32| {
        format!(
            "INSERT INTO orders VALUES ({id}, 0, 'x') ON CONFLICT (id) DO UPDATE SET note = 'pwned'"
        )
    };
    s.direct_ok(&upsert(35));
    assert!(!s.intact(35));
    refused(&s.gate(s.rw, &upsert(36), "UTF8"), "agentgate");
    assert!(s.intact(36));
    // A write in a CTE reports no row count, so a session write limit cannot hold it.
    let cte = "WITH i AS (INSERT INTO orders SELECT n, 0, 'cte' FROM generate_series(200, 210) AS t(n) RETURNING 1) SELECT count(*) FROM i";
    refused(&s.gate(s.rw, cte, "UTF8"), "maxRowsModifiedPerSession");
    assert_eq!(
        s.direct_ok("SELECT count(*) FROM orders WHERE id BETWEEN 200 AND 210"),
        "0"
    );
    // The impact preview does not plan a statement that calls a function reading a
    // table by name (the planner folds stable functions).
    let o = s.gate(
        s.rw,
        "DELETE FROM orders WHERE id = length(table_to_xml('secret.keys', true, false, '')::text)",
        "UTF8",
    );
    assert!(!o.status.success());
    s.assert_nothing_leaked(&text(&o.stderr));
}

/// `psql -c sql` through the sidecar's `port` as the launching user, off the runtime.
fn psql_through(
    port: u16,
    token: &str,
    sql: &str,
) -> impl std::future::Future<Output = Output> + 'static {
    let (token, sql) = (token.to_owned(), sql.to_owned());
    let run = tokio::task::spawn_blocking(move || {
        Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-U", "app", "-d", "postgres", "-X", "-A", "-t", "-c", &sql])
            .env("PGPASSWORD", &token)
            // Longer than the sidecar's own bounds: its answer is what is tested.
            .env("PGCONNECT_TIMEOUT", "60")
            .output()
            .unwrap()
    });
    async move { run.await.unwrap() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_gets_a_clear_error_and_stalls_no_one_else() {
    // Control: the "server" accepts connections and then says nothing, ever — not to a
    // startup packet, not to an HTTP request.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_port = hung.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = hung.accept().await {
            held.push(stream);
        }
    });
    let mut direct = tokio::net::TcpStream::connect(("127.0.0.1", hung_port))
        .await
        .unwrap();
    direct
        .write_all(&startup_message(&[
            ("user", "app"),
            ("database", "postgres"),
        ]))
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(std::time::Duration::from_secs(1), direct.read(&mut byte))
            .await
            .is_err(),
        "the hung server answered"
    );

    // ro-db and hung-api go to the hung server; rw-db to a real one.
    let sql = setup_sql();
    let db = tokio::task::spawn_blocking(move || Postgres::start(&sql).unwrap())
        .await
        .unwrap();
    let pki = Pki::new();
    let issuer = OidcIssuer::start(&pki).await;
    let (ro, rw, api) = (free_port(), free_port(), free_port());
    let mut bundle = bundle(db.port, ro, rw, &issuer.url, json!({}));
    bundle["connections"][0]["spec"]["upstream"]["address"] =
        json!(format!("127.0.0.1:{hung_port}"));
    bundle["connections"].as_array_mut().unwrap().push(json!({
        "name": "hung-api", "generation": 1, "spec": {
            "protocol": "http",
            "upstream": { "address": format!("http://127.0.0.1:{hung_port}"), "tls": { "mode": "disable" } },
            "credentials": { "secretRef": { "name": "api-creds" } },
            "listen": { "port": api } } }));
    bundle["policies"][0]["spec"]["connections"] = json!(["ro-db", "rw-db", "hung-api"]);
    bundle["policies"][0]["spec"]["rules"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "api-reads", "match": { "http": { "methods": ["GET"] } }, "action": "allow" }));
    let sidecar = Sidecar::start_with(
        &bundle,
        "app=\"agent\"\n",
        &[
            "--upstream-connect-timeout",
            "6s",
            "--upstream-response-timeout",
            "3s",
        ],
        |dir| {
            pki.write_ca(&dir.join("extra-ca.pem"));
            write_secret(
                dir,
                "db-creds",
                &[("username", "app"), ("password", APP_PASSWORD)],
            );
            write_secret(dir, "api-creds", &[("token", "api-token-never-shown")]);
        },
    )
    .await;
    let token = issuer.token(&["developers"], json!({}));
    let started = std::time::Instant::now();

    // Sessions on the hung database, and a request to the hung API, all at once.
    let hung_sessions: Vec<_> = (0..3)
        .map(|_| tokio::spawn(psql_through(ro, &token, "SELECT 1")))
        .collect();
    let hung_request = {
        let token = token.clone();
        tokio::spawn(async move {
            let request = http::Request::get("/anything")
                .header("proxy-authorization", format!("Bearer {token}"))
                .body(full(""))
                .unwrap();
            let answer = plain_request(api, request).await;
            (answer, started.elapsed())
        })
    };

    // Meanwhile the other Connection answers as if nothing were wrong.
    for i in 0..10 {
        let asked = std::time::Instant::now();
        let o = psql_through(rw, &token, &format!("SELECT {i} + 1")).await;
        assert_eq!(
            text(&o.stdout).trim(),
            (i + 1).to_string(),
            "{}",
            text(&o.stderr)
        );
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(3),
            "a query on the healthy database took {:?}",
            asked.elapsed()
        );
    }
    assert!(
        hung_sessions.iter().all(|s| !s.is_finished()),
        "the hung sessions ended before the healthy queries did; nothing was shown"
    );

    // The hung ones end with their reasons, within their bounds.
    let ((status, _, body), took) = match hung_request.await.unwrap() {
        (Ok(answer), took) => (answer, took),
        (Err(e), _) => panic!("no answer from the sidecar: {e}"),
    };
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("did not begin its answer within 3s"),
        "{body}"
    );
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
    for session in hung_sessions {
        let o = session.await.unwrap();
        assert!(!o.status.success());
        assert!(
            text(&o.stderr).contains("did not complete the login within 6s"),
            "{}",
            text(&o.stderr)
        );
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    drop(sidecar);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_statement_name_per_query_does_not_grow_the_sidecar() {
    let s = setup().await;
    // A driver that names a fresh statement for every query and closes it after use,
    // 100,000 times, in batches as a pipelining driver sends them.
    let mut raw = Raw::connect(s.ro, &s.token()).await;
    let run = |from: u32, to: u32| {
        let mut frames = Vec::new();
        for i in from..to {
            let name = format!("s{i}");
            frames.push(parse(&name, &format!("SELECT {i} AS n")));
            frames.push(bind("", &name));
            frames.push(execute(""));
            frames.push(close_statement(&name));
        }
        frames.push(sync());
        frames
    };
    let mut rss = Vec::new();
    for batch in 0..200u32 {
        let answer = raw.ask(&run(batch * 500, (batch + 1) * 500)).await;
        assert!(errors(&answer).is_empty(), "{:?}", errors(&answer));
        let rows = answer.iter().filter(|f| f.tag == b'D').count();
        assert_eq!(rows, 500, "every statement ran");
        if batch == 19 || batch == 199 {
            rss.push(s.sidecar.rss_kib());
        }
    }
    let (after_10k, after_100k) = (rss[0], rss[1]);
    eprintln!(
        "sidecar RSS after 10,000 statements: {after_10k} KiB; after 100,000: {after_100k} KiB"
    );
    assert!(
        after_100k <= after_10k + 8 * 1024,
        "the sidecar grew from {after_10k} KiB to {after_100k} KiB"
    );

    // Control: statements that are never closed are held, up to the session's bound,
    // past which a Parse is refused (the server would hold them too).
    let mut raw = Raw::connect(s.ro, &s.token()).await;
    for batch in 0..20u32 {
        let frames: Vec<Frame> = (batch * 500..(batch + 1) * 500)
            .map(|i| parse(&format!("kept{i}"), "SELECT 1"))
            .chain([sync()])
            .collect();
        assert!(errors(&raw.ask(&frames).await).is_empty());
    }
    let e = errors(&raw.ask(&[parse("one-more", "SELECT 1"), sync()]).await);
    assert!(
        e.iter()
            .any(|m| m.contains("54000") && m.contains("10000 prepared statements")),
        "{e:?}"
    );
    // Closing one makes room again.
    let answer = raw
        .ask(&[
            close_statement("kept0"),
            parse("one-more", "SELECT 1"),
            sync(),
        ])
        .await;
    assert!(errors(&answer).is_empty(), "{:?}", errors(&answer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_the_server_dropped_mid_transaction_are_gone_for_the_gate_too() {
    let s = setup().await;
    let mut seen = String::new();
    let mut raw = Raw::connect(s.ro, &s.token()).await;
    // A portal bound in a transaction, dropped by COMMIT, and a SQL cursor of its name
    // declared in the next transaction of the same query string.
    raw.ask(&[query("BEGIN")]).await;
    raw.ask(&[
        parse("s1", "SELECT 1::int4 AS a, 2::int4 AS b, 3::int4 AS c"),
        bind("p1", "s1"),
        sync(),
    ])
    .await;
    raw.ask(&[query(
        "COMMIT; BEGIN; DECLARE p1 CURSOR FOR SELECT email, ssn, api_key FROM customers",
    )])
    .await;
    let out = shown(&raw.ask(&[execute("p1"), sync()]).await);
    seen += &out;
    assert!(out.contains("does not exist"), "{out}");
    raw.ask(&[query("ROLLBACK")]).await;
    // A SAVEPOINT drops nothing: a portal bound before it still runs (JDBC's autosave).
    raw.ask(&[query("BEGIN")]).await;
    raw.ask(&[
        parse("s4", "SELECT note FROM orders WHERE id = 14"),
        bind("p4", "s4"),
        sync(),
    ])
    .await;
    raw.ask(&[query("SAVEPOINT a")]).await;
    let out = shown(&raw.ask(&[execute("p4"), sync()]).await);
    assert!(out.contains("order 14"), "{out}");
    raw.ask(&[query("ROLLBACK")]).await;
    // DEALLOCATE ALL in a batch, then a Bind of a statement parsed earlier in it: the
    // gate answers at once, as the server does, instead of waiting for itself.
    let out = shown(
        &raw.ask(&[
            parse("s9", "SELECT 1"),
            parse("d", "DEALLOCATE ALL"),
            bind("", "d"),
            execute(""),
            bind("", "s9"),
            execute(""),
            sync(),
        ])
        .await,
    );
    assert!(out.contains("does not exist"), "{out}");
    s.assert_nothing_leaked(&seen);

    // A FETCH of a portal bound to an INSERT writes rows the server does not count: it
    // is refused under a session write limit.
    let mut raw = Raw::connect(s.rw, &s.token()).await;
    raw.ask(&[query("BEGIN")]).await;
    raw.ask(&[ parse("", "INSERT INTO orders SELECT n, 0, 'via fetch' FROM generate_series(3000, 3999) AS t(n) RETURNING id"), bind("c0", ""), sync(), ]).await;
    let out = shown(&raw.ask(&[query("FETCH 1 FROM c0")]).await);
    assert!(out.contains("maxRowsModifiedPerSession"), "{out}");
    raw.ask(&[query("COMMIT")]).await;
    assert_eq!(
        s.direct_ok("SELECT count(*) FROM orders WHERE id >= 3000"),
        "0"
    );
}
