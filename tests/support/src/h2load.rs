//! h2load's summary: the "finished in" line, and the request and status-code counts.
//!
//! ```text
//! finished in 4.00s, 94238.00 req/s, 3.55MB/s
//! requests: 282714 total, 282714 started, 282714 done, 282714 succeeded, 0 failed, 0 errored, 0 timeout
//! status codes: 282714 2xx, 0 3xx, 0 4xx, 0 5xx
//! ```

/// What one h2load run reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub seconds: f64,
    pub requests_per_s: f64,
    /// The `requests:` line, when h2load printed it.
    pub requests: Option<Requests>,
    /// 3xx, 4xx and 5xx answers, when h2load printed its `status codes:` line.
    pub not_2xx: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    pub total: u64,
    pub started: u64,
    pub done: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub timeout: u64,
}

impl Summary {
    /// Whether the run went well: no request failed, errored, timed out or answered other than
    /// 2xx, every one done succeeded, and `expected` of them (or at least one) did.
    pub fn all_succeeded(&self, expected: Option<u64>) -> Result<(), String> {
        let r = self.requests.ok_or("h2load printed no requests: line")?;
        let not_2xx = self.not_2xx.unwrap_or(0);
        let count_ok = expected.map_or(r.succeeded > 0, |n| r.succeeded == n);
        if count_ok && r.succeeded == r.done && r.failed + r.errored + r.timeout + not_2xx == 0 {
            return Ok(());
        }
        Err(format!(
            "not every request succeeded{}: {} done, {} succeeded, {} failed, {} errored, {} timed out, {not_2xx} not 2xx",
            expected
                .map(|n| format!(" ({n} wanted)"))
                .unwrap_or_default(),
            r.done,
            r.succeeded,
            r.failed,
            r.errored,
            r.timeout
        ))
    }
}

/// Reads h2load's output; None without a well-formed "finished in" line.
pub fn parse(text: &str) -> Option<Summary> {
    let line = |prefix: &str| text.lines().find_map(|l| l.trim().strip_prefix(prefix));
    let mut finished = line("finished in ")?.split(", ");
    let seconds = duration_seconds(finished.next()?)?;
    let requests_per_s = finished.next()?.strip_suffix(" req/s")?.parse().ok()?;
    let requests = line("requests: ").and_then(|rest| {
        let c = counts(rest)?;
        let get = |word: &str| c.iter().find(|(w, _)| *w == word).map(|(_, n)| *n);
        Some(Requests {
            total: get("total")?,
            started: get("started")?,
            done: get("done")?,
            succeeded: get("succeeded")?,
            failed: get("failed")?,
            errored: get("errored")?,
            timeout: get("timeout")?,
        })
    });
    let not_2xx = line("status codes: ").and_then(|rest| {
        let c = counts(rest)?;
        ["3xx", "4xx", "5xx"]
            .iter()
            .map(|word| c.iter().find(|(w, _)| w == word).map(|(_, n)| *n))
            .sum()
    });
    Some(Summary {
        seconds,
        requests_per_s,
        requests,
        not_2xx,
    })
}

/// "N word, N word, ..." as (word, N).
fn counts(rest: &str) -> Option<Vec<(&str, u64)>> {
    rest.split(", ")
        .map(|part| {
            let (n, word) = part.trim().split_once(' ')?;
            Some((word, n.parse().ok()?))
        })
        .collect()
}

/// h2load prints durations as `6.53s`, `812.34ms` or `488us`.
fn duration_seconds(s: &str) -> Option<f64> {
    if let Some(us) = s.strip_suffix("us") {
        us.parse::<f64>().ok().map(|v| v / 1e6)
    } else if let Some(ms) = s.strip_suffix("ms") {
        ms.parse::<f64>().ok().map(|v| v / 1e3)
    } else {
        s.strip_suffix('s')?.parse().ok()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const FULL: &str = "starting benchmark...\n\
        finished in 4.00s, 94238.00 req/s, 3.55MB/s\n\
        requests: 282714 total, 282714 started, 282714 done, 282714 succeeded, 0 failed, 0 errored, 0 timeout\n\
        status codes: 282714 2xx, 0 3xx, 0 4xx, 0 5xx\n";

    #[test]
    fn reads_the_summary() {
        let s = parse(FULL).unwrap();
        assert_eq!((s.seconds, s.requests_per_s), (4.0, 94238.0));
        let r = s.requests.unwrap();
        assert_eq!(
            (r.total, r.done, r.succeeded, r.failed),
            (282714, 282714, 282714, 0)
        );
        assert_eq!(s.not_2xx, Some(0));
        assert!(s.all_succeeded(Some(282714)).is_ok());
        assert!(s.all_succeeded(Some(300000)).is_err());
    }

    #[test]
    fn reads_every_duration_unit() {
        for (line, seconds) in [
            ("finished in 6.53s, 30627.95 req/s, 3.46MB/s", 6.53),
            ("finished in 812.5ms, 1230.77 req/s, 0B/s", 0.8125),
            // A run this short once made a bench give up on a good result.
            ("finished in 488us, 2049.18 req/s, 0B/s", 0.000488),
        ] {
            let s = parse(line).unwrap();
            assert!((s.seconds - seconds).abs() < 1e-12, "{line}");
            assert_eq!(s.requests, None);
        }
        assert!(parse("finished in soon").is_none());
        assert!(parse("nothing").is_none());
    }

    #[test]
    fn failures_are_reported() {
        let refused = "finished in 4.00s, 0.00 req/s, 0B/s\n\
            requests: 10 total, 10 started, 0 done, 0 succeeded, 10 failed, 10 errored, 0 timeout\n\
            status codes: 0 2xx, 0 3xx, 0 4xx, 0 5xx\n";
        assert!(parse(refused).unwrap().all_succeeded(None).is_err());
        let not_ok = FULL.replace("0 5xx", "3 5xx");
        let s = parse(&not_ok).unwrap();
        assert_eq!(s.not_2xx, Some(3));
        assert!(s.all_succeeded(None).is_err());
    }
}
