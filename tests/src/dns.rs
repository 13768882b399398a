//! A DNS server for the DNS-discovery tests: Debian's dnsmasq on 127.0.0.1 and a port of its
//! own (never 53, never another address, never the system's resolver), serving names the test
//! changes while a load runs.
//!
//! - A/AAAA records are one hosts file per name in a `--hostsdir`, which dnsmasq watches with
//!   inotify: a file renamed in replaces the name's whole set at once, served by the next
//!   query (well under a millisecond). A file removed makes the name NXDOMAIN; a SIGHUP then
//!   makes its parents forget it too. No restart, no gap in service.
//! - SRV records (`--srv-host`) are read at start only (SIGHUP re-reads hosts files, not the
//!   configuration; a `--servers-file` rejects `srv-host`), so [`DnsServer::set_srv`] restarts
//!   dnsmasq on the same port: queries sent during those milliseconds (6 to 20 here) go
//!   unanswered (ICMP port unreachable), as from a server that restarts.
//!
//! Answers from local data carry TTL 1 s (`--local-ttl=1`, SRV included). NXDOMAIN and NODATA
//! carry no SOA, so a resolver does not cache them (RFC 2308), or caches them for its own
//! minimum (hickory: `negative_min_ttl`, 0 by default).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use test_support::supervised::{Supervised, Supervision, collect_lines};

const DNSMASQ: &str = "/usr/sbin/dnsmasq";
const DIG: &str = "dig";

/// How long a change may take to show in dnsmasq's answers (it takes milliseconds).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// dnsmasq serving a zone from files in a temporary directory; stopped, and the directory
/// removed, when dropped.
pub struct DnsServer {
    addr: SocketAddr,
    dir: PathBuf,
    running: Mutex<Running>,
    /// SRV records by owner name, each `(target, port)`: what `--srv-host` says at each start.
    srv: Mutex<BTreeMap<String, Vec<(String, u16)>>>,
}

struct Running {
    process: Supervised,
    stderr: Arc<Mutex<String>>,
}

/// One reply as dig printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// `NOERROR`, `NXDOMAIN`, `REFUSED`, ...
    pub rcode: String,
    /// The answer section's records of the type asked for.
    pub records: Vec<Record>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub ttl: u32,
    /// As `dig +short` prints it: `10.0.0.1`, `0 0 50051 a.orders.test.`.
    pub data: String,
}

impl DnsServer {
    /// Starts dnsmasq on 127.0.0.1 and a free port, serving no names yet (every name is
    /// NXDOMAIN); returns once it answers.
    pub fn start() -> DnsServer {
        assert!(
            Path::new(DNSMASQ).exists(),
            "{DNSMASQ} not found: install dnsmasq (cargo xtask setup installs dnsmasq-base)"
        );
        static INSTANCE: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "e2e-dns-{}-{}",
            std::process::id(),
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["hosts", "stage"] {
            std::fs::create_dir_all(dir.join(sub))
                .unwrap_or_else(|e| panic!("{}: {e}", dir.join(sub).display()));
        }
        let addr = free_addr();
        let mut server = DnsServer {
            addr,
            dir: dir.clone(),
            running: Mutex::new(spawn(&dir, addr)),
            srv: Mutex::new(BTreeMap::new()),
        };
        // The port was free when picked; another program may take it before dnsmasq binds it.
        for _ in 0..5 {
            match server.wait_answering("ready.invalid", "A", |_| true) {
                Ok(()) => return server,
                Err(why) if why.contains("Address already in use") => {
                    server.addr = free_addr();
                    *server.running() = spawn(&dir, server.addr);
                }
                Err(why) => panic!("dnsmasq did not start: {why}"),
            }
        }
        panic!("dnsmasq found no free port on 127.0.0.1 in 5 tries")
    }

    /// 127.0.0.1 and its port, UDP and TCP.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops answering (SIGSTOP): queries time out, as with a DNS server that is down.
    pub fn pause(&self) {
        self.running().process.signal(libc::SIGSTOP);
    }

    /// Answers again after [`Self::pause`].
    pub fn resume(&self) {
        self.running().process.signal(libc::SIGCONT);
    }

    /// dnsmasq's log: each query and how it was answered, each file it (re)read.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dnsmasq.log")).unwrap_or_default()
    }

    /// How many times it has (re)loaded its data, started or told to by SIGHUP.
    fn reloads(&self) -> usize {
        self.log().matches("cleared cache").count()
    }

    /// Replaces all A and AAAA records of `name` with `addrs` at once (none: the name answers
    /// NXDOMAIN, or NODATA while names below it have records), and returns once dnsmasq
    /// answers with the new set.
    pub fn set_addresses(&self, name: &str, addrs: &[IpAddr]) {
        let name = checked_name(name);
        let file = self.dir.join("hosts").join(&name);
        // Set when a name is removed: how many reloads its log showed before.
        let mut reloads_before = None;
        if addrs.is_empty() {
            reloads_before = Some(self.reloads());
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("{}: {e}", file.display()),
            }
            // The removal alone makes the name NXDOMAIN, but its parents stay empty
            // non-terminals (NODATA) as if it were still there; a reload forgets it whole.
            self.running().process.signal(libc::SIGHUP);
        } else {
            let text: String = addrs.iter().map(|a| format!("{a} {name}\n")).collect();
            // Written elsewhere, then renamed in: dnsmasq never reads half a file, and reads
            // the new one whole (it flushes the old file's records first).
            let staged = self.dir.join("stage").join(&name);
            std::fs::write(&staged, text).unwrap_or_else(|e| panic!("{}: {e}", staged.display()));
            std::fs::rename(&staged, &file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        }
        let mut want: Vec<IpAddr> = addrs.to_vec();
        want.sort();
        want.dedup();
        let deadline = Instant::now() + CHANGE_TIMEOUT;
        let seen = loop {
            let seen = match (self.lookup(&name, "A"), self.lookup(&name, "AAAA")) {
                (Ok(a), Ok(aaaa)) => {
                    let mut got: Vec<IpAddr> = a
                        .records
                        .iter()
                        .chain(&aaaa.records)
                        .filter_map(|r| r.data.parse().ok())
                        .collect();
                    got.sort();
                    // dnsmasq is single-threaded: a query sent once its log shows the reload
                    // is answered after it.
                    if got == want && reloads_before.is_none_or(|n| self.reloads() > n) {
                        return;
                    }
                    got.iter().map(IpAddr::to_string).collect()
                }
                (Err(e), _) | (_, Err(e)) => vec![e],
            };
            if Instant::now() >= deadline {
                break seen;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        panic!(
            "dnsmasq at {} did not serve {name} = {want:?} within {CHANGE_TIMEOUT:?}; last seen: \
             {seen:?}\nits log:\n{}",
            self.addr,
            self.log()
        );
    }

    /// Replaces the SRV records of `name` (`_grpc._tcp.orders.test`) with one per
    /// `(target, port)`, priority and weight 0 (none: the name answers NXDOMAIN); the targets'
    /// addresses are theirs from [`DnsServer::set_addresses`]. Restarts dnsmasq on the same
    /// port (see the module's doc) and returns once it answers with the new set.
    pub fn set_srv(&self, name: &str, targets: &[(&str, u16)]) {
        let name = checked_name(name);
        let mut want: Vec<(String, u16)> = targets
            .iter()
            .map(|&(target, port)| (checked_name(target), port))
            .collect();
        want.sort();
        want.dedup();
        // Held to the end: one restart at a time, each with the configuration it wrote.
        let mut srv = self.srv.lock().unwrap();
        if want.is_empty() {
            srv.remove(&name);
        } else {
            srv.insert(name.clone(), want.clone());
        }
        let conf: String = srv
            .iter()
            .flat_map(|(owner, targets)| {
                targets
                    .iter()
                    .map(move |(target, port)| format!("srv-host={owner},{target},{port}\n"))
            })
            .collect();
        let path = self.dir.join("dnsmasq.conf");
        std::fs::write(&path, conf).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        {
            let mut running = self.running();
            // SIGKILL and reaped: the port is free when kill returns.
            running.process.kill();
            *running = spawn(&self.dir, self.addr);
        }
        let served = |answer: &Answer| {
            let mut got: Vec<(String, u16)> = answer
                .records
                .iter()
                .filter_map(|r| parse_srv(&r.data))
                .collect();
            got.sort();
            got == want
        };
        if let Err(why) = self.wait_answering(&name, "SRV", served) {
            panic!(
                "dnsmasq at {} did not serve {name} SRV = {want:?} after its restart: {why}",
                self.addr
            );
        }
    }

    /// The records of `name` of type `rtype` (`A`, `AAAA`, `SRV`), sorted, as `dig +short`
    /// prints them; empty for NXDOMAIN and NODATA. Panics if dnsmasq does not answer.
    pub fn query(&self, name: &str, rtype: &str) -> Vec<String> {
        let mut data: Vec<String> = self
            .answer(name, rtype)
            .records
            .into_iter()
            .map(|r| r.data)
            .collect();
        data.sort();
        data
    }

    /// The whole reply to `name` `rtype`: its rcode and records with their TTLs. Panics if
    /// dnsmasq does not answer.
    pub fn answer(&self, name: &str, rtype: &str) -> Answer {
        self.lookup(name, rtype).unwrap_or_else(|why| {
            panic!(
                "dnsmasq at {} did not answer {name} {rtype}: {why}",
                self.addr
            )
        })
    }

    /// One query with dig: one try, 1 s for the reply.
    fn lookup(&self, name: &str, rtype: &str) -> Result<Answer, String> {
        let out = Command::new(DIG)
            .arg(format!("@{}", self.addr.ip()))
            .args(["-p", &self.addr.port().to_string()])
            .args(["+tries=1", "+time=1", "+noall", "+comments", "+answer"])
            .args([name, rtype])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {DIG} ({e}): install it (cargo xtask setup installs bind9-dnsutils)"
                )
            });
        let stdout = String::from_utf8_lossy(&out.stdout);
        // dig exits 9 when no reply came, 0 for any reply (NXDOMAIN included).
        if !out.status.success() {
            return Err(format!(
                "dig exited with {}: {}{}",
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        parse_dig(&stdout, rtype)
            .ok_or_else(|| format!("dig printed no header line: {}", stdout.trim()))
    }

    fn running(&self) -> MutexGuard<'_, Running> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until dnsmasq answers `name` `rtype` in a way `done` accepts: Err with why if it
    /// exits or `CHANGE_TIMEOUT` passes.
    fn wait_answering(
        &self,
        name: &str,
        rtype: &str,
        done: impl Fn(&Answer) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + CHANGE_TIMEOUT;
        loop {
            {
                let mut running = self.running();
                if let Some(status) = running.process.exited() {
                    // The stderr reader may still be taking the last lines.
                    std::thread::sleep(Duration::from_millis(50));
                    return Err(format!(
                        "dnsmasq exited with {status}; its stderr:\n{}",
                        running.stderr.lock().unwrap()
                    ));
                }
            }
            let last = match self.lookup(name, rtype) {
                Ok(answer) if done(&answer) => return Ok(()),
                Ok(answer) => format!("{answer:?}"),
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "no answer as expected within {CHANGE_TIMEOUT:?} (last: {last}); its log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        // Killed (and reaped) before its directory goes.
        self.running().process.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// 127.0.0.1 and a port that was free a moment ago.
fn free_addr() -> SocketAddr {
    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), crate::free_port("127.0.0.1"))
}

/// dnsmasq serving the files in `dir` on `addr`, in the foreground.
fn spawn(dir: &Path, addr: SocketAddr) -> Running {
    let mut cmd = Command::new(DNSMASQ);
    cmd.arg("--keep-in-foreground")
        // Our configuration only (the SRV records): not /etc/dnsmasq.conf, which it reads
        // otherwise.
        .arg(format!(
            "--conf-file={}",
            dir.join("dnsmasq.conf").display()
        ))
        // No upstream and no /etc/resolv.conf (never opened then, so --no-poll adds nothing),
        // no /etc/hosts.
        .args(["--no-resolv", "--no-hosts"])
        // Every name is local: a name nobody set is NXDOMAIN, not REFUSED for want of an
        // upstream.
        .arg("--local=/#/")
        .arg(format!("--listen-address={}", addr.ip()))
        .arg("--bind-interfaces")
        .arg(format!("--port={}", addr.port()))
        .arg("--local-ttl=1")
        .arg(format!("--hostsdir={}", dir.join("hosts").display()))
        .arg("--log-queries")
        .arg(format!(
            "--log-facility={}",
            dir.join("dnsmasq.log").display()
        ))
        .arg("--pid-file=")
        // As root it would switch to nobody:dip, and changing credentials clears
        // PR_SET_PDEATHSIG: it would outlive a test that is killed. (Ignored when not root.)
        .args(["--user=root", "--group=root"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let conf = dir.join("dnsmasq.conf");
    if !conf.exists() {
        std::fs::write(&conf, "").unwrap_or_else(|e| panic!("{}: {e}", conf.display()));
    }
    let mut process =
        Supervised::spawn("dnsmasq", &mut cmd, Supervision::KILL).unwrap_or_else(|e| panic!("{e}"));
    let stderr = collect_lines(process.child_mut().stderr.take().unwrap());
    Running { process, stderr }
}

/// `name` in lower case without its final dot, usable as a file name in the hosts directory
/// and in a `srv-host` line; panics on anything else.
fn checked_name(name: &str) -> String {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    assert!(
        !name.is_empty()
            // dnsmasq skips hidden files in a hosts directory.
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')),
        "{name:?} is not a DNS name the fixture serves (letters, digits, '-', '_', '.')"
    );
    name
}

/// `0 0 50051 a.orders.test.` as `("a.orders.test", 50051)`.
fn parse_srv(data: &str) -> Option<(String, u16)> {
    let mut fields = data.split_whitespace().skip(2);
    let port = fields.next()?.parse().ok()?;
    let target = fields.next()?.trim_end_matches('.').to_owned();
    Some((target, port))
}

/// dig's `+noall +comments +answer` output: the header's status and the answer lines of
/// type `rtype` (`name. 1 IN A 10.0.0.1`).
fn parse_dig(out: &str, rtype: &str) -> Option<Answer> {
    let rcode = out.lines().find_map(|line| {
        let rest = line.split_once("status: ")?.1;
        Some(rest.split(',').next()?.trim().to_owned())
    })?;
    let records = out
        .lines()
        .filter(|line| !line.starts_with(';'))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [_, ttl, _class, kind, data @ ..] if kind.eq_ignore_ascii_case(rtype) => {
                    Some(Record {
                        ttl: ttl.parse().ok()?,
                        data: data.join(" "),
                    })
                }
                _ => None,
            }
        })
        .collect();
    Some(Answer { rcode, records })
}
