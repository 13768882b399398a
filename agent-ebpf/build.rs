use which::which;

/// Building this crate has an undeclared dependency on the `bpf-linker` binary: rebuild whenever
/// it changes (same trick as aya-template; artifact dependencies would say it better).
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => println!("cargo:warning=bpf-linker not found ({e}); run `cargo xtask setup`"),
    }
}
