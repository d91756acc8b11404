//! Builds the kernel programs in `ebpf/` (nightly, bpfel-unknown-none, through aya-build)
//! so `include_bytes_aligned!` in `datapath` embeds the object: one `cargo build` builds
//! both sides. Needs what `cargo xtask setup` installs: nightly with rust-src, bpf-linker.

use std::path::Path;

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = Path::new(&manifest_dir)
        .parent()
        .context("agent/ has no parent")?
        .join("ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("the ebpf/ path is not UTF-8")?;
    println!("cargo:rerun-if-changed={ebpf_dir}/src");
    println!("cargo:rerun-if-changed={ebpf_dir}/Cargo.toml");
    println!("cargo:rerun-if-changed={ebpf_dir}/common");
    if which_bpf_linker().is_none() {
        bail!(
            "bpf-linker is not on PATH: the eBPF programs in ebpf/ cannot be linked. \
             Run `cargo xtask setup` (it installs nightly's rust-src, LLVM 22 and bpf-linker)."
        );
    }
    // aya-build runs `cargo build --package weir-ebpf` in the current directory; ebpf/ is a
    // workspace of its own, so that is where it must run.
    std::env::set_current_dir(ebpf_dir).with_context(|| format!("entering {ebpf_dir}"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "weir-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the eBPF programs in ebpf/ (try `cargo xtask build-ebpf` for the plain compiler output)")
}

fn which_bpf_linker() -> Option<std::path::PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file())
}
