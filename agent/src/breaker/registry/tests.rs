#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use super::*;
use crate::breaker::{
    circuit::{Breaker, Mark, SignalAction, State},
    classify::Verdict,
    config::RawBreakers,
};

fn config(toml_text: &str) -> BreakerConfig {
    let raw: RawBreakers = toml::from_str(toml_text).unwrap();
    BreakerConfig::from_raw(raw).unwrap()
}

/// A registry of one cluster `orders` with endpoints `a:1`, `b:2`, `c:3`, which the tests name
/// by index.
struct Fixture {
    b: Breakers,
    eps: Vec<Arc<EndpointBreakers>>,
}

impl std::ops::Deref for Fixture {
    type Target = Breakers;
    fn deref(&self) -> &Breakers {
        &self.b
    }
}

impl Fixture {
    fn ep(&self, i: usize) -> &EndpointBreakers {
        &self.eps[i]
    }

    fn admissible(&self, class: usize, i: usize, now: Instant) -> bool {
        self.b.endpoint_admissible(self.ep(i), class, now)
    }

    fn admit_ep<'a>(
        &'a self,
        p: &mut CallPermits<'a>,
        class: usize,
        i: usize,
        now: Instant,
        out: &mut Vec<Transition>,
    ) -> Result<(), Rejected> {
        self.b.admit_endpoint(p, self.ep(i), class, now, out)
    }

    fn no_ep(&self, class: usize, now: Instant) -> Option<Rejected> {
        self.b
            .no_endpoint(0, class, self.eps.iter().map(|e| &**e), now)
    }
}

fn breakers(cfg: BreakerConfig, subsets: &[usize], names: &[String]) -> Fixture {
    let b = Breakers::new(
        cfg,
        &[ClusterShape {
            name: "orders",
            subsets: names,
            endpoints_only: false,
        }],
        Instant::now(),
    );
    let eps = ["a:1", "b:2", "c:3"]
        .iter()
        .zip(subsets)
        .map(|(a, &s)| b.endpoint(0, a, s))
        .collect();
    Fixture { b, eps }
}

const UP_FAIL: Verdict = Verdict {
    upstream: Mark::Failure,
    client: Mark::Success,
};
const CLIENT_FAIL: Verdict = Verdict {
    upstream: Mark::Success,
    client: Mark::Failure,
};
const OK: Verdict = Verdict {
    upstream: Mark::Success,
    client: Mark::Success,
};

/// One call through the cluster to `endpoint`.
fn call(
    b: &Fixture,
    class: usize,
    client: Option<&str>,
    endpoint: usize,
    v: Verdict,
    now: Instant,
    out: &mut Vec<Transition>,
) -> Result<(), Rejected> {
    let mut p = b.admit_call(0, class, "/pkg.S/M", client, now, out)?;
    b.admit_ep(&mut p, class, endpoint, now, out)?;
    p.record_call(v, Duration::from_millis(1), now, client, out);
    Ok(())
}

#[test]
fn one_clients_faults_open_only_that_clients_breaker() {
    let b = breakers(BreakerConfig::default(), &[0, 0, 0], &["default".into()]);
    let now = Instant::now();
    let mut out = Vec::new();
    for _ in 0..10 {
        call(&b, 0, Some("sub:mallory"), 0, CLIENT_FAIL, now, &mut out).unwrap();
    }
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].breaker.scope, Scope::Client);
    assert_eq!(out[0].breaker.name, "sub:mallory");
    let r = call(&b, 0, Some("sub:mallory"), 0, OK, now, &mut out).unwrap_err();
    assert_eq!(r.breaker.to_string(), "client sub:mallory");
    for _ in 0..100 {
        call(&b, 0, Some("sub:alice"), 0, OK, now, &mut out).unwrap();
        call(&b, 0, None, 1, OK, now, &mut out).unwrap();
    }
}

#[test]
fn a_failing_subset_opens_its_own_breaker() {
    // a:1 and b:2 stable, c:3 canary.
    let b = breakers(
        BreakerConfig::default(),
        &[0, 0, 1],
        &["stable".into(), "canary".into()],
    );
    let now = Instant::now();
    let mut out = Vec::new();
    // Five failures in a row (the default) open the canary's subset and endpoint breakers.
    for i in 0..5 {
        call(&b, 0, None, 2, UP_FAIL, now, &mut out).unwrap();
        call(&b, 0, None, i % 2, OK, now, &mut out).unwrap();
    }
    let opened: Vec<_> = out.iter().map(|t| t.breaker.to_string()).collect();
    assert_eq!(opened, ["subset orders/canary", "endpoint orders/c:3"]);
    assert!(!b.admissible(0, 2, now));
    assert!(b.admissible(0, 0, now));
    assert!(b.admissible(0, 1, now));
    let r = b.no_ep(0, now).unwrap();
    assert!(r.retry_after > Duration::from_secs(4));
}

#[test]
fn priority_classes_have_their_own_breakers_and_thresholds() {
    let cfg = config(
        r#"
        [endpoint]
        consecutive_failures = 0
        failure_ratio = 0.3
        min_requests = 10
        [[class]]
        name = "high"
        policy = { failure_ratio = 0.9 }
        "#,
    );
    assert_eq!(cfg.class_of(Some(b"high")), 1);
    assert_eq!(cfg.class_of(Some(b"nope")), 0);
    assert_eq!(cfg.class_of(None), 0);
    let b = breakers(cfg, &[0, 0, 0], &["default".into()]);
    let now = Instant::now();
    let mut out = Vec::new();
    // Half the calls of each class fail on endpoint 0.
    for i in 0..20 {
        let v = if i % 2 == 0 { UP_FAIL } else { OK };
        let _ = call(&b, 0, None, 0, v, now, &mut out);
        call(&b, 1, None, 0, v, now, &mut out).unwrap();
    }
    assert!(!b.admissible(0, 0, now));
    assert!(b.admissible(1, 0, now));
    let names: Vec<_> = out.iter().map(|t| t.breaker.to_string()).collect();
    assert_eq!(names, ["endpoint orders/a:1"]);
    let snap = b.snapshot(now);
    let high = snap
        .iter()
        .find(|s| {
            s.id.class.as_deref() == Some("high")
                && s.id.scope == Scope::Endpoint
                && s.id.name == "orders/a:1"
        })
        .unwrap();
    assert_eq!(high.figures.state, State::Closed);
    assert_eq!(high.figures.window.calls, 20);
}

#[test]
fn client_breakers_are_bounded() {
    let cfg = config("max_clients = 3");
    let b = breakers(cfg, &[0, 0, 0], &["default".into()]);
    let now = Instant::now();
    let mut out = Vec::new();
    // Clients that were never at fault need no breaker.
    for i in 0..100 {
        call(&b, 0, Some(&format!("session:ok{i}")), 0, OK, now, &mut out).unwrap();
    }
    assert!(b.snapshot(now).iter().all(|s| s.id.scope != Scope::Client));
    for i in 0..5 {
        call(
            &b,
            0,
            Some(&format!("session:{i}")),
            0,
            CLIENT_FAIL,
            now,
            &mut out,
        )
        .unwrap();
    }
    assert_eq!(b.untracked_clients.load(Ordering::Relaxed), 2);
    // A window later the idle ones are forgotten and new clients get breakers.
    let later = now + Duration::from_secs(11);
    call(&b, 0, Some("session:new"), 0, CLIENT_FAIL, later, &mut out).unwrap();
    assert_eq!(b.untracked_clients.load(Ordering::Relaxed), 2);
    let clients: Vec<String> = b
        .snapshot(later)
        .into_iter()
        .filter(|s| s.id.scope == Scope::Client)
        .map(|s| s.id.name)
        .collect();
    assert_eq!(clients, ["session:new"]);
    // Its next call finds its breaker through the filter.
    for _ in 0..9 {
        call(&b, 0, Some("session:new"), 0, CLIENT_FAIL, later, &mut out).unwrap();
    }
    assert!(call(&b, 0, Some("session:new"), 0, OK, later, &mut out).is_err());
}

#[test]
fn disabled_scopes_have_no_breakers() {
    let cfg = config(
        r#"
        [endpoint]
        enabled = false
        [client]
        enabled = false
        "#,
    );
    let b = breakers(cfg, &[0, 0, 0], &["default".into()]);
    let now = Instant::now();
    let mut out = Vec::new();
    for _ in 0..100 {
        call(&b, 0, Some("sub:x"), 0, CLIENT_FAIL, now, &mut out).unwrap();
    }
    let scopes: Vec<_> = b.snapshot(now).iter().map(|s| s.id.scope).collect();
    assert!(!scopes.contains(&Scope::Endpoint) && !scopes.contains(&Scope::Client));
    assert!(scopes.contains(&Scope::Cluster) && scopes.contains(&Scope::Method));
    let off = config("enabled = false");
    let b = breakers(off, &[0, 0, 0], &["default".into()]);
    assert!(b.snapshot(now).is_empty());
}

#[test]
fn an_operator_names_a_breaker() {
    let b = breakers(BreakerConfig::default(), &[0, 0, 0], &["default".into()]);
    let now = Instant::now();
    let t = b.force("endpoint orders/b:2", true, now).unwrap().unwrap();
    assert_eq!(t.change.to, State::Open);
    assert!(!b.admissible(0, 1, now));
    assert!(b.force("orders/b:2", false, now).unwrap().is_some());
    assert!(b.force("endpoint orders/zz:9", true, now).is_none());
}

#[test]
fn a_dropped_call_gives_its_probe_back() {
    let cfg = config(
        r#"
        [endpoint]
        consecutive_failures = 1
        half_open_probes = 1
        jitter = 0.0
        "#,
    );
    let b = breakers(cfg, &[0, 0, 0], &["default".into()]);
    let now = Instant::now();
    let mut out = Vec::new();
    call(&b, 0, None, 0, UP_FAIL, now, &mut out).unwrap();
    let later = now + Duration::from_secs(5);
    {
        let mut p = b
            .admit_call(0, 0, "/pkg.S/M", None, later, &mut out)
            .unwrap();
        b.admit_ep(&mut p, 0, 0, later, &mut out).unwrap();
        assert!(p.probing());
        assert!(!b.admissible(0, 0, later));
        // dropped here, unrecorded
    }
    assert!(b.admissible(0, 0, later));
}

#[test]
fn bad_policies_are_refused_with_the_key() {
    let raw: RawBreakers = toml::from_str("[endpoint]\nfailure_ratio = 1.5").unwrap();
    let errors = BreakerConfig::from_raw(raw).unwrap_err();
    let message = errors[0].to_string();
    assert!(message.contains("failure_ratio"), "{errors:?}");
    assert!(message.contains("endpoint"), "{errors:?}");
    let raw: RawBreakers = toml::from_str("[policy]\nslow_threshold = \"soon\"").unwrap();
    let errors = BreakerConfig::from_raw(raw).unwrap_err();
    assert!(
        errors[0].to_string().contains("slow_threshold"),
        "{errors:?}"
    );
}

#[test]
fn signals_reach_every_class_of_an_endpoint_and_one_client() {
    let cfg = config(
        r#"
        [[class]]
        name = "high"
        "#,
    );
    let b = breakers(cfg, &[0, 0, 0], &["default".into()]);
    let now = Instant::now();
    let mut out = Vec::new();
    b.signal_endpoint(
        b.ep(1),
        crate::signals::SignalKind::TcpReset,
        SignalAction::Trip,
        now,
        &mut out,
    );
    let names: Vec<_> = out.iter().map(|t| t.breaker.to_string()).collect();
    assert_eq!(
        names,
        ["endpoint orders/b:2", "endpoint orders/b:2 (class high)"]
    );
    assert_eq!(out[0].change.reason.as_str(), "tcp_reset");
    assert!(!b.admissible(0, 1, now) && !b.admissible(1, 1, now));
    assert!(b.admissible(0, 0, now));
    out.clear();
    b.signal_client(
        "session:s1",
        crate::signals::SignalKind::RapidReset,
        SignalAction::Trip,
        now,
        &mut out,
    );
    assert_eq!(out.len(), 1);
    let r = call(&b, 0, Some("session:s1"), 0, OK, now, &mut out).unwrap_err();
    assert_eq!(r.reason.as_str(), "rapid_reset");
    call(&b, 0, Some("session:s2"), 0, OK, now, &mut out).unwrap();
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

    /// Successes counted without the lock (while a breaker is healthy) leave the breaker
    /// exactly where recording every call under the lock would: same window, same trips, at
    /// the same calls.
    #[test]
    fn lock_free_successes_match_the_locked_breaker(
        steps in proptest::collection::vec((0u64..400, 0u8..10), 1..400),
    ) {
        let cfg = config(
            r#"
            [endpoint]
            consecutive_failures = 4
            failure_ratio = 0.5
            min_requests = 8
            window = "1s"
            buckets = 5
            open_for = "300ms"
            jitter = 0.0
            half_open_probes = 1
            half_open_successes = 1
            [cluster]
            enabled = false
            [method]
            enabled = false
            "#,
        );
        let policy = cfg.policy(0, Scope::Endpoint).unwrap();
        let epoch = Instant::now();
        let registry = Breakers::new(
            cfg,
            &[ClusterShape { name: "c", subsets: &[], endpoints_only: false }],
            epoch,
        );
        let eps = vec![registry.endpoint(0, "a:1", 0)];
        let b = Fixture { b: registry, eps };
        let mut pure = Breaker::new(policy, epoch, 0);
        let mut now = epoch;
        let mut out = Vec::new();
        for (gap_ms, roll) in steps {
            now += Duration::from_millis(gap_ms);
            let mark = if roll < 2 { Mark::Failure } else { Mark::Success };
            let v = Verdict { upstream: mark, client: Mark::Success };
            out.clear();
            let fast = call(&b, 0, None, 0, v, now, &mut out);
            let slow = pure.admit(now).map(|(p, admitted)| {
                let recorded = pure.record(p, mark, Duration::from_millis(1), now);
                usize::from(admitted.is_some()) + usize::from(recorded.is_some())
            });
            proptest::prop_assert_eq!(fast.is_ok(), slow.is_ok());
            if let Ok(changes) = slow {
                proptest::prop_assert_eq!(out.len(), changes);
            }
            let got = &b.snapshot(now)[0].figures;
            let want = pure.figures(now);
            proptest::prop_assert_eq!(got.state, want.state);
            proptest::prop_assert_eq!(got.window, want.window);
            proptest::prop_assert_eq!(got.consecutive_failures, want.consecutive_failures);
        }
    }
}

#[test]
fn a_healthy_breaker_counts_successes_without_its_lock() {
    let b = breakers(BreakerConfig::default(), &[0, 0, 0], &["default".into()]);
    let now = Instant::now();
    let mut out = Vec::new();
    for _ in 0..100 {
        call(&b, 0, None, 0, OK, now, &mut out).unwrap();
    }
    let cell = b.ep(0).classes[0].endpoint.as_ref().unwrap();
    let pending: u64 = cell
        .successes
        .iter()
        .map(|s| s.load(Ordering::Relaxed) & COUNT_MASK)
        .sum();
    assert_eq!(pending, 100, "every success went around the lock");
    // One failure: from then on (while it is in the window) the lock counts them.
    call(&b, 0, None, 0, UP_FAIL, now, &mut out).unwrap();
    call(&b, 0, None, 0, OK, now, &mut out).unwrap();
    let pending: u64 = cell
        .successes
        .iter()
        .map(|s| s.load(Ordering::Relaxed) & COUNT_MASK)
        .sum();
    assert_eq!(pending, 0);
    let figures = cell.lock().figures(now);
    assert_eq!((figures.window.calls, figures.window.failures), (102, 1));
}

#[test]
fn method_breakers_are_bounded_and_found_again() {
    let b = breakers(config("max_methods = 2"), &[0, 0, 0], &["default".into()]);
    let now = Instant::now();
    let mut out = Vec::new();
    for m in ["/a.S/One", "/a.S/Two", "/a.S/One", "/a.S/Three", "/a.S/Two"] {
        let mut p = b.admit_call(0, 0, m, None, now, &mut out).unwrap();
        b.admit_ep(&mut p, 0, 0, now, &mut out).unwrap();
        p.record_call(UP_FAIL, Duration::from_millis(1), now, None, &mut out);
    }
    assert_eq!(b.untracked_methods.load(Ordering::Relaxed), 1);
    let methods: Vec<(String, u32)> = b
        .snapshot(now)
        .into_iter()
        .filter(|s| s.id.scope == Scope::Method)
        .map(|s| (s.id.name, s.figures.window.calls))
        .collect();
    assert_eq!(methods.len(), 2, "{methods:?}");
    assert!(
        methods.contains(&("orders/a.S/One".into(), 2)),
        "{methods:?}"
    );
    assert!(
        methods.contains(&("orders/a.S/Two".into(), 2)),
        "{methods:?}"
    );
    // Many threads finding and adding the same methods at once get one breaker each.
    let b = breakers(BreakerConfig::default(), &[0, 0, 0], &["default".into()]);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let mut out = Vec::new();
                for i in 0..200 {
                    let m = format!("/a.S/M{}", i % 50);
                    let mut p = b.admit_call(0, 0, &m, None, now, &mut out).unwrap();
                    p.record_call(OK, Duration::from_millis(1), now, None, &mut out);
                }
            });
        }
    });
    let methods = b
        .snapshot(now)
        .into_iter()
        .filter(|s| s.id.scope == Scope::Method)
        .map(|s| s.figures.window.calls)
        .collect::<Vec<_>>();
    assert_eq!(methods.len(), 50);
    assert!(methods.iter().all(|&c| c == 16), "{methods:?}");
}

#[test]
fn a_new_registry_keeps_the_state_of_breakers_whose_policy_stays() {
    let old = breakers(BreakerConfig::default(), &[0, 0, 0], &["default".into()]);
    let now = Instant::now();
    let mut out = Vec::new();
    old.force("endpoint orders/a:1", true, now).unwrap();
    for _ in 0..10 {
        let _ = call(&old, 0, Some("sub:mallory"), 1, CLIENT_FAIL, now, &mut out);
    }
    assert!(
        old.admit_call(0, 0, "/p.S/M", Some("sub:mallory"), now, &mut out)
            .is_err()
    );

    let shape = [ClusterShape {
        name: "orders",
        subsets: &["default".to_owned()],
        endpoints_only: false,
    }];
    // The same policies: the open endpoint breaker and the client's stay open, in the very
    // same breakers (calls of the old configuration still in flight record into them).
    let same = Breakers::new_after(BreakerConfig::default(), &shape, &old);
    let a = same.endpoint(0, "a:1", 0);
    assert!(!same.endpoint_admissible(&a, 0, now));
    assert!(Arc::ptr_eq(
        a.classes[0].endpoint.as_ref().unwrap(),
        old.ep(0).classes[0].endpoint.as_ref().unwrap()
    ));
    let refused = same
        .admit_call(0, 0, "/p.S/M", Some("sub:mallory"), now, &mut out)
        .err()
        .unwrap();
    assert_eq!(refused.breaker.to_string(), "client sub:mallory");
    assert!(
        same.admit_call(0, 0, "/p.S/M", Some("sub:alice"), now, &mut out)
            .is_ok()
    );

    // Another endpoint policy: the endpoint breakers start afresh; the client's stays.
    let other = Breakers::new_after(config("[endpoint]\nconsecutive_failures = 9"), &shape, &old);
    let a = other.endpoint(0, "a:1", 0);
    assert!(other.endpoint_admissible(&a, 0, now));
    assert!(
        other
            .admit_call(0, 0, "/p.S/M", Some("sub:mallory"), now, &mut out)
            .is_err()
    );
}
