//! `gateway down`: detach the datapath and remove its pins. A running daemon is asked to do
//! it and exit; with none, the pins are removed here.

use std::time::{Duration, Instant};

use super::{CliError, args::DownArgs};
use crate::{
    api::{Client, ClientError},
    daemon::remove_datapath,
};

/// How long the daemon gets to exit once it accepted.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often its socket is looked for meanwhile.
const EXIT_POLL: Duration = Duration::from_millis(20);

pub(super) async fn run(client: &Client, args: DownArgs) -> Result<(), CliError> {
    match client.down().await {
        Ok(()) => {
            // The daemon removes its socket as its last step.
            let deadline = Instant::now() + EXIT_TIMEOUT;
            while client.socket().exists() {
                if Instant::now() >= deadline {
                    return Err(CliError::DownTimeout {
                        waited: EXIT_TIMEOUT,
                    });
                }
                tokio::time::sleep(EXIT_POLL).await;
            }
            println!("the daemon detached the datapath and exited");
        }
        Err(ClientError::Connect { .. }) => {
            let bpffs = &args.bpffs;
            let removed = remove_datapath(bpffs).map_err(CliError::RemovePins)?;
            if removed.is_empty() {
                println!("nothing to remove in {}", bpffs.display());
            } else {
                println!(
                    "removed {} pins from {} (datapath detached)",
                    removed.len(),
                    bpffs.display()
                );
            }
        }
        Err(source) => return Err(CliError::Down { source }),
    }
    Ok(())
}
