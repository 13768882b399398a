//! Which local process serves each upstream endpoint, found from /proc when the proxy opens a
//! connection to it. On a task of its own: a /proc scan takes milliseconds on a busy node, and
//! the signal loop must not wait for it (signals would queue in the ring meanwhile).

use std::{
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{sync::watch, task::JoinHandle};
use tracing::debug;

use super::{Joins, process, table::Side};

pub struct OwnerLookup {
    pub joins: Arc<Joins>,
}

impl OwnerLookup {
    /// Runs until `stopped` turns true: on every newly opened upstream connection, and every
    /// `rescan` for connections whose notification raced their registration.
    pub fn spawn(self, rescan: Duration, mut stopped: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut rescan = tokio::time::interval(rescan);
            loop {
                tokio::select! {
                    _ = self.joins.tracked.upstream_opened.notified() => {}
                    _ = rescan.tick() => {}
                    _ = stopped.changed() => break,
                }
                self.look_up_pending().await;
            }
        })
    }

    /// Looks up the serving process of every upstream connection not looked up yet (reading
    /// /proc on a blocking thread, off the runtime's).
    pub async fn look_up_pending(&self) {
        for conn in self.joins.tracked.upstreams_to_look_up() {
            conn.owner_looked_up.store(true, Ordering::Relaxed);
            let Side::Upstream { endpoint } = &conn.side else {
                continue;
            };
            let name = endpoint.name.to_string();
            let (local, peer) = (conn.local, conn.peer);
            let found = tokio::task::spawn_blocking(move || {
                process::peer_owner(Path::new("/proc"), local, peer)
            })
            .await
            .ok()
            .flatten();
            match found {
                Some(owner) => {
                    debug!(endpoint = %name, pid = owner.pid, comm = %owner.comm, netns = owner.netns, "endpoint served by");
                    self.joins.set_owner(name, owner);
                }
                None => debug!(endpoint = %name, "no local process serves this endpoint"),
            }
        }
    }
}
