//! The CLI's side of the API: [`Client`], one method per endpoint, taking and giving the
//! request and response types of [`super`], so both ends of the contract are checked by the
//! compiler. Each call is one HTTP/1.1 exchange on a connection of its own to the daemon's
//! Unix socket.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, body::Bytes};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};

use super::{
    AddBackend, AppView, BackendView, CreateApp, Deploy, ErrorBody, FlowList, FlowQuery,
    RemoveBackend, Status, UpdateApp,
};

/// A failed API call. Each variant's message is one line; the causes follow as its sources.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket (no daemon, or another path).
    #[error(
        "cannot reach the gateway daemon at {path}: {source} (is `gateway daemon` running? the socket is set by --api-socket or GATEWAY_API_SOCKET)"
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The HTTP exchange failed after connecting (the daemon went away, or spoke no HTTP).
    #[error("talking to the gateway daemon failed")]
    Http {
        #[source]
        source: hyper::Error,
    },
    /// The daemon answered success with a body that is not the expected type.
    #[error("talking to the gateway daemon failed: bad answer")]
    Answer {
        #[source]
        source: serde_json::Error,
    },
    /// A request body could not be written as JSON.
    #[error("encoding the request body for {path}")]
    Body {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// A query could not be written as `application/x-www-form-urlencoded`.
    #[error("encoding the query string for {path}")]
    Query {
        path: String,
        #[source]
        source: serde_urlencoded::ser::Error,
    },
    /// The request itself could not be built (an invalid URI).
    #[error("building the request for {path}")]
    Request {
        path: String,
        #[source]
        source: hyper::http::Error,
    },
    /// The daemon refused: the HTTP status (4xx/5xx) and the message of its
    /// [`ErrorBody`] (or the status's reason when the body is not one).
    #[error("{message}")]
    Refused { status: u16, message: String },
}

/// The CLI's side of the API, talking to the daemon on its Unix socket.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon serving on `socket` (nothing is opened until a call).
    pub fn new(socket: &Path) -> Self {
        Client {
            socket: socket.to_owned(),
        }
    }

    /// The daemon's API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /v1/status`: the daemon, its attachments and every app.
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.call(Method::GET, "/v1/status").await
    }

    /// `GET /v1/apps`: every app.
    pub async fn apps(&self) -> Result<Vec<AppView>, ClientError> {
        self.call(Method::GET, "/v1/apps").await
    }

    /// `POST /v1/apps`: creates an app; the app as created (its port allocated).
    pub async fn create_app(&self, app: &CreateApp) -> Result<AppView, ClientError> {
        self.call_with(Method::POST, "/v1/apps", app).await
    }

    /// `GET /v1/cluster`: the cluster's live nodes (cluster mode only).
    pub async fn cluster(&self) -> Result<crate::api::ClusterView, ClientError> {
        self.call(Method::GET, "/v1/cluster").await
    }

    /// `GET /v1/apps/{name}`.
    pub async fn app(&self, name: &str) -> Result<AppView, ClientError> {
        self.call(Method::GET, &path::app(name)).await
    }

    /// `PATCH /v1/apps/{name}`: changes the app's settings; the app as changed.
    pub async fn update_app(&self, name: &str, update: &UpdateApp) -> Result<AppView, ClientError> {
        self.call_with(Method::PATCH, &path::app(name), update)
            .await
    }

    /// `DELETE /v1/apps/{name}`: the app as it was.
    pub async fn delete_app(&self, name: &str) -> Result<AppView, ClientError> {
        self.call(Method::DELETE, &path::app(name)).await
    }

    /// `GET /v1/apps/{app}/backends`.
    pub async fn backends(&self, app: &str) -> Result<Vec<BackendView>, ClientError> {
        self.call(Method::GET, &path::backends(app)).await
    }

    /// `POST /v1/apps/{app}/backends`: the backend as added (pending until healthy).
    pub async fn add_backend(
        &self,
        app: &str,
        backend: &AddBackend,
    ) -> Result<BackendView, ClientError> {
        self.call_with(Method::POST, &path::backends(app), backend)
            .await
    }

    /// `DELETE /v1/apps/{app}/backends/{address}?...`: the backend, draining with the
    /// connections it had, or (with `now`) removed with the connections ended.
    pub async fn remove_backend(
        &self,
        app: &str,
        address: &str,
        how: &RemoveBackend,
    ) -> Result<BackendView, ClientError> {
        self.call(Method::DELETE, &path::backend(app, address, how)?)
            .await
    }

    /// `POST /v1/apps/{app}/deploy`: answers once the app switched to the new backends
    /// (the replaced ones draining); [`ClientError::Refused`] with 504 when it aborted.
    pub async fn deploy(&self, app: &str, deploy: &Deploy) -> Result<AppView, ClientError> {
        self.call_with(Method::POST, &path::deploy(app), deploy)
            .await
    }

    /// `GET /v1/flows?...`: the live connections that match.
    pub async fn flows(&self, query: &FlowQuery) -> Result<FlowList, ClientError> {
        self.call(Method::GET, &path::flows(query)?).await
    }

    /// `POST /v1/down`: asks the daemon to detach the datapath and exit (it answers at once,
    /// then goes; it removes its socket last).
    pub async fn down(&self) -> Result<(), ClientError> {
        self.exchange(Method::POST, "/v1/down", Bytes::new())
            .await
            .map(drop)
    }

    /// A request without a body; the answer parsed as `T`.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
    ) -> Result<T, ClientError> {
        parse(&self.exchange(method, path, Bytes::new()).await?)
    }

    /// A request with `body` as JSON; the answer parsed as `T`.
    async fn call_with<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|source| ClientError::Body {
            path: path.to_owned(),
            source,
        })?;
        parse(&self.exchange(method, path, Bytes::from(body)).await?)
    }

    /// One request on a connection of its own; the answer's body when its status is a
    /// success, else [`ClientError::Refused`].
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Bytes, ClientError> {
        let http = |source| ClientError::Http { source };
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                path: self.socket.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let conn = tokio::spawn(conn);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "gateway")
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|source| ClientError::Request {
                path: path.to_owned(),
                source,
            })?;
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(http)?
            .to_bytes();
        drop(sender);
        let _ = conn.await;
        if status.is_success() {
            return Ok(bytes);
        }
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| {
                format!(
                    "{} {}",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or("error")
                )
            });
        Err(ClientError::Refused {
            status: status.as_u16(),
            message,
        })
    }
}

/// An answer's body as `T`.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|source| ClientError::Answer { source })
}

/// The paths (and query strings) of the API's resources, names percent-encoded.
mod path {
    use serde::Serialize;

    use super::ClientError;
    use crate::api::{FlowQuery, RemoveBackend};

    /// `/v1/apps/{name}`.
    pub fn app(name: &str) -> String {
        format!("/v1/apps/{}", segment(name))
    }

    /// `/v1/apps/{app}/backends`.
    pub fn backends(app: &str) -> String {
        format!("/v1/apps/{}/backends", segment(app))
    }

    /// `/v1/apps/{app}/backends/{address}?{how}`.
    pub fn backend(app: &str, address: &str, how: &RemoveBackend) -> Result<String, ClientError> {
        let path = format!("/v1/apps/{}/backends/{}", segment(app), segment(address));
        with_query(path, how)
    }

    /// `/v1/apps/{app}/deploy`.
    pub fn deploy(app: &str) -> String {
        format!("/v1/apps/{}/deploy", segment(app))
    }

    /// `/v1/flows?{query}`.
    pub fn flows(query: &FlowQuery) -> Result<String, ClientError> {
        with_query("/v1/flows".to_owned(), query)
    }

    /// `path?query`, the query's fields form-encoded (`None` ones left out); `path` alone when
    /// none is left.
    fn with_query(path: String, query: &impl Serialize) -> Result<String, ClientError> {
        match serde_urlencoded::to_string(query) {
            Ok(q) if q.is_empty() => Ok(path),
            Ok(q) => Ok(format!("{path}?{q}")),
            Err(source) => Err(ClientError::Query { path, source }),
        }
    }

    /// Percent-encodes one path segment (app names and addresses need none today; this keeps
    /// an odd input from changing the path).
    fn segment(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::path;
    use crate::api::{AddBackend, CreateApp, Deploy, FlowQuery, RemoveBackend, UpdateApp};
    use crate::state::{ClientAddress, HealthOverrides, RateLimit};

    #[test]
    fn paths_percent_encode_names_and_keep_addresses() {
        assert_eq!(path::app("web"), "/v1/apps/web");
        assert_eq!(path::app("a b/c?d"), "/v1/apps/a%20b%2Fc%3Fd");
        assert_eq!(path::backends("é"), "/v1/apps/%C3%A9/backends");
        assert_eq!(path::deploy("web"), "/v1/apps/web/deploy");
    }

    #[test]
    fn remove_backend_query() {
        let at = |how: &RemoveBackend| path::backend("web", "10.0.0.2:8080", how).unwrap();
        assert_eq!(
            at(&RemoveBackend::default()),
            "/v1/apps/web/backends/10.0.0.2:8080"
        );
        let now = RemoveBackend {
            now: true,
            drain_timeout_ms: None,
        };
        assert_eq!(at(&now), "/v1/apps/web/backends/10.0.0.2:8080?now=true");
        let drain = RemoveBackend {
            now: false,
            drain_timeout_ms: Some(1500),
        };
        assert_eq!(
            at(&drain),
            "/v1/apps/web/backends/10.0.0.2:8080?drain_timeout_ms=1500"
        );
    }

    #[test]
    fn flows_query() {
        assert_eq!(path::flows(&FlowQuery::default()).unwrap(), "/v1/flows");
        let all = FlowQuery {
            app: Some("my app&x".to_owned()),
            backend: Some("10.0.0.2:8080".to_owned()),
            limit: Some(5),
        };
        let p = path::flows(&all).unwrap();
        assert_eq!(
            p,
            "/v1/flows?app=my+app%26x&backend=10.0.0.2%3A8080&limit=5"
        );
        // What the daemon's `Query<FlowQuery>` reads back.
        let back: FlowQuery = serde_urlencoded::from_str(p.split_once('?').unwrap().1).unwrap();
        assert_eq!(
            (back.app, back.backend, back.limit),
            (all.app, all.backend, all.limit)
        );
    }

    /// The bodies the client sends are read back by the daemon's types (`deny_unknown_fields`),
    /// and so are the hand-written ones the CLI sent before (`null` for an absent option).
    #[test]
    fn request_bodies_round_trip() {
        let create = CreateApp {
            name: "web".to_owned(),
            port: None,
            health: HealthOverrides {
                rise: Some(3),
                ..HealthOverrides::default()
            },
            mss_clamp: None,
            client_address: None,
            rate_limit: None,
            plan: None,
            nodes: None,
        };
        let json = serde_json::to_value(&create).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"name": "web", "port": null, "health": {"rise": 3}})
        );
        let back: CreateApp = serde_json::from_value(json).unwrap();
        assert_eq!(
            (back.name, back.port, back.health),
            ("web".to_owned(), None, create.health)
        );
        let before = serde_json::json!({"name": "web", "port": null, "health":
            {"interval_ms": null, "timeout_ms": null, "rise": 3, "fall": null}});
        let back: CreateApp = serde_json::from_value(before).unwrap();
        assert_eq!(back.health, create.health);

        let limited = CreateApp {
            rate_limit: Some(RateLimit {
                pps: 1000,
                burst: 200,
            }),
            ..create.clone()
        };
        let json = serde_json::to_value(&limited).unwrap();
        assert_eq!(
            json["rate_limit"],
            serde_json::json!({"pps": 1000, "burst": 200})
        );
        assert!(json.get("plan").is_none(), "{json}");
        let back: CreateApp = serde_json::from_value(json).unwrap();
        assert_eq!(back.rate_limit, limited.rate_limit);
        let planned: CreateApp =
            serde_json::from_value(serde_json::json!({"name": "web", "plan": "small"})).unwrap();
        assert_eq!(
            (planned.rate_limit, planned.plan.as_deref()),
            (None, Some("small"))
        );
        assert!(
            serde_json::from_value::<CreateApp>(
                serde_json::json!({"name": "web", "rate_limit": "1000pps"})
            )
            .is_err()
        );
        let patch = |v| serde_json::from_value::<UpdateApp>(v).unwrap();
        assert_eq!(
            patch(serde_json::json!({"rate_limit": null})),
            UpdateApp {
                rate_limit: Some(None),
                ..Default::default()
            }
        );
        assert_eq!(
            patch(serde_json::json!({"rate_limit": {"pps": 7, "burst": 1}})),
            UpdateApp {
                rate_limit: Some(Some(RateLimit { pps: 7, burst: 1 })),
                ..Default::default()
            }
        );
        assert_eq!(
            patch(serde_json::json!({"plan": "small"})),
            UpdateApp {
                plan: Some("small".to_owned()),
                ..Default::default()
            }
        );
        assert_eq!(
            serde_json::to_value(UpdateApp {
                rate_limit: Some(None),
                ..Default::default()
            })
            .unwrap(),
            serde_json::json!({"rate_limit": null})
        );

        let clamped = CreateApp {
            mss_clamp: Some(1360),
            ..create.clone()
        };
        let json = serde_json::to_value(&clamped).unwrap();
        assert_eq!(json["mss_clamp"], 1360);
        let back: CreateApp = serde_json::from_value(json).unwrap();
        assert_eq!(back.mss_clamp, Some(1360));

        let told = CreateApp {
            client_address: Some(ClientAddress::Toa),
            ..create.clone()
        };
        let json = serde_json::to_value(&told).unwrap();
        assert_eq!(json["client_address"], "toa");
        let back: CreateApp = serde_json::from_value(json).unwrap();
        assert_eq!(back.client_address, Some(ClientAddress::Toa));
        let none: CreateApp =
            serde_json::from_value(serde_json::json!({"name": "web", "client_address": "none"}))
                .unwrap();
        assert_eq!(none.client_address, Some(ClientAddress::None));
        let null: CreateApp =
            serde_json::from_value(serde_json::json!({"name": "web", "client_address": null}))
                .unwrap();
        assert_eq!(null.client_address, None);
        let err = serde_json::from_value::<CreateApp>(
            serde_json::json!({"name": "web", "client_address": "foo"}),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("client address must be toa or none, not \"foo\""),
            "{err}"
        );

        let deploy = Deploy {
            backends: vec!["10.0.0.2:8080".to_owned()],
            weight: None,
            quorum: Some(1),
            timeout_ms: None,
            drain_timeout_ms: Some(2000),
        };
        let back: Deploy = serde_json::from_slice(&serde_json::to_vec(&deploy).unwrap()).unwrap();
        assert_eq!(
            (
                back.backends,
                back.weight,
                back.quorum,
                back.timeout_ms,
                back.drain_timeout_ms
            ),
            (deploy.backends, None, Some(1), None, Some(2000))
        );

        let add = AddBackend {
            address: "10.0.0.2:8080".to_owned(),
            weight: None,
        };
        let back: AddBackend = serde_json::from_slice(&serde_json::to_vec(&add).unwrap()).unwrap();
        assert_eq!((back.address, back.weight), (add.address, None));
    }

    /// `PATCH /v1/apps/{name}` as a JSON merge patch: an absent field is left as it is, `null`
    /// removes the setting, a value sets it; the client writes each so.
    #[test]
    fn app_updates_tell_absent_from_null() {
        let cases = [
            (UpdateApp::default(), serde_json::json!({})),
            (
                UpdateApp {
                    mss_clamp: Some(None),
                    ..UpdateApp::default()
                },
                serde_json::json!({"mss_clamp": null}),
            ),
            (
                UpdateApp {
                    mss_clamp: Some(Some(1360)),
                    ..UpdateApp::default()
                },
                serde_json::json!({"mss_clamp": 1360}),
            ),
            (
                UpdateApp {
                    client_address: Some(Some(ClientAddress::Toa)),
                    ..UpdateApp::default()
                },
                serde_json::json!({"client_address": "toa"}),
            ),
            (
                UpdateApp {
                    client_address: Some(Some(ClientAddress::None)),
                    ..UpdateApp::default()
                },
                serde_json::json!({"client_address": "none"}),
            ),
            (
                UpdateApp {
                    client_address: Some(None),
                    ..UpdateApp::default()
                },
                serde_json::json!({"client_address": null}),
            ),
            (
                UpdateApp {
                    mss_clamp: Some(Some(1360)),
                    client_address: Some(Some(ClientAddress::Toa)),
                    ..Default::default()
                },
                serde_json::json!({"mss_clamp": 1360, "client_address": "toa"}),
            ),
        ];
        for (update, json) in cases {
            assert_eq!(serde_json::to_value(&update).unwrap(), json);
            assert_eq!(serde_json::from_value::<UpdateApp>(json).unwrap(), update);
        }
        assert!(serde_json::from_value::<UpdateApp>(serde_json::json!({"mss": 1360})).is_err());
        let err = serde_json::from_value::<UpdateApp>(serde_json::json!({"client_address": "TOA"}))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("client address must be toa or none"),
            "{err}"
        );
    }
}
