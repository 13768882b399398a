//! Kernel facts the programs cannot know by themselves, resolved by the agent at load time
//! (from BTF and tracefs) and written into the program's `.rodata` before loading.

/// Marks an offset the agent could not resolve: the program skips that read.
pub const UNKNOWN_OFFSET: u32 = u32::MAX;

/// Byte offsets inside kernel structs and tracepoint records.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KernelLayout {
    /// `tcp_send_reset` record: `skaddr` and `skbaddr` fields.
    pub send_reset_skaddr: u32,
    pub send_reset_skbaddr: u32,
    /// `tcp_receive_reset` record: `skaddr`.
    pub recv_reset_skaddr: u32,
    /// Bytes of each record to copy (clamped to `TP_RECORD_MAX`).
    pub send_reset_len: u32,
    pub recv_reset_len: u32,
    /// `struct sock`: `__sk_common.skc_net.net` (a `struct net *`).
    pub sock_net: u32,
    /// `struct sock`: `__sk_common.skc_state` (u8).
    pub sock_state: u32,
    /// `struct sock`: `sk_cgrp_data.cgroup` (a `struct cgroup *`).
    pub sock_cgroup: u32,
    /// `struct net`: `ns.inum` (u32).
    pub net_inum: u32,
    /// `struct cgroup`: `kn` (a `struct kernfs_node *`).
    pub cgroup_kn: u32,
    /// `struct kernfs_node`: `id` (u64).
    pub kernfs_node_id: u32,
    /// `struct sk_buff`: `dev` (a `struct net_device *`), for resets sent without a socket.
    pub skb_dev: u32,
    /// `struct net_device`: `nd_net.net` (a `struct net *`).
    pub net_device_net: u32,
    /// `sched_process_exit` record: `group_dead` (bool); unknown on kernels before 6.x, where
    /// the program falls back to "the thread group leader exited".
    pub exit_group_dead: u32,
}

impl KernelLayout {
    pub const UNKNOWN: Self = Self {
        send_reset_skaddr: UNKNOWN_OFFSET,
        send_reset_skbaddr: UNKNOWN_OFFSET,
        recv_reset_skaddr: UNKNOWN_OFFSET,
        send_reset_len: 0,
        recv_reset_len: 0,
        sock_net: UNKNOWN_OFFSET,
        sock_state: UNKNOWN_OFFSET,
        sock_cgroup: UNKNOWN_OFFSET,
        net_inum: UNKNOWN_OFFSET,
        cgroup_kn: UNKNOWN_OFFSET,
        kernfs_node_id: UNKNOWN_OFFSET,
        skb_dev: UNKNOWN_OFFSET,
        net_device_net: UNKNOWN_OFFSET,
        exit_group_dead: UNKNOWN_OFFSET,
    };
}

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy, all u32: every bit pattern is valid.
unsafe impl aya::Pod for KernelLayout {}
