//! `gateway flows [--app NAME] [--backend IP:PORT] [--limit N]`: live connections, and which
//! client is behind the SNAT port a backend sees.

use super::{
    CliError,
    args::FlowsArgs,
    print::{self, FlowsTable},
};
use crate::api::{Client, FlowQuery};

pub(super) async fn run(client: &Client, args: FlowsArgs) -> Result<(), CliError> {
    let FlowsArgs {
        app,
        backend,
        limit,
        json,
    } = args;
    let list = client
        .flows(&FlowQuery {
            app,
            backend,
            limit,
        })
        .await?;
    if json {
        print::json(&list)
    } else {
        print!("{}", FlowsTable(&list));
        Ok(())
    }
}
