//! Classification: from a protocol's raw request to [`RequestAttrs`](crate::RequestAttrs)
//! facts. Anything that cannot be classified with certainty is an error, which the
//! callers turn into a denial.

mod http;
mod kubernetes;
mod sql;

pub use http::{classify_http, normalize_host, normalize_path};
pub use kubernetes::classify_kubernetes;
pub use sql::{SqlContext, classify_sql, classify_sql_in, is_safe, merge_statements};

/// Why a request could not be classified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    /// The path is malformed, or is not in canonical form (dot segments, empty segments,
    /// encoded slashes, double encoding), so what the upstream would serve is uncertain.
    #[error("request path {path:?} is not canonical: {why}")]
    NonCanonicalPath {
        /// The raw path.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A Kubernetes path with a special verb but nothing after it.
    #[error("kubernetes request path {0:?} is incomplete")]
    IncompleteKubernetesPath(String),
    /// A Kubernetes query string the API server could read differently from the
    /// classifier (repeated parameters that change the request, pairs it would drop).
    #[error("kubernetes request query {query:?} is ambiguous: {why}")]
    AmbiguousQuery {
        /// The raw query.
        query: String,
        /// What is wrong with it.
        why: &'static str,
    },
}
