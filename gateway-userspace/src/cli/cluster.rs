//! `gateway cluster status|import`: the cluster of nodes sharing apps through etcd.

use std::path::PathBuf;

use super::{CliError, args::ClusterCommand, print};
use crate::{
    api::Client,
    cluster::Store,
    config::{self, parse_cluster},
    daemon::cluster_intent_of,
    state::State,
};

pub(super) async fn run(client: &Client, command: ClusterCommand) -> Result<(), CliError> {
    match command {
        ClusterCommand::Status { json } => {
            let view = client.cluster().await?;
            if json {
                print::json(&view)?;
                return Ok(());
            }
            println!(
                "node {} (etcd {}, revision {} applied)",
                view.node, view.endpoints, view.applied_revision
            );
            println!("{:16}  {:10}  {:>10}  APPS", "NODE", "VERSION", "UP");
            let now = crate::daemon::now_ms();
            for n in &view.nodes {
                let up = humantime::format_duration(std::time::Duration::from_secs(
                    now.saturating_sub(n.started_ms) / 1000,
                ));
                let apps = if n.apps.is_empty() {
                    "-".to_owned()
                } else {
                    n.apps.join(",")
                };
                println!(
                    "{:16}  {:10}  {:>10}  {apps}",
                    n.node,
                    n.version,
                    up.to_string()
                );
            }
        }
        ClusterCommand::Import {
            cluster,
            cluster_prefix,
            state,
        } => {
            let path = state
                .unwrap_or_else(|| PathBuf::from(config::DEFAULT_STATE_DIR).join("state.json"));
            let text = std::fs::read_to_string(&path).map_err(|e| CliError::StateFile {
                path: path.clone(),
                cause: e.to_string(),
            })?;
            let state: State = serde_json::from_str(&text).map_err(|e| CliError::StateFile {
                path: path.clone(),
                cause: e.to_string(),
            })?;
            let endpoints = parse_cluster(&cluster)?;
            let store = Store::connect(
                &endpoints,
                &cluster_prefix,
                crate::daemon::CLUSTER_STORE_TIMEOUT,
            )
            .await?;
            let total = state.apps.len();
            let mut reasons = Vec::new();
            for (name, app) in &state.apps {
                let intent = cluster_intent_of(app);
                // Those imported: not the draining ones, nor those a deploy holds.
                let backends = intent["backends"].as_array().map_or(0, Vec::len);
                match store.create_app(name, intent, [app.port]).await {
                    Ok(port) => {
                        println!("imported app {name} on port {port} ({backends} backends)")
                    }
                    Err(e) if e.is_unavailable() => return Err(e.into()),
                    Err(e) => reasons.push(format!("{name}: {e}")),
                }
            }
            if !reasons.is_empty() {
                return Err(CliError::Import {
                    refused: reasons.len(),
                    total,
                    reasons: reasons.join("; "),
                });
            }
        }
    }
    Ok(())
}
