//! Installs the prerequisites a fresh machine lacks, idempotently, saying what it does.
//! Detection is cheap (a few file checks and one `dpkg-query`), so a machine that has
//! everything is done in well under a second.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::is_root;

/// Debian packages the build and the tests need.
pub const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",       // bpf-linker links against LLVM 22 (the nightly's LLVM)
    "libpolly-22-dev",   // LLVM 22's static libraries reference Polly
    "bpftool",           // inspecting links and maps in tests
    "iproute2",          // ip netns, veth, routes
    "ethtool",           // veth offloads for native XDP
    "prometheus",        // promtool: the metrics tests check the scrape with it
    "nftables",          // metrics tests count packets with nft; a benchmark contender
    "haproxy",           // a benchmark contender (the smoke version runs in the tests)
    "iperf3",            // benchmark throughput
    "fonts-dejavu-core", // the benchmark chart's labels
    "redis-server",      // the client-address tests: an unmodified app behind the agent
    "python3",           // the client-address tests: a plain accept() server
    "etcd-server",       // the cluster store's tests run a real single-member etcd (v3 API)
    "protobuf-compiler", // protoc: the etcd client crate compiles etcd's .proto files at build time
    "libprotobuf-dev",   // google/protobuf/*.proto, which etcd's .proto files import
];

const BPF_LINKER_VERSION: &str = "0.13";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn setup() -> anyhow::Result<()> {
    let start = Instant::now();
    let mut did = Vec::new();
    rust_src(&mut did)?;
    apt(APT_PACKAGES, &mut did)?;
    bpf_linker(&mut did)?;
    if did.is_empty() {
        eprintln!(
            "xtask setup: every prerequisite is present ({} ms)",
            start.elapsed().as_millis()
        );
    } else {
        eprintln!(
            "xtask setup: installed {} in {:.0} s",
            did.join(", "),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn run(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask setup: {what}: {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status}): {cmd:?}");
    }
    Ok(())
}

/// The nightly toolchain (for the bpf target) with its `rust-src` component (build-std).
fn rust_src(did: &mut Vec<String>) -> anyhow::Result<()> {
    let sysroot = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .stderr(Stdio::null())
        .output();
    let sysroot = match sysroot {
        Ok(out) if out.status.success() => String::from_utf8(out.stdout)?.trim().to_owned(),
        _ => {
            run(
                "installing the nightly toolchain (the eBPF datapath builds with it)",
                Command::new("rustup").args([
                    "toolchain",
                    "install",
                    "nightly",
                    "--profile",
                    "minimal",
                    "--component",
                    "rust-src",
                ]),
            )
            .context("the nightly toolchain is missing: run `rustup toolchain install nightly --component rust-src`")?;
            did.push("the nightly toolchain".into());
            return Ok(());
        }
    };
    let core = Path::new(&sysroot).join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if !core.exists() {
        run(
            "adding rust-src to nightly (build-std for the bpf target)",
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        )
        .context("run `rustup component add rust-src --toolchain nightly`")?;
        did.push("rust-src".into());
    }
    Ok(())
}

/// Installs the missing ones of `packages` with apt-get.
pub fn apt(packages: &[&str], did: &mut Vec<String>) -> anyhow::Result<()> {
    let missing = missing_apt(packages)?;
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    let have_apt = Command::new("apt-get")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have_apt {
        bail!(
            "missing packages {list}, and there is no apt-get here: install their equivalents with your package manager"
        );
    }
    if !is_root() {
        bail!(
            "missing Debian packages {list}: run `sudo apt-get update && sudo apt-get install -y {list}` (or run this as root)"
        );
    }
    let noninteractive = |c: &mut Command| {
        c.env("DEBIAN_FRONTEND", "noninteractive");
    };
    let mut update = Command::new("apt-get");
    update.args(["update", "-qq"]);
    noninteractive(&mut update);
    run("refreshing the package lists", &mut update)?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing);
    noninteractive(&mut install);
    run(&format!("installing {list}"), &mut install)?;
    did.extend(missing);
    Ok(())
}

fn missing_apt(packages: &[&str]) -> anyhow::Result<Vec<String>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Abbrev}\n"])
        .args(packages)
        .stderr(Stdio::null())
        .output();
    let Ok(out) = out else {
        bail!(
            "cannot run dpkg-query: this is not a Debian-like system; install {} yourself",
            packages.join(" ")
        )
    };
    let listing = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = listing
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next()?;
            let status = parts.next()?;
            status.starts_with("ii").then_some(name)
        })
        .collect();
    Ok(packages
        .iter()
        .filter(|p| !installed.contains(p))
        .map(|p| p.to_string())
        .collect())
}

/// bpf-linker 0.13, built against LLVM 22.
fn bpf_linker(did: &mut Vec<String>) -> anyhow::Result<()> {
    let version = Command::new("bpf-linker")
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if version.as_deref().is_some_and(|v| {
        v.trim()
            .starts_with(&format!("bpf-linker {BPF_LINKER_VERSION}"))
    }) {
        return Ok(());
    }
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        bail!("bpf-linker needs LLVM 22 in {LLVM_PREFIX}: install llvm-22-dev and libpolly-22-dev");
    }
    run(
        "building bpf-linker against LLVM 22 (about a minute)",
        Command::new(crate::env_cargo())
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                &format!("~{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                "llvm-22",
                "--force",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
    .context(format!(
        "run `LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker --version ~{BPF_LINKER_VERSION} --no-default-features --features llvm-22`"
    ))?;
    did.push("bpf-linker".into());
    Ok(())
}
