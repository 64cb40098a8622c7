//! `gateway app create|list|show|delete`: apps, each a public endpoint `tcp://HOST:PORT`.

use super::{
    CliError,
    args::AppCommand,
    print::{self, AppsTable, BackendsTable},
};
use crate::{
    api::{Client, CreateApp},
    config::Dur,
    state::HealthOverrides,
};

pub(super) async fn run(client: &Client, command: AppCommand) -> Result<(), CliError> {
    match command {
        AppCommand::Create {
            name,
            port,
            check_interval,
            check_timeout,
            check_rise,
            check_fall,
        } => {
            let health = HealthOverrides {
                interval_ms: check_interval.map(Dur::ms),
                timeout_ms: check_timeout.map(Dur::ms),
                rise: check_rise,
                fall: check_fall,
            };
            let app = client
                .create_app(&CreateApp {
                    name,
                    port,
                    health,
                    mss_clamp: None,
                })
                .await?;
            println!("{}", app.url);
        }
        AppCommand::List { json } => {
            let apps = client.apps().await?;
            if json {
                print::json(&apps)?;
            } else {
                print!("{}", AppsTable(&apps));
            }
        }
        AppCommand::Show { name, json } => {
            let app = client.app(&name).await?;
            if json {
                print::json(&app)?;
            } else {
                println!(
                    "app {}  {}  port {}  {} open connections",
                    app.name, app.url, app.port, app.connections
                );
                print!("{}", BackendsTable::now(&app.backends, "  "));
            }
        }
        AppCommand::Delete { name } => {
            let app = client.delete_app(&name).await?;
            println!("deleted app {}; port {} is free", app.name, app.port);
        }
    }
    Ok(())
}
