#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const PROGRAM: &str = "package main\n\nimport (\n\t\"fmt\"\n\t\"runtime\"\n)\n\n\
    func main() {\n\truntime.GC()\n\tfmt.Println(\"hello\")\n}\n";
const FUNCS: [&str; 3] = [
    "runtime.stopTheWorldWithSema",
    "runtime.startTheWorldWithSema",
    "main.main",
];
/// Builds every test binary once per test process: (file name, extra `go build` args).
const BUILDS: [(&str, &[&str]); 4] = [
    ("plain", &[]),
    ("stripped", &["-ldflags=-s -w"]),
    ("pie", &["-buildmode=pie"]),
    ("pie_stripped", &["-buildmode=pie", "-ldflags=-s -w"]),
];
/// Externally linked (cgo-style) PIE: needs a C toolchain, so optional.
const EXT_BUILDS: [(&str, &[&str]); 2] = [
    (
        "ext_pie",
        &["-buildmode=pie", "-ldflags=-linkmode=external"],
    ),
    (
        "ext_pie_stripped",
        &["-buildmode=pie", "-ldflags=-linkmode=external -s -w"],
    ),
];

/// Scratch space inside cargo's target dir (`target/<profile>/go-test-bins`), so
/// `cargo clean` removes it; the test executable lives in `target/<profile>/deps`.
fn scratch() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(Path::parent)
        .unwrap()
        .join("go-test-bins")
}

fn go(dir: &Path) -> Command {
    let mut cmd = Command::new("go");
    cmd.current_dir(dir)
        .env("GO111MODULE", "off")
        .env("GOCACHE", scratch().join("gocache"));
    cmd
}

fn go_build(dir: &Path, out: &str, args: &[&str]) -> bool {
    let status = go(dir)
        .arg("build")
        .args(args)
        .args(["-o", out, "main.go"])
        .status();
    status
        .expect("`go` must be on PATH for these tests")
        .success()
}

fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch().join(std::process::id().to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("main.go"), PROGRAM).unwrap();
        for (out, args) in BUILDS {
            assert!(go_build(&dir, out, args), "go build {out} failed");
        }
        for (out, args) in EXT_BUILDS {
            if !go_build(&dir, out, args) {
                eprintln!("external linking unavailable; skipping {out}");
            }
        }
        dir
    })
}

fn read_bin(name: &str) -> Vec<u8> {
    std::fs::read(bin_dir().join(name)).unwrap()
}

fn go_tool(args: &[&str]) -> String {
    let out = go(bin_dir()).arg("tool").args(args).output().unwrap();
    assert!(out.status.success(), "go tool {args:?} failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Deterministic xorshift so failures reproduce.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Required lookups, as the agent makes them: every name must be found.
fn functions(data: &[u8], names: &[&str]) -> Result<Vec<FunctionCode>> {
    names
        .iter()
        .zip(find_functions(data, names)?)
        .map(|(name, f)| {
            f.ok_or_else(|| GoBinaryError::SymbolNotFound {
                name: (*name).to_owned(),
            })
        })
        .collect()
}

fn function_file_offsets(data: &[u8], names: &[&str]) -> Result<Vec<u64>> {
    Ok(functions(data, names)?
        .into_iter()
        .map(|f| f.file_offset)
        .collect())
}

fn lookups(data: &[u8]) -> (Vec<Option<u64>>, Vec<Option<u64>>) {
    let file = parse_elf(data).unwrap();
    let addrs =
        |v: Vec<Option<(u64, u64)>>| v.into_iter().map(|f| f.map(|(addr, _)| addr)).collect();
    (
        addrs(symtab_lookup(&file, &FUNCS)),
        addrs(pclntab_lookup(&file, &FUNCS).unwrap()),
    )
}

#[test]
fn inspect_reports_version_and_symbol_source() {
    let expected = go_tool(&["dist", "version"]).trim().to_owned(); // e.g. "go1.19.8"
    let expected_num = parse_go_version(&expected).unwrap();
    for (name, source) in [
        ("plain", SymbolSource::Symtab),
        ("stripped", SymbolSource::Pclntab),
        ("pie", SymbolSource::Symtab),
        ("pie_stripped", SymbolSource::Pclntab),
    ] {
        let data = read_bin(name);
        let info = inspect(&data).unwrap();
        assert_eq!(
            info.go_version.as_deref(),
            Some(expected.as_str()),
            "{name}"
        );
        assert_eq!(info.go_version_number, Some(expected_num), "{name}");
        assert_eq!(info.symbol_source, source, "{name}");
        let has_symtab = object::File::parse(&*data)
            .unwrap()
            .symbol_table()
            .is_some();
        assert_eq!(has_symtab, source == SymbolSource::Symtab, "{name}");
    }
}

#[test]
fn pclntab_agrees_with_symtab_on_same_binary() {
    for name in ["plain", "pie", "ext_pie"] {
        let Ok(data) = std::fs::read(bin_dir().join(name)) else {
            continue; // ext_pie needs a C linker
        };
        let (sym, pcln) = lookups(&data);
        assert!(sym.iter().all(Option::is_some), "{name}: {sym:x?}");
        if name == "ext_pie" {
            // ld folds the table into .data.rel.ro: this exercises the header scan.
            let file = parse_elf(&data).unwrap();
            assert!(
                PCLNTAB_SECTIONS
                    .iter()
                    .all(|n| file.section_by_name(n).is_none())
            );
        }
        assert_eq!(sym, pcln, "{name}");
    }
}

#[test]
fn stripped_and_unstripped_builds_agree() {
    for (full, stripped) in [
        ("plain", "stripped"),
        ("pie", "pie_stripped"),
        ("ext_pie", "ext_pie_stripped"),
    ] {
        let (Ok(a), Ok(b)) = (
            std::fs::read(bin_dir().join(full)),
            std::fs::read(bin_dir().join(stripped)),
        ) else {
            continue;
        };
        let a = function_file_offsets(&a, &FUNCS).unwrap();
        assert_eq!(
            a,
            function_file_offsets(&b, &FUNCS).unwrap(),
            "{full} vs {stripped}"
        );
    }
}

#[test]
fn offsets_match_go_tool_nm_and_objdump() {
    for name in ["plain", "pie"] {
        let path = bin_dir().join(name);
        let path = path.to_str().unwrap();
        let data = read_bin(name);
        let offsets = function_file_offsets(&data, &FUNCS).unwrap();
        let (sym, _) = lookups(&data);
        let nm = go_tool(&["nm", path]);
        let file = object::File::parse(&*data).unwrap();
        let text = file.section_by_name(".text").unwrap();
        for ((func, offset), addr) in FUNCS.iter().zip(&offsets).zip(&sym) {
            let addr = addr.unwrap();
            // `go tool nm`: "  4369a0 T runtime.stopTheWorldWithSema"
            let nm_addr = nm
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|f| f.len() == 3 && f[2] == *func)
                .map(|f| u64::from_str_radix(f[0], 16).unwrap());
            assert_eq!(nm_addr, Some(addr), "{name} {func}");
            let (text_off, _) = text.file_range().unwrap();
            assert_eq!(*offset, addr - text.address() + text_off, "{name} {func}");
            // objdump's first instruction: "  proc.go:1179  0x4369a0  493b6610  CMPQ ..."
            let dump = go_tool(&[
                "objdump",
                "-s",
                &format!("^{}$", func.replace('.', "\\.")),
                path,
            ]);
            let first: Vec<_> = dump.lines().nth(1).unwrap().split_whitespace().collect();
            assert_eq!(first[1], format!("{addr:#x}"), "{name} {func}");
            let bytes: Vec<u8> = (0..first[2].len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&first[2][i..i + 2], 16).unwrap())
                .collect();
            let at = usize::try_from(*offset).unwrap();
            assert_eq!(&data[at..at + bytes.len()], &bytes[..], "{name} {func}");
        }
    }
}

#[test]
fn missing_symbol_is_reported_by_name() {
    for name in ["plain", "stripped"] {
        let err = function_file_offsets(&read_bin(name), &["main.main", "main.nope"]).unwrap_err();
        assert!(
            matches!(&err, GoBinaryError::SymbolNotFound { name } if name == "main.nope"),
            "{err}"
        );
    }
}

#[test]
fn non_go_and_garbage_inputs_are_errors() {
    let true_bin = std::fs::read("/bin/true").unwrap();
    assert!(matches!(inspect(&true_bin), Err(GoBinaryError::NotGo)));
    let mut next = rng(0x9e37_79b9_7f4a_7c15);
    let random: Vec<u8> = (0..4096).map(|_| next() as u8).collect();
    assert!(matches!(inspect(&random), Err(GoBinaryError::NotElf)));
    assert!(matches!(
        function_file_offsets(&random, &FUNCS),
        Err(GoBinaryError::NotElf)
    ));
    let mut fake_elf = random.clone();
    fake_elf[..4].copy_from_slice(b"\x7fELF");
    assert!(inspect(&fake_elf).is_err());
    assert!(function_file_offsets(&fake_elf, &FUNCS).is_err());

    for name in ["plain", "stripped"] {
        let data = read_bin(name);
        for len in [64 << 10, 1 << 20] {
            assert!(inspect(&data[..len]).is_err(), "{name} truncated to {len}");
            assert!(
                function_file_offsets(&data[..len], &FUNCS).is_err(),
                "{name} truncated to {len}"
            );
        }
    }

    // Wipe .gopclntab of the stripped binary: still Go (buildinfo), but no symbols.
    let mut data = read_bin("stripped");
    let (off, size) = {
        let file = object::File::parse(&*data).unwrap();
        file.section_by_name(".gopclntab")
            .unwrap()
            .file_range()
            .unwrap()
    };
    data[off as usize..(off + size) as usize].fill(0xff);
    assert_eq!(inspect(&data).unwrap().symbol_source, SymbolSource::Pclntab);
    let err = function_file_offsets(&data, &FUNCS).unwrap_err();
    assert!(
        matches!(
            err,
            GoBinaryError::UnsupportedPclntab { magic: 0xffff_ffff }
        ),
        "{err}"
    );
}

#[test]
fn truncation_and_corruption_never_panic() {
    let mut next = rng(42);
    for name in ["plain", "stripped"] {
        let data = read_bin(name);
        for _ in 0..200 {
            let cut = &data[..(next() % data.len() as u64) as usize];
            let _ = inspect(cut);
            let _ = function_file_offsets(cut, &FUNCS);
        }
    }
    // Flip bytes in the pclntab header and functab, where lengths and offsets live.
    let data = read_bin("stripped");
    let (off, size) = {
        let file = object::File::parse(&*data).unwrap();
        file.section_by_name(".gopclntab")
            .unwrap()
            .file_range()
            .unwrap()
    };
    for _ in 0..200 {
        let mut bad = data.clone();
        for _ in 0..4 {
            let at = off + next() % size.min(64 << 10);
            bad[at as usize] = next() as u8;
        }
        let _ = inspect(&bad);
        let _ = function_file_offsets(&bad, &FUNCS);
    }
}

#[test]
fn go_version_parsing() {
    assert_eq!(parse_go_version("go1.19.8"), Some((1, 19)));
    assert_eq!(parse_go_version("go1.21rc2"), Some((1, 21)));
    assert_eq!(parse_go_version("go1.20 X:boringcrypto"), Some((1, 20)));
    assert_eq!(parse_go_version("devel go1.22-abcdef Tue"), Some((1, 22)));
    assert_eq!(parse_go_version("go"), None);
    assert_eq!(parse_go_version(""), None);
}

/// startTheWorldWithSema's exits, found identically through .symtab and through .gopclntab
/// (stripped build of the same source): with wakep known, its one call to wakep (e8 rel32 to
/// wakep) and no return, since Go 1.19 returns only after that call; without it, the returns.
#[test]
fn start_the_world_exits_same_for_symtab_and_pclntab() {
    let plain = read_bin("plain");
    let stripped = read_bin("stripped");
    let names = ["runtime.startTheWorldWithSema", "runtime.wakep"];
    let exits = |data: &[u8], with_callee: bool| {
        let f = functions(data, &names).unwrap();
        exit_offsets(data, f[0], with_callee.then_some(f[1].file_offset)).unwrap()
    };
    let a = exits(&plain, true);
    assert_eq!(a, exits(&stripped, true));
    let wakep = function_file_offsets(&plain, &["runtime.wakep"]).unwrap()[0];
    assert_eq!(a.len(), 1, "one exit, the wakep call: {a:x?}");
    let at = &plain[a[0] as usize..];
    assert_eq!(at[0], 0xe8, "CALL rel32 at {:#x}", a[0]);
    let rel = i32::from_le_bytes(at[1..5].try_into().unwrap());
    assert_eq!((a[0] as i64 + 5 + i64::from(rel)) as u64, wakep);

    let returns = exits(&plain, false);
    assert_eq!(returns, exits(&stripped, false));
    assert!(!returns.is_empty());
    for off in returns {
        assert_eq!(plain[off as usize], 0xc3, "RET at {off:#x}");
    }
}

/// The entry probes go on the JBE of Go's stack check (`CMPQ 0x10(R14), SP` is 4 bytes), which
/// the kernel emulates instead of single-stepping.
#[test]
fn entry_probe_on_stack_check_jump() {
    for name in ["plain", "stripped", "pie"] {
        let data = read_bin(name);
        let f = functions(&data, &FUNCS[..2]).unwrap();
        for code in f {
            let at = entry_offset(&data, code).unwrap();
            assert_eq!(at, code.file_offset + 4, "{name}");
            assert_eq!(
                &data[at as usize..at as usize + 2],
                &[0x0f, 0x86],
                "{name}: JBE rel32"
            );
        }
    }
}

/// Hand-assembled control flow: a return reached around the callee call is an exit, one only
/// reached after it is not; an indirect jump falls back to every return and call.
#[test]
fn exits_follow_control_flow() {
    let base = 0x1000;
    let callee = 0x2000u64;
    let call = |at: u64| {
        let rel = (callee as i64 - (at as i64 + 5)) as i32;
        let mut v = vec![0xe8];
        v.extend_from_slice(&rel.to_le_bytes());
        v
    };
    // 1000: test rax,rax; 1003: je 100b; 1005: call callee; 100a: ret; 100b: ret
    let mut code = vec![0x48, 0x85, 0xc0, 0x74, 0x06];
    code.extend(call(0x1005));
    code.extend([0xc3, 0xc3]);
    assert_eq!(x86_exits(&code, base, Some(callee)), vec![0x1005, 0x100b]);
    assert_eq!(x86_exits(&code, base, None), vec![0x100a, 0x100b]);

    // 1000: jmp rax; 1002: call callee; 1007: ret
    let mut code = vec![0xff, 0xe0];
    code.extend(call(0x1002));
    code.push(0xc3);
    assert_eq!(x86_exits(&code, base, Some(callee)), vec![0x1002, 0x1007]);

    // A loop back to the entry ends: 1000: cmp rax,rbx; 1003: jne 1000; 1005: ret
    let code = [0x48, 0x39, 0xd8, 0x75, 0xfb, 0xc3];
    assert_eq!(x86_exits(&code, base, None), vec![0x1005]);
}
