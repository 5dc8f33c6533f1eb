//! What the sidecar asks a database itself, on a connection of its own per Connection:
//! which table column each result column comes from (for column masks), whether a
//! table has masked columns (for COPY), and the planner's estimate of a held write.
//!
//! Each Connection has its own catalog and its own lock, and every look-up is bounded
//! by `--catalog-timeout`: a slow or hung database delays only its own sessions' look-ups,
//! never another Connection's. A look-up that fails or times out answers "unknown", and
//! the caller then masks (or refuses) what it could not name.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use agentgate_crds::Impact;
use agentgate_policy::masking::MaskingProfile;
use bytes::Bytes;

use super::upstream::{ConnectError, Established, PgUpstream};

/// Column names remembered per Connection; past this the cache starts again (a schema
/// this large is looked up again rather than held for the sidecar's life).
const MAX_COLUMNS: usize = 100_000;

/// The catalogs of every postgres Connection of this sidecar.
#[derive(Debug)]
pub(super) struct Catalogs {
    timeout: Duration,
    by_connection: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Catalog>>>>,
}

/// What the sidecar knows of one database's tables, and its connection for asking more.
#[derive(Debug, Default)]
struct Catalog {
    /// The upstream this catalog describes: a reload that changes it starts afresh.
    upstream: Option<Arc<PgUpstream>>,
    columns: HashMap<(u32, i16), String>,
    connection: Option<Established>,
}

/// Rows of a simple query, as text.
type Rows = Vec<Vec<Option<String>>>;

impl Catalogs {
    pub(super) fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            by_connection: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The catalog of `connection`, as `upstream` reaches it.
    async fn of(
        &self,
        connection: &str,
        upstream: &Arc<PgUpstream>,
    ) -> tokio::sync::OwnedMutexGuard<Catalog> {
        let catalog = self
            .by_connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(connection.to_owned())
            .or_default()
            .clone();
        let mut catalog = catalog.lock_owned().await;
        if !catalog
            .upstream
            .as_ref()
            .is_some_and(|u| Arc::ptr_eq(u, upstream))
        {
            *catalog = Catalog {
                upstream: Some(upstream.clone()),
                ..Catalog::default()
            };
        }
        catalog
    }

    /// `table.column` for each `(table OID, column)` in `wanted`, asking the database
    /// for the ones not known yet. `None` when the database cannot be asked: the caller
    /// then masks every column whose origin it cannot name.
    pub(super) async fn column_names(
        &self,
        connection: &str,
        upstream: &Arc<PgUpstream>,
        wanted: &[(u32, i16)],
    ) -> Option<HashMap<(u32, i16), String>> {
        let mut catalog = self.of(connection, upstream).await;
        let missing: Vec<String> = wanted
            .iter()
            .filter(|k| !catalog.columns.contains_key(k))
            .map(|(oid, _)| oid.to_string())
            .collect();
        if !missing.is_empty() {
            let sql = format!(
                "SELECT a.attrelid::int8, a.attnum, c.relname, a.attname FROM pg_catalog.pg_attribute a \
                 JOIN pg_catalog.pg_class c ON c.oid = a.attrelid WHERE a.attrelid IN ({}) AND a.attnum > 0",
                missing.join(",")
            );
            let rows = catalog.query(connection, &sql, self.timeout).await?;
            if catalog.columns.len() + rows.len() > MAX_COLUMNS {
                catalog.columns.clear();
            }
            for row in rows {
                if let [Some(oid), Some(num), Some(table), Some(column)] = &row[..]
                    && let (Ok(oid), Ok(num)) = (oid.parse::<u32>(), num.parse::<i16>())
                {
                    catalog
                        .columns
                        .insert((oid, num), format!("{table}.{column}"));
                }
            }
        }
        Some(
            wanted
                .iter()
                .filter_map(|k| catalog.columns.get(k).map(|n| (*k, n.clone())))
                .collect(),
        )
    }

    /// Whether any column of `tables` (`schema.table`) is masked by `masking`. `None`
    /// when the catalog cannot say (the caller then assumes one is).
    pub(super) async fn tables_have_masked_columns(
        &self,
        connection: &str,
        upstream: &Arc<PgUpstream>,
        tables: &[String],
        masking: &MaskingProfile,
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
        let mut catalog = self.of(connection, upstream).await;
        let rows = catalog.query(connection, &sql, self.timeout).await?;
        Some(rows.iter().any(|row| match &row[..] {
            [Some(table), Some(column)] => masking.masks_column(&format!("{table}.{column}")),
            _ => true,
        }))
    }

    /// The impact preview of a held UPDATE or DELETE: the planner's row estimate.
    /// Never fails: an estimate that cannot be made says why.
    pub(super) async fn impact(
        &self,
        connection: &str,
        upstream: &Arc<PgUpstream>,
        statement: &str,
        parameters: Option<&[Option<Bytes>]>,
    ) -> Impact {
        let no_estimate = |detail: String| Impact {
            estimated_rows: None,
            detail: detail.chars().take(1000).collect(),
        };
        let Some(parameters) = parameters else {
            return no_estimate(
                "no estimate: the statement's parameters are in binary format".into(),
            );
        };
        let mut catalog = self.of(connection, upstream).await;
        let timeout = self.timeout;
        let estimate = tokio::time::timeout(timeout, async {
            catalog
                .connection()
                .await?
                .estimate_rows(statement, parameters)
                .await
        });
        let Ok(estimate) = estimate.await else {
            // Its answer would come later, out of step: the connection goes.
            catalog.connection = None;
            return no_estimate(format!(
                "no estimate: EXPLAIN did not answer within {}s",
                timeout.as_secs()
            ));
        };
        match estimate {
            Ok(rows) => Impact {
                estimated_rows: Some(rows),
                detail: "the planner's estimate (EXPLAIN, not run)".into(),
            },
            Err(e) => {
                if matches!(e, ConnectError::Io(_) | ConnectError::Protocol(_)) {
                    catalog.connection = None;
                }
                no_estimate(match e {
                    ConnectError::Refused { code, message } => {
                        format!("no estimate: EXPLAIN failed ({code}): {message}")
                    }
                    other => format!("no estimate: {other}"),
                })
            }
        }
    }
}

impl Catalog {
    /// The sidecar's own connection, opened on first use (and again after a failure
    /// dropped it).
    async fn connection(&mut self) -> Result<&mut Established, ConnectError> {
        let connection = match (self.connection.take(), &self.upstream) {
            (Some(c), _) => c,
            // Only the sidecar's own catalog reads and EXPLAINs run here.
            (None, Some(upstream)) => upstream.connect(&[], true).await?,
            (None, None) => {
                return Err(ConnectError::Protocol("no upstream for the catalog".into()));
            }
        };
        Ok(self.connection.insert(connection))
    }

    /// Runs one of the sidecar's own catalog queries; opening the connection and the
    /// query together are bounded by `timeout`.
    async fn query(&mut self, connection: &str, sql: &str, timeout: Duration) -> Option<Rows> {
        let asked = tokio::time::timeout(timeout, async {
            self.connection().await?.simple_query(sql).await
        })
        .await;
        match asked {
            Ok(Ok(rows)) => return Some(rows),
            Ok(Err(e)) => {
                tracing::warn!(connection, error = %e, "catalog look-up failed; masking what cannot be looked up");
            }
            Err(_) => tracing::warn!(
                connection,
                "catalog look-up timed out; masking what cannot be looked up"
            ),
        }
        // A connection that failed or fell out of step is not used again.
        self.connection = None;
        None
    }
}
