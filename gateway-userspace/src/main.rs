//! `gateway`: the daemon (`gateway daemon`) and the CLI that talks to it over its API socket.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gateway::{
    api::{self, AddBackend, AppView, BackendView, Client, CreateApp, FlowList, FlowQuery, Status},
    config::{self, DaemonArgs, Settings},
    state::HealthOverrides,
};

/// An eBPF full-NAT TCP load balancer.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, about)]
struct Args {
    /// The daemon's API socket.
    #[arg(
        long,
        global = true,
        env = "GATEWAY_API_SOCKET",
        default_value = config::DEFAULT_API_SOCKET,
        value_name = "PATH"
    )]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: attach the datapath and serve the API.
    Daemon(Box<DaemonArgs>),
    /// Apps: public endpoints `tcp://HOST:PORT`.
    #[command(subcommand)]
    App(AppCommand),
    /// An app's backends (containers).
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Replace an app's backends: the new ones join once healthy, in one switch, and the
    /// others drain.
    Deploy {
        app: String,
        /// The new backends, `IP:PORT` each.
        #[arg(required = true, value_name = "IP:PORT")]
        backends: Vec<String>,
        /// Weight of the new backends, 1 to 256.
        #[arg(long)]
        weight: Option<u32>,
        /// How many new backends must be healthy to switch [default: all].
        #[arg(long)]
        quorum: Option<usize>,
        /// Abort (keeping the old backends) if they are not healthy by then [default: the
        /// daemon's --deploy-timeout].
        #[arg(long, value_name = "DURATION")]
        timeout: Option<config::Dur>,
        /// How long the replaced backends drain [default: the daemon's --drain-timeout].
        #[arg(long, value_name = "DURATION")]
        drain_timeout: Option<config::Dur>,
        /// After the switch, wait until the replaced backends are gone (no connection left,
        /// or the drain timeout): then they can be stopped.
        #[arg(long)]
        wait: bool,
    },
    /// Apps, ports, backends with their state, open connections, rates.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Live connections: client, public port, backend, SNAT port, state, age, bytes. With
    /// `--backend IP:PORT`, the SNAT port a container sees tells which client is behind it.
    Flows {
        /// Only this app's.
        #[arg(long)]
        app: Option<String>,
        /// Only those to this backend.
        #[arg(long, value_name = "IP:PORT")]
        backend: Option<String>,
        /// At most this many (the oldest first).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Detach the datapath and remove its pins (drops every connection); stops the daemon if
    /// one is running.
    Down {
        /// Where the pins are, when no daemon answers.
        #[arg(long, value_name = "DIR", default_value = config::DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Load the datapath into the kernel and report what it holds, without attaching it.
    Check,
}

#[derive(Debug, Subcommand)]
enum AppCommand {
    /// Create an app; prints its TCP_URL.
    Create {
        name: String,
        /// This public port instead of the lowest free one.
        #[arg(long)]
        port: Option<u16>,
        /// Health checks: time between two [default: the daemon's].
        #[arg(long, value_name = "DURATION")]
        check_interval: Option<config::Dur>,
        /// Health checks: handshake timeout [default: the daemon's].
        #[arg(long, value_name = "DURATION")]
        check_timeout: Option<config::Dur>,
        /// Health checks: passes in a row to become healthy [default: the daemon's].
        #[arg(long, value_name = "N")]
        check_rise: Option<u32>,
        /// Health checks: failures in a row to become unhealthy [default: the daemon's].
        #[arg(long, value_name = "N")]
        check_fall: Option<u32>,
    },
    /// List the apps.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one app.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete an app: frees its port; its connections end.
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
enum BackendCommand {
    /// Add a backend `IP:PORT` to an app.
    Add {
        app: String,
        address: String,
        /// Relative weight, 1 to 256.
        #[arg(long)]
        weight: Option<u32>,
    },
    /// Remove a backend: it drains (no new connections; open ones go on until they close or
    /// the drain timeout), then goes.
    Remove {
        app: String,
        address: String,
        /// Remove it at once and end its connections.
        #[arg(long)]
        now: bool,
        /// How long it drains [default: the daemon's --drain-timeout].
        #[arg(long, value_name = "DURATION", conflicts_with = "now")]
        drain_timeout: Option<config::Dur>,
    },
    /// List an app's backends.
    List {
        app: String,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Daemon(daemon_args) => daemon(*daemon_args),
        Command::Check => check(),
        Command::Down { bpffs } => down(&args.api_socket, &bpffs),
        command => cli(&args.api_socket, command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("gateway: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn daemon(args: DaemonArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GATEWAY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let settings = Settings::resolve(args)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(gateway::daemon::run(settings))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn cli(socket: &std::path::Path, command: Command) -> anyhow::Result<()> {
    let client = Client::new(socket);
    let rt = runtime()?;
    rt.block_on(async {
        match command {
            Command::App(AppCommand::Create {
                name,
                port,
                check_interval,
                check_timeout,
                check_rise,
                check_fall,
            }) => {
                let health = HealthOverrides {
                    interval_ms: check_interval.map(config::Dur::ms),
                    timeout_ms: check_timeout.map(config::Dur::ms),
                    rise: check_rise,
                    fall: check_fall,
                };
                let app = client.create_app(&CreateApp { name, port, health }).await?;
                println!("{}", app.url);
            }
            Command::App(AppCommand::List { json }) => {
                let apps = client.apps().await?;
                if json {
                    print_json(&apps)?;
                } else {
                    print_apps(&apps);
                }
            }
            Command::App(AppCommand::Show { name, json }) => {
                let app = client.app(&name).await?;
                if json {
                    print_json(&app)?;
                } else {
                    println!(
                        "app {}  {}  port {}  {} open connections",
                        app.name, app.url, app.port, app.connections
                    );
                    print_backends(&app.backends, "  ");
                }
            }
            Command::App(AppCommand::Delete { name }) => {
                let app = client.delete_app(&name).await?;
                println!("deleted app {}; port {} is free", app.name, app.port);
            }
            Command::Backend(BackendCommand::Add {
                app,
                address,
                weight,
            }) => {
                let b = client
                    .add_backend(&app, &AddBackend { address, weight })
                    .await?;
                println!(
                    "added backend {} (weight {}) to app {app}",
                    b.address, b.weight
                );
            }
            Command::Backend(BackendCommand::Remove {
                app,
                address,
                now,
                drain_timeout,
            }) => {
                let how = api::RemoveBackend {
                    now,
                    drain_timeout_ms: drain_timeout.map(config::Dur::ms),
                };
                let b = client.remove_backend(&app, &address, &how).await?;
                if now {
                    println!(
                        "removed backend {} from app {app}; its {} connections were ended",
                        b.address, b.connections
                    );
                } else {
                    println!(
                        "backend {} of app {app} is draining: no new connections; its {} open ones go on",
                        b.address, b.connections
                    );
                }
            }
            Command::Deploy {
                app,
                backends,
                weight,
                quorum,
                timeout,
                drain_timeout,
                wait,
            } => {
                let deploy = api::Deploy {
                    backends,
                    weight,
                    quorum,
                    timeout_ms: timeout.map(config::Dur::ms),
                    drain_timeout_ms: drain_timeout.map(config::Dur::ms),
                };
                let view = client.deploy(&app, &deploy).await?;
                let backends = deploy.backends;
                let old: Vec<String> = view
                    .backends
                    .iter()
                    .filter(|b| b.state == gateway::state::BackendState::Draining)
                    .map(|b| b.address.clone())
                    .collect();
                println!(
                    "app {app} switched to {}; draining: {}",
                    backends.join(" "),
                    if old.is_empty() { "none".to_owned() } else { old.join(" ") }
                );
                if wait && !old.is_empty() {
                    // The daemon ends the drain at its deadline; this waits a little longer.
                    let until = view.backends.iter().filter_map(|b| b.drain_until_ms).max();
                    let limit = until.unwrap_or(0).saturating_sub(gateway::daemon::now_ms());
                    let deadline = std::time::Instant::now()
                        + std::time::Duration::from_millis(limit)
                        + std::time::Duration::from_secs(10);
                    loop {
                        let view = client.app(&app).await?;
                        if !view.backends.iter().any(|b| old.contains(&b.address)) {
                            break;
                        }
                        anyhow::ensure!(
                            std::time::Instant::now() < deadline,
                            "the replaced backends of app {app} are still there after their drain timeout"
                        );
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    println!("the replaced backends are gone: they can be stopped");
                }
            }
            Command::Backend(BackendCommand::List { app, json }) => {
                let backends = client.backends(&app).await?;
                if json {
                    print_json(&backends)?;
                } else {
                    print_backends(&backends, "");
                }
            }
            Command::Status { json } => {
                let status = client.status().await?;
                if json {
                    print_json(&status)?;
                } else {
                    print_status(&status);
                }
            }
            Command::Flows {
                app,
                backend,
                limit,
                json,
            } => {
                let query = FlowQuery {
                    app,
                    backend,
                    limit,
                };
                let list = client.flows(&query).await?;
                if json {
                    print_json(&list)?;
                } else {
                    print_flows(&list);
                }
            }
            Command::Daemon(_) | Command::Check | Command::Down { .. } => {
                unreachable!("handled in main")
            }
        }
        anyhow::Ok(())
    })
}

fn print_apps(apps: &[AppView]) {
    if apps.is_empty() {
        println!("no apps");
        return;
    }
    let w = apps.iter().map(|a| a.name.len()).max().unwrap_or(0).max(4);
    println!(
        "{:w$}  {:>5}  {:30}  {:>8}  {:>11}",
        "NAME", "PORT", "URL", "BACKENDS", "CONNECTIONS"
    );
    for a in apps {
        println!(
            "{:w$}  {:>5}  {:30}  {:>8}  {:>11}",
            a.name,
            a.port,
            a.url,
            a.backends.len(),
            a.connections
        );
    }
}

fn print_backends(backends: &[BackendView], indent: &str) {
    if backends.is_empty() {
        println!("{indent}no backends");
        return;
    }
    println!(
        "{indent}{:21}  {:>6}  {:9}  {:>8}  {:>11}",
        "BACKEND", "WEIGHT", "STATE", "SINCE", "CONNECTIONS"
    );
    let now = gateway::daemon::now_ms();
    for b in backends {
        let state = if b.held { "pending*" } else { b.state.as_str() };
        let age = humantime::format_duration(std::time::Duration::from_secs(
            now.saturating_sub(b.since_ms) / 1000,
        ));
        println!(
            "{indent}{:21}  {:>6}  {:9}  {:>8}  {:>11}",
            b.address,
            b.weight,
            state,
            age.to_string(),
            b.connections
        );
    }
    if backends.iter().any(|b| b.held) {
        println!("{indent}(* added by a deploy that has not switched yet)");
    }
}

fn print_status(s: &Status) {
    let attached: Vec<String> = s
        .attachments
        .iter()
        .map(|a| format!("{} ({})", a.iface, a.mode))
        .collect();
    println!(
        "gateway {}  public {}  SNAT {}  app ports {}",
        s.version, s.public_ip, s.snat_ip, s.port_range
    );
    println!("attached to {}", attached.join(", "));
    println!(
        "conntrack: {} of {} entries in use; apps: {}",
        s.conntrack_entries,
        s.conntrack_capacity,
        s.apps.len()
    );
    println!(
        "health checks since start: {} run, {} failed",
        s.health_checks, s.health_checks_failed
    );
    for a in &s.apps {
        println!(
            "\napp {}  {}  {} open connections  {:.1} conn/s  {:.0} pkt/s  {}/s",
            a.name,
            a.url,
            a.connections,
            a.rates.connections,
            a.rates.packets,
            human_bytes(a.rates.bytes)
        );
        print_backends(&a.backends, "  ");
    }
    let ago = gateway::daemon::now_ms().saturating_sub(s.scanned_at_ms);
    println!(
        "\n(connections and rates as of the conntrack scan {:.1} s ago)",
        ago as f64 / 1000.0
    );
}

fn human_bytes(b: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

fn print_flows(list: &FlowList) {
    if list.flows.is_empty() {
        println!("no flows");
        return;
    }
    let w = list
        .flows
        .iter()
        .map(|f| f.app.len())
        .max()
        .unwrap_or(0)
        .max(3);
    println!(
        "{:w$}  {:21}  {:21}  {:21}  {:21}  {:11}  {:>8}  {:>10}  {:>10}",
        "APP", "CLIENT", "PUBLIC", "BACKEND", "SNAT", "STATE", "AGE", "BYTES IN", "BYTES OUT"
    );
    for f in &list.flows {
        let age = humantime::format_duration(std::time::Duration::from_secs(f.age_ms / 1000));
        println!(
            "{:w$}  {:21}  {:21}  {:21}  {:21}  {:11}  {:>8}  {:>10}  {:>10}",
            f.app,
            f.client,
            f.public,
            f.backend,
            f.snat,
            f.state,
            age.to_string(),
            f.bytes_in,
            f.bytes_out
        );
    }
    if list.matched > list.flows.len() {
        println!("({} of {} flows shown)", list.flows.len(), list.matched);
    }
}

/// Asks a running daemon to detach and exit (waiting for it to be gone); with none, removes
/// the pins itself.
fn down(socket: &std::path::Path, bpffs: &std::path::Path) -> anyhow::Result<()> {
    let rt = runtime()?;
    let client = Client::new(socket);
    match rt.block_on(client.down()) {
        Ok(_) => {
            // The daemon removes its socket as its last step.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while socket.exists() {
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "the daemon did not exit within 30 s"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            println!("the daemon detached the datapath and exited");
        }
        Err(api::ClientError::Connect { .. }) => {
            let removed = gateway::daemon::remove_datapath(bpffs)?;
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
        Err(e) => return Err(e).context("asking the daemon to go down"),
    }
    Ok(())
}

fn check() -> anyhow::Result<()> {
    use gateway::datapath::{Datapath, TC_PROGRAM, XDP_PROGRAM};
    let datapath = Datapath::load()
        .context("loading the datapath (are you root, on Linux >= 6.6 with BTF?)")?;
    // Reading the counters proves the maps are usable, not only created.
    datapath.global_stats()?;
    println!(
        "datapath loaded and verified: programs {XDP_PROGRAM} and {TC_PROGRAM}, maps {}",
        gateway_common::maps::ALL.join(", ")
    );
    Ok(())
}
