//! Transparent interception: cgroup `connect4`/`connect6` steer TCP connects to selected
//! destinations into the agent's intercept listener, keeping what the application dialed;
//! `sock_ops` publishes the redirected socket's own address for the listener to look up;
//! `getpeername4`/`getpeername6` give the application back the address it dialed.
//!
//! Every program lets the operation through (returns 1) whatever happens: a failure here leaves
//! the connect as the application made it (fail open), and is counted.

use agent_common::intercept::{
    DestinationKey, INTERCEPT_COUNTER_SLOTS, InterceptConfig, InterceptCounter,
    MAX_DESTINATION_RULES, MAX_PENDING_PEERS, MAX_REDIRECTED_SOCKETS, OriginalDestination,
    PORT_PREFIX_BITS, PeerKey,
};
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, bpf_sock_addr,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::{SockAddrContext, SockOpsContext},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;

#[unsafe(no_mangle)]
static INTERCEPT_CONFIG: InterceptConfig = InterceptConfig::UNSET;

/// Selected destinations: (port, address) prefixes, value the rule's index.
#[map]
static DESTINATIONS: LpmTrie<DestinationKey, u32> =
    LpmTrie::with_max_entries(MAX_DESTINATION_RULES, 0);

/// Socket cookie of each redirected socket -> what it dialed (for `getpeername`, and for
/// `sock_ops` to publish it). Removed when the socket closes.
#[map]
static BY_COOKIE: LruHashMap<u64, OriginalDestination> =
    LruHashMap::with_max_entries(MAX_REDIRECTED_SOCKETS, 0);

/// The redirected socket's own address and port -> what it dialed: the listener looks its
/// accepted connection's peer up here, then removes the entry.
#[map]
static BY_PEER: LruHashMap<PeerKey, OriginalDestination> =
    LruHashMap::with_max_entries(MAX_PENDING_PEERS, 0);

#[map]
static INTERCEPT_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(INTERCEPT_COUNTER_SLOTS, 0);

#[inline(always)]
fn config() -> InterceptConfig {
    // SAFETY: a plain static, rewritten by the loader in `.rodata`; volatile so the compiler
    // does not fold the placeholder.
    unsafe { core::ptr::read_volatile(&raw const INTERCEPT_CONFIG) }
}

#[inline(always)]
fn bump(counter: InterceptCounter) {
    if let Some(slot) = INTERCEPT_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn mapped_v4(addr_be: u32) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[10] = 0xff;
    a[11] = 0xff;
    a[12..16].copy_from_slice(&addr_be.to_ne_bytes());
    a
}

#[inline(always)]
fn v6_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0..4].copy_from_slice(&words[0].to_ne_bytes());
    a[4..8].copy_from_slice(&words[1].to_ne_bytes());
    a[8..12].copy_from_slice(&words[2].to_ne_bytes());
    a[12..16].copy_from_slice(&words[3].to_ne_bytes());
    a
}

#[inline(always)]
fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[0..10] == [0u8; 10] && a[10] == 0xff && a[11] == 0xff
}

/// The selection rule for a destination: the dialed port's prefixes first, then any port's.
#[inline(always)]
fn selected(addr: &[u8; 16], port_be: u16) -> Option<u32> {
    let mut data: DestinationKey = [0; 18];
    data[0..2].copy_from_slice(&port_be.to_ne_bytes());
    data[2..18].copy_from_slice(addr);
    let bits = PORT_PREFIX_BITS + 128;
    if let Some(rule) = DESTINATIONS.get(Key::new(bits, data)) {
        return Some(*rule);
    }
    data[0] = 0;
    data[1] = 0;
    DESTINATIONS.get(Key::new(bits, data)).copied()
}

/// Which of the agent's listeners a steered connect goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// The agent's own namespace: its loopback listener.
    Loopback,
    /// Another namespace (a pod's): the node listener, if there is one.
    Node,
}

/// Whether this connect is one to steer, the rule that selected it, and where it goes.
#[inline(always)]
fn select(
    ctx: &SockAddrContext,
    sa: &bpf_sock_addr,
    addr: &[u8; 16],
    port_be: u16,
) -> Option<(u32, Via)> {
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return None;
    }
    let rule = selected(addr, port_be)?;
    let cfg = config();
    // SAFETY: `sk` is always set for connect hooks (the verifier types it as a socket).
    let mark = unsafe { (*sa.__bindgen_anon_1.sk).mark };
    if cfg.own_mark != 0 && mark == cfg.own_mark {
        bump(InterceptCounter::OwnSkipped);
        return None;
    }
    // SAFETY: helper on the program's own context.
    let own_netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } == cfg.netns_cookie;
    Some((rule, if own_netns { Via::Loopback } else { Via::Node }))
}

/// Keeps what was dialed under the socket's cookie; false when it could not be kept (the
/// connect then goes where it was dialed).
#[inline(always)]
fn remember(ctx: &SockAddrContext, orig: &OriginalDestination) -> bool {
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if BY_COOKIE.insert(cookie, orig, 0).is_err() {
        bump(InterceptCounter::StoreFailed);
        return false;
    }
    true
}

#[cgroup_sock_addr(connect4)]
pub fn intercept_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let addr = mapped_v4(sa.user_ip4);
    let port_be = sa.user_port as u16;
    let Some((rule, via)) = select(&ctx, sa, &addr, port_be) else {
        return 1;
    };
    let cfg = config();
    let (to_addr, to_port) = match via {
        Via::Loopback => (cfg.listen4_addr, cfg.listen4_port),
        Via::Node => (cfg.node4_addr, cfg.node4_port),
    };
    if to_port == 0 {
        bump(InterceptCounter::OtherNetnsSkipped);
        return 1;
    }
    let orig = OriginalDestination {
        addr,
        port: port_be,
        family: AF_INET as u16,
        rule,
    };
    if remember(&ctx, &orig) {
        sa.user_ip4 = to_addr;
        sa.user_port = to_port;
        redirected(via);
    }
    1
}

#[inline(always)]
fn redirected(via: Via) {
    bump(InterceptCounter::Redirected);
    if via == Via::Node {
        bump(InterceptCounter::RedirectedToNode);
    }
}

#[cgroup_sock_addr(connect6)]
pub fn intercept_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let words = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let addr = v6_bytes(words);
    let port_be = sa.user_port as u16;
    let Some((rule, via)) = select(&ctx, sa, &addr, port_be) else {
        return 1;
    };
    let cfg = config();
    let (to4, to4_port, to6, to6_port) = match via {
        Via::Loopback => (
            cfg.listen4_addr,
            cfg.listen4_port,
            cfg.listen6_addr,
            cfg.listen6_port,
        ),
        Via::Node => (
            cfg.node4_addr,
            cfg.node4_port,
            cfg.node6_addr,
            cfg.node6_port,
        ),
    };
    // A dual-stack socket dialing an IPv4 address goes to the IPv4 listener, mapped.
    let mapped = is_v4_mapped(&addr);
    if (mapped && to4_port == 0) || (!mapped && to6_port == 0) {
        bump(match via {
            Via::Loopback => InterceptCounter::NoListenerSkipped,
            Via::Node => InterceptCounter::OtherNetnsSkipped,
        });
        return 1;
    }
    let orig = OriginalDestination {
        addr,
        port: port_be,
        family: AF_INET6 as u16,
        rule,
    };
    if !remember(&ctx, &orig) {
        return 1;
    }
    if mapped {
        sa.user_ip6[0] = 0;
        sa.user_ip6[1] = 0;
        sa.user_ip6[2] = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        sa.user_ip6[3] = to4;
        sa.user_port = to4_port;
    } else {
        sa.user_ip6[0] = to6[0];
        sa.user_ip6[1] = to6[1];
        sa.user_ip6[2] = to6[2];
        sa.user_ip6[3] = to6[3];
        sa.user_port = to6_port;
    }
    redirected(via);
    1
}

/// `getpeername()` of a redirected socket: what the application dialed, not the listener.
#[inline(always)]
fn restore_peer(ctx: &SockAddrContext, v6: bool) {
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: read-only copy of a map value.
    let Some(orig) = (unsafe { BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let a = orig.addr;
    if v6 {
        sa.user_ip6[0] = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
        sa.user_ip6[1] = u32::from_ne_bytes([a[4], a[5], a[6], a[7]]);
        sa.user_ip6[2] = u32::from_ne_bytes([a[8], a[9], a[10], a[11]]);
        sa.user_ip6[3] = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
    } else {
        sa.user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
    }
    sa.user_port = u32::from(orig.port);
    bump(InterceptCounter::PeerNameRestored);
}

#[cgroup_sock_addr(getpeername4)]
pub fn intercept_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, false);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn intercept_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, true);
    1
}

/// The socket's IPv6 address, word by word: the verifier allows only 4-byte loads of the
/// context's address fields, and a plain copy may be merged into 8-byte ones.
#[inline(always)]
fn local_ip6(ctx: &SockOpsContext) -> [u32; 4] {
    // SAFETY: the context pointer is valid for the program's run; each read is one aligned
    // u32 of it.
    unsafe {
        let words = &raw const (*ctx.ops).local_ip6;
        let first = words.cast::<u32>();
        [
            core::ptr::read_volatile(first),
            core::ptr::read_volatile(first.add(1)),
            core::ptr::read_volatile(first.add(2)),
            core::ptr::read_volatile(first.add(3)),
        ]
    }
}

/// At the SYN of a redirected socket its own port is known: publish (address, port) -> what it
/// dialed, which is how the listener finds the destination of the connection it accepts. And
/// forget the socket when it closes.
#[sock_ops]
pub fn intercept_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB {
        return 1;
    }
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    if op == BPF_SOCK_OPS_STATE_CB {
        // arg 1: the new state.
        if ctx.arg(1) == BPF_TCP_CLOSE {
            let _ = BY_COOKIE.remove(cookie);
        }
        return 1;
    }
    // SAFETY: read-only copy of a map value.
    let Some(orig) = (unsafe { BY_COOKIE.get(cookie) }).copied() else {
        return 1;
    };
    // A dual-stack socket dialing IPv4 has no IPv6 source yet at this point.
    let local6 = v6_bytes(local_ip6(&ctx));
    let addr = if ctx.family() == AF_INET || local6 == [0u8; 16] {
        mapped_v4(ctx.local_ip4())
    } else {
        local6
    };
    let key = PeerKey {
        addr,
        port: (ctx.local_port() as u16).to_be(),
        pad: 0,
    };
    if BY_PEER.insert(key, orig, 0).is_ok() {
        bump(InterceptCounter::PeerPublished);
    } else {
        bump(InterceptCounter::PeerPublishFailed);
    }
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    1
}
