//! `gateway backend add|remove|list`: an app's backends (containers), added one at a time or
//! drained out.

use super::{
    CliError,
    args::BackendCommand,
    print::{self, BackendsTable},
};
use crate::{
    api::{AddBackend, Client, RemoveBackend},
    config::Dur,
};

pub(super) async fn run(client: &Client, command: BackendCommand) -> Result<(), CliError> {
    match command {
        BackendCommand::Add {
            app,
            address,
            weight,
        } => {
            let b = client
                .add_backend(&app, &AddBackend { address, weight })
                .await?;
            println!(
                "added backend {} (weight {}) to app {app}",
                b.address, b.weight
            );
        }
        BackendCommand::Remove {
            app,
            address,
            now,
            drain_timeout,
        } => {
            let how = RemoveBackend {
                now,
                drain_timeout_ms: drain_timeout.map(Dur::ms),
            };
            let b = client.remove_backend(&app, &address, &how).await?;
            if now {
                println!(
                    "removed backend {} from app {app}; its {} connections were ended",
                    b.address, b.connections
                );
            } else {
                println!(
                    "backend {} of app {app} is draining: no new connections; its open ones go on \
                     ({} as of the last conntrack scan)",
                    b.address, b.connections
                );
            }
        }
        BackendCommand::List { app, json } => {
            let backends = client.backends(&app).await?;
            if json {
                print::json(&backends)?;
            } else {
                print!("{}", BackendsTable::now(&backends, ""));
            }
        }
    }
    Ok(())
}
