use which::which;

/// Building this crate has an undeclared dependency on the `bpf-linker` binary: rebuild whenever
/// it changes (same trick as aya-template; artifact dependencies would say it better).
///
/// It also declares the `bpf_target_arch` cfg that aya-build passes (`--cfg
/// bpf_target_arch="..."`, for architecture-specific register reads), here rather than in
/// `[lints.rust]`, which would leave the workspace lints out (`lints.workspace = true` takes no
/// additions).
fn main() {
    println!(
        "cargo::rustc-check-cfg=cfg(bpf_target_arch, values(\"x86_64\", \"aarch64\", \"arm\", \
         \"riscv64\", \"powerpc64\", \"s390x\", \"mips\", \"loongarch64\"))"
    );
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => println!("cargo:warning=bpf-linker not found ({e}); run `cargo xtask setup`"),
    }
}
