//! The NUMA node a GPU hangs off, from sysfs, and host memory placed there: a staging ring
//! on the other socket would cross the interconnect twice (into the ring, then out to the
//! GPU), so the ring is allocated by a thread bound to the GPU's node, whose first touch (the
//! driver's, when it pins the pages) places the pages on that node.
//!
//! Every path is read under a sysfs root given by the caller (`/sys` on a machine), so that
//! tests can lay out a fake one.

use std::path::Path;

/// The sysfs root of this machine.
pub(crate) const SYSFS: &str = "/sys";

/// The PCI address sysfs names a device by (`0000:17:00.0`), from its domain, bus and device
/// numbers (function 0: a GPU's own).
pub(crate) fn pci_address(domain: u32, bus: u32, device: u32) -> String {
    format!("{domain:04x}:{bus:02x}:{device:02x}.0")
}

/// The NUMA node of the PCI device at `address` (`<sysfs>/bus/pci/devices/<address>/numa_node`),
/// `None` where sysfs does not say (no such file, or -1: a machine of one node).
pub(crate) fn node_of(sysfs: &Path, address: &str) -> Option<usize> {
    let path = sysfs
        .join("bus/pci/devices")
        .join(address)
        .join("numa_node");
    let text = std::fs::read_to_string(path).ok()?;
    usize::try_from(text.trim().parse::<i64>().ok()?).ok()
}

/// The CPUs of NUMA node `node` (`<sysfs>/devices/system/node/node<N>/cpulist`, such as
/// `0-15,32-47`), `None` where sysfs does not say or the list does not parse.
pub(crate) fn cpus_of(sysfs: &Path, node: usize) -> Option<Vec<usize>> {
    let path = sysfs.join(format!("devices/system/node/node{node}/cpulist"));
    let text = std::fs::read_to_string(path).ok()?;
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().ok()?..=b.parse::<usize>().ok()?),
            None => cpus.push(part.parse().ok()?),
        }
    }
    (!cpus.is_empty()).then_some(cpus)
}

/// Runs `f` on a thread bound to `cpus` (where the kernel allows: a refused binding runs it
/// unbound), and returns what it returns.
pub(crate) fn on_cpus<T: Send>(cpus: &[usize], f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            bind(cpus);
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Binds the calling thread to `cpus` (those the set can hold), ignoring a refusal.
fn bind(cpus: &[usize]) {
    // SAFETY: an all-zero cpu_set_t is the empty set, a valid value of this plain C type.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let room = 8 * std::mem::size_of::<libc::cpu_set_t>();
    for &cpu in cpus.iter().filter(|&&c| c < room) {
        // SAFETY: `cpu` is below the set's capacity (checked above).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size given.
    let _ = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_and_cpus_come_from_sysfs() {
        let root = tempfile::tempdir().unwrap();
        let gpu = root.path().join("bus/pci/devices/0000:17:00.0");
        std::fs::create_dir_all(&gpu).unwrap();
        std::fs::write(gpu.join("numa_node"), "1\n").unwrap();
        let lone = root.path().join("bus/pci/devices/0000:65:00.0");
        std::fs::create_dir_all(&lone).unwrap();
        std::fs::write(lone.join("numa_node"), "-1\n").unwrap();
        let node = root.path().join("devices/system/node/node1");
        std::fs::create_dir_all(&node).unwrap();
        std::fs::write(node.join("cpulist"), "16-19,48,50-51\n").unwrap();

        assert_eq!(pci_address(0, 0x17, 0), "0000:17:00.0");
        assert_eq!(node_of(root.path(), "0000:17:00.0"), Some(1));
        assert_eq!(node_of(root.path(), "0000:65:00.0"), None);
        assert_eq!(node_of(root.path(), "0000:99:00.0"), None);
        assert_eq!(
            cpus_of(root.path(), 1),
            Some(vec![16, 17, 18, 19, 48, 50, 51])
        );
        assert_eq!(cpus_of(root.path(), 0), None);
    }

    #[test]
    fn work_runs_on_the_cpus_it_is_bound_to() {
        let on = on_cpus(&[0], || {
            // SAFETY: a zeroed set is valid; pid 0 is this thread.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::cpu_set_t>();
            // SAFETY: as above, a valid set of the size given.
            assert_eq!(unsafe { libc::sched_getaffinity(0, size, &mut set) }, 0);
            // SAFETY: both below the set's capacity.
            unsafe { (libc::CPU_ISSET(0, &set), libc::CPU_ISSET(1, &set)) }
        });
        assert_eq!(on, (true, false));
    }
}
