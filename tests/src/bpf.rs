//! The kernel side as a test sees it directly: program run counts and the pinned socket-storage
//! map, without going through lull's own reading of them.

use std::{
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
};

use aya::maps::{Map, MapData, MapError, SkStorage};
use lull_common::{SLOTS_MAP, SlotRef};

/// BPF run-time statistics, on while this lives.
///
/// This is `BPF_ENABLE_STATS`, the kernel's own reference-counted form of
/// `kernel.bpf_stats_enabled`: the count drops when the fd closes, however the test ends, and
/// it never overwrites a value someone else wrote to the sysctl.
pub struct StatsOn(#[allow(dead_code)] OwnedFd);

impl StatsOn {
    /// Turns the statistics on.
    ///
    /// # Panics
    /// If the kernel refuses (before 5.8, or without CAP_SYS_ADMIN): the test measures nothing
    /// without them.
    pub fn new() -> Self {
        Self(
            aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .unwrap_or_else(|e| panic!("BPF_ENABLE_STATS: {e}")),
        )
    }
}

impl Default for StatsOn {
    fn default() -> Self {
        Self::new()
    }
}

/// How many times program `id` has run (`bpf_prog_info.run_cnt`), while [`StatsOn`] lives.
///
/// # Panics
/// If no program has that id.
pub fn run_count(id: u32) -> u64 {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .unwrap_or_else(|| panic!("no BPF program with id {id} is loaded"))
        .run_count()
}

/// The pinned socket-storage map of the build pinned in `pin_dir`.
///
/// # Panics
/// If it cannot be opened as lull's map.
pub fn slots_map(pin_dir: &Path) -> SkStorage<MapData, SlotRef> {
    let path = pin_dir.join(SLOTS_MAP);
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    SkStorage::try_from(Map::SkStorage(data)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Whether `socket` has an entry in lull's socket storage: a lookup by its fd, where ENOENT
/// means none.
///
/// # Panics
/// On any other error.
pub fn has_storage(map: &SkStorage<MapData, SlotRef>, socket: &impl AsRawFd) -> bool {
    match map.get(socket, 0) {
        Ok(_) => true,
        Err(MapError::KeyNotFound) => false,
        Err(e) => panic!("looking up fd {} in LULL_SLOTS: {e}", socket.as_raw_fd()),
    }
}
