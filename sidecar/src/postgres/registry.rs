//! The names a session's server holds — prepared statements, portals, cursors — as the
//! server confirmed them (`ParseComplete`, `BindComplete`, `CloseComplete`,
//! `DECLARE CURSOR`), and what the batch being sent changes before it is confirmed.
//! Entries go when the server drops them (Close, the end of a transaction or of an
//! unnamed statement, `DEALLOCATE`/`DISCARD`/`CLOSE`), and a session may hold at most
//! [`MAX_PREPARED`] statements and [`MAX_CURSORS`] cursors.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use agentgate_policy::{SqlRequest, SqlStatement};
use bytes::Bytes;

use super::codec::Field;

/// A statement the server holds, as the agent parsed it and the gateway classified it.
#[derive(Debug)]
pub(super) struct Prepared {
    pub(super) sql: Arc<SqlRequest>,
    pub(super) text: Arc<str>,
    /// Its result columns, from the sidecar's own `Describe` after the Parse.
    pub(super) fields: OnceLock<Vec<Field>>,
}

/// A portal the server holds: the exact statement it was bound to — a later Parse of
/// the same name does not change what an existing portal runs — and its parameters.
#[derive(Debug)]
pub(super) struct Bound {
    pub(super) statement: Arc<Prepared>,
    /// The parameters as audit records and approvers see them (masked).
    pub(super) shown: Vec<String>,
    /// The parameters as sent, when all are text (for an impact estimate).
    pub(super) text: Option<Vec<Option<Bytes>>>,
    /// Bind's result format codes.
    pub(super) result_formats: Vec<i16>,
    /// Rows sent to the agent so far (the row limit counts across Executes).
    pub(super) sent: AtomicU64,
}

/// The statements and portals the server has confirmed (ParseComplete, BindComplete,
/// CloseComplete), written by the server half as the confirmations arrive. The agent
/// half decides `Bind`/`Execute` on these — never on what it sent but the server may
/// have refused (a Parse of a name that exists fails, and the old statement stays).
#[derive(Debug, Default)]
pub(super) struct Registry {
    pub(super) statements: HashMap<String, Arc<Prepared>>,
    pub(super) portals: HashMap<String, Arc<Bound>>,
    /// Cursors the server confirmed declaring (`DECLARE CURSOR`) → what they read. SQL
    /// cursors and protocol portals share one namespace at the server.
    pub(super) cursors: HashMap<String, SqlStatement>,
}

impl Registry {
    /// What a statement run by the server changed in the namespaces: SQL-level
    /// `PREPARE`/`DEALLOCATE`/`DISCARD ALL` and `CLOSE`. Applied in protocol order, as
    /// the server half sees the statement end; a removal is applied even when the
    /// statement failed (forgetting too much only refuses more).
    pub(super) fn forget(&mut self, statement: &SqlStatement) {
        if statement.ends_transaction {
            // COMMIT, ROLLBACK (TO SAVEPOINT), COMMIT AND CHAIN drop portals and
            // cursors, whatever transaction follows.
            self.portals.clear();
            self.cursors.clear();
        }
        match statement.prepared_statement.as_deref() {
            Some("*") => self.statements.clear(),
            Some(name) => {
                self.statements.remove(name);
            }
            None => {}
        }
        match statement.closes.as_deref() {
            Some("*") => {
                self.portals.clear();
                self.cursors.clear();
            }
            Some(name) => {
                self.portals.remove(name);
                self.cursors.remove(name);
            }
            None => {}
        }
    }
}

/// Prepared statements (and portals) one session may hold at once.
pub(super) const MAX_PREPARED: usize = 10_000;
/// Cursors one session may have declared at once.
pub(super) const MAX_CURSORS: usize = 1_000;

pub(super) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the current batch (since the last `Sync` or `Query`) changed: within a batch
/// the server runs messages in order and skips the rest after an error, so the agent
/// half may rely on them; across batches only confirmed state counts.
#[derive(Debug, Default)]
pub(super) struct Overlay {
    pub(super) statements: HashMap<String, Option<Arc<Prepared>>>,
    pub(super) portals: HashMap<String, Option<Arc<Bound>>>,
    /// This batch dropped every statement (`DEALLOCATE ALL`, `DISCARD ALL`): a name
    /// not made again since is gone.
    pub(super) statements_gone: bool,
    /// This batch dropped every portal (`CLOSE ALL`, `DISCARD ALL`, a transaction's
    /// end).
    pub(super) portals_gone: bool,
}
