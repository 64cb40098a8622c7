//! `gateway deploy APP IP:PORT... [--wait]`: rotation. The daemon answers once the app has
//! switched to the new backends (the replaced ones draining); with `--wait` this then waits
//! until the replaced backends are gone, so they can be stopped.

use std::time::{Duration, Instant};

use super::{CliError, args::DeployArgs};
use crate::{
    api::{Client, Deploy},
    config::Dur,
    daemon::now_ms,
    state::BackendState,
};

/// How often `--wait` asks whether the replaced backends are gone.
const WAIT_POLL: Duration = Duration::from_millis(100);
/// How long `--wait` waits past the daemon's drain deadline before giving up (the daemon ends
/// a drain at its deadline, on its next tick).
const WAIT_SLACK: Duration = Duration::from_secs(10);

pub(super) async fn run(client: &Client, args: DeployArgs) -> Result<(), CliError> {
    let DeployArgs {
        app,
        backends,
        weight,
        quorum,
        timeout,
        drain_timeout,
        wait,
    } = args;
    let deploy = Deploy {
        backends,
        weight,
        quorum,
        timeout_ms: timeout.map(Dur::ms),
        drain_timeout_ms: drain_timeout.map(Dur::ms),
    };
    let view = client.deploy(&app, &deploy).await?;
    let old: Vec<String> = view
        .backends
        .iter()
        .filter(|b| b.state == BackendState::Draining)
        .map(|b| b.address.clone())
        .collect();
    println!(
        "app {app} switched to {}; draining: {}",
        deploy.backends.join(" "),
        if old.is_empty() {
            "none".to_owned()
        } else {
            old.join(" ")
        }
    );
    if !wait || old.is_empty() {
        return Ok(());
    }
    let until = view.backends.iter().filter_map(|b| b.drain_until_ms).max();
    let limit = until.unwrap_or(0).saturating_sub(now_ms());
    let deadline = Instant::now() + Duration::from_millis(limit) + WAIT_SLACK;
    loop {
        let view = client.app(&app).await?;
        if !view.backends.iter().any(|b| old.contains(&b.address)) {
            break;
        }
        if Instant::now() >= deadline {
            return Err(CliError::DrainTimeout { app });
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
    println!("the replaced backends are gone: they can be stopped");
    Ok(())
}
