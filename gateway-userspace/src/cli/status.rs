//! `gateway status [--json]`: the daemon (version, addresses, attachments, conntrack use: how
//! full, connections by phase, SYNs refused for want of room; health checks), then each app
//! with its open (and half-open) connections, its rates and its backends.

use std::fmt::{self, Display, Formatter};

use super::{
    CliError,
    args::StatusArgs,
    print::{self, BackendsTable},
};
use crate::{
    api::{Client, Status},
    state::ClientAddress,
};

pub(super) async fn run(client: &Client, args: StatusArgs) -> Result<(), CliError> {
    let status = client.status().await?;
    if args.json {
        print::json(&status)
    } else {
        print!(
            "{}",
            StatusReport {
                status: &status,
                now_ms: crate::daemon::now_ms(),
            }
        );
        Ok(())
    }
}

/// `gateway status` as text.
struct StatusReport<'a> {
    status: &'a Status,
    /// Now (Unix time, ms): ages are counted up to it.
    now_ms: u64,
}

impl Display for StatusReport<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let s = self.status;
        let attached: Vec<String> = s
            .attachments
            .iter()
            .map(|a| format!("{} ({})", a.iface, a.mode))
            .collect();
        writeln!(
            f,
            "gateway {}  public {}  SNAT {}  app ports {}",
            s.version, s.public_ip, s.snat_ip, s.port_range
        )?;
        writeln!(f, "attached to {}", attached.join(", "))?;
        let fill = if s.conntrack_capacity == 0 {
            0.0
        } else {
            100.0 * s.conntrack_entries as f64 / s.conntrack_capacity as f64
        };
        writeln!(
            f,
            "conntrack: {} of {} entries in use ({fill:.1}%); apps: {}",
            s.conntrack_entries,
            s.conntrack_capacity,
            s.apps.len()
        )?;
        let c = &s.conntrack_connections;
        writeln!(
            f,
            "  connections: {} half-open, {} established, {} closing, {} closed, {} in TIME_WAIT",
            c.half_open, c.established, c.closing, c.closed, c.time_wait
        )?;
        writeln!(
            f,
            "  SYNs refused: {} conntrack_full, {} snat_exhausted",
            s.refused.conntrack_full, s.refused.snat_exhausted
        )?;
        writeln!(
            f,
            "health checks since start: {} run, {} failed",
            s.health_checks, s.health_checks_failed
        )?;
        for a in &s.apps {
            // A setting is shown when the app has it.
            let client = match a.client_address {
                ClientAddress::None => String::new(),
                other => format!("client address {other}  "),
            };
            let client = match &a.rate_limit {
                Some(l) => format!("{client}rate limit {} per backend  ", print::Limit(l)),
                None => client,
            };
            writeln!(
                f,
                "\napp {}  {}  {client}{} open connections ({} half-open)  {:.1} conn/s  {:.0} pkt/s  {}/s",
                a.name,
                a.url,
                a.connections,
                a.half_open,
                a.rates.connections,
                a.rates.packets,
                human_bytes(a.rates.bytes)
            )?;
            let backends = BackendsTable {
                backends: &a.backends,
                indent: "  ",
                now_ms: self.now_ms,
            };
            write!(f, "{backends}")?;
        }
        let ago = self.now_ms.saturating_sub(s.scanned_at_ms);
        writeln!(
            f,
            "\n(connections and rates as of the conntrack scan {:.1} s ago)",
            ago as f64 / 1000.0
        )
    }
}

/// A byte count (a rate's, so fractional) with a binary unit: `512 B`, `1.5 KiB`, `2.0 GiB`.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::{AppView, AttachmentView, Rates, Refusals},
        datapath::{AttachMode, Phases},
    };

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(0.0), "0 B");
        assert_eq!(human_bytes(1023.4), "1023 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
        assert_eq!(human_bytes(2048.0 * 1024f64.powi(4)), "2048.0 TiB");
    }

    #[test]
    fn status_report() {
        let status = Status {
            version: "0.1.0".to_owned(),
            public_ip: "203.0.113.10".to_owned(),
            snat_ip: "10.0.0.1".to_owned(),
            port_range: "20000-29999".to_owned(),
            attachments: vec![AttachmentView {
                iface: "eth0".to_owned(),
                mode: AttachMode::Tc,
            }],
            apps: vec![AppView {
                name: "web".to_owned(),
                port: 20000,
                url: "tcp://203.0.113.10:20000".to_owned(),
                mss_clamp: None,
                client_address: ClientAddress::None,
                rate_limit: None,
                plan: None,
                backends: vec![],
                connections: 2,
                half_open: 1,
                rates: Rates {
                    connections: 1.26,
                    packets: 10.4,
                    bytes: 2048.0,
                },
                not_served_here: false,
            }],
            conntrack_entries: 6,
            conntrack_capacity: 1024,
            conntrack_connections: Phases {
                half_open: 1,
                established: 1,
                time_wait: 1,
                ..Phases::default()
            },
            refused: Refusals {
                conntrack_full: 12,
                snat_exhausted: 3,
            },
            health_checks: 9,
            health_checks_failed: 1,
            scanned_at_ms: 10_000,
        };
        // An app with a setting shows it.
        let mut status = status;
        let told = AppView {
            name: "api".to_owned(),
            url: "tcp://203.0.113.10:20001".to_owned(),
            client_address: ClientAddress::Toa,
            ..status.apps[0].clone()
        };
        status.apps.push(told);
        let report = StatusReport {
            status: &status,
            now_ms: 11_500,
        };
        assert_eq!(
            report.to_string(),
            "gateway 0.1.0  public 203.0.113.10  SNAT 10.0.0.1  app ports 20000-29999\n\
             attached to eth0 (tc)\n\
             conntrack: 6 of 1024 entries in use (0.6%); apps: 2\n  \
             connections: 1 half-open, 1 established, 0 closing, 0 closed, 1 in TIME_WAIT\n  \
             SYNs refused: 12 conntrack_full, 3 snat_exhausted\n\
             health checks since start: 9 run, 1 failed\n\
             \n\
             app web  tcp://203.0.113.10:20000  2 open connections (1 half-open)  1.3 conn/s  10 pkt/s  2.0 KiB/s\n  \
             no backends\n\
             \n\
             app api  tcp://203.0.113.10:20001  client address toa  2 open connections (1 half-open)  1.3 conn/s  10 pkt/s  2.0 KiB/s\n  \
             no backends\n\
             \n\
             (connections and rates as of the conntrack scan 1.5 s ago)\n"
        );
    }
}
