//! Minimal, panic-free inspection of Go ELF executables: toolchain version from
//! `.go.buildinfo` and function entry points (as uprobe file offsets) from `.symtab`
//! or, for stripped binaries, from the Go runtime's own `.gopclntab`.
//!
//! The input is an untrusted file from the host: every read is bounds-checked and
//! every failure is an `Err`, never a panic.

use std::collections::HashMap;

use object::elf::{self, SHF_ALLOC, SHF_EXECINSTR};
use object::{Object, ObjectSection, ObjectSymbol, ObjectSymbolTable, SectionFlags, SymbolKind};

/// What the agent needs to know about one Go executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoBinary {
    /// Go toolchain version from `.go.buildinfo`, e.g. "go1.19.8"; None when absent/unreadable.
    pub go_version: Option<String>,
    /// Parsed (major, minor) of `go_version`, e.g. (1, 19).
    pub go_version_number: Option<(u32, u32)>,
    /// Where symbols will be looked up by [`find_functions`].
    pub symbol_source: SymbolSource,
}

/// Where function symbols come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymbolSource {
    /// The ELF `.symtab` (unstripped binary).
    Symtab,
    /// The Go runtime's pclntab (binary linked with `-s`, or stripped afterwards).
    Pclntab,
}

/// Why a file could not be inspected; all variants are recoverable per-binary failures.
#[derive(Debug, thiserror::Error)]
pub enum GoBinaryError {
    #[error("not an elf file")]
    NotElf,
    #[error("malformed elf file: {0}")]
    Elf(#[from] object::Error),
    #[error("not a go binary: no .go.buildinfo or .gopclntab section")]
    NotGo,
    #[error("go pclntab not found")]
    NoPclntab,
    #[error("symbol not found: {name}")]
    SymbolNotFound { name: String },
    #[error("unsupported pclntab magic {magic:#010x} (go older than 1.16?)")]
    UnsupportedPclntab { magic: u32 },
    #[error("invalid pclntab: {reason}")]
    InvalidPclntab { reason: &'static str },
    #[error("truncated {what}")]
    Truncated { what: &'static str },
    #[error("no file-backed section contains address {addr:#x}")]
    NoSectionForAddress { addr: u64 },
    #[error("finding return instructions is not supported on {arch}")]
    UnsupportedArchitecture { arch: String },
    #[error("function at file offset {file_offset:#x} has no return instruction")]
    NoReturn { file_offset: u64 },
}

type Result<T> = std::result::Result<T, GoBinaryError>;

const BUILDINFO_MAGIC: &[u8; 14] = b"\xff Go buildinf:";
const BUILDINFO_HEADER_LEN: usize = 32;
/// Internal linking names the table `.gopclntab`, or `.data.rel.ro.gopclntab` for PIE
/// (relro) builds; external linking (cgo) merges it into `.data.rel.ro` (see `load_pclntab`).
const PCLNTAB_SECTIONS: [&str; 2] = [".gopclntab", ".data.rel.ro.gopclntab"];
const MAGIC_GO116: u32 = 0xffff_fffa;
const MAGIC_GO118: u32 = 0xffff_fff0;
const MAGIC_GO120: u32 = 0xffff_fff1;
/// Go version strings are a few dozen bytes; refuse to chase absurd lengths.
const MAX_VERSION_LEN: u64 = 1024;

/// Inspect an ELF file's bytes. `Err(GoBinaryError::NotGo)` when it has neither a
/// `.go.buildinfo` nor a `.gopclntab` section: the cheap "is this Go?" test.
///
/// # Errors
/// `NotElf`/`Elf` for non-ELF or malformed input, `NotGo`, or `Truncated` when the Go
/// sections extend past the end of `data`. An unreadable version is `None`, not an error.
pub fn inspect(data: &[u8]) -> Result<GoBinary> {
    let file = parse_elf(data)?;
    let buildinfo = file.section_by_name(".go.buildinfo");
    let pclntab = PCLNTAB_SECTIONS
        .iter()
        .find_map(|n| file.section_by_name(n));
    if buildinfo.is_none() && pclntab.is_none() {
        return Err(GoBinaryError::NotGo);
    }
    // Sections reaching past the end of the file mean a truncated/corrupt file: say so
    // now rather than failing later in find_functions.
    let buildinfo = buildinfo
        .map(|s| section_data(&s, ".go.buildinfo section"))
        .transpose()?;
    pclntab
        .map(|s| section_data(&s, ".gopclntab section"))
        .transpose()?;
    // Unknown buildinfo contents (e.g. unrelocated pre-1.18 pointers) only lose the version.
    let go_version = buildinfo.and_then(|d| read_build_version(&file, d));
    let go_version_number = go_version.as_deref().and_then(parse_go_version);
    let symbol_source = if file.symbol_table().is_some() {
        SymbolSource::Symtab
    } else {
        SymbolSource::Pclntab
    };
    Ok(GoBinary {
        go_version,
        go_version_number,
        symbol_source,
    })
}

/// Where a function's machine code lies in the file: `file_offset` is what uprobe attach wants
/// (`vaddr - sh_addr + sh_offset` of the containing section).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FunctionCode {
    pub file_offset: u64,
    pub len: u64,
}

/// File ranges of the named functions, one per name, from `.symtab` or else `.gopclntab`; a
/// name that is not found is `None`, so optional functions are looked up in the same pass as
/// required ones.
pub fn find_functions(data: &[u8], names: &[&str]) -> Result<Vec<Option<FunctionCode>>> {
    let file = parse_elf(data)?;
    let mut found = symtab_lookup(&file, names);
    if found.iter().any(Option::is_none) {
        match pclntab_lookup(&file, names) {
            Ok(from_pclntab) => {
                for (slot, f) in found.iter_mut().zip(from_pclntab) {
                    *slot = slot.or(f);
                }
            }
            // Without a symtab the pclntab error is the real cause; with one,
            // "symbol not found" ([`GoBinaryError::SymbolNotFound`], from the caller) is the more useful answer.
            Err(e) if file.symbol_table().is_none() => return Err(e),
            Err(_) => {}
        }
    }
    found
        .into_iter()
        .map(|f| {
            f.map(|(addr, len)| {
                Ok(FunctionCode {
                    file_offset: vaddr_to_file_offset(&file, addr)?,
                    len,
                })
            })
            .transpose()
        })
        .collect()
}

/// File offsets of the instructions of function `code` where the world can be considered
/// running again: on x86-64 each CALL to the function at file offset `callee` (e.g. the
/// `runtime.wakep` that `startTheWorldWithSema` makes right after reading its clock), and each
/// return that some path from the entry reaches without passing such a call; on arm64 every
/// return.
///
/// The agent needs exit points of Go functions without uretprobes (which rewrite return
/// addresses on goroutine stacks that Go may move). A probe placed anywhere but on an
/// instruction boundary would corrupt the target's code, so x86-64 code is decoded properly;
/// arm64 instructions are fixed-width words. Returns only reached after the callee call are
/// left out: each probe hit costs a trap (and for a RET, a single-step) in the target process.
pub fn exit_offsets(data: &[u8], code: FunctionCode, callee: Option<u64>) -> Result<Vec<u64>> {
    let file = parse_elf(data)?;
    let bytes = function_bytes(data, code)?;
    let exits: Vec<u64> = match file.architecture() {
        object::Architecture::X86_64 => x86_exits(bytes, code.file_offset, callee),
        object::Architecture::Aarch64 => bytes
            .chunks_exact(4)
            .enumerate()
            .filter(|(_, w)| *w == [0xc0, 0x03, 0x5f, 0xd6])
            .map(|(i, _)| code.file_offset + 4 * i as u64)
            .collect(),
        other => {
            return Err(GoBinaryError::UnsupportedArchitecture {
                arch: format!("{other:?}"),
            });
        }
    };
    if exits.is_empty() {
        return Err(GoBinaryError::NoReturn {
            file_offset: code.file_offset,
        });
    }
    Ok(exits)
}

/// Where to put an entry probe on function `code`: its first instruction, or on x86-64 the
/// conditional jump of Go's stack-bound check (`CMP 0x10(R14), SP; JBE morestack`, possibly
/// after a `LEA` into a scratch register) when the function starts with one.
///
/// The kernel emulates a probed conditional jump but must single-step most other instructions
/// out of line, which costs a second trap (#DB; in a VM, an exit to the hypervisor). The jump is
/// reached a few nanoseconds after entry with the argument registers untouched, and is re-run,
/// like the entry, when the stack grows.
pub fn entry_offset(data: &[u8], code: FunctionCode) -> Result<u64> {
    let file = parse_elf(data)?;
    let bytes = function_bytes(data, code)?;
    if file.architecture() != object::Architecture::X86_64 {
        return Ok(code.file_offset);
    }
    let mut decoder =
        iced_x86::Decoder::with_ip(64, bytes, code.file_offset, iced_x86::DecoderOptions::NONE);
    // At most: LEA, CMP, Jcc.
    for _ in 0..3 {
        if !decoder.can_decode() {
            break;
        }
        let ins = decoder.decode();
        let harmless = match ins.mnemonic() {
            iced_x86::Mnemonic::Cmp => true,
            // LEA only computes an address; it must not clobber an argument register.
            iced_x86::Mnemonic::Lea => matches!(
                ins.op0_register(),
                iced_x86::Register::R12 | iced_x86::Register::R13
            ),
            _ => false,
        };
        if ins.flow_control() == iced_x86::FlowControl::ConditionalBranch {
            return Ok(ins.ip());
        }
        if !harmless {
            break;
        }
    }
    Ok(code.file_offset)
}

fn function_bytes(data: &[u8], code: FunctionCode) -> Result<&[u8]> {
    let start = usize::try_from(code.file_offset).map_err(|_| truncated("function code"))?;
    let len = usize::try_from(code.len).map_err(|_| truncated("function code"))?;
    start
        .checked_add(len)
        .and_then(|end| data.get(start..end))
        .filter(|b| !b.is_empty())
        .ok_or(truncated("function code"))
}

/// x86-64 exits: walk the control flow from the entry, ending a path at a CALL to `callee` or
/// a return. An indirect jump makes the walk unsure, so then every return counts.
fn x86_exits(bytes: &[u8], base: u64, callee: Option<u64>) -> Vec<u64> {
    use iced_x86::{Code, FlowControl};
    // Decode in file-offset space so CALL targets compare with the callee's offset (a direct
    // CALL is relative, so the translation cancels out).
    let insns: Vec<iced_x86::Instruction> =
        iced_x86::Decoder::with_ip(64, bytes, base, iced_x86::DecoderOptions::NONE)
            .into_iter()
            .collect();
    let index: HashMap<u64, usize> = insns.iter().enumerate().map(|(i, x)| (x.ip(), i)).collect();
    let is_return = |x: &iced_x86::Instruction| matches!(x.code(), Code::Retnq | Code::Retnq_imm16);
    let calls_callee = |x: &iced_x86::Instruction| {
        x.code() == Code::Call_rel32_64 && callee.is_some_and(|c| x.near_branch_target() == c)
    };

    let mut seen = vec![false; insns.len()];
    let mut todo = vec![0usize];
    let mut exits = Vec::new();
    while let Some(i) = todo.pop() {
        let Some(ins) = insns.get(i) else { continue };
        if std::mem::replace(&mut seen[i], true) {
            continue;
        }
        if calls_callee(ins) || is_return(ins) {
            exits.push(ins.ip());
            continue;
        }
        let target = || index.get(&ins.near_branch_target()).copied();
        match ins.flow_control() {
            FlowControl::UnconditionalBranch => todo.extend(target()),
            FlowControl::ConditionalBranch => {
                todo.extend(target());
                todo.push(i + 1);
            }
            // INT3/UD2 padding after calls that do not return.
            FlowControl::Interrupt | FlowControl::Exception => {}
            FlowControl::IndirectBranch => {
                // A jump table we do not follow: fall back to every return and callee call.
                return insns
                    .iter()
                    .filter(|x| is_return(x) || calls_callee(x))
                    .map(iced_x86::Instruction::ip)
                    .collect();
            }
            // Calls (including to functions that never return: conservative), plain code.
            _ => todo.push(i + 1),
        }
    }
    exits.sort_unstable();
    exits
}

fn parse_elf(data: &[u8]) -> Result<object::File<'_>> {
    if !data.starts_with(b"\x7fELF") {
        return Err(GoBinaryError::NotElf);
    }
    Ok(object::File::parse(data)?)
}

fn truncated(what: &'static str) -> GoBinaryError {
    GoBinaryError::Truncated { what }
}

fn section_data<'a>(s: &object::Section<'a, '_>, what: &'static str) -> Result<&'a [u8]> {
    s.data().map_err(|_| truncated(what))
}

fn section_flags(s: &object::Section<'_, '_>) -> elf::SectionFlags {
    match s.flags() {
        SectionFlags::Elf { sh_flags, .. } => sh_flags,
        _ => elf::SectionFlags::default(),
    }
}

/// Loaded, file-backed section containing `addr`, with the section's bytes.
fn section_for_addr<'a>(file: &object::File<'a>, addr: u64) -> Option<(u64, u64, &'a [u8])> {
    file.sections().find_map(|s| {
        let (offset, size) = s.file_range()?; // None for SHT_NOBITS (.bss)
        let start = s.address();
        if !section_flags(&s).contains(SHF_ALLOC) || addr < start || addr - start >= size {
            return None;
        }
        Some((start, offset, s.data().ok()?))
    })
}

fn vaddr_to_file_offset(file: &object::File<'_>, addr: u64) -> Result<u64> {
    section_for_addr(file, addr)
        .and_then(|(start, offset, _)| (addr - start).checked_add(offset))
        .ok_or(GoBinaryError::NoSectionForAddress { addr })
}

/// `len` bytes at virtual address `addr`, if one section holds all of them.
fn read_vaddr<'a>(file: &object::File<'a>, addr: u64, len: u64) -> Option<&'a [u8]> {
    let (start, _, bytes) = section_for_addr(file, addr)?;
    let from = usize::try_from(addr - start).ok()?;
    bytes.get(from..from.checked_add(usize::try_from(len).ok()?)?)
}

// ---- endian-aware, bounds-checked reads -------------------------------------------

fn read_u32(d: &[u8], off: usize, le: bool) -> Option<u32> {
    let b: [u8; 4] = d.get(off..off.checked_add(4)?)?.try_into().ok()?;
    Some(if le {
        u32::from_le_bytes(b)
    } else {
        u32::from_be_bytes(b)
    })
}

/// A pointer-sized (4 or 8 byte) unsigned word.
fn read_word(d: &[u8], off: usize, size: usize, le: bool) -> Option<u64> {
    if size == 4 {
        return read_u32(d, off, le).map(u64::from);
    }
    let b: [u8; 8] = d.get(off..off.checked_add(8)?)?.try_into().ok()?;
    Some(if le {
        u64::from_le_bytes(b)
    } else {
        u64::from_be_bytes(b)
    })
}

fn read_uvarint(d: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for (i, &b) in d.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, d.get(i + 1..)?));
        }
    }
    None
}

// ---- .go.buildinfo ------------------------------------------------------------------

/// Mirrors debug/buildinfo: a 16-byte aligned header; since Go 1.18 (flags & 2) the
/// version is inlined after it, before that the header holds a pointer to a Go string.
fn read_build_version(file: &object::File<'_>, section: &[u8]) -> Option<String> {
    let hdr = (0..section.len())
        .step_by(16)
        .filter_map(|i| section.get(i..))
        .find(|d| d.starts_with(BUILDINFO_MAGIC) && d.len() >= BUILDINFO_HEADER_LEN)?;
    let ptr_size = usize::from(*hdr.get(14)?);
    let flags = *hdr.get(15)?;
    let bytes = if flags & 2 != 0 {
        let (len, rest) = read_uvarint(hdr.get(BUILDINFO_HEADER_LEN..)?)?;
        rest.get(..usize::try_from(len).ok()?)?
    } else {
        if ptr_size != 4 && ptr_size != 8 {
            return None;
        }
        let le = flags & 1 == 0;
        // runtime.buildVersion is a Go string header {data, len}. In PIE files the
        // pointers may be zero until relocated: then there is simply no version.
        let str_addr = read_word(hdr, 16, ptr_size, le)?;
        let str_hdr = read_vaddr(file, str_addr, 2 * ptr_size as u64)?;
        let data_addr = read_word(str_hdr, 0, ptr_size, le)?;
        let len = read_word(str_hdr, ptr_size, ptr_size, le)?;
        if len > MAX_VERSION_LEN {
            return None;
        }
        read_vaddr(file, data_addr, len)?
    };
    let version = std::str::from_utf8(bytes).ok()?;
    (!version.is_empty()).then(|| version.to_owned())
}

/// "go1.19.8" -> (1, 19); also copes with "go1.21rc2", "devel go1.22-abc", "go1.20 X:boringcrypto".
fn parse_go_version(v: &str) -> Option<(u32, u32)> {
    let rest = v.get(v.find("go1")? + 2..)?;
    let mut nums = rest.split(|c: char| !c.is_ascii_digit());
    let major = nums.next()?.parse().ok()?;
    let minor = nums.next()?.parse().ok()?;
    Some((major, minor))
}

// ---- .symtab --------------------------------------------------------------------------

/// Virtual addresses of the named functions from `.symtab` (all None when stripped).
fn symtab_lookup(file: &object::File<'_>, names: &[&str]) -> Vec<Option<(u64, u64)>> {
    let mut found: HashMap<&[u8], Option<(u64, u64)>> =
        names.iter().map(|n| (n.as_bytes(), None)).collect();
    if let Some(table) = file.symbol_table() {
        for sym in table.symbols() {
            if sym.kind() != SymbolKind::Text || !sym.is_definition() {
                continue;
            }
            if let Some(slot @ None) = sym.name_bytes().ok().and_then(|n| found.get_mut(n)) {
                *slot = Some((sym.address(), sym.size()));
            }
        }
    }
    names
        .iter()
        .map(|n| found.get(n.as_bytes()).copied().flatten())
        .collect()
}

// ---- .gopclntab ---------------------------------------------------------------------

/// The parts of the runtime's pcHeader/functab needed to map names to entry PCs.
/// Layouts: runtime/symtab.go (pcHeader, functab, _func) for Go 1.16 through 1.2x.
struct Pclntab<'a> {
    le: bool,
    /// Go >= 1.18: functab holds u32 offsets from `text_start`, not pointer-size PCs.
    relative: bool,
    ptr_size: usize,
    nfunc: usize,
    text_start: u64,
    funcnametab: &'a [u8],
    /// `functab` pairs followed by the `_func` records their offsets point at.
    functab: &'a [u8],
}

impl<'a> Pclntab<'a> {
    /// `fallback_text` is used for Go >= 1.18 when the header's textStart is an
    /// unrelocated zero (what debug/gosym always uses: the `.text` address).
    fn parse(d: &'a [u8], le: bool, fallback_text: Option<u64>) -> Result<Self> {
        let magic = read_u32(d, 0, le).ok_or(truncated("pclntab header"))?;
        let relative = match magic {
            MAGIC_GO116 => false,
            MAGIC_GO118 | MAGIC_GO120 => true,
            _ => return Err(GoBinaryError::UnsupportedPclntab { magic }),
        };
        let (pad, quantum, ptr_size) = match d.get(4..8) {
            Some(&[p1, p2, q, p]) => ((p1, p2), q, usize::from(p)),
            _ => {
                return Err(truncated("pclntab header"));
            }
        };
        if pad != (0, 0) || !matches!(quantum, 1 | 2 | 4) || !matches!(ptr_size, 4 | 8) {
            return Err(GoBinaryError::InvalidPclntab {
                reason: "bad header fields",
            });
        }
        let word = |i: usize| {
            read_word(d, 8 + i * ptr_size, ptr_size, le)
                .and_then(|w| usize::try_from(w).ok())
                .ok_or(truncated("pclntab header"))
        };
        // Header words: nfunc, nfiles, [textStart (1.18+)], funcnameOffset, cuOffset,
        // filetabOffset, pctabOffset, pclnOffset.
        let (text_start, funcname_word, pcln_word) = if relative {
            let ts = read_word(d, 8 + 2 * ptr_size, ptr_size, le).unwrap_or(0);
            let ts = if ts == 0 {
                fallback_text.unwrap_or(0)
            } else {
                ts
            };
            (ts, 3, 7)
        } else {
            (0, 2, 6)
        };
        let nfunc = word(0)?;
        let funcnametab = d
            .get(word(funcname_word)?..)
            .ok_or(truncated("pclntab funcnametab"))?;
        let functab = d
            .get(word(pcln_word)?..)
            .ok_or(truncated("pclntab functab"))?;
        let tab = Pclntab {
            le,
            relative,
            ptr_size,
            nfunc,
            text_start,
            funcnametab,
            functab,
        };
        // nfunc+1 (entry, funcoff) pairs must fit: bounds every later loop by the file size.
        let pairs_len = nfunc
            .checked_add(1)
            .and_then(|n| n.checked_mul(2 * tab.field_size()))
            .filter(|&len| len <= functab.len());
        if nfunc == 0 || pairs_len.is_none() {
            return Err(GoBinaryError::InvalidPclntab {
                reason: "function count does not fit",
            });
        }
        Ok(tab)
    }

    fn field_size(&self) -> usize {
        if self.relative { 4 } else { self.ptr_size }
    }

    fn field(&self, index: usize) -> Result<u64> {
        let size = self.field_size();
        index
            .checked_mul(size)
            .and_then(|off| read_word(self.functab, off, size, self.le))
            .ok_or(truncated("pclntab functab"))
    }

    /// Entry PC of function `i`.
    fn entry(&self, i: usize) -> Result<u64> {
        let raw = self.field(2 * i)?;
        Ok(if self.relative {
            self.text_start.wrapping_add(raw)
        } else {
            raw
        })
    }

    /// Name of function `i`: `_func.nameOff`, right after `_func`'s entry field (which is
    /// as wide as a functab field), indexes funcnametab.
    fn name(&self, i: usize) -> Result<&'a [u8]> {
        let func_off = self.field(2 * i + 1)?;
        let name_off = usize::try_from(func_off)
            .ok()
            .and_then(|off| off.checked_add(self.field_size()))
            .and_then(|off| read_u32(self.functab, off, self.le))
            .ok_or(truncated("pclntab _func record"))?;
        let name = usize::try_from(name_off)
            .ok()
            .and_then(|off| self.funcnametab.get(off..))
            .ok_or(truncated("pclntab funcnametab"))?;
        let end = name
            .iter()
            .position(|&b| b == 0)
            .ok_or(truncated("pclntab funcnametab"))?;
        Ok(name.get(..end).unwrap_or_default())
    }
}

/// Finds and parses the pclntab: by section name, else (externally linked binaries,
/// where ld folds it into `.data.rel.ro`) by scanning loaded data for a valid header.
fn load_pclntab<'a>(file: &object::File<'a>) -> Result<Pclntab<'a>> {
    let le = file.is_little_endian();
    let text = file.section_by_name(".text").map(|s| s.address());
    if let Some(s) = PCLNTAB_SECTIONS
        .iter()
        .find_map(|n| file.section_by_name(n))
    {
        return Pclntab::parse(section_data(&s, ".gopclntab section")?, le, text);
    }
    let is_code = |addr: u64| {
        file.sections().any(|s| {
            section_flags(&s).contains(SHF_EXECINSTR)
                && addr >= s.address()
                && addr - s.address() < s.size()
        })
    };
    for s in file.sections() {
        let flags = section_flags(&s);
        if !flags.contains(SHF_ALLOC) || flags.contains(SHF_EXECINSTR) {
            continue;
        }
        let Ok(d) = s.data() else { continue };
        // pcHeader is pointer-aligned; the magic alone is cheap to reject on.
        for off in (0..d.len()).step_by(8) {
            if !matches!(
                read_u32(d, off, le),
                Some(MAGIC_GO116 | MAGIC_GO118 | MAGIC_GO120)
            ) {
                continue;
            }
            let Some(Ok(tab)) = d.get(off..).map(|d| Pclntab::parse(d, le, text)) else {
                continue;
            };
            // Reject look-alikes: the first function must be named and start in code.
            if tab.name(0).is_ok_and(|n| !n.is_empty()) && tab.entry(0).is_ok_and(is_code) {
                return Ok(tab);
            }
        }
    }
    Err(GoBinaryError::NoPclntab)
}

/// Virtual addresses and sizes of the named functions from the pclntab. A function ends where
/// the next one starts (the functab has an extra final entry: the end of the text).
fn pclntab_lookup(file: &object::File<'_>, names: &[&str]) -> Result<Vec<Option<(u64, u64)>>> {
    let tab = load_pclntab(file)?;
    let mut found: HashMap<&[u8], Option<(u64, u64)>> =
        names.iter().map(|n| (n.as_bytes(), None)).collect();
    let mut missing = found.len();
    for i in 0..tab.nfunc {
        if missing == 0 {
            break;
        }
        if let Some(slot @ None) = found.get_mut(tab.name(i)?) {
            let entry = tab.entry(i)?;
            let size = tab.entry(i + 1)?.saturating_sub(entry);
            *slot = Some((entry, size));
            missing -= 1;
        }
    }
    Ok(names
        .iter()
        .map(|n| found.get(n.as_bytes()).copied().flatten())
        .collect())
}

#[cfg(test)]
mod tests;
