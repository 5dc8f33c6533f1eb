//! The Postgres gateway with real processes on loopback: a real PostgreSQL server
//! (Debian's package, a fresh cluster per test), the sidecar binary in front of it, and
//! real clients as the agent — `psql`, `pgbench` and the `tokio-postgres` driver.

#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use agentgate_crds::audit::verify;
use agentgate_e2e::postgres::Postgres;
use serde_json::{Value, json};
use support::*;

/// The Connection's credentials: only the sidecar holds them.
const APP_PASSWORD: &str = "app-password-Zq8x-never-shown";
const AWS_KEY: &str = "AKIAIOSFODNN7EXAMPLE";

const SETUP: &str = "
CREATE ROLE app LOGIN PASSWORD 'app-password-Zq8x-never-shown';
CREATE SCHEMA secret;
CREATE TABLE public.orders (id int PRIMARY KEY, total numeric, note text);
INSERT INTO public.orders SELECT g, g * 10, 'order ' || g FROM generate_series(1, 20) g;
CREATE UNIQUE INDEX ON public.orders (note);
CREATE TABLE public.customers (id int, name text, email text, ssn text, api_key text, age int);
INSERT INTO public.customers VALUES
  (1, 'Jane', 'jane@example.com', '123-45-6789', 'AKIAIOSFODNN7EXAMPLE', 41),
  (2, 'Joe', NULL, '987-65-4321', 'none', 35);
CREATE TABLE secret.keys (id int, value text);
GRANT ALL ON ALL TABLES IN SCHEMA public TO app;
GRANT USAGE ON SCHEMA secret TO app;
GRANT ALL ON ALL TABLES IN SCHEMA secret TO app;
GRANT CREATE ON SCHEMA public TO app;
";

fn bundle(db_port: u16, listen_port: u16, issuer: &str) -> Value {
    json!({
        "namespace": "agents",
        "connections": [{ "name": "orders-db", "generation": 1, "spec": {
            "protocol": "postgres",
            "upstream": { "address": format!("127.0.0.1:{db_port}"), "database": "postgres",
                          "tls": { "mode": "disable" } },
            "credentials": { "secretRef": { "name": "orders-db-creds" } },
            "listen": { "port": listen_port } } }],
        "policies": [{ "name": "agents", "generation": 1, "spec": {
            "agentSelector": {},
            "identity": { "issuer": issuer, "audiences": [AUDIENCE] },
            "connections": ["orders-db"],
            "rules": [
                { "name": "reads", "match": { "sql": { "statements": ["select", "explain"], "tables": ["public.*", "pg_catalog.*"] } }, "action": "allow" },
                { "name": "sessions", "match": { "sql": { "statements": ["transaction", "set"] } }, "action": "allow" },
                { "name": "copy-orders", "match": { "sql": { "statements": ["copy"], "tables": ["public.orders", "public.customers"] } }, "action": "allow" },
                { "name": "inserts", "match": { "sql": { "statements": ["insert"], "tables": ["public.orders"] } }, "action": "allow" },
                { "name": "no-ddl", "match": { "sql": { "statements": ["ddl"] } }, "action": "deny" },
                { "name": "no-writes", "match": { "sql": { "statements": ["update", "delete"] } }, "action": "deny" }
            ],
            "masking": { "detectors": ["secrets", "pii"], "columns": ["customers.email", "*.ssn"] },
            "limits": { "maxRowsPerQuery": 50, "maxRowsModifiedPerSession": 5 } } }]
    })
}

struct Setup {
    db: Postgres,
    sidecar: Sidecar,
    issuer: OidcIssuer,
    port: u16,
}

impl Setup {
    fn token(&self) -> String {
        self.issuer.token(&["developers"], json!({}))
    }

    /// `psql` through the sidecar with the launching user's token as the password.
    fn psql(&self, args: &[&str], stdin: Option<&str>) -> Output {
        self.psql_with(&self.token(), args, stdin)
    }

    fn psql_with(&self, password: &str, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new("psql");
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "agent",
            "-d",
            "orders",
            "-X",
            "-A",
            "-t",
        ])
        .args(args)
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    }

    fn direct(&self, sql: &str) -> String {
        self.db
            .psql_as(("app", APP_PASSWORD), &["-c", sql])
            .unwrap()
            .trim()
            .to_owned()
    }

    async fn client(&self) -> tokio_postgres::Client {
        let config = format!(
            "host=127.0.0.1 port={} user=agent dbname=orders password={}",
            self.port,
            self.token()
        );
        let (client, connection) = tokio_postgres::connect(&config, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }
}

async fn setup() -> Setup {
    let db = tokio::task::spawn_blocking(|| Postgres::start(SETUP).unwrap())
        .await
        .unwrap();
    let pki = Pki::new();
    let issuer = OidcIssuer::start(&pki).await;
    let port = free_port();
    let sidecar = Sidecar::start(
        &bundle(db.port, port, &issuer.url),
        "app=\"agent\"\n",
        |dir| {
            pki.write_ca(&dir.join("extra-ca.pem"));
            write_secret(
                dir,
                "orders-db-creds",
                &[("username", "app"), ("password", APP_PASSWORD)],
            );
        },
    )
    .await;
    Setup {
        db,
        sidecar,
        issuer,
        port,
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Nothing the agent, the log or the audit trail saw holds the database password or the
/// unmasked secrets.
fn assert_nothing_leaked(s: &Setup, seen: &str) {
    for text in [seen, &s.sidecar.log(), &s.sidecar.audit()] {
        assert!(!text.contains(APP_PASSWORD), "the database password leaked");
        assert!(!text.contains(AWS_KEY), "a detected secret leaked");
        assert!(!text.contains("jane@example.com"), "a masked column leaked");
        assert!(!text.contains("123-45-6789"), "a masked column leaked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_reads_pass_writes_and_ddl_are_denied_results_are_masked() {
    let s = setup().await;
    let mut seen = String::new();

    // The sidecar logged in as the Connection's user; the agent never had its password.
    let o = s.psql(&["-c", "SELECT current_user, count(*) FROM orders"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "app|20");

    // Masked columns (also under an alias), detected secrets, NULLs kept.
    let o = s.psql(
        &[
            "-c",
            "SELECT id, name, email, ssn, api_key, age FROM customers ORDER BY id",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    seen += &out;
    assert_eq!(
        out.lines().next().unwrap(),
        "1|Jane|[masked:column]|[masked:column]|[masked:aws-access-key-id]|41",
        "{out}"
    );
    assert_eq!(
        out.lines().nth(1).unwrap(),
        "2|Joe||[masked:column]|none|35",
        "{out}"
    );
    let o = s.psql(
        &["-c", "SELECT email AS contact FROM customers WHERE id = 1"],
        None,
    );
    assert_eq!(stdout(&o).trim(), "[masked:column]", "{}", stderr(&o));

    // Writes and DDL are refused with 42501 and the rule's name; nothing changed.
    let o = s.psql(&["-c", "DELETE FROM orders WHERE id = 1"], None);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("rule no-writes"), "{err}");
    let o = s.psql(
        &["-v", "VERBOSITY=verbose", "-c", "DROP TABLE orders"],
        None,
    );
    let err = stderr(&o);
    assert!(
        err.contains("42501") && err.contains("rule no-ddl"),
        "{err}"
    );
    // A select-only rule never covers another schema's tables or unparsable text.
    let o = s.psql(&["-c", "SELECT * FROM secret.keys"], None);
    assert!(!o.status.success());
    let o = s.psql(&["-c", "SELEKT 1"], None);
    assert!(!o.status.success());

    // A multi-statement string is decided per statement: one write refuses it all.
    let o = s.psql(&["-c", "SELECT 1; DELETE FROM orders"], None);
    assert!(stderr(&o).contains("no-writes"), "{}", stderr(&o));
    assert_eq!(s.direct("SELECT count(*) FROM orders"), "20");

    // Inside a transaction a refused statement leaves the session usable.
    let o = s.psql(
        &["-v", "ON_ERROR_STOP=0"],
        Some("BEGIN;\nSELECT count(*) FROM orders;\nDELETE FROM orders;\nSELECT 'still here';\nCOMMIT;\n"),
    );
    let out = stdout(&o);
    assert!(
        out.contains("20") && out.contains("still here"),
        "{out}\n{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("no-writes"));

    // maxRowsPerQuery ends the result with an error.
    let o = s.psql(&["-c", "SELECT g FROM generate_series(1, 1000) g"], None);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("maxRowsPerQuery is 50"),
        "{}",
        stderr(&o)
    );

    // \copy in both directions (allowed for public.orders by the copy rule).
    let file = s.sidecar.path("rows.csv");
    std::fs::write(&file, "101,5,copied 1\n102,6,copied 2\n").unwrap();
    let o = s.psql(
        &[
            "-c",
            &format!("\\copy orders FROM '{}' WITH (FORMAT csv)", file.display()),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        s.direct("SELECT count(*) FROM orders WHERE note LIKE 'copied%'"),
        "2"
    );
    let o = s.psql(
        &[
            "-c",
            "\\copy (SELECT id, note FROM orders WHERE id > 100 ORDER BY id) TO STDOUT",
        ],
        None,
    );
    assert_eq!(
        stdout(&o),
        "101\tcopied 1\n102\tcopied 2\n",
        "{}",
        stderr(&o)
    );
    // COPY out of a column-masked table is refused rather than leaked.
    let o = s.psql(&["-c", "\\copy customers TO STDOUT"], None);
    seen += &stdout(&o);
    assert!(stderr(&o).contains("column-masked"), "{}", stderr(&o));

    // The server's own errors are masked too: a unique violation quotes the value.
    let o = s.psql(
        &["-v", "ON_ERROR_STOP=0"],
        Some("INSERT INTO orders VALUES (401, 1, 'ops@example.org');\nINSERT INTO orders VALUES (402, 1, 'ops@example.org');\n"),
    );
    let err = stderr(&o);
    assert!(
        err.contains("duplicate key") && err.contains("[masked:email]"),
        "{err}"
    );
    assert!(!err.contains("ops@example.org"), "{err}");

    // Dangerous functions are never allowed by an allow rule.
    let o = s.psql(&["-c", "SELECT pg_read_file('/etc/passwd')"], None);
    assert!(stderr(&o).contains("pg_read_file"), "{}", stderr(&o));

    // maxRowsModifiedPerSession: 2 rows copied + 3 inserted reach 5; the next write in
    // the same session is refused.
    let o = s.psql(
        &["-v", "ON_ERROR_STOP=0"],
        Some("INSERT INTO orders VALUES (201, 1, 'a'), (202, 1, 'b'), (203, 1, 'c'), (204, 1, 'd'), (205, 1, 'e');\nINSERT INTO orders VALUES (206, 1, 'f');\n"),
    );
    assert!(
        stderr(&o).contains("maxRowsModifiedPerSession"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        s.direct("SELECT count(*) FROM orders WHERE id BETWEEN 201 AND 299"),
        "5"
    );

    // A bad token is refused at startup.
    let o = s.psql_with("not-a-jwt", &["-c", "SELECT 1"], None);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("launching user's token"),
        "{}",
        stderr(&o)
    );
    let other_issuer = OidcIssuer::start(&Pki::new()).await;
    let o = s.psql_with(
        &other_issuer.token(&[], json!({})),
        &["-c", "SELECT 1"],
        None,
    );
    assert!(!o.status.success());

    // A statement can name the prompt and tool call that made it (sqlcommenter).
    let o = s.psql(
        &[
            "-c",
            "SELECT 1 /*traceparent='00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01',prompt_id='prompt-42',tool_call_id='toolu_7'*/",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));

    assert_nothing_leaked(&s, &seen);
    let audit = s.sidecar.audit();
    verify(&audit, None).unwrap();
    // Each statement's events name the database session they ran in.
    let session_ids: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"kind\":\"session\""))
        .filter_map(|l| l.split("\"requestId\":\"").nth(1)?.split('"').next())
        .collect();
    assert!(!session_ids.is_empty());
    assert!(
        audit.lines().any(|l| l.contains("\"kind\":\"completed\"")
            && session_ids
                .iter()
                .any(|id| l.contains(&format!("\"sessionId\":\"{id}\"")))),
        "{audit}"
    );
    assert!(
        audit.contains("\"trace\":{\"traceparent\":\"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\",\"promptId\":\"prompt-42\",\"toolCallId\":\"toolu_7\"}"),
        "{audit}"
    );
    let events: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let delete = events
        .iter()
        .find(|e| e["request"]["sql"] == "DELETE FROM orders WHERE id = $1")
        .expect("the refused DELETE is recorded, literals removed");
    assert_eq!(delete["decision"], "deny");
    assert_eq!(delete["rule"], "no-writes");
    let copied = events
        .iter()
        .find(|e| e["kind"] == "completed" && e["rowsAffected"] == 2)
        .expect("the COPY FROM is recorded with its row count");
    assert_eq!(copied["request"]["statements"][0]["kind"], "copy");
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "completed" && e["masked"]["column"].as_u64() >= Some(2)),
        "masked counts are recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_through_the_sidecar_in_every_protocol_mode() {
    let s = setup().await;
    let pgbench = |port: u16, login: (&str, &str), args: &[&str]| {
        Command::new(s.db.bin().join("pgbench"))
            .args(args)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", login.0])
            .arg(if login.0 == "app" {
                "postgres"
            } else {
                "orders"
            })
            .env("PGPASSWORD", login.1)
            .output()
            .unwrap()
    };
    let init = pgbench(s.db.port, ("app", APP_PASSWORD), &["-i", "-s", "1", "-q"]);
    assert!(init.status.success(), "{}", stderr(&init));
    let token = s.token();
    for mode in ["simple", "extended", "prepared"] {
        let o = pgbench(
            s.port,
            ("agent", &token),
            &["-n", "-S", "-t", "200", "-c", "2", "-M", mode],
        );
        let out = stdout(&o);
        assert!(
            o.status.success(),
            "pgbench -M {mode}: {out}\n{}",
            stderr(&o)
        );
        assert!(
            out.contains("number of transactions actually processed: 400/400"),
            "{mode}: {out}"
        );
        assert!(
            out.contains("number of failed transactions: 0"),
            "{mode}: {out}"
        );
    }
    // The TPC-B script writes: refused by policy, and pgbench reports the refusal.
    let o = pgbench(
        s.port,
        ("agent", &token),
        &["-n", "-t", "1", "-M", "prepared"],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no-writes"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_with_the_extended_protocol_pipelines_prepares_and_cancels() {
    let s = setup().await;
    let client = s.client().await;

    // Prepared statements with parameters; binary results of masked columns masked.
    let stmt = client
        .prepare("SELECT id, email, ssn, age FROM customers WHERE id = $1")
        .await
        .unwrap();
    let row = client.query_one(&stmt, &[&1i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("[masked:column]")
    );
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some("[masked:column]")
    );
    assert_eq!(row.get::<_, i32>(3), 41);

    // A refused Parse answers with 42501 and the connection stays in step.
    let err = client
        .execute("DELETE FROM orders WHERE id = $1", &[&1i32])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    assert!(err.to_string().contains("no-writes") || format!("{err:?}").contains("no-writes"));
    let n: i64 = client
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 20);

    // Pipelined: all sent before any answer is read; the refused one fails alone.
    let a = client.query_one("SELECT 1::int4 AS one", &[]);
    let b = client.execute("UPDATE orders SET total = 0", &[]);
    let c = client.query_one("SELECT count(*) FROM orders WHERE id <= $1", &[&5i32]);
    let (a, b, c) = tokio::join!(a, b, c);
    assert_eq!(a.unwrap().get::<_, i32>(0), 1);
    assert!(b.is_err());
    assert_eq!(c.unwrap().get::<_, i64>(0), 5);

    // In a transaction, a refused statement does not break it.
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute("INSERT INTO orders VALUES (301, 1, 'tx')", &[])
        .await
        .unwrap();
    assert!(
        client
            .execute("DELETE FROM orders WHERE id = 301", &[])
            .await
            .is_err()
    );
    client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(s.direct("SELECT note FROM orders WHERE id = 301"), "tx");

    // Row limit over the extended protocol.
    let err = client
        .query("SELECT g FROM generate_series(1, 500) g", &[])
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("maxRowsPerQuery"), "{err:?}");
    let n: i64 = client
        .query_one("SELECT count(*) FROM customers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);

    // Cancel: the key the agent got maps to the real backend.
    let token = client.cancel_token();
    let slow = client.query_one("SELECT count(*) FROM generate_series(1, 2000000000)", &[]);
    // A cancel that arrives before the query reached the server cancels nothing (as
    // with the server itself): on a loaded machine, send it again until it lands.
    let slow = async {
        let mut slow = std::pin::pin!(slow);
        loop {
            tokio::select! {
                done = &mut slow => return done,
                () = tokio::time::sleep(Duration::from_millis(500)) => {
                    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
                }
            }
        }
    };
    let err = slow.await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{err:?}"
    );
    let n: i64 = client
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n >= 20);

    assert_nothing_leaked(&s, "");
    verify(&s.sidecar.audit(), None).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_leg_uses_tls_as_the_connection_says() {
    // The database's certificate comes from its own CA, which only the Connection names.
    let (pki, db_pki) = (Pki::new(), Pki::new());
    let (cert, key) = (db_pki.cert_pem.clone(), db_pki.key_pem.clone());
    let db =
        tokio::task::spawn_blocking(move || Postgres::start_with_tls(SETUP, &cert, &key).unwrap())
            .await
            .unwrap();
    let issuer = OidcIssuer::start(&pki).await;
    let (verified, wrong_ca) = (free_port(), free_port());
    let mut bundle = bundle(db.port, verified, &issuer.url);
    let tls =
        |ca: &str| json!({ "mode": "verify-full", "caSecretRef": { "name": ca, "key": "ca.crt" } });
    bundle["connections"][0]["spec"]["upstream"]["tls"] = tls("db-ca");
    let mut other = bundle["connections"][0].clone();
    other["name"] = json!("wrong-ca");
    other["spec"]["upstream"]["tls"] = tls("other-ca");
    other["spec"]["listen"]["port"] = json!(wrong_ca);
    bundle["connections"].as_array_mut().unwrap().push(other);
    bundle["policies"][0]["spec"]["connections"] = json!(["orders-db", "wrong-ca"]);
    let sidecar = Sidecar::start(&bundle, "app=\"agent\"\n", |dir| {
        pki.write_ca(&dir.join("extra-ca.pem"));
        db_pki.write_ca(&dir.join("credentials/db-ca/ca.crt"));
        Pki::new().write_ca(&dir.join("credentials/other-ca/ca.crt"));
        write_secret(
            dir,
            "orders-db-creds",
            &[("username", "app"), ("password", APP_PASSWORD)],
        );
    })
    .await;
    let s = Setup {
        db,
        sidecar,
        issuer,
        port: verified,
    };
    let o = s.psql(
        &[
            "-c",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ],
        None,
    );
    assert_eq!(stdout(&o).trim(), "t", "{}", stderr(&o));

    // A server whose certificate the Connection's CA did not sign is never logged in to.
    let o = Setup {
        port: wrong_ca,
        ..s
    }
    .psql(&["-c", "SELECT 1"], None);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("cannot reach the database") && err.contains("certificate"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_an_error_and_a_closed_connection_never_a_hang() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup().await;
    let token = s.token();
    let startup = {
        let mut body = Vec::new();
        for (k, v) in [("user", "agent"), ("database", "orders")] {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut packet = ((body.len() + 8) as i32).to_be_bytes().to_vec();
        packet.extend_from_slice(&196_608i32.to_be_bytes());
        packet.extend_from_slice(&body);
        packet
    };
    let password = {
        let mut m = vec![b'p'];
        m.extend_from_slice(&((token.len() + 5) as i32).to_be_bytes());
        m.extend_from_slice(token.as_bytes());
        m.push(0);
        m
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "huge startup length",
            vec![0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0],
        ),
        ("unknown protocol", vec![0, 0, 0, 8, 0, 9, 0, 0]),
        (
            "huge message after login",
            [
                startup.clone(),
                password.clone(),
                vec![b'Q', 0x7f, 0xff, 0xff, 0xff],
            ]
            .concat(),
        ),
        (
            "negative length after login",
            [
                startup.clone(),
                password.clone(),
                vec![b'Q', 0xff, 0xff, 0xff, 0xf0],
            ]
            .concat(),
        ),
        (
            "query without its NUL",
            [
                startup.clone(),
                password.clone(),
                vec![b'Q', 0, 0, 0, 8, b'S', b'E', b'L', b'E'],
            ]
            .concat(),
        ),
    ];
    for (what, bytes) in cases {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", s.port))
            .await
            .unwrap();
        conn.write_all(&bytes).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("{what}: the sidecar hung"))
            .unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.contains("08P01"), "{what}: {text}");
    }
    // The sidecar is unharmed.
    let o = s.psql(&["-c", "SELECT 1"], None);
    assert_eq!(stdout(&o).trim(), "1", "{}", stderr(&o));
}
