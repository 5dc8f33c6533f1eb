//! The PostgreSQL front end: one listener per postgres Connection. The agent speaks the
//! v3 protocol to the sidecar as if it were the server, with the launching user's token
//! as its password; the sidecar logs in to the real server with the Connection's
//! credentials, decides every statement through the shared pipeline, masks every row,
//! and keeps both sides in step (see `docs/postgres.md`).
//!
//! Where things live: `session` (startup, identity, the upstream login), `agent_half`
//! (the agent's messages, each statement decided), `server_half` (the server's answers,
//! matched to what was forwarded, masked and recorded), `pending` (what the server half
//! expects next), `registry` (the statements, portals and cursors the server holds),
//! `catalog` (the sidecar's own look-ups), `rows` (masking a row), `codec` and
//! `upstream` (the wire and the server).

mod agent_half;
mod catalog;
pub mod codec;
mod pending;
mod registry;
mod rows;
mod server_half;
mod session;
pub mod upstream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use agentgate_crds::Protocol;
use bytes::Bytes;
use tokio::net::TcpListener;

use crate::pipeline::Gateway;
use crate::refusal::Refusal;
use catalog::Catalogs;
use codec::{Frame, error_response};
pub use upstream::PgUpstream;

/// The Postgres front end's state: the shared pipeline, and what its sessions share.
#[derive(Debug)]
pub struct Front {
    gateway: Arc<Gateway>,
    /// The cancel key handed to each agent session → where its query really runs.
    cancels: Mutex<HashMap<(i32, Bytes), CancelTarget>>,
    /// Each Connection's catalog.
    catalogs: Catalogs,
}

#[derive(Debug, Clone)]
struct CancelTarget {
    upstream: Arc<PgUpstream>,
    pid: i32,
    key: Bytes,
}

/// Serves one postgres Connection's listener until the task is dropped.
pub async fn serve(listener: TcpListener, connection: String, front: Arc<Front>) {
    let connection: Arc<str> = connection.into();
    loop {
        let stream = agentgate_process::accept(&listener, &connection).await;
        let _ = stream.set_nodelay(true);
        tokio::spawn(session::run(front.clone(), connection.clone(), stream));
    }
}

/// The `ErrorResponse` an agent gets for a refusal, wherever in the protocol it stands.
pub(crate) fn refusal_frame(refusal: &Refusal) -> Frame {
    error_response(
        refusal.sqlstate(),
        &refusal.message(),
        Some(refusal.next_step(Protocol::Postgres)),
    )
}

impl Front {
    /// The front end of `gateway`; the sidecar's own catalog look-ups are bounded by
    /// `catalog_timeout`.
    pub fn new(gateway: Arc<Gateway>, catalog_timeout: std::time::Duration) -> Self {
        Self {
            gateway,
            cancels: Mutex::new(HashMap::new()),
            catalogs: Catalogs::new(catalog_timeout),
        }
    }

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
}
