//! The open-file limit and the process's descriptor table, both prepared before the
//! runtime starts a thread.
//!
//! Linux keeps a process's descriptors in one table that it doubles when a new descriptor
//! does not fit. When threads share the table, a doubling waits for an RCU grace period
//! before the old table can go (`expand_fdtable`), and every thread that opens a descriptor
//! meanwhile waits as well. A burst of new streams (two sockets each) crosses several
//! doublings: on the 2-core box one burst of 1,000 streams kept podproxy's workers blocked
//! there for ~70 ms in all, while nginx's single-threaded workers never wait. Grown once
//! while podproxy has one thread, the table costs no wait at all. It never shrinks: the
//! kernel keeps 8 bytes per slot (65,536 slots: 0.5 MiB).

use crate::config::Config;

/// Descriptors reserved for each allowed connection: its socket and its upstream's.
const PER_CONNECTION: u64 = 2;
/// Listeners, admin, health checks, the log file.
const SPARE: u64 = 64;
/// Beyond this the table grows as it needs to, as it would without a reservation.
const MAX_SLOTS: u64 = 65_536;

/// What `prepare` did, logged once logging is up.
pub struct Prepared {
    /// The soft open-file limit after raising it to the hard limit.
    limit: std::io::Result<u64>,
    /// The slots reserved in the descriptor table; `None` without a known limit.
    reserved: Option<std::io::Result<u64>>,
}

/// Raises the soft open-file limit to the hard limit (every stream holds two sockets, and
/// the usual soft limit of 1024 would cap a node near 500 streams), then grows the
/// descriptor table for the connections `config` allows. Call before starting any thread.
pub fn prepare(config: &Config) -> Prepared {
    let limit = rlimit::increase_nofile_limit(u64::MAX);
    let reserved = limit
        .as_ref()
        .ok()
        .map(|limit| reserve(slots_for(config).min(*limit)));
    Prepared { limit, reserved }
}

impl Prepared {
    pub fn log(&self) {
        match &self.limit {
            Ok(n) => tracing::debug!(limit = n, "open-file limit"),
            Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
        }
        match &self.reserved {
            Some(Ok(n)) => tracing::debug!(slots = n, "descriptor table grown"),
            // Nothing is lost: the table grows as it needs to, with the waits above.
            Some(Err(e)) => tracing::info!("cannot grow the descriptor table ahead: {e}"),
            None => {}
        }
    }
}

/// The table size for `config`: room for every connection its listeners allow.
fn slots_for(config: &Config) -> u64 {
    let connections: u64 = config
        .listeners
        .iter()
        .map(|l| l.max_connections as u64)
        .sum();
    (connections * PER_CONNECTION + SPARE).min(MAX_SLOTS)
}

/// Grows the descriptor table to hold descriptors below `slots`: a duplicate at the
/// highest one makes the kernel size the table for it, and closing it keeps the size.
fn reserve(slots: u64) -> std::io::Result<u64> {
    let Some(highest) = slots.checked_sub(1) else {
        return Ok(0);
    };
    let highest = i32::try_from(highest)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "too many slots"))?;
    let (read, _write) = rustix::pipe::pipe()?;
    drop(rustix::io::fcntl_dupfd_cloexec(&read, highest)?);
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `FDSize` in /proc: the slots of this process's descriptor table.
    #[cfg(target_os = "linux")]
    fn table_size() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("FDSize:")).unwrap();
        line["FDSize:".len()..].trim().parse().unwrap()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reserving_grows_the_table_for_good() {
        rlimit::increase_nofile_limit(u64::MAX).unwrap();
        let want = 8192.min(rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap().0);
        assert_eq!(reserve(want).unwrap(), want);
        assert!(table_size() >= want, "FDSize {} < {want}", table_size());
        // The descriptor used to grow it is closed: the next one is a low number again.
        let (r, _w) = rustix::pipe::pipe().unwrap();
        assert!(std::os::fd::AsRawFd::as_raw_fd(&r) < 1024);
        assert_eq!(reserve(0).unwrap(), 0);
    }

    #[test]
    fn the_table_is_sized_by_the_connections_the_config_allows() {
        let mut config = Config::load(None).unwrap();
        for l in &mut config.listeners {
            l.max_connections = 100;
        }
        let n = config.listeners.len() as u64;
        assert_eq!(slots_for(&config), n * 100 * PER_CONNECTION + SPARE);
        config.listeners[0].max_connections = 10_000_000;
        assert_eq!(slots_for(&config), MAX_SLOTS);
    }
}
