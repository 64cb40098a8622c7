//! The daemon's HTTP side, and the only place that knows HTTP: the routes of `/v1` (see the
//! table in [`crate::api`]) and `GET /metrics`, each a thin call of a [`Daemon`] method, and
//! [`DaemonError`] mapped to a status with a `{"error": "..."}` body. Also the API's Unix
//! socket: root-only, refused when another daemon answers on it, removed on exit.

use std::path::{Path, PathBuf};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path as UrlPath, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use serde::de::DeserializeOwned;
use tracing::warn;

use super::{
    AddBackend, AppView, BackendView, CreateApp, Deploy, ErrorBody, FlowList, FlowQuery,
    RemoveBackend, Status, UpdateApp,
};
use crate::{
    daemon::{Daemon, DaemonError},
    metrics,
    state::ErrorKind,
};

/// The status a refusal of `kind` goes with; `None` (a failure of the daemon itself) is 500.
fn status_of(kind: Option<ErrorKind>) -> StatusCode {
    match kind {
        Some(ErrorKind::Invalid) => StatusCode::BAD_REQUEST,
        Some(ErrorKind::NotFound) => StatusCode::NOT_FOUND,
        Some(ErrorKind::Conflict | ErrorKind::Exhausted) => StatusCode::CONFLICT,
        Some(ErrorKind::Timeout) => StatusCode::GATEWAY_TIMEOUT,
        Some(ErrorKind::Unavailable) => StatusCode::SERVICE_UNAVAILABLE,
        None => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A refused or failed API call: its status and one line.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl From<DaemonError> for ApiError {
    fn from(e: DaemonError) -> Self {
        ApiError {
            status: status_of(e.kind()),
            message: e.chain(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

/// A request body parsed as `T`, or a 400 naming what is wrong with it.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!("bad request body: {e}"),
    })
}

type Answer<T> = Result<Json<T>, ApiError>;

async fn get_status(State(d): State<Daemon>) -> Answer<Status> {
    Ok(Json(d.status().await?))
}

async fn list_apps(State(d): State<Daemon>) -> Answer<Vec<AppView>> {
    Ok(Json(d.apps().await?))
}

async fn create_app(
    State(d): State<Daemon>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<AppView>), ApiError> {
    let req: CreateApp = body(&bytes)?;
    Ok((StatusCode::CREATED, Json(d.create_app(req).await?)))
}

async fn show_app(State(d): State<Daemon>, UrlPath(name): UrlPath<String>) -> Answer<AppView> {
    Ok(Json(d.app(name).await?))
}

async fn update_app(
    State(d): State<Daemon>,
    UrlPath(name): UrlPath<String>,
    bytes: Bytes,
) -> Answer<AppView> {
    let req: UpdateApp = body(&bytes)?;
    Ok(Json(d.update_app(name, req).await?))
}

async fn delete_app(State(d): State<Daemon>, UrlPath(name): UrlPath<String>) -> Answer<AppView> {
    Ok(Json(d.delete_app(name).await?))
}

async fn list_backends(
    State(d): State<Daemon>,
    UrlPath(name): UrlPath<String>,
) -> Answer<Vec<BackendView>> {
    Ok(Json(d.backends(name).await?))
}

async fn add_backend(
    State(d): State<Daemon>,
    UrlPath(name): UrlPath<String>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<BackendView>), ApiError> {
    let req: AddBackend = body(&bytes)?;
    Ok((StatusCode::CREATED, Json(d.add_backend(name, req).await?)))
}

async fn remove_backend(
    State(d): State<Daemon>,
    UrlPath((name, address)): UrlPath<(String, String)>,
    Query(q): Query<RemoveBackend>,
) -> Answer<BackendView> {
    Ok(Json(d.remove_backend(name, address, q).await?))
}

/// Answers once switched, or with 504 once the deploy timed out and was rolled back.
async fn deploy(
    State(d): State<Daemon>,
    UrlPath(name): UrlPath<String>,
    bytes: Bytes,
) -> Answer<AppView> {
    let req: Deploy = body(&bytes)?;
    Ok(Json(d.deploy(name, req).await?))
}

async fn get_cluster(State(d): State<Daemon>) -> Answer<super::ClusterView> {
    Ok(Json(d.cluster_view().await?))
}

async fn list_flows(State(d): State<Daemon>, Query(q): Query<FlowQuery>) -> Answer<FlowList> {
    Ok(Json(d.flows(q).await?))
}

async fn down(State(d): State<Daemon>) -> StatusCode {
    d.down();
    StatusCode::ACCEPTED
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such API path (this daemon serves /v1/...)".to_owned(),
    }
}

fn router(daemon: Daemon) -> Router {
    Router::new()
        .route("/v1/status", get(get_status))
        .route("/v1/apps", get(list_apps).post(create_app))
        .route(
            "/v1/apps/{name}",
            get(show_app).patch(update_app).delete(delete_app),
        )
        .route(
            "/v1/apps/{name}/backends",
            get(list_backends).post(add_backend),
        )
        .route("/v1/apps/{name}/backends/{addr}", delete(remove_backend))
        .route("/v1/apps/{name}/deploy", post(deploy))
        .route("/v1/flows", get(list_flows))
        .route("/v1/cluster", get(get_cluster))
        .route("/v1/down", post(down))
        .fallback(not_found)
        .with_state(daemon)
}

/// `GET /metrics`: OpenMetrics when the scraper asks for it (Prometheus does), the
/// Prometheus text format 0.0.4 otherwise.
async fn get_metrics(State(d): State<Daemon>, headers: HeaderMap) -> Result<Response, ApiError> {
    use axum::http::header::{ACCEPT, CONTENT_TYPE};
    let text = d.metrics().await?;
    let accept = headers.get(ACCEPT).and_then(|v| v.to_str().ok());
    Ok(if metrics::wants_openmetrics(accept) {
        ([(CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
    } else {
        let text = metrics::to_prometheus_text(&text);
        ([(CONTENT_TYPE, metrics::CONTENT_TYPE_TEXT)], text).into_response()
    })
}

/// Serves `GET /metrics` on `listener` until aborted.
pub async fn serve_metrics(listener: tokio::net::TcpListener, daemon: Daemon) {
    let router = Router::new()
        .route("/metrics", get(get_metrics))
        .with_state(daemon);
    if let Err(e) = axum::serve(listener, router).await {
        warn!(error = %e, "the metrics endpoint stopped");
    }
}

/// Refuses `path` if a live daemon answers on it.
pub fn refuse_live_socket(path: &Path) -> Result<(), DaemonError> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(DaemonError::SocketInUse {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// The API socket's file, removed when this goes (the daemon's last step, which `gateway down`
/// waits for).
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the API socket `path`, root-only (0600): the listener, and the guard of its file. A
/// socket left by a dead daemon is replaced; one a live daemon answers on is not.
pub fn bind(path: &Path) -> Result<(tokio::net::UnixListener, SocketFile), DaemonError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(DaemonError::io("creating", dir))?;
    }
    refuse_live_socket(path)?;
    if path.exists() {
        std::fs::remove_file(path).map_err(DaemonError::io("removing", path))?;
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = tokio::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(DaemonError::io("binding the API socket", path))?;
    Ok((listener, SocketFile(path.to_owned())))
}

/// Serves the API on `listener` until the daemon is asked to exit (requests in flight are
/// finished first).
pub async fn serve(listener: tokio::net::UnixListener, daemon: Daemon) -> Result<(), DaemonError> {
    let exiting = {
        let d = daemon.clone();
        async move { d.exiting().await }
    };
    axum::serve(listener, router(daemon))
        .with_graceful_shutdown(exiting)
        .await
        .map_err(DaemonError::Serve)
}
