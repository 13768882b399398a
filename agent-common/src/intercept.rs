//! Transparent interception (`agent-intercept`): the cgroup programs that steer selected TCP
//! connects into the agent's intercept listener, and what they leave for the agent to find the
//! destination the application dialed.
//!
//! Addresses are kept as 16 bytes, IPv4 as IPv4-mapped IPv6 (`::ffff:a.b.c.d`), and ports in
//! network byte order, as the kernel hands them to the programs; one key shape for both
//! families.

/// Load-time settings (`.rodata`, set by the agent before the verifier sees the programs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterceptConfig {
    /// Where redirected IPv4 connects go: address and port in network byte order.
    pub listen4_addr: u32,
    pub listen4_port: u32,
    /// Where redirected IPv6 connects go; all zero: IPv6 connects are not redirected.
    pub listen6_addr: [u32; 4],
    pub listen6_port: u32,
    /// Sockets carrying this `SO_MARK` are the agent's own (its upstream and passthrough
    /// connections): never redirected, so the agent cannot loop into itself.
    pub own_mark: u32,
    /// The agent's network namespace (`SO_NETNS_COOKIE`): the listener is on its loopback, so a
    /// socket of another namespace (a pod's) goes to the node listener below instead, or is
    /// left alone when there is none (redirected to loopback it would reach nothing).
    pub netns_cookie: u64,
    /// The node listener: an address of the agent's namespace that other namespaces reach
    /// (the pods' gateway on their veth, say); port 0: none.
    pub node4_addr: u32,
    pub node4_port: u32,
    pub node6_addr: [u32; 4],
    pub node6_port: u32,
}

impl InterceptConfig {
    /// Placeholder in the object file; a program loaded with it redirects nothing (no
    /// destination is selected before the agent fills the maps).
    pub const UNSET: InterceptConfig = InterceptConfig {
        listen4_addr: 0,
        listen4_port: 0,
        listen6_addr: [0; 4],
        listen6_port: 0,
        own_mark: 0,
        netns_cookie: 0,
        node4_addr: 0,
        node4_port: 0,
        node6_addr: [0; 4],
        node6_port: 0,
    };
}

/// Key data of the selected destinations (an LPM trie): port first, then the address, so that a
/// prefix is "this port, this CIDR". Port 0 stands for any port (the programs look up the
/// dialed port, then 0). The prefix length counts the port's 16 bits.
pub type DestinationKey = [u8; 18];

/// Bits of the prefix taken by the port.
pub const PORT_PREFIX_BITS: u32 = 16;

/// The destination a redirected socket dialed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDestination {
    /// IPv4-mapped for IPv4.
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`: the family the application dialed with.
    pub family: u16,
    /// Index of the selection rule that matched (the order of `[intercept] destinations`).
    pub rule: u32,
}

/// Key of `BY_PEER`: the redirected socket's own address and port, which is the peer address
/// the intercept listener sees on the accepted connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub pad: u16,
}

/// Slots of the per-CPU `INTERCEPT_COUNTERS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterceptCounter {
    /// TCP connects to a selected destination, steered to the listener.
    Redirected = 0,
    /// Connects of the agent's own sockets (marked) to a selected destination, left alone.
    OwnSkipped = 1,
    /// Connects to a selected destination from another network namespace with no node
    /// listener for it, left alone.
    OtherNetnsSkipped = 2,
    /// IPv6 connects to a selected destination with no IPv6 listener, left alone.
    NoListenerSkipped = 3,
    /// The original destination could not be stored: the connect is left alone (fail open).
    StoreFailed = 4,
    /// `getpeername()` answered with the original destination.
    PeerNameRestored = 5,
    /// A redirected socket's address and port published for the listener.
    PeerPublished = 6,
    /// ... and could not be (map full): the agent will splice it nowhere and count it.
    PeerPublishFailed = 7,
    /// Of `Redirected`: from another network namespace, to the node listener.
    RedirectedToNode = 8,
}

impl InterceptCounter {
    pub const ALL: [InterceptCounter; 9] = [
        InterceptCounter::Redirected,
        InterceptCounter::OwnSkipped,
        InterceptCounter::OtherNetnsSkipped,
        InterceptCounter::NoListenerSkipped,
        InterceptCounter::StoreFailed,
        InterceptCounter::PeerNameRestored,
        InterceptCounter::PeerPublished,
        InterceptCounter::PeerPublishFailed,
        InterceptCounter::RedirectedToNode,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            InterceptCounter::Redirected => "redirected",
            InterceptCounter::OwnSkipped => "own_skipped",
            InterceptCounter::OtherNetnsSkipped => "other_netns_skipped",
            InterceptCounter::NoListenerSkipped => "no_listener_skipped",
            InterceptCounter::StoreFailed => "store_failed",
            InterceptCounter::PeerNameRestored => "peer_name_restored",
            InterceptCounter::PeerPublished => "peer_published",
            InterceptCounter::PeerPublishFailed => "peer_publish_failed",
            InterceptCounter::RedirectedToNode => "redirected_to_node",
        }
    }
}

pub const INTERCEPT_COUNTER_SLOTS: u32 = InterceptCounter::ALL.len() as u32;

/// Sizes of the maps: sockets redirected and alive (for `getpeername`), and redirected sockets
/// whose connection the listener has not taken yet. Both are LRU: a burst past them evicts the
/// oldest entries rather than failing connects.
pub const MAX_REDIRECTED_SOCKETS: u32 = 262_144;
pub const MAX_PENDING_PEERS: u32 = 65_536;
pub const MAX_DESTINATION_RULES: u32 = 4096;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, integers and byte arrays only; every bit pattern is valid.
    unsafe impl aya::Pod for super::InterceptConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OriginalDestination {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PeerKey {}
}
