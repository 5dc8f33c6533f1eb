//! The PostgreSQL gateway: one listener per postgres Connection. The agent speaks the
//! v3 protocol to the sidecar as if it were the server, with the launching user's token
//! as its password; the sidecar logs in to the real server with the Connection's
//! credentials, decides every statement, masks every row, and keeps both sides in step
//! (see `docs/postgres.md`).

pub mod codec;
mod rows;
mod session;
pub mod upstream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::net::TcpListener;

use crate::gateway::Gateway;
pub use upstream::PgUpstream;

/// How long the impact preview's EXPLAIN, or one of the sidecar's catalog look-ups,
/// may take (a timed-out look-up masks every column it could not name).
const PREVIEW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// State the Postgres sessions of one sidecar share.
#[derive(Debug, Default)]
pub struct Shared {
    /// The cancel key handed to each agent session → where its query really runs.
    cancels: Mutex<HashMap<(i32, Bytes), CancelTarget>>,
    /// `(table OID, column number)` → `table.column`, per Connection, for column masks.
    catalog: tokio::sync::Mutex<HashMap<String, Catalog>>,
}

#[derive(Debug, Clone)]
struct CancelTarget {
    upstream: Arc<PgUpstream>,
    pid: i32,
    key: Bytes,
}

/// What the sidecar knows of one database's tables, and its connection for asking more.
#[derive(Debug, Default)]
struct Catalog {
    columns: HashMap<(u32, i16), String>,
    connection: Option<upstream::Established>,
}

impl Catalog {
    /// The sidecar's own connection, opened on first use (and again after a failure
    /// dropped it).
    async fn connection(
        &mut self,
        upstream: &PgUpstream,
    ) -> Result<&mut upstream::Established, upstream::ConnectError> {
        let connection = match self.connection.take() {
            Some(c) => c,
            // Only the sidecar's own catalog reads and EXPLAINs run here.
            None => upstream.connect(&[], true).await?,
        };
        Ok(self.connection.insert(connection))
    }
}

impl Shared {
    fn register_cancel(&self, target: CancelTarget) -> (i32, Bytes) {
        let mut cancels = self
            .cancels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            let mut raw = [0u8; 8];
            if getrandom::fill(&mut raw).is_err() {
                // No randomness: use a key nobody can guess only because it is never
                // registered (cancel then cannot work for this session).
                return (0, Bytes::new());
            }
            let pid = i32::from_be_bytes([raw[0] & 0x7f, raw[1], raw[2], raw[3]]);
            let key = Bytes::copy_from_slice(&raw[4..]);
            if let std::collections::hash_map::Entry::Vacant(e) = cancels.entry((pid, key.clone()))
            {
                e.insert(target);
                return (pid, key);
            }
        }
    }

    fn unregister_cancel(&self, pid: i32, key: &Bytes) {
        self.cancels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&(pid, key.clone()));
    }

    fn cancel_target(&self, pid: i32, key: &Bytes) -> Option<CancelTarget> {
        self.cancels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(pid, key.clone()))
            .cloned()
    }

    /// `table.column` for each `(table OID, column)` in `wanted`, asking the database
    /// for the ones not known yet. `None` when the database cannot be asked: the caller
    /// then masks every column whose origin it cannot name.
    async fn column_names(
        &self,
        connection: &str,
        upstream: &PgUpstream,
        wanted: &[(u32, i16)],
    ) -> Option<HashMap<(u32, i16), String>> {
        let missing: Vec<String> = {
            let catalogs = self.catalog.lock().await;
            let known = catalogs.get(connection).map(|c| &c.columns);
            wanted
                .iter()
                .filter(|k| known.is_none_or(|m| !m.contains_key(k)))
                .map(|(oid, _)| oid.to_string())
                .collect()
        };
        if !missing.is_empty() {
            let sql = format!(
                "SELECT a.attrelid::int8, a.attnum, c.relname, a.attname FROM pg_catalog.pg_attribute a \
                 JOIN pg_catalog.pg_class c ON c.oid = a.attrelid WHERE a.attrelid IN ({}) AND a.attnum > 0",
                missing.join(",")
            );
            let rows = self.catalog_query(connection, upstream, &sql).await?;
            let mut catalogs = self.catalog.lock().await;
            let columns = &mut catalogs.entry(connection.to_owned()).or_default().columns;
            for row in rows {
                if let [Some(oid), Some(num), Some(table), Some(column)] = &row[..]
                    && let (Ok(oid), Ok(num)) = (oid.parse::<u32>(), num.parse::<i16>())
                {
                    columns.insert((oid, num), format!("{table}.{column}"));
                }
            }
        }
        let catalogs = self.catalog.lock().await;
        let columns = &catalogs.get(connection)?.columns;
        Some(
            wanted
                .iter()
                .filter_map(|k| columns.get(k).map(|n| (*k, n.clone())))
                .collect(),
        )
    }
}

impl Shared {
    /// Whether any column of `tables` (`schema.table`) is masked by `masking`. `None`
    /// when the catalog cannot say (the caller then assumes one is).
    async fn tables_have_masked_columns(
        &self,
        connection: &str,
        upstream: &PgUpstream,
        tables: &[String],
        masking: &agentgate_policy::masking::MaskingProfile,
    ) -> Option<bool> {
        let mut pairs = Vec::new();
        for t in tables {
            let (schema, table) = t.split_once('.')?;
            // Names come from the agent's SQL: only plain ones are put into a query.
            let plain = |s: &str| {
                s.chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '$')
            };
            if !plain(schema) || !plain(table) {
                return None;
            }
            pairs.push(format!("('{schema}','{table}')"));
        }
        if pairs.is_empty() {
            return Some(false);
        }
        let sql = format!(
            "SELECT c.relname, a.attname FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE a.attnum > 0 AND NOT a.attisdropped AND (n.nspname, c.relname) IN ({})",
            pairs.join(",")
        );
        let rows = self.catalog_query(connection, upstream, &sql).await?;
        Some(rows.iter().any(|row| match &row[..] {
            [Some(table), Some(column)] => masking.masks_column(&format!("{table}.{column}")),
            _ => true,
        }))
    }

    /// The impact preview of a held UPDATE or DELETE: the planner's row estimate, asked
    /// on the catalog connection. Never fails: an estimate that cannot be made says why.
    async fn impact(
        &self,
        connection: &str,
        upstream: &PgUpstream,
        statement: &str,
        parameters: Option<&[Option<Bytes>]>,
    ) -> agentgate_crds::Impact {
        let Some(parameters) = parameters else {
            return agentgate_crds::Impact {
                estimated_rows: None,
                detail: "no estimate: the statement's parameters are in binary format".into(),
            };
        };
        let mut catalogs = self.catalog.lock().await;
        let catalog = catalogs.entry(connection.to_owned()).or_default();
        let conn = match catalog.connection(upstream).await {
            Ok(c) => c,
            Err(e) => {
                return agentgate_crds::Impact {
                    estimated_rows: None,
                    detail: format!("no estimate: {e}"),
                };
            }
        };
        // The catalog connection is shared by the Connection's sessions: a slow plan
        // must not hold them up, so it gets a bound, and a connection it outlived is
        // dropped (its answer would come later, out of step).
        let estimate =
            tokio::time::timeout(PREVIEW_TIMEOUT, conn.estimate_rows(statement, parameters));
        let Ok(estimate) = estimate.await else {
            catalog.connection = None;
            return agentgate_crds::Impact {
                estimated_rows: None,
                detail: format!(
                    "no estimate: EXPLAIN did not answer within {}s",
                    PREVIEW_TIMEOUT.as_secs()
                ),
            };
        };
        match estimate {
            Ok(rows) => agentgate_crds::Impact {
                estimated_rows: Some(rows),
                detail: "the planner's estimate (EXPLAIN, not run)".into(),
            },
            Err(e) => {
                if matches!(
                    e,
                    upstream::ConnectError::Io(_) | upstream::ConnectError::Protocol(_)
                ) {
                    catalog.connection = None;
                }
                let detail = match e {
                    upstream::ConnectError::Refused { code, message } => {
                        format!("no estimate: EXPLAIN failed ({code}): {message}")
                    }
                    other => format!("no estimate: {other}"),
                };
                agentgate_crds::Impact {
                    estimated_rows: None,
                    detail: detail.chars().take(1000).collect(),
                }
            }
        }
    }

    /// Runs one of the sidecar's own catalog queries on the Connection's catalog
    /// connection (opened on first use, reopened after a failure).
    async fn catalog_query(
        &self,
        connection: &str,
        upstream: &PgUpstream,
        sql: &str,
    ) -> Option<Vec<Vec<Option<String>>>> {
        let mut catalogs = self.catalog.lock().await;
        let catalog = catalogs.entry(connection.to_owned()).or_default();
        let conn = match catalog.connection(upstream).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(connection, error = %e, "cannot open the catalog connection; masking what cannot be looked up");
                return None;
            }
        };
        // Bounded like the preview: the lock is shared by the Connection's sessions.
        match tokio::time::timeout(PREVIEW_TIMEOUT, conn.simple_query(sql)).await {
            Ok(Ok(rows)) => Some(rows),
            Ok(Err(e)) => {
                tracing::warn!(connection, error = %e, "catalog look-up failed; masking what cannot be looked up");
                catalog.connection = None;
                None
            }
            Err(_) => {
                tracing::warn!(
                    connection,
                    "catalog look-up timed out; masking what cannot be looked up"
                );
                catalog.connection = None;
                None
            }
        }
    }
}

/// Serves one postgres Connection's listener until the task is dropped.
pub async fn serve(listener: TcpListener, connection: String, gateway: Arc<Gateway>) {
    let connection: Arc<str> = connection.into();
    loop {
        let stream = agentgate_process::accept(&listener, &connection).await;
        let _ = stream.set_nodelay(true);
        tokio::spawn(session::run(gateway.clone(), connection.clone(), stream));
    }
}
