//! How many compute threads this process should use.

use std::collections::HashSet;

/// Physical cores this process may run on: the CPUs of its affinity mask, SMT siblings counted
/// once, capped by its cgroup CPU quota (which `available_parallelism` applies). Memory-bound
/// decode gains nothing from a core's second hardware thread, and a pool larger than the
/// quota only adds preemption.
pub fn default_threads() -> usize {
    let avail = std::thread::available_parallelism().map_or(1, |n| n.get());
    physical_cores().map_or(avail, |c| c.min(avail)).max(1)
}

/// Distinct (package, core) pairs among the CPUs of this process's affinity mask.
fn physical_cores() -> Option<usize> {
    let cpus = affinity()?;
    let mut cores = HashSet::new();
    for cpu in &cpus {
        let topo = format!("/sys/devices/system/cpu/cpu{cpu}/topology");
        let read = |f: &str| std::fs::read_to_string(format!("{topo}/{f}")).ok()?.trim().parse::<i64>().ok();
        cores.insert((read("physical_package_id")?, read("core_id")?));
    }
    (!cores.is_empty()).then_some(cores.len())
}

#[cfg(target_os = "linux")]
fn affinity() -> Option<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        Some((0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect())
    }
}

#[cfg(not(target_os = "linux"))]
fn affinity() -> Option<Vec<usize>> {
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_threads_is_within_the_allowed_cpus() {
        let t = super::default_threads();
        let avail = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(t >= 1 && t <= avail, "{t} threads, {avail} CPUs allowed");
    }
}
