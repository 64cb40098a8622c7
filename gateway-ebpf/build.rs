use which::which;

/// Rebuild the eBPF object when bpf-linker changes (it is the linker of the bpf target).
fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker is not installed: run `cargo xtask setup` (it installs every prerequisite)",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
}
