//! Loading host mode's programs, pinning its maps, programs and links, and taking them away.
//!
//! Pins, under `/sys/fs/bpf/lull/<instance>/` (`host` by default):
//! - `maps/HOST_*`: every map. A restart (even after SIGKILL) reuses them, so rules, counters,
//!   the verdicts waiting in the ring buffer and every watched socket's record survive;
//! - `sock_ops`: the `sock_ops` program;
//! - `links/<cgroup id>`: one cgroup link per attached cgroup. Pinned links stay attached while
//!   no process holds them, which is what keeps policy applied while `lull host` is down;
//! - `list`, `owners`: the list and owners iterators' links, which `lull ls` opens like
//!   files.
//!
//! A new `lull host` loads fresh programs (with this kernel's offsets) and swaps them into the
//! pinned links with `BPF_LINK_UPDATE`, which is atomic: no connection is established
//! without a program, and none runs two.

use std::{
    fs::File,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    ptr::NonNull,
    sync::atomic::AtomicU64,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, RingBuf},
    programs::{Iter, SockOps},
};
use lull_common::host::{
    CLOCK_PROG, CgroupKey, CidrKey, HOST_BANKS_MAP, HOST_CGROUPS_MAP, HOST_CIDRS_MAP,
    HOST_CONFIG_MAP, HOST_COUNTERS_MAP, HOST_NAMES_MAP, HOST_PORTS_MAP, HOST_SOCKS_MAP,
    HOST_VERDICTS_MAP, HostConfig, LIST_PROG, MAX_CIDRS, MAX_RULE_CGROUPS, OWNERS_PROG,
    PICKUP_PROG, PORT_MAP_ENTRIES, RULE_SLOTS, RuleBank, RuleCounters, RuleName, SOCK_OPS_PROG,
    SockRecord, VERDICT_RING_BYTES,
};

use super::{HostError, error::chain, offsets, sys};
use crate::activity::{PIN_ROOT, kernel_btf::KernelBtf, lock_file::RUN_DIR};

/// Where one host-mode instance keeps its pins and its lock.
#[derive(Clone, Debug)]
pub struct HostPaths {
    /// The instance's name.
    pub instance: String,
    /// Its pin directory in bpffs.
    pub pins: PathBuf,
    /// The lock file a running `lull host` holds exclusively.
    pub lock: PathBuf,
}

impl HostPaths {
    /// The paths of instance `name` (`host` is the default; tests and side-by-side runs use
    /// their own).
    pub fn new(name: &str) -> Self {
        Self {
            instance: name.to_string(),
            pins: Path::new(PIN_ROOT).join(name),
            lock: Path::new(RUN_DIR).join(format!("{name}.lock")),
        }
    }

    pub(crate) fn map(&self, name: &str) -> PathBuf {
        self.pins.join("maps").join(name)
    }

    pub(crate) fn links(&self) -> PathBuf {
        self.pins.join("links")
    }

    pub(crate) fn list_link(&self) -> PathBuf {
        self.pins.join("list")
    }

    pub(crate) fn owners_link(&self) -> PathBuf {
        self.pins.join("owners")
    }
}

/// (name, key size, value size, max entries) of each pinned map, as this build defines it.
const MAPS: [(&str, u32, u32, u32); 9] = [
    (HOST_CONFIG_MAP, 4, size_of::<HostConfig>() as u32, 1),
    (HOST_BANKS_MAP, 4, size_of::<RuleBank>() as u32, 2),
    (HOST_PORTS_MAP, 4, 8, PORT_MAP_ENTRIES as u32),
    (
        HOST_CIDRS_MAP,
        4 + size_of::<CidrKey>() as u32,
        1,
        MAX_CIDRS as u32,
    ),
    (
        HOST_CGROUPS_MAP,
        size_of::<CgroupKey>() as u32,
        8,
        MAX_RULE_CGROUPS as u32,
    ),
    (HOST_SOCKS_MAP, 4, size_of::<SockRecord>() as u32, 0),
    (HOST_VERDICTS_MAP, 0, 0, VERDICT_RING_BYTES as u32),
    (
        HOST_COUNTERS_MAP,
        4,
        size_of::<RuleCounters>() as u32,
        RULE_SLOTS as u32,
    ),
    (
        HOST_NAMES_MAP,
        4,
        size_of::<RuleName>() as u32,
        RULE_SLOTS as u32,
    ),
];

/// Host mode's programs and maps, loaded.
pub(crate) struct Kernel {
    pub(crate) config: Array<MapData, HostConfig>,
    pub(crate) banks: Array<MapData, RuleBank>,
    /// Mapped only while rules are written ([`Kernel::ports`]): kept mapped, its 2 MiB
    /// would count in the daemon's resident memory for nothing.
    ports: MapData,
    pub(crate) cidrs: LpmTrie<MapData, CidrKey, u8>,
    pub(crate) cgroups: HashMap<MapData, CgroupKey, u64>,
    pub(crate) counters: PerCpuArray<MapData, RuleCounters>,
    pub(crate) names: Array<MapData, RuleName>,
    pub(crate) verdicts: Option<RingBuf<MapData>>,
    pub(crate) pickup_link: OwnedFd,
    pub(crate) clock_link: OwnedFd,
    /// Whether the maps were already pinned (a restart) rather than made now.
    pub(crate) restarted: bool,
    paths: HostPaths,
    ebpf: Ebpf,
}

impl Kernel {
    /// Loads the object with every map taken from (or pinned to) `paths`, and loads the
    /// programs. Attaches nothing yet.
    pub(crate) fn load(paths: &HostPaths) -> Result<Self, HostError> {
        let object = crate::activity::bpf_object().ok_or(HostError::NoBpfObject)?;
        ensure_bpffs()?;
        for dir in [paths.pins.join("maps"), paths.links()] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| HostError::syscall(format!("mkdir {}", dir.display()), e))?;
        }
        // Root only: the maps hold addresses and ports of other processes' connections.
        std::fs::set_permissions(
            &paths.pins,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(|e| HostError::syscall(format!("chmod 0700 {}", paths.pins.display()), e))?;
        let restarted = check_pinned_maps(paths)?;
        let offsets = offsets::read(&KernelBtf::load()?)?;
        let pins: Vec<(&str, PathBuf)> = MAPS.iter().map(|m| (m.0, paths.map(m.0))).collect();
        let mut loader = EbpfLoader::new();
        for (name, value) in &offsets {
            loader.override_global(name, value, true);
        }
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object).map_err(HostError::Load)?;

        let sock_ops: &mut SockOps = program(&mut ebpf, SOCK_OPS_PROG)?;
        sock_ops.load().map_err(|e| prog_error(SOCK_OPS_PROG, e))?;
        let btf = aya::Btf::from_sys_fs().map_err(|e| {
            HostError::syscall(
                "reading /sys/kernel/btf/vmlinux",
                std::io::Error::other(e.to_string()),
            )
        })?;
        let mut links = Vec::new();
        for (name, target) in [
            (PICKUP_PROG, "tcp"),
            (LIST_PROG, "tcp"),
            (OWNERS_PROG, "task_file"),
            (CLOCK_PROG, "bpf_map"),
        ] {
            let iter: &mut Iter = program(&mut ebpf, name)?;
            iter.load(target, &btf).map_err(|e| prog_error(name, e))?;
            let fd = iter.fd().map_err(|e| prog_error(name, e))?;
            links.push(sys::link_create(
                fd.as_fd(),
                None,
                sys::ATTACH_TRACE_ITER,
                name,
            )?);
        }
        let Ok([pickup_link, list_link, owners_link, clock_link]) = <[OwnedFd; 4]>::try_from(links)
        else {
            unreachable!("one link per iterator program");
        };
        // `lull ls` opens these pins.
        replace_pin(list_link.as_fd(), &paths.list_link())?;
        replace_pin(owners_link.as_fd(), &paths.owners_link())?;

        let ports = map_data(&mut ebpf, HOST_PORTS_MAP)?;
        let kernel = Self {
            config: typed(&mut ebpf, HOST_CONFIG_MAP)?,
            banks: typed(&mut ebpf, HOST_BANKS_MAP)?,
            ports,
            cidrs: typed(&mut ebpf, HOST_CIDRS_MAP)?,
            cgroups: typed(&mut ebpf, HOST_CGROUPS_MAP)?,
            counters: typed(&mut ebpf, HOST_COUNTERS_MAP)?,
            names: typed(&mut ebpf, HOST_NAMES_MAP)?,
            verdicts: Some(typed(&mut ebpf, HOST_VERDICTS_MAP)?),
            pickup_link,
            clock_link,
            restarted,
            paths: paths.clone(),
            ebpf,
        };
        kernel.pin_sock_ops()?;
        Ok(kernel)
    }

    /// The port bitmaps, mapped for writing.
    pub(crate) fn ports(&self) -> Result<Ports, HostError> {
        Ports::map(self.ports.fd().as_fd())
    }

    fn sock_ops_fd(&self) -> Result<BorrowedFd<'_>, HostError> {
        let program = self.ebpf.program(SOCK_OPS_PROG).ok_or(HostError::Missing {
            kind: "program",
            name: SOCK_OPS_PROG,
        })?;
        let aya::programs::Program::SockOps(sock_ops) = program else {
            return Err(HostError::Missing {
                kind: "program",
                name: SOCK_OPS_PROG,
            });
        };
        Ok(sock_ops
            .fd()
            .map_err(|e| prog_error(SOCK_OPS_PROG, e))?
            .as_fd())
    }

    /// Pins the current `sock_ops` program (for `bpftool prog show pinned`), replacing the pin
    /// of an earlier run.
    fn pin_sock_ops(&self) -> Result<(), HostError> {
        replace_pin(self.sock_ops_fd()?, &self.paths.pins.join("sock_ops"))
    }

    /// Makes the `sock_ops` program run for exactly the cgroups `wanted` (id, path): updates
    /// the pinned link of each to this run's program, attaches new ones, and unpins the links
    /// of cgroups no longer wanted (which detaches them). Returns how many links it made.
    pub(crate) fn sync_links(&self, wanted: &[(u64, PathBuf)]) -> Result<usize, HostError> {
        let prog = self.sock_ops_fd()?;
        let prog_id = crate::bpf_syscall::prog_id(prog)
            .map_err(|e| HostError::syscall("bpf(BPF_OBJ_GET_INFO_BY_FD) on a program", e))?;
        let dir = self.paths.links();
        let mut made = 0;
        for (id, path) in wanted {
            let pin = dir.join(id.to_string());
            if pin.exists() {
                let link = sys::obj_get(&pin)?;
                let info = crate::bpf_syscall::link_info(link.as_fd())
                    .map_err(|e| HostError::syscall("bpf(BPF_OBJ_GET_INFO_BY_FD) on a link", e))?;
                if info.cgroup_id == *id {
                    if info.prog_id != prog_id {
                        sys::link_update(link.as_fd(), prog, &pin.display().to_string())?;
                    }
                    continue;
                }
                // The cgroup was removed (and maybe made again, with a new id): the old link
                // is defunct.
                let _ = std::fs::remove_file(&pin);
            }
            let cgroup = File::open(path)
                .map_err(|e| HostError::syscall(format!("open {}", path.display()), e))?;
            let link = sys::link_create(
                prog,
                Some(cgroup.as_fd()),
                sys::ATTACH_CGROUP_SOCK_OPS,
                &format!("sock_ops on {}", path.display()),
            )?;
            sys::obj_pin(link.as_fd(), &pin)?;
            made += 1;
        }
        for entry in std::fs::read_dir(&dir)
            .map_err(|e| HostError::syscall(format!("listing {}", dir.display()), e))?
            .flatten()
        {
            let keep = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| wanted.iter().any(|w| w.0 == id));
            if !keep {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(made)
    }
}

/// Pins `fd` at `path`, replacing what was pinned there in one rename, so a reader never
/// finds the path missing. (bpffs refuses names with a dot: those are the kernel's.)
fn replace_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<(), HostError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push("-new");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    sys::obj_pin(fd, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        HostError::syscall(format!("rename {} to {}", tmp.display(), path.display()), e)
    })
}

/// Removes everything instance `paths` pinned: links (which detaches the programs), programs
/// and maps. Returns the number of links removed. Sockets keep the keepalive options they
/// were given.
pub(crate) fn uninstall(paths: &HostPaths) -> Result<usize, HostError> {
    if !paths.pins.exists() {
        return Err(HostError::NotInstalled {
            dir: paths.pins.clone(),
        });
    }
    let links = std::fs::read_dir(paths.links())
        .map(|d| d.flatten().count())
        .unwrap_or(0);
    std::fs::remove_dir_all(&paths.pins)
        .map_err(|e| HostError::syscall(format!("removing {}", paths.pins.display()), e))?;
    Ok(links)
}

/// Checks the maps an earlier run pinned against this build's definitions. Returns whether
/// any was pinned.
fn check_pinned_maps(paths: &HostPaths) -> Result<bool, HostError> {
    let mut any = false;
    for (name, key, value, max) in MAPS {
        let path = paths.map(name);
        if !path.exists() {
            continue;
        }
        any = true;
        let info = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .map_err(|e| HostError::PinMismatch {
                path: path.clone(),
                why: chain(&e),
            })?;
        let found = (info.key_size(), info.value_size(), info.max_entries());
        if found != (key, value, max) {
            return Err(HostError::PinMismatch {
                path,
                why: format!(
                    "key, value and max_entries are {found:?}; this build has {:?}",
                    (key, value, max)
                ),
            });
        }
    }
    Ok(any)
}

/// Mounts bpffs at `/sys/fs/bpf` unless it is there (the engine's own pins need the same).
pub(crate) fn ensure_bpffs() -> Result<(), HostError> {
    Ok(crate::activity::ensure_bpffs()?)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, HostError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .ok_or(HostError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|_| HostError::Missing {
            kind: "program",
            name,
        })
}

fn prog_error(name: &'static str, source: aya::programs::ProgramError) -> HostError {
    HostError::Program { name, source }
}

fn map_data(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData, HostError> {
    match ebpf.take_map(name) {
        Some(
            Map::Array(data)
            | Map::HashMap(data)
            | Map::LpmTrie(data)
            | Map::PerCpuArray(data)
            | Map::RingBuf(data),
        ) => Ok(data),
        _ => Err(HostError::Missing { kind: "map", name }),
    }
}

fn typed<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, HostError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(HostError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| HostError::Map { name, source })
}

/// [`HOST_PORTS_MAP`] mapped into this process: userspace writes the bitmaps in place.
pub(crate) struct Ports {
    base: NonNull<AtomicU64>,
}

// SAFETY: the mapping is shared memory of atomics, valid until drop; access goes through
// `AtomicU64`.
unsafe impl Send for Ports {}
// SAFETY: as above.
unsafe impl Sync for Ports {}

const PORTS_LEN: usize = PORT_MAP_ENTRIES * 8;

impl Ports {
    fn map(fd: BorrowedFd<'_>) -> Result<Self, HostError> {
        // SAFETY: mapping a BPF_F_MMAPABLE array map of PORTS_LEN bytes, shared, at an address
        // the kernel picks; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PORTS_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(HostError::last_os("mmap(HOST_PORTS)"));
        }
        Ok(Self {
            base: NonNull::new(ptr.cast()).expect("mmap does not return NULL on success"),
        })
    }

    /// Word `index` of the bitmaps.
    pub(crate) fn word(&self, index: u32) -> &AtomicU64 {
        assert!((index as usize) < PORT_MAP_ENTRIES);
        // SAFETY: in bounds (checked above) of a live mapping of u64s, 8-byte aligned (mmap is
        // page aligned).
        unsafe { &*self.base.as_ptr().add(index as usize) }
    }
}

impl Drop for Ports {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `map`, which nothing uses after drop.
        unsafe { libc::munmap(self.base.as_ptr().cast(), PORTS_LEN) };
    }
}
