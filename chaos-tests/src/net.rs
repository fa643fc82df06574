//! The test network: one network namespace per node on a private bridge, and partitions as
//! iptables rules inside those namespaces.
//!
//! Layout: bridge `wchaos0` in the root namespace with `10.213.0.254/24`; node `i` lives in
//! namespace `wchaos-n<i>` with `10.213.0.<i>` on a veth pair (`wch<i>h` on the bridge,
//! `wch<i>n` in the namespace). The namespaces get no default route, so nothing a node sends
//! can leave the bridge; the workload and `warrenctl` run in the root namespace and reach
//! the nodes through the bridge address. A partition drops, inside a node's namespace,
//! packets from the peers it must not hear (`iptables -A INPUT -s PEER -j DROP`); the
//! bridge address (the clients) is never dropped, so clients keep reaching their node.
//!
//! Everything here is named with the `wchaos`/`wch` prefix so [`cleanup`] can find and
//! remove leftovers of an interrupted run (`chaos cleanup`). `cluster.rs` starts the nodes
//! inside these namespaces; `nemesis.rs` decides the partitions.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, bail};

pub const BRIDGE: &str = "wchaos0";
pub const NS_PREFIX: &str = "wchaos-n";
const LINK_PREFIX: &str = "wch";
/// The harness's private subnet, 10.213.0.0/24.
const SUBNET: [u8; 3] = [10, 213, 0];
const BRIDGE_HOST: u8 = 254;
/// Marker in the paths of tmpfs mounts the harness made, for [`cleanup`].
pub const TMPFS_MARKER: &str = "wchaos-tmpfs";

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`sh`] but for teardown steps whose failure only matters as a message.
fn sh_quiet(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn namespace(node: u64) -> String {
    format!("{NS_PREFIX}{node}")
}

/// A node's address. Node ids above 253 do not fit the subnet; the harness never makes
/// that many (see `cluster.rs`).
pub fn address(node: u64) -> Ipv4Addr {
    assert!(
        (1..254).contains(&node),
        "node id {node} outside the subnet"
    );
    Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], node as u8)
}

pub fn bridge_address() -> Ipv4Addr {
    Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], BRIDGE_HOST)
}

/// Checks that root, `ip` and `iptables` are there and that the subnet is not in use by
/// anything but a previous run of the harness.
pub fn preflight() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("chaos needs root (network namespaces, iptables, tmpfs)");
    }
    for tool in ["ip", "iptables"] {
        if which(tool).is_none() {
            bail!("{tool} is not installed (scripts/chaos.sh installs iproute2 and iptables)");
        }
    }
    let routes = sh("ip", &["-4", "route", "show"])?;
    for line in routes.lines() {
        if line.starts_with("10.213.") && !line.contains(BRIDGE) {
            bail!("10.213.0.0/24 is already routed here ({line}); refusing to use it");
        }
    }
    Ok(())
}

pub fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| std::path::Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// The bridge and the namespaces made so far. Dropping it removes them (best effort);
/// [`cleanup`] does the same from names alone.
pub struct Net {
    hosts: BTreeSet<u64>,
    up: bool,
}

impl Net {
    /// Creates the bridge with the clients' address on it.
    pub fn create() -> anyhow::Result<Net> {
        let net = Net {
            hosts: BTreeSet::new(),
            up: true,
        };
        sh("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        let cidr = format!("{}/24", bridge_address());
        sh("ip", &["addr", "add", &cidr, "dev", BRIDGE])?;
        sh("ip", &["link", "set", BRIDGE, "up"])?;
        Ok(net)
    }

    /// Adds node `id`'s namespace with its address on the bridge.
    pub fn add_host(&mut self, id: u64) -> anyhow::Result<()> {
        let ns = namespace(id);
        let host_end = format!("{LINK_PREFIX}{id}h");
        let ns_end = format!("{LINK_PREFIX}{id}n");
        let cidr = format!("{}/24", address(id));
        sh("ip", &["netns", "add", &ns])?;
        self.hosts.insert(id);
        sh(
            "ip",
            &[
                "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end,
            ],
        )?;
        sh("ip", &["link", "set", &ns_end, "netns", &ns])?;
        sh("ip", &["link", "set", &host_end, "master", BRIDGE])?;
        sh("ip", &["link", "set", &host_end, "up"])?;
        sh("ip", &["-n", &ns, "addr", "add", &cidr, "dev", &ns_end])?;
        sh("ip", &["-n", &ns, "link", "set", &ns_end, "up"])?;
        sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    pub fn has_host(&self, id: u64) -> bool {
        self.hosts.contains(&id)
    }

    /// Replaces all partition rules: `grudge[n]` is the set of nodes whose packets node `n`
    /// drops. Nodes not in the map hear everyone.
    pub fn partition(&self, grudge: &BTreeMap<u64, BTreeSet<u64>>) -> anyhow::Result<()> {
        self.heal()?;
        for (node, peers) in grudge {
            if !self.hosts.contains(node) {
                continue;
            }
            let ns = namespace(*node);
            for peer in peers {
                let src = address(*peer).to_string();
                sh(
                    "ip",
                    &[
                        "netns", "exec", &ns, "iptables", "-w", "-A", "INPUT", "-s", &src, "-j",
                        "DROP",
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Removes every partition rule.
    pub fn heal(&self) -> anyhow::Result<()> {
        for id in &self.hosts {
            let ns = namespace(*id);
            sh(
                "ip",
                &["netns", "exec", &ns, "iptables", "-w", "-F", "INPUT"],
            )?;
        }
        Ok(())
    }

    /// Removes the namespaces (killing what still runs in them) and the bridge.
    pub fn teardown(&mut self) {
        if !self.up {
            return;
        }
        self.up = false;
        for id in std::mem::take(&mut self.hosts) {
            remove_namespace(&namespace(id));
            sh_quiet("ip", &["link", "del", &format!("{LINK_PREFIX}{id}h")]);
        }
        sh_quiet("ip", &["link", "del", BRIDGE]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Kills every process left in a namespace and deletes it.
fn remove_namespace(ns: &str) {
    for _ in 0..3 {
        let pids = sh("ip", &["netns", "pids", ns]).unwrap_or_default();
        let pids: Vec<i32> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SIGCONT first: a stopped process does not die of SIGKILL until continued on
            // some kernels' accounting, and a paused node must not outlive the run.
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::kill(pid, libc::SIGCONT);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    sh_quiet("ip", &["netns", "del", ns]);
}

/// Removes everything a harness run may have left behind: namespaces named `wchaos-n*`
/// (and the processes in them), `wch*` links and the bridge, tmpfs mounts under a
/// `wchaos-tmpfs` directory. Returns what it removed.
pub fn cleanup() -> Vec<String> {
    let mut removed = Vec::new();
    let list = sh("ip", &["netns", "list"]).unwrap_or_default();
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if name.starts_with(NS_PREFIX) {
            remove_namespace(name);
            removed.push(format!("namespace {name}"));
        }
    }
    let links = sh("ip", &["-o", "link", "show"]).unwrap_or_default();
    for line in links.lines() {
        // "12: wch1h@if11: <...>"
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        if name.starts_with(LINK_PREFIX) && sh_quiet("ip", &["link", "del", name]) {
            removed.push(format!("link {name}"));
        }
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(fs), Some(point)) = (f.next(), f.next()) else {
            continue;
        };
        if fs == "tmpfs" && point.contains(TMPFS_MARKER) && sh_quiet("umount", &["-l", point]) {
            removed.push(format!("tmpfs {point}"));
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_stay_in_the_private_subnet() {
        assert_eq!(address(1).to_string(), "10.213.0.1");
        assert_eq!(address(12).to_string(), "10.213.0.12");
        assert_eq!(bridge_address().to_string(), "10.213.0.254");
        assert_eq!(namespace(3), "wchaos-n3");
    }

    #[test]
    #[should_panic]
    fn ids_outside_the_subnet_are_refused() {
        address(254);
    }
}
