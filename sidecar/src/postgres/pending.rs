//! What the agent half hands the server half, in the order it forwarded (or refused)
//! messages: the server's answers are matched to these, one by one.

use std::collections::VecDeque;
use std::sync::Arc;

use agentgate_policy::masking::{MaskReport, MaskingProfile};
use agentgate_policy::{SqlRequest, SqlStatement};
use tokio::sync::oneshot;

use super::codec::Frame;
use super::registry::{Bound, Prepared};
use super::rows::Column;
use crate::pipeline::Record;

/// What the server half expects next, in the order the agent half forwarded (or
/// refused) messages.
#[derive(Debug)]
pub(super) enum Pending {
    /// A simple-protocol query: results up to `ReadyForQuery`.
    Query(Box<Execution>),
    /// `ParseComplete`: the statement is then the server's.
    Parse {
        name: String,
        prepared: Arc<Prepared>,
    },
    /// The sidecar's own `Describe` of a statement it saw parsed: swallowed, its row
    /// description kept for masking.
    DescribeStatement(Arc<Prepared>),
    /// `BindComplete`: the portal is then the server's.
    Bind { portal: String, bound: Arc<Bound> },
    /// The agent's `Describe`: up to `RowDescription` or `NoData`.
    Describe,
    /// A portal's rows, up to `CommandComplete`, `EmptyQueryResponse` or
    /// `PortalSuspended`.
    Execute(Box<Execution>),
    /// `CloseComplete`: the statement (`S`) or portal (`P`) is gone.
    Close { target: u8, name: String },
    /// `ReadyForQuery`, answering batch `batch`.
    Sync { batch: u64 },
    /// A refusal in place of the server's answer; with `ready`, a `ReadyForQuery` too
    /// (a refused simple query or function call).
    Refused { error: Frame, ready: bool },
}

/// One statement (or simple query string) on its way, for masking, limits and audit.
#[derive(Debug)]
pub(super) struct Execution {
    pub(super) record: Record,
    pub(super) masking: Arc<MaskingProfile>,
    pub(super) max_rows: Option<u64>,
    /// The portal, for extended-protocol executions (its rows count across Executes).
    pub(super) portal: Option<Arc<Bound>>,
    /// Told whether the result was replaced (cut off, refused) when it ends, so the
    /// agent half can hold back the rest of the batch until then.
    pub(super) done: Option<oneshot::Sender<bool>>,
    /// The cursors it declares, in order: each is registered when the server
    /// confirms it (`DECLARE CURSOR`).
    pub(super) declares: VecDeque<(String, SqlStatement)>,
    /// For a simple query: the batch its `ReadyForQuery` answers.
    pub(super) ends_batch: Option<u64>,
    /// The statements, as classified.
    pub(super) sql: Arc<SqlRequest>,
    /// The current result's columns.
    pub(super) columns: Vec<Column>,
    /// Whether `columns` has been worked out for the current result.
    pub(super) described: bool,
    pub(super) rows: u64,
    pub(super) report: MaskReport,
    pub(super) copy_in: bool,
    /// Set when the row limit cut the result: rows are dropped until the result ends.
    pub(super) cut_off: bool,
    /// A column-masked COPY TO: its data is dropped, the agent gets an error.
    pub(super) copy_refused: bool,
    /// A simple query whose result was replaced by an error: everything up to
    /// `ReadyForQuery` is dropped.
    pub(super) silenced: bool,
}

impl Execution {
    /// Ends the current result: its record (rows returned and `affected`) and masking
    /// report, and a clean slate for the next result of the same execution.
    pub(super) fn end_result(&mut self, affected: Option<u64>) -> (Record, MaskReport) {
        let mut record = self.record.clone();
        record.event.rows_returned = Some(self.rows);
        record.event.rows_affected = affected;
        self.rows = 0;
        self.columns.clear();
        self.described = false;
        self.copy_in = false;
        (record, std::mem::take(&mut self.report))
    }
}
