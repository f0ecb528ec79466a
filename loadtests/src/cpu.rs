//! Where the machine's CPU goes during a run, by process group (Gavel, the
//! generator, PostgreSQL's client backends and its own processes, the
//! replica, other processes; busy and stolen time), read from `/proc` once
//! a second, so that a rate that stops holding can be told from a machine
//! whose cores went elsewhere. Without `/proc` there is no probe.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::probe::ProbeThread;

/// Clock ticks per second in `/proc` (`USER_HZ`, 100 on every Linux
/// architecture Gavel runs on).
const TICKS_PER_S: f64 = 100.0;

/// Titles of PostgreSQL's own processes (after `postgres: ` and an
/// optional cluster name); any other child of a postmaster is a backend
/// serving a client.
const BACKGROUND: &[&str] = &[
    "checkpointer",
    "background writer",
    "walwriter",
    "walsender",
    "walreceiver",
    "startup",
    "autovacuum",
    "logical replication",
    "archiver",
    "stats collector",
];

/// The processes to account for; the load generator is always this process.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuWatch {
    /// Gavel's process, when it runs as one of its own.
    pub gavel: Option<u32>,
    /// The primary's postmaster.
    pub primary: Option<u32>,
    /// The replica's postmaster.
    pub replica: Option<u32>,
    /// `gavel` is the HTTP floor ([`crate::floor`]) in Gavel's place.
    pub floor: bool,
}

/// What a watched process counts towards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Group {
    Gavel,
    Generator,
    PrimaryBackends,
    PrimaryBackground,
    Replica,
}

impl Group {
    fn name(self) -> &'static str {
        match self {
            Group::Gavel => "Gavel",
            Group::Generator => "load generator",
            Group::PrimaryBackends => "PostgreSQL primary: client backends",
            Group::PrimaryBackground => {
                "PostgreSQL primary: WAL writer, WAL sender, checkpointer, autovacuum"
            }
            Group::Replica => "PostgreSQL replica: replay and reads",
        }
    }
}

/// CPU use within one second of the run, in cores (1.0 is one core busy
/// for the whole second).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuSecond {
    /// The whole machine, busy (user, system, interrupts).
    pub busy: f64,
    /// Taken by the hypervisor while this machine had work to run.
    pub steal: f64,
    /// Each watched group, in the order of [`CpuUse::groups`].
    pub groups: Vec<f64>,
}

/// CPU use over a window of seconds, in cores on average.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuWindow {
    /// Seconds averaged.
    pub seconds: usize,
    /// The machine's CPUs.
    pub cores: usize,
    /// The whole machine, busy.
    pub busy: f64,
    /// Stolen by the hypervisor.
    pub steal: f64,
    /// Each watched group, by name, in cores.
    pub groups: Vec<(String, f64)>,
    /// Busy time no watched group accounts for.
    pub other: f64,
}

impl CpuWindow {
    /// The share of the machine that `cores` is, in percent.
    pub fn share_pct(&self, cores: f64) -> f64 {
        100.0 * cores / self.cores.max(1) as f64
    }
}

/// A run's CPU use by second, as far as it has been measured. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct CpuSeconds {
    groups: Arc<Vec<String>>,
    cores: usize,
    seconds: Arc<Mutex<Vec<CpuSecond>>>,
}

impl CpuSeconds {
    /// The average over seconds `from..to` of those measured.
    pub fn window(&self, from: usize, to: usize) -> Option<CpuWindow> {
        let seconds = self.seconds.lock().expect("cpu seconds");
        average(&self.groups, self.cores, &seconds, from, to)
    }

    /// The last second measured.
    pub fn latest(&self) -> Option<CpuWindow> {
        let seconds = self.seconds.lock().expect("cpu seconds");
        let n = seconds.len();
        average(&self.groups, self.cores, &seconds, n.saturating_sub(1), n)
    }

    /// Everything measured so far.
    pub fn snapshot(&self) -> CpuUse {
        CpuUse {
            cores: self.cores,
            groups: self.groups.to_vec(),
            seconds: self.seconds.lock().expect("cpu seconds").clone(),
        }
    }
}

/// A run's CPU use by second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuUse {
    /// The machine's CPUs.
    pub cores: usize,
    /// The watched groups.
    pub groups: Vec<String>,
    /// From second 0.
    pub seconds: Vec<CpuSecond>,
}

impl CpuUse {
    /// The average over seconds `from..to` of those measured.
    pub fn window(&self, from: usize, to: usize) -> Option<CpuWindow> {
        average(&self.groups, self.cores, &self.seconds, from, to)
    }
}

/// The average over seconds `from..to` of those in `seconds`.
fn average(
    groups: &[String],
    cores: usize,
    seconds: &[CpuSecond],
    from: usize,
    to: usize,
) -> Option<CpuWindow> {
    let end = to.min(seconds.len());
    let seconds = &seconds[from.min(end)..end];
    if seconds.is_empty() {
        return None;
    }
    let n = seconds.len() as f64;
    let mean = |f: &dyn Fn(&CpuSecond) -> f64| seconds.iter().map(f).sum::<f64>() / n;
    let groups: Vec<(String, f64)> = groups
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let cores = mean(&|s| s.groups.get(i).copied().unwrap_or(0.0));
            (name.clone(), cores)
        })
        .collect();
    let busy = mean(&|s| s.busy);
    let watched: f64 = groups.iter().map(|(_, c)| c).sum();
    Some(CpuWindow {
        seconds: seconds.len(),
        cores,
        busy,
        steal: mean(&|s| s.steal),
        other: (busy - watched).max(0.0),
        groups,
    })
}

/// A running probe; [`CpuProbe::stop`] ends it.
pub struct CpuProbe {
    seconds: CpuSeconds,
    thread: ProbeThread,
}

impl CpuProbe {
    /// Starts accounting for `watch` from `t0` (second 0), once a second;
    /// fails when `/proc` cannot be read.
    pub fn start(watch: CpuWatch, t0: Instant) -> anyhow::Result<Self> {
        let mut sampler = Sampler::new(watch)?;
        let seconds = CpuSeconds {
            groups: Arc::new(sampler.names()),
            cores: sampler.cores,
            seconds: Arc::default(),
        };
        let thread = ProbeThread::spawn("CPU probe", {
            let seconds = seconds.clone();
            move |stop| {
                sleep_until(t0, stop);
                let mut last = sampler.sample();
                let mut next = t0;
                while !stop.load(Ordering::Acquire) {
                    next += Duration::from_secs(1);
                    sleep_until(next, stop);
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let now = sampler.sample();
                    let second = sampler.second(&last, &now);
                    seconds.seconds.lock().expect("cpu seconds").push(second);
                    last = now;
                }
            }
        })?;
        Ok(CpuProbe { seconds, thread })
    }

    /// What it has measured so far (shared with the probe).
    pub fn seconds(&self) -> CpuSeconds {
        self.seconds.clone()
    }

    /// Stops the probe and returns every second it measured.
    pub fn stop(mut self) -> CpuUse {
        self.thread.halt();
        self.seconds.snapshot()
    }
}

/// Sleeps until `at`, waking early when `stop` is set.
fn sleep_until(at: Instant, stop: &AtomicBool) {
    loop {
        let now = Instant::now();
        if now >= at || stop.load(Ordering::Acquire) {
            return;
        }
        std::thread::sleep((at - now).min(Duration::from_millis(100)));
    }
}

/// The machine's cumulative CPU times and each watched process's, at one
/// moment.
struct Sample {
    at: Instant,
    machine: MachineTicks,
    /// Cumulative ticks by pid, with the group each counts towards.
    processes: HashMap<u32, (Group, u64)>,
}

/// Reads `/proc` and turns two samples into a second's CPU use.
struct Sampler {
    watch: CpuWatch,
    own: u32,
    cores: usize,
    groups: Vec<Group>,
    /// Children of a postmaster seen in the previous sample, and the ticks
    /// already counted for them, by postmaster.
    children: HashMap<u32, HashMap<u32, u64>>,
    /// Ticks of exited children a postmaster's reaped time still holds,
    /// already counted while they ran.
    counted: HashMap<u32, u64>,
    /// Client backend or not, by pid (a title is read once).
    kinds: HashMap<u32, bool>,
}

impl Sampler {
    fn new(watch: CpuWatch) -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat")
            .context("reading /proc/stat for the CPU probe")?;
        let cores = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count()
            .max(1);
        let own = std::process::id();
        let mut groups = Vec::new();
        if watch.gavel.is_some_and(|pid| pid != own) {
            groups.push(Group::Gavel);
        }
        groups.push(Group::Generator);
        if watch.primary.is_some() {
            groups.extend([Group::PrimaryBackends, Group::PrimaryBackground]);
        }
        if watch.replica.is_some() {
            groups.push(Group::Replica);
        }
        Ok(Sampler {
            watch,
            own,
            cores,
            groups,
            children: HashMap::new(),
            counted: HashMap::new(),
            kinds: HashMap::new(),
        })
    }

    /// The groups' names, in order.
    fn names(&self) -> Vec<String> {
        let together = self.watch.gavel == Some(self.own);
        let server = if self.watch.floor {
            "HTTP floor"
        } else {
            "Gavel"
        };
        self.groups
            .iter()
            .map(|&g| match g {
                Group::Generator if together => {
                    format!("load generator and {server} (one process)")
                }
                Group::Gavel => server.into(),
                g => g.name().into(),
            })
            .collect()
    }

    fn sample(&mut self) -> Sample {
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| MachineTicks::parse(&s))
            .unwrap_or_default();
        let mut processes = HashMap::new();
        let postmasters = [
            (self.watch.primary, Group::PrimaryBackground),
            (self.watch.replica, Group::Replica),
        ];
        let mut children: HashMap<u32, HashMap<u32, u64>> = HashMap::new();
        let gavel = self.watch.gavel.filter(|&pid| pid != self.own);
        for pid in proc_pids() {
            let Some(stat) = ProcessStat::read(pid) else {
                continue;
            };
            if Some(pid) == gavel {
                processes.insert(pid, (Group::Gavel, stat.own_ticks()));
            } else if pid == self.own {
                processes.insert(pid, (Group::Generator, stat.own_ticks()));
            } else if let Some(&(_, group)) = postmasters.iter().find(|(p, _)| *p == Some(pid)) {
                // The postmaster holds the time of its children once reaped.
                processes.insert(pid, (group, stat.own_ticks() + stat.reaped_ticks()));
            } else if let Some(&(Some(parent), group)) =
                postmasters.iter().find(|(p, _)| *p == Some(stat.ppid))
            {
                let group = match group {
                    Group::PrimaryBackground if self.is_client_backend(pid) => {
                        Group::PrimaryBackends
                    }
                    group => group,
                };
                processes.insert(pid, (group, stat.own_ticks()));
                children
                    .entry(parent)
                    .or_default()
                    .insert(pid, stat.own_ticks());
            }
        }
        // Children gone since the last sample were reaped with the time
        // already counted for them: the postmaster must not count it again.
        for (parent, before) in &self.children {
            let now = children.get(parent);
            let gone: u64 = before
                .iter()
                .filter(|(pid, _)| now.is_none_or(|n| !n.contains_key(pid)))
                .map(|(_, ticks)| ticks)
                .sum();
            *self.counted.entry(*parent).or_default() += gone;
        }
        self.kinds.retain(|pid, _| processes.contains_key(pid));
        self.children = children;
        Sample {
            at: Instant::now(),
            machine,
            processes,
        }
    }

    fn is_client_backend(&mut self, pid: u32) -> bool {
        *self.kinds.entry(pid).or_insert_with(|| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|raw| is_client_backend_title(&String::from_utf8_lossy(&raw)))
                .unwrap_or(false)
        })
    }

    fn second(&mut self, before: &Sample, after: &Sample) -> CpuSecond {
        let elapsed_ticks =
            after.at.duration_since(before.at).as_secs_f64().max(1e-3) * TICKS_PER_S;
        let cores = |ticks: u64| ticks as f64 / elapsed_ticks;
        let mut groups = vec![0.0; self.groups.len()];
        for (pid, &(group, ticks)) in &after.processes {
            let mut used = match before.processes.get(pid) {
                Some(&(_, earlier)) => ticks.saturating_sub(earlier),
                // Started since the last sample.
                None => ticks,
            };
            if let Some(counted) = self.counted.get_mut(pid) {
                let repeat = used.min(*counted);
                *counted -= repeat;
                used -= repeat;
            }
            if let Some(i) = self.groups.iter().position(|g| *g == group) {
                groups[i] += cores(used);
            }
        }
        let (b, a) = (&before.machine, &after.machine);
        CpuSecond {
            busy: cores(a.busy.saturating_sub(b.busy)),
            steal: cores(a.steal.saturating_sub(b.steal)),
            groups,
        }
    }
}

/// The machine's cumulative busy and stolen ticks (`/proc/stat`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct MachineTicks {
    busy: u64,
    steal: u64,
}

impl MachineTicks {
    /// From the `cpu` line: user nice system idle iowait irq softirq steal
    /// (guest time is already in user).
    fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        Some(MachineTicks {
            busy: at(0) + at(1) + at(2) + at(5) + at(6),
            steal: at(7),
        })
    }
}

/// The fields of `/proc/<pid>/stat` the probe needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcessStat {
    ppid: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

impl ProcessStat {
    fn read(pid: u32) -> Option<Self> {
        Self::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    /// The name (field 2) is in parentheses and may hold spaces and
    /// parentheses itself, so fields are counted from the last `)`.
    fn parse(stat: &str) -> Option<Self> {
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // fields[0] is field 3 (state).
        let field = |n: usize| fields.get(n - 3)?.parse().ok();
        Some(ProcessStat {
            ppid: field(4)? as u32,
            utime: field(14)?,
            stime: field(15)?,
            cutime: field(16)?,
            cstime: field(17)?,
        })
    }

    fn own_ticks(&self) -> u64 {
        self.utime + self.stime
    }

    fn reaped_ticks(&self) -> u64 {
        self.cutime + self.cstime
    }
}

/// CPU time, in seconds, of this process's children that have exited and
/// been waited for: a child's whole time, once it is done.
pub fn reaped_children_s() -> Option<f64> {
    let stat = ProcessStat::read(std::process::id())?;
    Some(stat.reaped_ticks() as f64 / TICKS_PER_S)
}

/// Every pid in `/proc`.
fn proc_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a PostgreSQL child's command line (its process title) names a
/// backend serving a client rather than one of PostgreSQL's own processes.
fn is_client_backend_title(cmdline: &str) -> bool {
    let title = cmdline.trim_end_matches('\0').trim();
    let Some(title) = title.strip_prefix("postgres: ") else {
        return false;
    };
    // `cluster_name`, when set, comes first: `postgres: main: checkpointer`.
    let title = match title.split_once(": ") {
        Some((name, rest)) if !name.contains(' ') => rest,
        _ => title,
    };
    !BACKGROUND.iter().any(|b| title.starts_with(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn process_stat_fields_are_counted_after_the_name() {
        let line = "4242 (postgres: a (b) c) S 17 4242 4242 0 -1 4194560 120 0 0 0 \
                    31 7 5 2 20 0 1 0 100 1000 10 18446744073709551615";
        let stat = ProcessStat::parse(line).unwrap();
        assert_eq!(
            stat,
            ProcessStat {
                ppid: 17,
                utime: 31,
                stime: 7,
                cutime: 5,
                cstime: 2
            }
        );
        assert_eq!(stat.own_ticks(), 38);
        assert_eq!(stat.reaped_ticks(), 7);
        assert_eq!(ProcessStat::parse("12 (sh"), None, "a truncated line");
    }

    #[test]
    fn machine_ticks_add_user_nice_system_and_interrupts() {
        let stat = "cpu  100 5 40 900 3 2 1 7 0 0\ncpu0 50 2 20 450 1 1 0 3 0 0\n";
        assert_eq!(
            MachineTicks::parse(stat),
            Some(MachineTicks {
                busy: 148,
                steal: 7
            })
        );
        assert_eq!(MachineTicks::parse("intr 1 2 3"), None);
    }

    #[test]
    fn postgres_titles_tell_client_backends_from_its_own_processes() {
        for own in [
            "postgres: checkpointer ",
            "postgres: walwriter ",
            "postgres: walsender gavel 127.0.0.1(51234) streaming 0/3000148",
            "postgres: main: autovacuum worker gavel_log",
            "postgres: startup recovering 000000010000000000000003",
        ] {
            assert!(!is_client_backend_title(own), "{own}");
        }
        for client in [
            "postgres: gavel gavel_log 127.0.0.1(40112) idle",
            "postgres: main: gavel gavel_log [local] INSERT\0",
        ] {
            assert!(is_client_backend_title(client), "{client}");
        }
        assert!(!is_client_backend_title(
            "/usr/lib/postgresql/15/bin/postgres -D data"
        ));
    }

    #[test]
    fn a_window_averages_its_seconds_and_what_no_group_holds_is_other() {
        let usage = CpuUse {
            cores: 2,
            groups: vec!["Gavel".into(), "load generator".into()],
            seconds: vec![
                CpuSecond {
                    busy: 1.0,
                    steal: 0.0,
                    groups: vec![0.5, 0.25],
                },
                CpuSecond {
                    busy: 2.0,
                    steal: 0.2,
                    groups: vec![1.5, 0.25],
                },
            ],
        };
        let w = usage.window(0, 10).unwrap();
        assert_eq!(w.seconds, 2);
        assert_eq!(w.busy, 1.5);
        assert!((w.steal - 0.1).abs() < 1e-9);
        assert_eq!(
            w.groups,
            vec![("Gavel".into(), 1.0), ("load generator".into(), 0.25)]
        );
        assert_eq!(w.other, 0.25);
        assert_eq!(w.share_pct(w.busy), 75.0);
        assert_eq!(usage.window(2, 5), None, "no second measured");
    }

    /// A shell running `script`, its output discarded.
    fn shell(script: &str) -> std::process::Child {
        Command::new("sh")
            .args(["-c", script])
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    }

    #[test]
    fn a_parent_that_reaps_its_children_counts_their_time_once() {
        // A shell running one spinning child (about a second each) after
        // another, watched as a postmaster. Each child lives across
        // samples (counted while it runs), then its time reaches the
        // parent as reaped time, which must not count again: one process
        // at a time uses at most one core.
        let mut parent =
            shell("while :; do sh -c 'i=0; while [ $i -lt 700000 ]; do i=$((i+1)); done'; done");
        let watch = CpuWatch {
            primary: Some(parent.id()),
            ..CpuWatch::default()
        };
        let probe = CpuProbe::start(watch, Instant::now()).unwrap();
        std::thread::sleep(Duration::from_millis(4_300));
        let usage = probe.stop();
        let _ = parent.kill();
        let _ = parent.wait();
        assert_eq!(
            usage.groups[1..],
            [
                Group::PrimaryBackends.name(),
                Group::PrimaryBackground.name()
            ]
        );
        let w = usage.window(0, 4).unwrap();
        let postgres = w.groups[1].1 + w.groups[2].1;
        assert!(
            postgres > 0.1,
            "the parent and its children used {postgres:.2} cores"
        );
        assert!(
            postgres < 1.15,
            "one process at a time cannot use {postgres:.2} cores: counted twice"
        );
        assert_eq!(w.groups[1].1, 0.0, "no child is a client backend");
    }

    #[test]
    fn the_probe_sees_a_busy_process_and_this_one() {
        // A shell spinning (without forking) until it is killed, watched
        // as Gavel would be.
        let mut busy = shell("i=0; while [ $i -ge 0 ]; do i=$((i + 1)); done");
        let watch = CpuWatch {
            gavel: Some(busy.id()),
            ..CpuWatch::default()
        };
        let probe = CpuProbe::start(watch, Instant::now()).unwrap();
        let spin = Instant::now();
        // This process spins too, for the generator's group.
        while spin.elapsed() < Duration::from_millis(2_200) {
            std::hint::black_box(0u64);
        }
        let live = probe.seconds();
        let usage = probe.stop();
        let _ = busy.kill();
        let _ = busy.wait();
        assert_eq!(usage.groups, ["Gavel", "load generator"]);
        assert!(usage.seconds.len() >= 2, "seconds: {}", usage.seconds.len());
        let w = usage.window(0, 2).unwrap();
        assert_eq!(live.window(0, 2), Some(w.clone()));
        let n = usage.seconds.len();
        assert_eq!(live.latest(), usage.window(n - 1, n), "the last second");
        // On a loaded machine either may get less than a core; both get some.
        let (gavel, generator) = (w.groups[0].1, w.groups[1].1);
        assert!(gavel > 0.2, "the spinning shell used {gavel:.2} cores");
        assert!(generator > 0.2, "this process used {generator:.2} cores");
        assert!(
            w.busy + 0.05 >= gavel + generator,
            "the machine was busy at least as long as both: {w:?}"
        );
    }
}
