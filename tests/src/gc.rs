//! Go GC pauses as the runtime reports them (`GODEBUG=gctrace=1`) and as the agent does, and how
//! well the two agree.

use serde_json::Value;

/// `gc 3 @0.046s 2%: 0.13+0.33+0.073 ms clock, ...` -> (130.0, 73.0): the first and third clock
/// figures are the two stop-the-world phases.
pub fn gctrace_stw_figures(line: &str) -> (f64, f64) {
    let clock = line
        .split(": ")
        .nth(1)
        .and_then(|r| r.split(" ms clock").next())
        .unwrap();
    let parts: Vec<f64> = clock
        .split('+')
        .map(|p| p.parse::<f64>().unwrap() * 1000.0)
        .collect();
    (parts[0], parts[2])
}

/// Groups the agent's pauses for `pid` into GC cycles: a cycle starts with a pause that is not
/// mark termination (sweep termination) and ends with its last mark-termination pause (the
/// runtime may restart mark once, with an extra pause gctrace does not print).
pub fn agent_cycle_pauses(events: &[Value], pid: u32) -> Vec<(&Value, &Value)> {
    let mut pauses: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "gc_stw" && e["pid"] == pid)
        .collect();
    pauses.sort_by_key(|e| e["start_ns"].as_u64().unwrap());
    let mut cycles: Vec<(&Value, Option<&Value>)> = Vec::new();
    for p in pauses {
        if p["reason"] == "GC mark termination" {
            let last = cycles
                .last_mut()
                .unwrap_or_else(|| panic!("mark termination without a sweep termination: {p}"));
            last.1 = Some(p);
        } else {
            cycles.push((p, None));
        }
    }
    cycles
        .into_iter()
        .map(|(sweep, mark)| {
            (
                sweep,
                mark.unwrap_or_else(|| panic!("cycle without mark termination")),
            )
        })
        .collect()
}

/// A pause's duration as the agent reports it, in microseconds.
pub fn pause_us(pause: &Value) -> f64 {
    pause["duration_ns"].as_f64().unwrap() / 1000.0
}

/// [`agent_cycle_pauses`] as (sweep termination, mark termination) durations in microseconds.
pub fn agent_cycles(events: &[Value], pid: u32) -> Vec<(f64, f64)> {
    agent_cycle_pauses(events, pid)
        .into_iter()
        .map(|(s, m)| (pause_us(s), pause_us(m)))
        .collect()
}

/// gctrace's STW figures of every cycle in a process's stderr.
pub fn gctrace_cycles(stderr: &str) -> Vec<(f64, f64)> {
    stderr
        .lines()
        .filter(|l| l.starts_with("gc "))
        .map(gctrace_stw_figures)
        .collect()
}

/// The acceptance bound, max(10 %, 50 us) of gctrace's figure, in microseconds.
pub fn tolerance_us(gctrace_us: f64) -> f64 {
    (0.1 * gctrace_us).max(50.0)
}

/// The agent's figure within [`tolerance_us`] of gctrace's.
pub fn within_tolerance(gctrace_us: f64, agent_us: f64) -> bool {
    (agent_us - gctrace_us).abs() <= tolerance_us(gctrace_us)
}

/// How many of the agent's pauses are within max(10 %, 50 us) of gctrace's, and the spread.
pub struct Agreement {
    pub within: usize,
    pub pauses: usize,
    /// |agent - gctrace| in microseconds, sorted.
    pub diffs: Vec<f64>,
}

impl Agreement {
    /// Compares cycle by cycle; panics when the agent did not report both pauses of every cycle.
    pub fn of(label: &str, gctrace: &[(f64, f64)], agent: &[(f64, f64)]) -> Agreement {
        assert_eq!(
            agent.len(),
            gctrace.len(),
            "{label}: the agent must report both pauses of every cycle"
        );
        let mut within = 0;
        let mut diffs = Vec::new();
        for ((gs, gm), (a_s, a_m)) in gctrace.iter().zip(agent) {
            for (g, a) in [(gs, a_s), (gm, a_m)] {
                let d = (a - g).abs();
                diffs.push(d);
                if within_tolerance(*g, *a) {
                    within += 1;
                }
            }
        }
        diffs.sort_by(f64::total_cmp);
        Agreement {
            within,
            pauses: diffs.len(),
            diffs,
        }
    }

    pub fn share(&self) -> f64 {
        self.within as f64 / self.pauses.max(1) as f64
    }
}

impl std::fmt::Display for Agreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.diffs.len();
        if n == 0 {
            return write!(f, "no pauses");
        }
        write!(
            f,
            "{}/{n} pauses within max(10%, 50us) of gctrace ({:.1}%); |diff| median {:.1}us p95 {:.1}us max {:.1}us",
            self.within,
            self.share() * 100.0,
            self.diffs[n / 2],
            self.diffs[n * 95 / 100],
            self.diffs[n - 1]
        )
    }
}
