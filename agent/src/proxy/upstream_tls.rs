//! TLS to a cluster's endpoints: rustls (ring), the cluster's CA bundle and client identity,
//! ALPN `h2`. The files are looked at again (a `stat` each, as endpoints files are:
//! [`FileWatch`]) each time a connection is opened, and the configuration rebuilt when one's
//! content changed: a rotated certificate is used from the next connection on, and the
//! connections already open keep their session. A rotation that does not load (a key that does not match its certificate,
//! half a file) keeps the configuration there was, and is counted.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tracing::{info, warn};

use crate::{
    config::tls::{UpstreamTls, UpstreamTlsError, client_config},
    discovery::file::FileWatch,
};

/// A cluster's TLS client, its files watched.
pub struct UpstreamTlsClient {
    files: UpstreamTls,
    /// The CA, certificate and key files as last seen, and the connector made of them.
    current: Mutex<(Vec<FileWatch>, TlsConnector)>,
    /// Times the files changed and loaded, and changed but did not load.
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

impl UpstreamTlsClient {
    pub fn new(files: &UpstreamTls) -> Result<Self, UpstreamTlsError> {
        let config = client_config(files)?;
        let mut watches = watches(files);
        for w in &mut watches {
            // The first look: the files as loaded now.
            w.changed();
        }
        Ok(Self {
            current: Mutex::new((watches, TlsConnector::from(Arc::new(config)))),
            files: files.clone(),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        })
    }

    /// The name an endpoint's certificate is checked against: the cluster's `server_name`,
    /// else `entry_name` (its entry's DNS name), else its address.
    pub fn server_name(
        &self,
        entry_name: Option<&str>,
        ip: std::net::IpAddr,
    ) -> ServerName<'static> {
        self.files
            .server_name
            .as_deref()
            .or(entry_name)
            .and_then(|n| ServerName::try_from(n.to_owned()).ok())
            .unwrap_or_else(|| ServerName::IpAddress(ip.into()))
    }

    /// The connector for a new connection, rebuilt first if a file changed.
    fn connector(&self) -> TlsConnector {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let mut changed = false;
        for w in &mut current.0 {
            // Every file looked at (no short cut), so each watch knows the file as it is now.
            changed |= w.changed();
        }
        if changed {
            match client_config(&self.files) {
                Ok(config) => {
                    current.1 = TlsConnector::from(Arc::new(config));
                    self.reloads.fetch_add(1, Ordering::Relaxed);
                    info!(ca = %self.files.ca.display(), "upstream TLS files changed: new connections use them");
                }
                Err(e) => {
                    self.reload_failures.fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, "upstream TLS files changed but do not load: the ones before stay in use");
                }
            }
        }
        current.1.clone()
    }

    /// The TLS handshake over `tcp`.
    pub async fn connect(
        &self,
        name: ServerName<'static>,
        tcp: TcpStream,
    ) -> io::Result<TlsStream<TcpStream>> {
        self.connector().connect(name, tcp).await
    }
}

/// A watch of each file (following symlinks: a Kubernetes Secret volume swaps its `..data`
/// link), telling a changed content from a touched file.
fn watches(files: &UpstreamTls) -> Vec<FileWatch> {
    std::iter::once(&files.ca)
        .chain(files.client.iter().flat_map(|c| [&c.cert, &c.key]))
        .map(|p| FileWatch::new(p.clone()))
        .collect()
}

/// An upstream connection's socket: cleartext (h2c) or TLS.
pub enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
