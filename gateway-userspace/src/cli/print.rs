//! How the commands show what the API answers: `--json` (the answer as the API gives it,
//! pretty-printed) and the text tables, as [`Display`] types (`print!("{}", AppsTable(&apps))`)
//! so that tests can render them.

use std::fmt::{self, Display, Formatter};

use serde::Serialize;

use super::CliError;
use crate::{
    api::{AppView, BackendView, FlowList},
    state::{ClientAddress, RateLimit},
};

/// A rate limit as the tables and `app show` print it: `1000 pps (burst 100)`.
pub(super) struct Limit<'a>(pub &'a RateLimit);

impl Display for Limit<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "{} pps (burst {})", self.0.pps, self.0.burst)
    }
}

/// Prints `value` as pretty JSON on stdout (`--json`).
pub(super) fn json<T: Serialize>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(|source| CliError::Json { source })?;
    println!("{text}");
    Ok(())
}

/// `gateway app list`: one line per app (name, port, URL, MSS clamp or `-`, client address
/// (`toa`) or `-`, backends, connections).
pub(super) struct AppsTable<'a>(pub &'a [AppView]);

impl Display for AppsTable<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let apps = self.0;
        if apps.is_empty() {
            return writeln!(f, "no apps");
        }
        let w = apps.iter().map(|a| a.name.len()).max().unwrap_or(0).max(4);
        let limited = apps.iter().any(|a| a.rate_limit.is_some());
        write!(
            f,
            "{:w$}  {:>5}  {:30}  {:>5}  {:6}  {:>8}  {:>11}",
            "NAME", "PORT", "URL", "MSS", "CLIENT", "BACKENDS", "CONNECTIONS"
        )?;
        if limited {
            write!(f, "  RATE LIMIT")?;
        }
        writeln!(f)?;
        for a in apps {
            let mss = a.mss_clamp.map_or("-".to_owned(), |m| m.to_string());
            let client = match a.client_address {
                ClientAddress::None => "-".to_owned(),
                other => other.to_string(),
            };
            write!(
                f,
                "{:w$}  {:>5}  {:30}  {:>5}  {:6}  {:>8}  {:>11}",
                a.name,
                a.port,
                a.url,
                mss,
                client,
                a.backends.len(),
                a.connections
            )?;
            if limited {
                match (&a.rate_limit, &a.plan) {
                    (Some(l), Some(plan)) => write!(f, "  {} (plan {plan})", Limit(l))?,
                    (Some(l), None) => write!(f, "  {}", Limit(l))?,
                    (None, _) => write!(f, "  -")?,
                }
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// An app's backends, one line each (address, weight, state, time in that state,
/// connections), every line after `indent`.
pub(super) struct BackendsTable<'a> {
    pub backends: &'a [BackendView],
    pub indent: &'a str,
    /// Now (Unix time, ms): the states' ages are counted up to it.
    pub now_ms: u64,
}

impl<'a> BackendsTable<'a> {
    /// The table with the states' ages as of now.
    pub fn now(backends: &'a [BackendView], indent: &'a str) -> Self {
        BackendsTable {
            backends,
            indent,
            now_ms: crate::daemon::now_ms(),
        }
    }
}

impl Display for BackendsTable<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let BackendsTable {
            backends,
            indent,
            now_ms,
        } = *self;
        if backends.is_empty() {
            return writeln!(f, "{indent}no backends");
        }
        // The rate-limit columns only when a backend has a limit or drops (no limit is the
        // default, and the table stays as it was).
        let limited = backends.iter().any(|b| {
            b.rate_limit.is_some()
                || b.rate_dropped_to_backend > 0
                || b.rate_dropped_from_backend > 0
        });
        write!(
            f,
            "{indent}{:21}  {:>6}  {:9}  {:>8}  {:>11}",
            "BACKEND", "WEIGHT", "STATE", "SINCE", "CONNECTIONS"
        )?;
        if limited {
            write!(
                f,
                "  {:24}  {:>15}  {:>21}",
                "RATE LIMIT", "PKT/S TO/FROM", "DROPPED TO/FROM"
            )?;
        }
        // Cluster mode: a column per node, its own state of each backend.
        let nodes: std::collections::BTreeSet<&String> =
            backends.iter().flat_map(|b| b.nodes.keys()).collect();
        for node in &nodes {
            write!(f, "  {node:12}")?;
        }
        writeln!(f)?;
        for b in backends {
            let state = if b.held { "pending*" } else { b.state.as_str() };
            let age = humantime::format_duration(std::time::Duration::from_secs(
                now_ms.saturating_sub(b.since_ms) / 1000,
            ));
            write!(
                f,
                "{indent}{:21}  {:>6}  {:9}  {:>8}  {:>11}",
                b.address,
                b.weight,
                state,
                age.to_string(),
                b.connections
            )?;
            if limited {
                let limit = b
                    .rate_limit
                    .as_ref()
                    .map_or("-".to_owned(), |l| Limit(l).to_string());
                let drops = format!(
                    "{}/{}",
                    b.rate_dropped_to_backend, b.rate_dropped_from_backend
                );
                let pps = format!("{:.0}/{:.0}", b.pps_to_backend, b.pps_from_backend);
                write!(f, "  {limit:24}  {pps:>15}  {drops:>21}")?;
            }
            for node in &nodes {
                let state = b.nodes.get(*node).map_or("-", String::as_str);
                write!(f, "  {state:12}")?;
            }
            writeln!(f)?;
        }
        if backends.iter().any(|b| b.held) {
            writeln!(f, "{indent}(* added by a deploy that has not switched yet)")?;
        }
        Ok(())
    }
}

/// `gateway flows`: one line per connection, and how many matched when a limit cut the list.
pub(super) struct FlowsTable<'a>(pub &'a FlowList);

impl Display for FlowsTable<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let list = self.0;
        if list.flows.is_empty() {
            return writeln!(f, "no flows");
        }
        let w = list
            .flows
            .iter()
            .map(|f| f.app.len())
            .max()
            .unwrap_or(0)
            .max(3);
        writeln!(
            f,
            "{:w$}  {:21}  {:21}  {:21}  {:21}  {:11}  {:>8}  {:>10}  {:>10}",
            "APP", "CLIENT", "PUBLIC", "BACKEND", "SNAT", "STATE", "AGE", "BYTES IN", "BYTES OUT"
        )?;
        for flow in &list.flows {
            let age =
                humantime::format_duration(std::time::Duration::from_secs(flow.age_ms / 1000));
            writeln!(
                f,
                "{:w$}  {:21}  {:21}  {:21}  {:21}  {:11}  {:>8}  {:>10}  {:>10}",
                flow.app,
                flow.client,
                flow.public,
                flow.backend,
                flow.snat,
                flow.state,
                age.to_string(),
                flow.bytes_in,
                flow.bytes_out
            )?;
        }
        if list.matched > list.flows.len() {
            writeln!(f, "({} of {} flows shown)", list.flows.len(), list.matched)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::{FlowView, Rates},
        state::BackendState,
    };

    fn backend(address: &str, state: BackendState, held: bool) -> BackendView {
        BackendView {
            address: address.to_owned(),
            weight: 1,
            state,
            since_ms: 1_000,
            drain_until_ms: None,
            held,
            connections: 7,
            health_changes: 0,
            rate_limit: None,
            rate_dropped_to_backend: 0,
            rate_dropped_from_backend: 0,
            pps_to_backend: 0.0,
            pps_from_backend: 0.0,
            nodes: Default::default(),
        }
    }

    #[test]
    fn apps_table() {
        assert_eq!(AppsTable(&[]).to_string(), "no apps\n");
        let app = AppView {
            name: "web".to_owned(),
            port: 20000,
            url: "tcp://203.0.113.10:20000".to_owned(),
            mss_clamp: None,
            client_address: ClientAddress::None,
            rate_limit: None,
            plan: None,
            backends: vec![backend("10.0.0.2:8080", BackendState::Active, false)],
            connections: 12,
            half_open: 0,
            rates: Rates::default(),
            not_served_here: false,
        };
        let clamped = AppView {
            name: "db".to_owned(),
            port: 20001,
            url: "tcp://203.0.113.10:20001".to_owned(),
            mss_clamp: Some(1360),
            ..app.clone()
        };
        let told = AppView {
            name: "api".to_owned(),
            port: 20002,
            url: "tcp://203.0.113.10:20002".to_owned(),
            client_address: ClientAddress::Toa,
            ..app.clone()
        };
        assert_eq!(
            AppsTable(&[app, clamped, told]).to_string(),
            "NAME   PORT  URL                               MSS  CLIENT  BACKENDS  CONNECTIONS\n\
             web   20000  tcp://203.0.113.10:20000            -  -              1           12\n\
             db    20001  tcp://203.0.113.10:20001         1360  -              1           12\n\
             api   20002  tcp://203.0.113.10:20002            -  toa            1           12\n"
        );
    }

    #[test]
    fn backends_table_marks_held_backends() {
        let table = BackendsTable {
            backends: &[
                backend("10.0.0.2:8080", BackendState::Active, false),
                backend("10.0.0.3:8080", BackendState::Pending, true),
            ],
            indent: "  ",
            now_ms: 66_000,
        };
        assert_eq!(
            table.to_string(),
            "  BACKEND                WEIGHT  STATE         SINCE  CONNECTIONS\n  \
             10.0.0.2:8080               1  active        1m 5s            7\n  \
             10.0.0.3:8080               1  pending*      1m 5s            7\n  \
             (* added by a deploy that has not switched yet)\n"
        );
        let none = BackendsTable {
            backends: &[],
            indent: "  ",
            now_ms: 0,
        };
        assert_eq!(none.to_string(), "  no backends\n");
    }

    #[test]
    fn backends_table_shows_rate_limits_when_there_are_some() {
        let limited = BackendView {
            rate_limit: Some(RateLimit {
                pps: 1000,
                burst: 100,
            }),
            pps_to_backend: 999.6,
            pps_from_backend: 12.2,
            rate_dropped_to_backend: 345,
            rate_dropped_from_backend: 6,
            ..backend("10.0.0.2:8080", BackendState::Active, false)
        };
        let table = BackendsTable {
            backends: &[
                limited,
                backend("10.0.0.3:8080", BackendState::Active, false),
            ],
            indent: "",
            now_ms: 66_000,
        };
        assert_eq!(
            table.to_string(),
            "BACKEND                WEIGHT  STATE         SINCE  CONNECTIONS  RATE LIMIT                  PKT/S TO/FROM        DROPPED TO/FROM\n\
             10.0.0.2:8080               1  active        1m 5s            7  1000 pps (burst 100)              1000/12                  345/6\n\
             10.0.0.3:8080               1  active        1m 5s            7  -                                     0/0                    0/0\n"
        );
    }

    #[test]
    fn flows_table_says_when_a_limit_cut_it() {
        let flow = FlowView {
            app: "web".to_owned(),
            client: "198.51.100.7:40000".to_owned(),
            public: "203.0.113.10:20000".to_owned(),
            backend: "10.0.0.2:8080".to_owned(),
            snat: "10.0.0.1:61000".to_owned(),
            state: "established".to_owned(),
            age_ms: 3_500,
            idle_ms: 0,
            packets_in: 1,
            bytes_in: 100,
            packets_out: 1,
            bytes_out: 2000,
        };
        let list = FlowList {
            matched: 3,
            flows: vec![flow],
        };
        let text = FlowsTable(&list).to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(
            lines[1],
            "web  198.51.100.7:40000     203.0.113.10:20000     10.0.0.2:8080          \
             10.0.0.1:61000         established        3s         100        2000"
        );
        assert_eq!(lines[2], "(1 of 3 flows shown)");
        let empty = FlowList {
            matched: 0,
            flows: vec![],
        };
        assert_eq!(FlowsTable(&empty).to_string(), "no flows\n");
    }
}
