//! `gateway app create|set|list|show|delete`: apps, each a public endpoint `tcp://HOST:PORT`.

use super::{
    CliError,
    args::{AppCommand, AppSettings},
    print::{self, AppsTable, BackendsTable},
};
use crate::{
    api::{AppView, Client, CreateApp, UpdateApp},
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
            mss,
            client_address,
            rate_limit,
            plan,
            nodes,
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
                    mss_clamp: mss,
                    client_address,
                    rate_limit,
                    plan,
                    nodes,
                })
                .await?;
            println!("{}", app.url);
        }
        AppCommand::Set { name, settings } => {
            let app = client.update_app(&name, &update(&settings)).await?;
            println!("app {}: {}", app.name, Settings(&app));
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
                    "app {}  {}  port {}  {}  {} open connections",
                    app.name,
                    app.url,
                    app.port,
                    Settings(&app),
                    app.connections
                );
                if app.not_served_here {
                    println!(
                        "  not served by this node (outside its --nodes set): `gateway backend list {}` shows its backends on the nodes that serve it",
                        app.name
                    );
                }
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

/// The request `gateway app set` sends for `settings`.
fn update(settings: &AppSettings) -> UpdateApp {
    UpdateApp {
        mss_clamp: if settings.no_mss {
            Some(None)
        } else {
            settings.mss.map(Some)
        },
        client_address: settings.client_address.map(Some),
        rate_limit: if settings.no_rate_limit {
            Some(None)
        } else {
            settings.rate_limit.map(Some)
        },
        plan: settings.plan.clone(),
        nodes: settings.nodes.clone(),
    }
}

/// An app's settings in words, as `app set` and `app show` print them: `MSS clamp 1360` or
/// `no MSS clamp`, then `client address toa` or `client address none`.
struct Settings<'a>(&'a AppView);

impl std::fmt::Display for Settings<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.mss_clamp {
            Some(mss) => write!(f, "MSS clamp {mss}")?,
            None => write!(f, "no MSS clamp")?,
        }
        write!(f, ", client address {}", self.0.client_address)?;
        match (&self.0.rate_limit, &self.0.plan) {
            (Some(l), Some(plan)) => write!(f, ", rate limit {} (plan {plan})", print::Limit(l)),
            (Some(l), None) => write!(f, ", rate limit {}", print::Limit(l)),
            // No limit is the default: not said (the line stays as it was).
            (None, _) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::{
        cli::{Args, CliCommand, Command},
        state::{ClientAddress, RateLimit},
    };

    /// `gateway ARGS...`'s app command, or clap's refusal.
    fn parse(args: &[&str]) -> Result<AppCommand, clap::Error> {
        let args = Args::try_parse_from(["gateway"].iter().chain(args))?;
        match args.command {
            Command::Cli(CliCommand::App(command)) => Ok(command),
            other => panic!("not an app command: {other:?}"),
        }
    }

    #[test]
    fn create_takes_an_mss_clamp() {
        let AppCommand::Create { name, mss, .. } =
            parse(&["app", "create", "web", "--mss", "1360"]).unwrap()
        else {
            panic!("not app create");
        };
        assert_eq!((name.as_str(), mss), ("web", Some(1360)));
        let AppCommand::Create { mss, .. } = parse(&["app", "create", "web"]).unwrap() else {
            panic!("not app create");
        };
        assert_eq!(mss, None);
        // Out of range values reach the daemon, which refuses them with one line (and so does
        // the API); what is no number at all is clap's.
        assert!(parse(&["app", "create", "web", "--mss", "70000"]).is_ok());
        assert!(parse(&["app", "create", "web", "--mss", "abc"]).is_err());
        assert!(parse(&["app", "create", "web", "--no-mss"]).is_err());
    }

    #[test]
    fn create_takes_a_client_address() {
        let client_address = |args: &[&str]| match parse(args) {
            Ok(AppCommand::Create {
                client_address,
                mss,
                ..
            }) => Ok((client_address, mss)),
            Ok(other) => panic!("not app create: {other:?}"),
            Err(e) => Err(e),
        };
        let create = ["app", "create", "web"];
        assert_eq!(client_address(&create).unwrap(), (None, None));
        for (value, ca) in [("toa", ClientAddress::Toa), ("none", ClientAddress::None)] {
            let args = [&create[..], &["--client-address", value, "--mss", "1360"]].concat();
            assert_eq!(client_address(&args).unwrap(), (Some(ca), Some(1360)));
        }
        // A bad value is refused with the daemon's words.
        let err =
            client_address(&[&create[..], &["--client-address", "foo"]].concat()).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(
            err.to_string()
                .contains("client address must be toa or none, not \"foo\""),
            "{err}"
        );
    }

    #[test]
    fn create_and_set_take_a_rate_limit_or_a_plan() {
        let create = |args: &[&str]| match parse(args) {
            Ok(AppCommand::Create {
                rate_limit, plan, ..
            }) => Ok((rate_limit, plan)),
            Ok(other) => panic!("not app create: {other:?}"),
            Err(e) => Err(e),
        };
        let rl = |pps, burst| Some(RateLimit { pps, burst });
        assert_eq!(create(&["app", "create", "web"]).unwrap(), (None, None));
        assert_eq!(
            create(&["app", "create", "web", "--rate-limit", "1000pps,burst=200"]).unwrap(),
            (rl(1000, 200), None)
        );
        assert_eq!(
            create(&["app", "create", "web", "--rate-limit", "1000"]).unwrap(),
            (rl(1000, 300), None)
        );
        assert_eq!(
            create(&["app", "create", "web", "--plan", "small"]).unwrap(),
            (None, Some("small".to_owned()))
        );
        let err = create(&["app", "create", "web", "--rate-limit", "fast"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(
            err.to_string()
                .contains("rate limit must look like 1000pps or 1000pps,burst=200"),
            "{err}"
        );
        let both = [
            "app",
            "create",
            "web",
            "--rate-limit",
            "1000",
            "--plan",
            "small",
        ];
        assert_eq!(
            create(&both).unwrap_err().kind(),
            clap::error::ErrorKind::ArgumentConflict
        );

        let set = |args: &[&str]| match parse(args) {
            Ok(AppCommand::Set { settings, .. }) => Ok(update(&settings)),
            Ok(other) => panic!("not app set: {other:?}"),
            Err(e) => Err(e.kind()),
        };
        let update = |rate_limit, plan: Option<&str>| {
            Ok(UpdateApp {
                rate_limit,
                plan: plan.map(str::to_owned),
                ..Default::default()
            })
        };
        assert_eq!(
            set(&["app", "set", "web", "--rate-limit", "5pps,burst=50"]),
            update(Some(rl(5, 50)), None)
        );
        assert_eq!(
            set(&["app", "set", "web", "--no-rate-limit"]),
            update(Some(None), None)
        );
        assert_eq!(
            set(&["app", "set", "web", "--plan", "small"]),
            update(None, Some("small"))
        );
        for args in [
            &["app", "set", "web", "--rate-limit", "5", "--no-rate-limit"][..],
            &["app", "set", "web", "--plan", "small", "--no-rate-limit"],
            &["app", "set", "web", "--plan", "small", "--rate-limit", "5"],
        ] {
            assert_eq!(
                set(args),
                Err(clap::error::ErrorKind::ArgumentConflict),
                "{args:?}"
            );
        }
    }

    #[test]
    fn set_sends_only_what_it_is_given_and_needs_something() {
        let set = |args: &[&str]| match parse(args) {
            Ok(AppCommand::Set { name, settings }) => Ok((name, update(&settings))),
            Ok(other) => panic!("not app set: {other:?}"),
            Err(e) => Err(e.kind()),
        };
        assert_eq!(
            set(&["app", "set", "web", "--mss", "1400"]),
            Ok((
                "web".to_owned(),
                UpdateApp {
                    mss_clamp: Some(Some(1400)),
                    client_address: None,
                    ..Default::default()
                }
            ))
        );
        assert_eq!(
            set(&["app", "set", "web", "--no-mss"]),
            Ok((
                "web".to_owned(),
                UpdateApp {
                    mss_clamp: Some(None),
                    client_address: None,
                    ..Default::default()
                }
            ))
        );
        assert_eq!(
            set(&["app", "set", "web", "--client-address", "toa"]),
            Ok((
                "web".to_owned(),
                UpdateApp {
                    mss_clamp: None,
                    client_address: Some(Some(ClientAddress::Toa)),
                    ..Default::default()
                }
            ))
        );
        assert_eq!(
            set(&[
                "app",
                "set",
                "web",
                "--client-address",
                "none",
                "--mss",
                "1400"
            ]),
            Ok((
                "web".to_owned(),
                UpdateApp {
                    mss_clamp: Some(Some(1400)),
                    client_address: Some(Some(ClientAddress::None)),
                    ..Default::default()
                }
            ))
        );
        assert_eq!(
            set(&["app", "set", "web", "--client-address", "foo"]),
            Err(clap::error::ErrorKind::ValueValidation)
        );
        assert_eq!(
            set(&["app", "set", "web", "--client-address"]),
            Err(clap::error::ErrorKind::InvalidValue)
        );
        assert_eq!(
            set(&["app", "set", "web"]),
            Err(clap::error::ErrorKind::MissingRequiredArgument)
        );
        assert_eq!(
            set(&["app", "set", "web", "--mss", "1400", "--no-mss"]),
            Err(clap::error::ErrorKind::ArgumentConflict)
        );
        assert_eq!(
            set(&["app", "set", "--mss", "1400"]),
            Err(clap::error::ErrorKind::MissingRequiredArgument)
        );
    }

    #[test]
    fn settings_in_words() {
        let mut app = AppView {
            name: "web".to_owned(),
            port: 20000,
            url: "tcp://203.0.113.10:20000".to_owned(),
            mss_clamp: Some(1360),
            client_address: ClientAddress::None,
            rate_limit: None,
            plan: None,
            backends: vec![],
            connections: 0,
            half_open: 0,
            rates: Default::default(),
            not_served_here: false,
        };
        assert_eq!(
            Settings(&app).to_string(),
            "MSS clamp 1360, client address none"
        );
        app.mss_clamp = None;
        assert_eq!(
            Settings(&app).to_string(),
            "no MSS clamp, client address none"
        );
        app.client_address = ClientAddress::Toa;
        assert_eq!(
            Settings(&app).to_string(),
            "no MSS clamp, client address toa"
        );
    }
}
