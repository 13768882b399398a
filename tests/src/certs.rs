//! Certificates for the TLS tests, made by the `openssl` command (Debian's 3.0): a CA, server
//! and client key pairs it signs, expired ones, and [`install`] to swap the pair a peer serves
//! while it runs (the peers read their files again when they change: `tests/peers/grpcpy`,
//! `tests/peers/grpcpeer`).
//!
//! Keys are ECDSA P-256. Every certificate gets a serial number of its own, which the peers print
//! in the same upper-case hex when they load it (`KeyPair::serial`).

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

const OPENSSL: &str = "openssl (cargo xtask setup installs it)";

/// A certificate authority: its key and self-signed certificate, PEM files.
#[derive(Debug, Clone)]
pub struct Ca {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate and its private key, PEM files.
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate's serial number, upper-case hex (`openssl x509 -serial` without
    /// `serial=`; the peers' "tls loaded" lines print it so).
    pub serial: String,
}

/// What a certificate is for.
enum Leaf<'a> {
    Server(&'a [&'a str]),
    Client,
}

impl Ca {
    /// A new CA named `name` (its subject CN): `DIR/NAME.key` and `DIR/NAME.crt`, valid ten years.
    pub fn new(dir: &Path, name: &str) -> Ca {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let ca = Ca {
            name: name.to_owned(),
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        openssl(
            Command::new("openssl")
                .args(["req", "-x509", "-nodes", "-days", "3650"])
                .args(EC_KEY)
                .args(["-subj", &format!("/CN={name}")])
                .args(["-set_serial", &new_serial()])
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
                .arg("-keyout")
                .arg(&ca.key)
                .arg("-out")
                .arg(&ca.cert),
        );
        ca
    }

    /// A server certificate for `sans` (DNS names, or IP addresses such as "127.0.0.2"; the
    /// first is also the CN), valid two days from now: `DIR/NAME.crt` and `DIR/NAME.key`.
    pub fn issue_server(&self, dir: &Path, name: &str, sans: &[&str]) -> KeyPair {
        self.issue(dir, name, Leaf::Server(sans), None)
    }

    /// A client certificate (extendedKeyUsage clientAuth) with CN `name`, valid two days.
    pub fn issue_client(&self, dir: &Path, name: &str) -> KeyPair {
        self.issue(dir, name, Leaf::Client, None)
    }

    /// Like [`Self::issue_server`], but valid from two days ago until one day ago: expired.
    pub fn issue_expired_server(&self, dir: &Path, name: &str, sans: &[&str]) -> KeyPair {
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let pair = self.issue(
            dir,
            name,
            Leaf::Server(sans),
            Some((now - 2 * day, now - day)),
        );
        assert!(
            is_expired(&pair.cert),
            "{} should have expired",
            pair.cert.display()
        );
        pair
    }

    fn issue(
        &self,
        dir: &Path,
        name: &str,
        leaf: Leaf<'_>,
        dates: Option<(SystemTime, SystemTime)>,
    ) -> KeyPair {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        let csr = dir.join(format!("{name}.csr"));
        let ext = dir.join(format!("{name}.ext"));
        let (cn, extensions) = match leaf {
            Leaf::Server(sans) => {
                assert!(!sans.is_empty(), "a server certificate needs a name");
                let alt: Vec<String> = sans
                    .iter()
                    .map(|s| match s.parse::<IpAddr>() {
                        Ok(_) => format!("IP:{s}"),
                        Err(_) => format!("DNS:{s}"),
                    })
                    .collect();
                (
                    sans[0].to_owned(),
                    format!(
                        "extendedKeyUsage=serverAuth\nsubjectAltName={}\n",
                        alt.join(",")
                    ),
                )
            }
            Leaf::Client => (name.to_owned(), "extendedKeyUsage=clientAuth\n".to_owned()),
        };
        fs::write(
            &ext,
            format!(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n{extensions}"
            ),
        )
        .unwrap();
        openssl(
            Command::new("openssl")
                .args(["req", "-new", "-nodes"])
                .args(EC_KEY)
                .args(["-subj", &format!("/CN={cn}")])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&csr),
        );
        let serial = new_serial();
        match dates {
            None => openssl(
                Command::new("openssl")
                    .args(["x509", "-req", "-days", "2", "-set_serial", &serial])
                    .arg("-in")
                    .arg(&csr)
                    .arg("-CA")
                    .arg(&self.cert)
                    .arg("-CAkey")
                    .arg(&self.key)
                    .arg("-extfile")
                    .arg(&ext)
                    .arg("-out")
                    .arg(&cert),
            ),
            Some(dates) => self.sign_dated(&csr, &ext, &serial, dates, &cert),
        }
        let _ = fs::remove_file(&csr);
        let _ = fs::remove_file(&ext);
        KeyPair {
            serial: serial_of(&cert),
            cert,
            key,
        }
    }

    /// Signs with dates of our choosing: `openssl x509` (3.0) can only start a certificate now,
    /// `openssl ca` takes -startdate and -enddate, given a database of its own (made here in a
    /// scratch directory beside `cert`, removed after).
    fn sign_dated(
        &self,
        csr: &Path,
        ext: &Path,
        serial: &str,
        (not_before, not_after): (SystemTime, SystemTime),
        cert: &Path,
    ) {
        let db = cert.with_extension("ca-db");
        let _ = fs::remove_dir_all(&db);
        fs::create_dir_all(&db).unwrap();
        fs::write(db.join("index.txt"), "").unwrap();
        fs::write(db.join("serial"), format!("{}\n", &serial[2..])).unwrap();
        let config = db.join("ca.cnf");
        fs::write(
            &config,
            format!(
                "[ca]\ndefault_ca = this\n[this]\ndir = {}\ndatabase = $dir/index.txt\n\
                 serial = $dir/serial\nnew_certs_dir = $dir\ndefault_md = sha256\n\
                 unique_subject = no\npolicy = any\n[any]\ncommonName = supplied\n",
                db.display()
            ),
        )
        .unwrap();
        openssl(
            Command::new("openssl")
                .args(["ca", "-batch", "-notext", "-config"])
                .arg(&config)
                .arg("-cert")
                .arg(&self.cert)
                .arg("-keyfile")
                .arg(&self.key)
                .args(["-startdate", &asn1_time(not_before)])
                .args(["-enddate", &asn1_time(not_after)])
                .arg("-extfile")
                .arg(ext)
                .arg("-in")
                .arg(csr)
                .arg("-out")
                .arg(cert),
        );
        let _ = fs::remove_dir_all(&db);
    }
}

/// `openssl req` arguments for a new P-256 key.
const EC_KEY: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"];

/// Runs an openssl command, panicking with its stderr if it fails.
fn openssl(cmd: &mut Command) {
    let out = cmd.output().expect(OPENSSL);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A serial number no other certificate of this process (nor, practically, of another run) has:
/// 0x1 followed by 15 hex digits, so positive, 8 bytes, and printed the same by openssl, Go and
/// Python.
fn new_serial() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mixed =
        nanos ^ (u64::from(std::process::id()) << 40) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("0x1{:015X}", mixed & 0x0FFF_FFFF_FFFF_FFFF)
}

/// `openssl x509 -serial` of `cert`, without `serial=`.
pub fn serial_of(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(cert)
        .output()
        .expect(OPENSSL);
    assert!(
        out.status.success(),
        "{}: not a certificate",
        cert.display()
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_owned()
}

/// Whether `cert`'s notAfter has passed (`openssl x509 -checkend 0`).
pub fn is_expired(cert: &Path) -> bool {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-checkend", "0", "-in"])
        .arg(cert)
        .output()
        .expect(OPENSSL);
    // 0: still valid; 1: expires within 0 s, i.e. has expired.
    !out.status.success()
}

/// `t` as openssl ca's -startdate/-enddate want it: YYYYMMDDHHMMSSZ, UTC.
fn asn1_time(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's days_from_civil, inverted).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}{:02}{:02}{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// Replaces the key pair a peer serves at `cert_dst` and `key_dst` with `pair`, each file
/// atomically ([`replace_file`]): the key first, then the certificate.
///
/// Between the two renames the files do not match. A peer that reads them then must refuse the
/// pair and keep the one it serves (grpcpy and grpcpeer check that they match, and read again at
/// the next handshake); one that reloads when the certificate changes finds the key already
/// there, which is why the certificate goes last.
pub fn install(pair: &KeyPair, cert_dst: &Path, key_dst: &Path) {
    replace_file(&pair.key, key_dst);
    replace_file(&pair.cert, cert_dst);
}

/// Puts a copy of `src` at `dst` atomically: written beside it under a temporary name, then
/// renamed over it. So a reader sees the old file or the new one, never part of one, and `dst`
/// is another inode afterwards. Its mtime is made later than the old file's by at least a
/// second, so that even a reloader that compares mtimes in whole seconds sees the change
/// (files written within the same clock tick, a few ms, would otherwise share their mtime);
/// rotations more often than once a second therefore date the file ahead of the clock.
pub fn replace_file(src: &Path, dst: &Path) {
    let file_name = dst
        .file_name()
        .unwrap_or_else(|| panic!("{}: not a file path", dst.display()));
    let tmp = dst.with_file_name(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    fs::copy(src, &tmp)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), tmp.display()));
    let now = SystemTime::now();
    let mtime = match fs::metadata(dst).and_then(|m| m.modified()) {
        Ok(old) if now < old + Duration::from_secs(1) => old + Duration::from_secs(1),
        _ => now,
    };
    fs::File::options()
        .write(true)
        .open(&tmp)
        .and_then(|f| f.set_modified(mtime))
        .unwrap_or_else(|e| panic!("{}: set mtime: {e}", tmp.display()));
    fs::rename(&tmp, dst)
        .unwrap_or_else(|e| panic!("rename {} to {}: {e}", tmp.display(), dst.display()));
}
