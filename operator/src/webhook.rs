//! The admission webhook server: `POST /mutate/pods` injects the sidecar (the pure
//! [`inject`](crate::inject::inject) does the work); `POST /mutate/approvals` stamps who
//! decided an `Approval` and `POST /validate/approvals` enforces separation of duties
//! (the pure [`approvals`](crate::approvals)). Every replica serves them.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use agentgate_crds::{Approval, BUNDLE_KEY, Bundle};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::net::TcpListener;

use crate::approvals;
use crate::inject::{BUNDLE_CONFIGMAP, InjectConfig, Injection, inject};
use crate::metrics::Metrics;

/// The API server sends at most this much (a Pod is far smaller).
const MAX_REVIEW_BYTES: usize = 3 << 20;

/// What the webhook handlers need.
pub struct WebhookState {
    /// The rendered bundles of every namespace, from a watch.
    pub bundles: Store<ConfigMap>,
    /// How to inject.
    pub inject: InjectConfig,
    /// Metrics.
    pub metrics: Metrics,
    /// How a decider is compared with the requester.
    pub identity: approvals::IdentityModel,
}

impl std::fmt::Debug for WebhookState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookState")
            .field("inject", &self.inject)
            .finish_non_exhaustive()
    }
}

/// Serves the webhooks over TLS until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    state: Arc<WebhookState>,
) {
    loop {
        let stream = agentgate_process::accept(&listener, "webhook").await;
        let (tls, state) = (tls.clone(), state.clone());
        tokio::spawn(async move {
            let Ok(stream) = tls.accept(stream).await else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn route(state: &WebhookState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let (kind, response, outcome) = match (&method, path.as_str()) {
        (&http::Method::POST, "/mutate/pods") => match read_review::<Pod>(req).await {
            Ok(request) => {
                let (response, outcome) = mutate_pod(state, &request);
                ("pods", response, outcome)
            }
            Err(refused) => return refused,
        },
        (&http::Method::POST, path @ ("/mutate/approvals" | "/validate/approvals")) => {
            match read_review::<Approval>(req).await {
                Ok(request) => {
                    let (response, outcome) = if path == "/mutate/approvals" {
                        mutate_approval(&request)
                    } else {
                        validate_approval(state, &request)
                    };
                    ("approvals", response, outcome)
                }
                Err(refused) => return refused,
            }
        }
        _ => {
            return respond(
                StatusCode::NOT_FOUND,
                "not found: the webhook serves POST /mutate/pods, /mutate/approvals and /validate/approvals".into(),
            );
        }
    };
    state
        .metrics
        .admissions
        .with_label_values(&[kind, outcome])
        .inc();
    state
        .metrics
        .admission_seconds
        .with_label_values(&[kind])
        .observe(started.elapsed().as_secs_f64());
    respond(
        StatusCode::OK,
        serde_json::to_string(&response.into_review()).unwrap_or_default(),
    )
}

/// Reads an `AdmissionReview` of a `T`, or the error response to send instead.
async fn read_review<T>(
    req: Request<Incoming>,
) -> Result<AdmissionRequest<T>, Response<Full<Bytes>>>
where
    T: kube::Resource + serde::de::DeserializeOwned,
{
    let body = match Limited::new(req.into_body(), MAX_REVIEW_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Err(respond(
                StatusCode::BAD_REQUEST,
                format!("cannot read the AdmissionReview: {e}"),
            ));
        }
    };
    let review: AdmissionReview<T> = serde_json::from_slice(&body).map_err(|e| {
        respond(
            StatusCode::BAD_REQUEST,
            format!(
                "not an AdmissionReview of a {}: {e}",
                std::any::type_name::<T>()
            ),
        )
    })?;
    review.try_into().map_err(|e| {
        respond(
            StatusCode::BAD_REQUEST,
            format!("the AdmissionReview has no request: {e}"),
        )
    })
}

/// Stamps `spec.decidedBy` and `spec.decidedByGroups` with the deciding user's.
fn mutate_approval(request: &AdmissionRequest<Approval>) -> (AdmissionResponse, &'static str) {
    let response = AdmissionResponse::from(request);
    let Some(new) = &request.object else {
        return (response, "skipped");
    };
    let decider = approvals::Decider::of(request);
    match approvals::stamp(new, request.old_object.as_ref(), &decider) {
        None => (response, "skipped"),
        Some(patch) => match response.with_patch(patch) {
            Ok(response) => (response, "stamped"),
            Err(e) => (
                AdmissionResponse::from(request)
                    .deny(format!("agentgate: cannot encode the decidedBy patch: {e}")),
                "error",
            ),
        },
    }
}

/// Refuses decisions that break separation of duties.
fn validate_approval(
    state: &WebhookState,
    request: &AdmissionRequest<Approval>,
) -> (AdmissionResponse, &'static str) {
    let response = AdmissionResponse::from(request);
    let Some(new) = &request.object else {
        return (response, "skipped");
    };
    let decider = approvals::Decider::of(request);
    let old = request.old_object.as_ref();
    match approvals::check(new, old, &decider, &state.identity, Timestamp::now()) {
        Ok(()) => (response, "allowed"),
        Err(reason) => {
            tracing::info!(approval = ?new.metadata.name, user = %decider.username, %reason, "approval decision refused");
            (response.deny(format!("agentgate: {reason}")), "denied")
        }
    }
}

/// Decides one pod. An opted-in pod that cannot be injected is refused: it must not run
/// without its gate.
fn mutate_pod(
    state: &WebhookState,
    request: &AdmissionRequest<Pod>,
) -> (AdmissionResponse, &'static str) {
    let response = AdmissionResponse::from(request);
    let Some(pod) = &request.object else {
        return (response, "skipped");
    };
    let namespace = request.namespace.clone().unwrap_or_default();
    let bundle = state
        .bundles
        .get(&ObjectRef::new(BUNDLE_CONFIGMAP).within(&namespace))
        .and_then(|cm| cm.data.as_ref()?.get(BUNDLE_KEY).cloned())
        .and_then(|text| serde_json::from_str::<Bundle>(&text).ok());
    let name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.clone())
        .unwrap_or_default();
    match inject(pod, bundle.as_ref(), &state.inject) {
        Ok(Injection::Skip { reason }) => {
            tracing::debug!(namespace, pod = name, reason, "not injected");
            (response, "skipped")
        }
        Ok(Injection::Patch {
            patch,
            warnings,
            connections,
        }) => match response.with_patch(patch) {
            Ok(mut response) => {
                tracing::info!(
                    namespace,
                    pod = name,
                    ?connections,
                    ?warnings,
                    "sidecar injected"
                );
                let mut notes = vec![format!(
                    "agentgate: sidecar injected for connections [{}]",
                    connections.join(", ")
                )];
                notes.extend(warnings.into_iter().map(|w| format!("agentgate: {w}")));
                response.warnings = Some(notes);
                (response, "injected")
            }
            Err(e) => (
                AdmissionResponse::from(request)
                    .deny(format!("agentgate: cannot encode the injection patch: {e}")),
                "error",
            ),
        },
        Err(e) => (
            AdmissionResponse::from(request).deny(format!("agentgate: {e}")),
            "error",
        ),
    }
}

fn respond(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}
