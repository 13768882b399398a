//! Builds the kernel programs (`agent-ebpf`) for the BPF target with aya-build (`probes` embeds
//! the object with `include_bytes_aligned!`), and the status API's code from `proto/` (its
//! file descriptor set too, for server reflection).

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR not set")?;
    let proto_dir = format!("{manifest_dir}/../proto");
    println!("cargo:rerun-if-changed={proto_dir}");
    let fds = protox::compile(["agent/v1/status.proto"], [&proto_dir])
        .context("cannot compile proto/agent/v1/status.proto")?;
    std::fs::write(
        format!("{out_dir}/status_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .compile_fds(fds)
        .context("cannot generate the status API's code")?;
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
