//! Typed kernel signals, decoded from ring-buffer records.
//!
//! Decoding is pure: bytes in, a [`Signal`] or a [`DecodeError`] out. Every record the agent
//! cannot decode is counted by the reader, never silently skipped.

pub mod go_stw;
pub mod h2_frame;
pub mod rapid_reset;
pub mod tcp_reset;
pub mod tracepoint;

use agent_common::events::{EventHeader, EventKind};

pub use go_stw::GoStwPause;
pub use tcp_reset::{TcpReset, TcpResetDecoder};

/// Declares [`SignalKind`] and its `ALL` from one list, so that a new kind cannot be left out
/// of `ALL` (which the stats, the API's figures and the metrics walk).
macro_rules! signal_kinds {
    ($($(#[$doc:meta])* $kind:ident => $name:literal,)+) => {
        /// The kinds of signal the correlator acts on, by the name the stats, metrics, API and
        /// trip events use. Matches over it are exhaustive: a new kind must be given its
        /// counters and metric.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
        #[serde(rename_all = "snake_case")]
        pub enum SignalKind {
            $($(#[$doc])* $kind,)+
        }

        impl SignalKind {
            pub const ALL: [SignalKind; [$(stringify!($kind)),+].len()] =
                [$(SignalKind::$kind,)+];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $(SignalKind::$kind => $name,)+
                }
            }
        }
    };
}

signal_kinds! {
    /// A TCP reset on a proxied connection.
    TcpReset => "tcp_reset",
    /// RST_STREAM on a proxied connection.
    RstStream => "rst_stream",
    /// GOAWAY on a proxied connection.
    Goaway => "goaway",
    /// A Go stop-the-world pause of a process serving an endpoint.
    GoStw => "go_stw",
    /// A client resetting streams faster than allowed (CVE-2023-44487).
    RapidReset => "rapid_reset",
}

impl std::fmt::Display for SignalKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug)]
pub enum Signal {
    TcpReset(TcpReset),
    GoStw(GoStwPause),
    H2Frame(h2_frame::H2Frame),
    H2Flow(h2_frame::H2FlowChange),
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is too short for {what} ({need} bytes)")]
    Short {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    #[error("tcp reset record: {0}")]
    TcpReset(&'static str),
    #[error("http/2 record: {0}")]
    H2(&'static str),
}

/// Decodes ring-buffer records into signals.
pub struct Decoder {
    pub tcp_reset: TcpResetDecoder,
}

impl Decoder {
    /// Appends the signals of one record to `out`: one, or several for a batch of frames.
    pub fn decode_into(&self, bytes: &[u8], out: &mut Vec<Signal>) -> Result<(), DecodeError> {
        let header: EventHeader = read_record(bytes, "event header")?;
        let signal = match EventKind::from_u32(header.kind) {
            Some(EventKind::TcpReset) => Signal::TcpReset(self.tcp_reset.decode(bytes)?),
            Some(EventKind::GoStw) => Signal::GoStw(go_stw::decode(bytes)?),
            // Written to PROCESS_EVENTS, which Go process discovery reads; never to this ring.
            Some(EventKind::ProcessExec | EventKind::ProcessExit) => {
                return Err(DecodeError::UnknownKind(header.kind));
            }
            Some(EventKind::H2Frame) => Signal::H2Frame(h2_frame::decode_frame(bytes)?),
            Some(EventKind::H2Flow) => Signal::H2Flow(h2_frame::decode_flow(bytes)?),
            Some(EventKind::H2FrameBatch) => {
                return h2_frame::decode_batch(bytes, |f| out.push(Signal::H2Frame(f)));
            }
            None => return Err(DecodeError::UnknownKind(header.kind)),
        };
        out.push(signal);
        Ok(())
    }
}

/// CLOCK_MONOTONIC now, in the kernel's `bpf_ktime_get_ns` terms.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Copies a `repr(C)` record out of possibly unaligned ring-buffer bytes.
///
/// Only for the plain-integer wire types of `agent_common::events`, for which any bit pattern is
/// a valid value.
pub(crate) fn read_record<T: Copy>(bytes: &[u8], what: &'static str) -> Result<T, DecodeError> {
    let need = std::mem::size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Short {
            what,
            len: bytes.len(),
            need,
        });
    }
    // SAFETY: length checked above; read_unaligned has no alignment requirement; T is one of the
    // integer-only wire structs, valid for any bit pattern.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// A kernel `comm`: NUL-terminated, at most 16 bytes, not necessarily UTF-8.
pub fn comm_str(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}
