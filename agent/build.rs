//! Builds the kernel programs (`agent-ebpf`) for the BPF target with aya-build; `probes` embeds
//! the object with `include_bytes_aligned!`.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = format!("{manifest_dir}/../agent-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
