//! Builds the eBPF datapath (`gateway-ebpf`) for the bpf target with aya-build; `src/lib.rs`
//! embeds the object from `OUT_DIR`.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let package = |name: &str| {
        metadata
            .packages
            .iter()
            .find(|p| p.name.as_str() == name)
            .ok_or_else(|| anyhow!("package {name} not found in the workspace"))
    };
    let ebpf = package("gateway-ebpf")?;
    // The datapath also changes when the shared types do.
    let common = package("gateway-common")?;
    let common_dir = common
        .manifest_path
        .parent()
        .context("gateway-common has no directory")?;
    println!("cargo:rerun-if-changed={common_dir}");
    let root_dir = ebpf
        .manifest_path
        .parent()
        .context("gateway-ebpf has no directory")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
