//! TCP reset signals: decoding the raw tracepoint record with tracefs' layout.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use agent_common::events::{ResetDirection, TcpResetEvent};
use serde::Serialize;

use super::tracepoint::{Field, TracepointFormat};
use super::{DecodeError, comm_str, read_record};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Sent,
    Received,
}

/// The task that caused a reset, known only when the probe ran in task context.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Task {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct TcpReset {
    /// CLOCK_MONOTONIC nanoseconds when the kernel saw the reset.
    pub ktime_ns: u64,
    pub direction: Direction,
    /// This host's end of the connection. A sent reset goes from `local` to `remote`, a received
    /// one from `remote` to `local`.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Socket state when the reset happened (`ESTABLISHED`, ...); None without a socket.
    pub state: Option<&'static str>,
    /// Why the kernel sent it (`sk_rst_reason`, Linux 6.10+); None for received resets.
    pub reason: Option<String>,
    pub task: Option<Task>,
    pub netns: Option<u32>,
    pub cgroup_id: Option<u64>,
    pub sock_cookie: Option<u64>,
}

/// How the addresses of one tracepoint's record are laid out.
#[derive(Clone, Debug)]
enum AddressLayout {
    /// Linux 6.10+ `tcp_send_reset`: `saddr`/`daddr` are `struct sockaddr_in{,6}` in 28 bytes.
    Sockaddr { saddr: Field, daddr: Field },
    /// `tcp_event_sk` and older `tcp_send_reset`: host-order ports, a family, and v4 and
    /// v4-mapped-or-v6 addresses side by side.
    Split {
        sport: Field,
        dport: Field,
        family: Field,
        saddr: Field,
        daddr: Field,
        saddr_v6: Field,
        daddr_v6: Field,
    },
}

#[derive(Clone, Debug)]
pub struct RecordLayout {
    addresses: AddressLayout,
    reason: Option<(Field, HashMap<u64, String>)>,
    sock_cookie: Option<Field>,
}

impl RecordLayout {
    pub fn from_format(format: &TracepointFormat) -> Option<Self> {
        let f = |name: &str| format.field(name).cloned();
        let addresses = match (f("saddr"), f("daddr")) {
            (Some(saddr), Some(daddr)) if saddr.size >= 28 && daddr.size >= 28 => {
                AddressLayout::Sockaddr { saddr, daddr }
            }
            (Some(saddr), Some(daddr)) => AddressLayout::Split {
                sport: f("sport")?,
                dport: f("dport")?,
                family: f("family")?,
                saddr,
                daddr,
                saddr_v6: f("saddr_v6")?,
                daddr_v6: f("daddr_v6")?,
            },
            _ => return None,
        };
        let reason = f("reason").map(|field| {
            (
                field,
                format.symbols.get("reason").cloned().unwrap_or_default(),
            )
        });
        Some(Self {
            addresses,
            reason,
            sock_cookie: f("sock_cookie"),
        })
    }
}

/// Decodes `TcpResetEvent`s with the layouts of this kernel's two tracepoints.
#[derive(Clone, Debug, Default)]
pub struct TcpResetDecoder {
    pub sent: Option<RecordLayout>,
    pub received: Option<RecordLayout>,
}

impl TcpResetDecoder {
    pub fn decode(&self, bytes: &[u8]) -> Result<TcpReset, DecodeError> {
        let ev: TcpResetEvent = read_record(bytes, "tcp reset")?;
        let (direction, layout) = match ev.direction {
            d if d == ResetDirection::Sent as u32 => (Direction::Sent, &self.sent),
            d if d == ResetDirection::Received as u32 => (Direction::Received, &self.received),
            _ => return Err(DecodeError::TcpReset("unknown direction")),
        };
        let layout = layout
            .as_ref()
            .ok_or(DecodeError::TcpReset("no layout for this tracepoint"))?;
        let len = (ev.record_len as usize).min(ev.record.len());
        if len == 0 {
            return Err(DecodeError::TcpReset("kernel could not copy the record"));
        }
        let record = &ev.record[..len];
        let (local, remote) = addresses(&layout.addresses, record)?;
        let reason = layout.reason.as_ref().and_then(|(field, names)| {
            let v = read_uint(record, field)?;
            Some(names.get(&v).cloned().unwrap_or_else(|| v.to_string()))
        });
        Ok(TcpReset {
            ktime_ns: ev.header.ktime_ns,
            direction,
            local,
            remote,
            state: tcp_state_name(ev.sk_state),
            reason,
            task: (ev.task_context == 1).then(|| Task {
                pid: ev.pid,
                tid: ev.tid,
                comm: comm_str(&ev.comm),
            }),
            netns: (ev.netns_ino != 0).then_some(ev.netns_ino),
            cgroup_id: (ev.cgroup_id != 0).then_some(ev.cgroup_id),
            sock_cookie: layout
                .sock_cookie
                .as_ref()
                .and_then(|f| read_uint(record, f))
                .filter(|&c| c != 0),
        })
    }
}

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

fn addresses(layout: &AddressLayout, r: &[u8]) -> Result<(SocketAddr, SocketAddr), DecodeError> {
    let bad = DecodeError::TcpReset("address fields outside the record");
    match layout {
        AddressLayout::Sockaddr { saddr, daddr } => Ok((
            sockaddr(slice(r, saddr).ok_or(bad.clone())?)?,
            sockaddr(slice(r, daddr).ok_or(bad)?)?,
        )),
        AddressLayout::Split {
            sport,
            dport,
            family,
            saddr,
            daddr,
            saddr_v6,
            daddr_v6,
        } => {
            let family = read_uint(r, family).ok_or(bad.clone())? as u16;
            let sport = read_uint(r, sport).ok_or(bad.clone())? as u16;
            let dport = read_uint(r, dport).ok_or(bad.clone())? as u16;
            let (s, d) = match family {
                AF_INET => (
                    IpAddr::V4(ipv4(slice(r, saddr).ok_or(bad.clone())?)?),
                    IpAddr::V4(ipv4(slice(r, daddr).ok_or(bad)?)?),
                ),
                AF_INET6 => (
                    IpAddr::V6(ipv6(slice(r, saddr_v6).ok_or(bad.clone())?)?),
                    IpAddr::V6(ipv6(slice(r, daddr_v6).ok_or(bad)?)?),
                ),
                _ => return Err(DecodeError::TcpReset("unknown address family")),
            };
            Ok((SocketAddr::new(s, sport), SocketAddr::new(d, dport)))
        }
    }
}

/// A `struct sockaddr_in` or `sockaddr_in6` as the kernel stores it: host-order family,
/// network-order port.
fn sockaddr(b: &[u8]) -> Result<SocketAddr, DecodeError> {
    let family = u16::from_ne_bytes([b[0], b[1]]);
    let port = u16::from_be_bytes([b[2], b[3]]);
    match family {
        AF_INET => Ok(SocketAddr::new(IpAddr::V4(ipv4(&b[4..8])?), port)),
        AF_INET6 => Ok(SocketAddr::new(IpAddr::V6(ipv6(&b[8..24])?), port)),
        _ => Err(DecodeError::TcpReset("unknown address family")),
    }
}

fn ipv4(b: &[u8]) -> Result<Ipv4Addr, DecodeError> {
    let a: [u8; 4] = b
        .get(..4)
        .and_then(|s| s.try_into().ok())
        .ok_or(DecodeError::TcpReset("short ipv4"))?;
    Ok(Ipv4Addr::from(a))
}

fn ipv6(b: &[u8]) -> Result<Ipv6Addr, DecodeError> {
    let a: [u8; 16] = b
        .get(..16)
        .and_then(|s| s.try_into().ok())
        .ok_or(DecodeError::TcpReset("short ipv6"))?;
    Ok(Ipv6Addr::from(a))
}

fn slice<'a>(r: &'a [u8], f: &Field) -> Option<&'a [u8]> {
    r.get(f.offset..f.offset.checked_add(f.size)?)
}

/// A native-endian unsigned integer field of 1, 2, 4 or 8 bytes.
fn read_uint(r: &[u8], f: &Field) -> Option<u64> {
    let b = slice(r, f)?;
    Some(match f.size {
        1 => u64::from(b[0]),
        2 => u64::from(u16::from_ne_bytes(b.try_into().ok()?)),
        4 => u64::from(u32::from_ne_bytes(b.try_into().ok()?)),
        8 => u64::from_ne_bytes(b.try_into().ok()?),
        _ => return None,
    })
}

/// `include/net/tcp_states.h`; stable numbering, shared with userspace tools like `ss`.
pub fn tcp_state_name(state: u32) -> Option<&'static str> {
    Some(match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        13 => "BOUND_INACTIVE",
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
