//! What the agent has done, from its pins or its loaded maps: `gateway agent status` and the
//! metrics (`metrics`) show the same figures.

use std::{net::Ipv4Addr, path::Path};

use gateway_common::agent::AgentStat;

use super::{
    AgentError,
    cgroup::find_by_id,
    kernel::{AgentMaps, pinned_links},
};

/// At most this many directories are walked to name a cgroup from its id.
const CGROUP_WALK_LIMIT: usize = 100_000;

/// One program attached through a pinned link.
#[derive(Debug, serde::Serialize)]
pub struct ProgramStatus {
    pub program: &'static str,
    pub program_id: u32,
    pub link_id: u32,
    pub pin: String,
}

/// The agent's state.
#[derive(Debug, serde::Serialize)]
pub struct AgentStatus {
    pub pin_dir: String,
    /// The cgroup the links are attached to (its path when found under the cgroup v2 mounts).
    pub cgroup: Option<String>,
    pub cgroup_id: u64,
    pub programs: Vec<ProgramStatus>,
    pub trusted: Vec<Ipv4Addr>,
    /// Sockets mapped to a client address now.
    pub connections_mapped: usize,
    /// The socket map's size.
    pub capacity: u32,
    /// Each counter by its label, summed over the CPUs.
    pub counters: Vec<(String, u64)>,
}

impl AgentStatus {
    /// Reads the pins in `dir`: an error when nothing of the agent's is pinned there.
    pub fn read(dir: &Path) -> Result<Self, AgentError> {
        let links = pinned_links(dir)?;
        if links.is_empty() {
            return Err(AgentError::NotAttached {
                pin_dir: dir.to_owned(),
            });
        }
        let maps = AgentMaps::from_pins(dir)?;
        let cgroup_id = links[0].2.cgroup_id;
        let programs = links
            .iter()
            .map(|(program, path, info)| ProgramStatus {
                program,
                program_id: info.program_id,
                link_id: info.id,
                pin: path.display().to_string(),
            })
            .collect();
        Ok(AgentStatus {
            pin_dir: dir.display().to_string(),
            cgroup: find_by_id(cgroup_id, CGROUP_WALK_LIMIT).map(|p| p.display().to_string()),
            cgroup_id,
            programs,
            trusted: maps.trusted()?,
            connections_mapped: maps.mapped(),
            capacity: maps.capacity,
            counters: labelled(maps.counters()?),
        })
    }

    /// The text `gateway agent status` prints.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let cgroup = self
            .cgroup
            .as_deref()
            .unwrap_or("(not found under the cgroup2 mounts)");
        out.push_str(&format!(
            "cgroup:              {cgroup} (id {})\n",
            self.cgroup_id
        ));
        for p in &self.programs {
            out.push_str(&format!(
                "program:             {} (id {}, link {}, pinned at {})\n",
                p.program, p.program_id, p.link_id, p.pin
            ));
        }
        let trusted: Vec<String> = self.trusted.iter().map(Ipv4Addr::to_string).collect();
        out.push_str(&format!("trusted sources:     {}\n", trusted.join(", ")));
        out.push_str(&format!(
            "connections mapped:  {} (of at most {})\n",
            self.connections_mapped, self.capacity
        ));
        let counters: Vec<String> = self
            .counters
            .iter()
            .map(|(label, n)| format!("{label} {n}"))
            .collect();
        out.push_str(&format!("counters:            {}\n", counters.join(", ")));
        out
    }
}

/// The counters by their label.
pub fn labelled(counters: Vec<(AgentStat, u64)>) -> Vec<(String, u64)> {
    counters
        .into_iter()
        .map(|(stat, n)| (stat.label().to_owned(), n))
        .collect()
}
