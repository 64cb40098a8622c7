//! The CLI: the operator's commands, which talk to the daemon through the API's typed
//! [`Client`] (all but `check`, which loads the datapath itself, and `down` when no daemon
//! answers). `gateway daemon` is not here: the binary runs [`crate::daemon::run`].
//!
//! | command                      | module      |
//! |------------------------------|-------------|
//! | the clap types, every flag   | [`args`]    |
//! | `gateway app ...`            | `app`       |
//! | `gateway backend ...`        | `backend`   |
//! | `gateway deploy`             | `deploy`    |
//! | `gateway status`             | `status`    |
//! | `gateway flows`              | `flows`     |
//! | `gateway down`               | `down`      |
//! | `gateway check`              | `check`     |
//! | tables and `--json`          | `print`     |

use std::{path::Path, time::Duration};

use crate::{
    api::{Client, ClientError},
    datapath::DatapathError,
};

mod app;
pub mod args;
mod backend;
mod check;
mod cluster;
mod deploy;
mod down;
mod flows;
mod print;
mod status;

pub use args::{Args, CliCommand, Command};

/// Why a command failed. Each message is one line for the operator; the causes follow as its
/// sources (the binary prints the whole chain on one line).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// An API call failed, or the daemon refused it (its message, e.g. `no app named "db"`).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// `deploy --wait`: the replaced backends were still listed after their drain deadline
    /// (and some slack).
    #[error("the replaced backends of app {app} are still there after their drain timeout")]
    DrainTimeout { app: String },
    /// `down`: the daemon could not be asked to go down (other than by being absent).
    #[error("asking the daemon to go down")]
    Down {
        #[source]
        source: ClientError,
    },
    /// `down`: the daemon accepted, but its API socket was still there after `waited`.
    #[error("the daemon did not exit within {} s", waited.as_secs())]
    DownTimeout { waited: Duration },
    /// `down` with no daemon: removing the pins (or unmounting their bpffs) failed.
    #[error(transparent)]
    RemovePins(crate::daemon::DaemonError),
    /// `check`: the datapath could not be loaded and verified.
    #[error("loading the datapath (are you root, on Linux >= 6.6 with BTF?)")]
    Load {
        #[source]
        source: DatapathError,
    },
    /// `check`: the datapath loaded but its counters could not be read.
    #[error("reading the datapath's counters")]
    Counters {
        #[source]
        source: DatapathError,
    },
    /// `cluster import`: reading the state file.
    #[error("reading the state file {path}: {cause}")]
    StateFile {
        path: std::path::PathBuf,
        cause: String,
    },
    /// `cluster import`: etcd refused or could not take an app (or was unreachable).
    #[error(transparent)]
    Store(#[from] crate::cluster::StoreError),
    /// `cluster import`: some apps were not imported (each named with why).
    #[error("{refused} of {total} apps not imported: {reasons}")]
    Import {
        refused: usize,
        total: usize,
        reasons: String,
    },
    /// `cluster import`: a bad `--cluster`.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The async runtime the API calls run on could not start.
    #[error("starting the CLI's async runtime")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
    /// An answer could not be written as JSON (`--json`).
    #[error("writing JSON")]
    Json {
        #[source]
        source: serde_json::Error,
    },
}

/// Runs one of the operator's commands against the daemon serving on `api_socket`; what it
/// shows goes to stdout.
pub fn run(api_socket: &Path, command: CliCommand) -> Result<(), CliError> {
    let client = Client::new(api_socket);
    match command {
        CliCommand::App(command) => block_on(app::run(&client, command)),
        CliCommand::Backend(command) => block_on(backend::run(&client, command)),
        CliCommand::Deploy(args) => block_on(deploy::run(&client, args)),
        CliCommand::Status(args) => block_on(status::run(&client, args)),
        CliCommand::Flows(args) => block_on(flows::run(&client, args)),
        CliCommand::Down(args) => block_on(down::run(&client, args)),
        CliCommand::Check => check::run(),
        CliCommand::Cluster(command) => block_on(cluster::run(&client, command)),
    }
}

/// Runs `command` to its end on a single-threaded runtime.
fn block_on(command: impl Future<Output = Result<(), CliError>>) -> Result<(), CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| CliError::Runtime { source })?
        .block_on(command)
}
