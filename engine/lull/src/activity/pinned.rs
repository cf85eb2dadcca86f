//! [`PinnedObject`]: lull's programs and maps, loaded once per host and pinned in bpffs, so
//! that every engine of every process shares one set, and each cgroup one attachment.
//!
//! # Layout
//!
//! | path | what |
//! |---|---|
//! | `/sys/fs/bpf/lull/engine-<build>/` | one build's pins; `<build>` hashes the BPF object |
//! | `…/prog_ingress`, `…/prog_sock_ops`, `…/prog_egress` | the programs |
//! | `…/LULL_ACTIVITY`, `…/LULL_SLOTS` | the maps |
//! | `…/links/<cgroup id>-ingress`, `…-sock_ops` | the attachments, one pair per cgroup |
//! | `…/links/<cgroup id>-egress` | UDP's egress attachment, only where a UDP flow is watched |
//! | `/run/lull/engine-<build>/setup.lock` | held exclusively while pins are made or removed |
//! | `/run/lull/engine-<build>/users/<pid>.<n>` | one per user, locked while it lives; lists its cgroups |
//! | `/run/lull/engine-<build>/extents/<k>` | one per 4,096 rows of the table, locked by its lessee |
//!
//! # Ground rules
//! - Pins are made, and removed, only under `setup.lock`. A user registers itself under it
//!   too, so a user never sees half-made pins, and the last user never removes pins that
//!   another is about to open.
//! - A user's record is locked for as long as it lives, and the kernel drops the lock when it
//!   dies, however it dies. A record whose lock can be taken is a dead user's, and is removed.
//! - The last user of a cgroup unpins that cgroup's links, which detaches them; the last user
//!   of the build removes every pin. A user killed with SIGKILL leaves its pins attached, and
//!   the next user to start picks them up.
//! - Two builds never share pins (the name hashes the object), so a pin is never misread.
//!   Another build's pins are removed when nobody uses them; while somebody does (an upgrade
//!   under way), both run side by side, and a warning names the directory and the processes.
//! - A cgroup whose ancestor has lull's links gets no links of its own: its sockets already
//!   run the programs, and a second link would run them twice per packet.
//! - The egress link is attached lazily, by the first user that watches a UDP flow with the
//!   eBPF source, to the cgroup its ingress link is on, and noted in that user's record. It
//!   is removed once no live user's record notes it, even while TCP users of the cgroup go
//!   on: a cgroup with TCP connections alone runs nothing on egress.

use std::{
    ffi::CString,
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, SkStorage},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SockOps, links::FdLink},
};
use aya_log::EbpfLogger;
use lull_common::{
    ACTIVITY_MAP, ActivityEntry, EGRESS_PROG, INGRESS_PROG, NOTICES_MAP, PROBES_OUT_OFFSET_GLOBAL,
    SK_ERR_OFFSET_GLOBAL, SLOTS_MAP, SOCK_OPS_PROG, SlotRef,
};

mod egress;
mod links;

use super::{
    ActivityError,
    cgroup::{cgroup_id, cgroup2_root},
    host_users::{HostUsers, PIN_ROOT, UserRecord},
    kernel_btf::{KernelBtf, SockOffsets},
    link_health::WatchedLink,
    lock_file::RUN_DIR,
    notices::Notices,
};

/// Where bpffs is mounted on every distribution lull knows.
pub(crate) const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// The programs lull attaches to every cgroup it uses, by the suffix of their pin and link
/// names.
const PROGRAMS: [(&str, &str); 2] = [("ingress", INGRESS_PROG), ("sock_ops", SOCK_OPS_PROG)];
/// The suffix of the egress program's pin and link names (UDP only, attached lazily).
const EGRESS: &str = "egress";
/// Every link a cgroup may have.
const LINK_SUFFIXES: [&str; 3] = ["ingress", "sock_ops", EGRESS];

/// The name of one build's pins: `engine-` and 16 hex digits of the object's FNV-1a hash.
pub(crate) fn instance_name(object: &[u8]) -> String {
    let hash = object.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("engine-{hash:016x}")
}

/// lull's programs and maps as pinned for this host, opened by one user.
pub(crate) struct PinnedObject {
    dir: PathBuf,
    users: HostUsers,
    /// This user's record, locked while it lives.
    record: Option<UserRecord>,
    ingress: CgroupSkb,
    sock_ops: SockOps,
    egress: CgroupSkb,
    pub(crate) slots: SkStorage<MapData, SlotRef>,
    pub(crate) activity: MapData,
    pub(crate) notices: MapData,
    /// Rows in the activity table (fixed when the first user made it).
    pub(crate) rows: u32,
    pub(crate) logger: Option<EbpfLogger<&'static dyn log::Log>>,
    /// Cgroups this user attached to (or found covered), by id.
    cgroups: Vec<u64>,
    /// The cgroup whose links the last [`attach`](PinnedObject::attach) uses: id and path.
    covering: Option<(u64, PathBuf)>,
    /// Cgroups on which this user relies on the egress link, by id.
    egress_cgroups: Vec<u64>,
}

impl PinnedObject {
    /// Opens this build's pins, making them first if this is the first user on the host (with
    /// an activity table of `rows` rows).
    pub(crate) fn open(object: &[u8], rows: u32) -> Result<Self, ActivityError> {
        ensure_bpffs()?;
        let name = instance_name(object);
        let dir = Path::new(PIN_ROOT).join(&name);
        let users = HostUsers::new(Path::new(RUN_DIR).join(&name));
        let setup = users.setup_lock()?;
        remove_other_builds(&name)?;
        if !complete(&dir) {
            // Half-made pins are from a user that died making them: nobody can be using them.
            remove_pins(&dir);
            make_pins(object, rows, &dir)?;
        }
        let opened = Self::open_pins(&dir, users);
        drop(setup);
        opened
    }

    fn open_pins(dir: &Path, users: HostUsers) -> Result<Self, ActivityError> {
        let pin_error = |what: &'static str, path: PathBuf| {
            move |e: Box<dyn std::error::Error + Send + Sync>| ActivityError::Pin {
                action: what,
                path: path.clone(),
                source: e,
            }
        };
        let ingress_path = dir.join("prog_ingress");
        let ingress = CgroupSkb::from_pin(&ingress_path, CgroupSkbAttachType::Ingress)
            .map_err(|e| pin_error("opening", ingress_path.clone())(e.into()))?;
        let egress_path = dir.join("prog_egress");
        let egress = CgroupSkb::from_pin(&egress_path, CgroupSkbAttachType::Egress)
            .map_err(|e| pin_error("opening", egress_path.clone())(e.into()))?;
        let sock_ops_path = dir.join("prog_sock_ops");
        let sock_ops = SockOps::from_pin(&sock_ops_path)
            .map_err(|e| pin_error("opening", sock_ops_path.clone())(e.into()))?;
        let activity_path = dir.join(ACTIVITY_MAP);
        let activity = MapData::from_pin(&activity_path)
            .map_err(|e| pin_error("opening", activity_path.clone())(e.into()))?;
        let info = activity
            .info()
            .map_err(|e| pin_error("reading", activity_path.clone())(e.into()))?;
        if info.value_size() as usize != size_of::<ActivityEntry>() {
            return Err(ActivityError::PinMismatch {
                path: activity_path,
                why: format!(
                    "rows of {} bytes, this build's are {}",
                    info.value_size(),
                    size_of::<ActivityEntry>()
                ),
            });
        }
        let rows = info.max_entries();
        let notices_path = dir.join(NOTICES_MAP);
        let notices = MapData::from_pin(&notices_path)
            .map_err(|e| pin_error("opening", notices_path.clone())(e.into()))?;
        let slots_path = dir.join(SLOTS_MAP);
        let slots: SkStorage<MapData, SlotRef> = MapData::from_pin(&slots_path)
            .map_err(|e| pin_error("opening", slots_path.clone())(e.into()))
            .and_then(|data| {
                Map::from_map_data(data)
                    .and_then(SkStorage::try_from)
                    .map_err(|e| pin_error("opening", slots_path.clone())(e.into()))
            })?;
        let logger = sock_ops
            .info()
            .ok()
            .and_then(|info| EbpfLogger::init_from_id(info.id()).ok());
        let record = users.register()?;
        Ok(Self {
            dir: dir.into(),
            users,
            record: Some(record),
            ingress,
            sock_ops,
            egress,
            slots,
            activity,
            notices,
            rows,
            logger,
            cgroups: Vec::new(),
            covering: None,
            egress_cgroups: Vec::new(),
        })
    }

    /// Makes sure the sockets of `cgroup` run lull's programs: reuses this cgroup's links, or
    /// an ancestor's, or attaches and pins new ones. Returns the links to watch.
    pub(crate) fn attach(&mut self, cgroup: &Path) -> Result<Vec<WatchedLink>, ActivityError> {
        let _setup = self.users.setup_lock()?;
        let id = cgroup_id(cgroup)?;
        let covering = ancestors(cgroup)?
            .into_iter()
            .find(|&(ancestor, _)| ancestor != id && self.links_healthy(ancestor));
        let (covering_id, covering_path) = match covering {
            Some((ancestor, path)) => {
                tracing::info!(
                    cgroup = %cgroup.display(),
                    "lull's programs are already attached to its ancestor {}: using those",
                    path.display()
                );
                (ancestor, path)
            }
            None => {
                if !self.links_healthy(id) {
                    self.unpin_links(id);
                    self.attach_links(cgroup, id)?;
                }
                (id, cgroup.to_path_buf())
            }
        };
        for (other, path) in self.users.attached_cgroups() {
            if other != covering_id && path.starts_with(&covering_path) {
                tracing::warn!(
                    "lull's programs are attached both to {} and to its descendant {}: packets \
                     of sockets in {} run them twice until that cgroup's last lull user exits",
                    covering_path.display(),
                    path.display(),
                    path.display()
                );
            }
        }
        self.covering = Some((covering_id, covering_path.clone()));
        if !self.cgroups.contains(&covering_id) {
            self.cgroups.push(covering_id);
            if let Some(record) = &mut self.record {
                record.add_cgroup(covering_id, &covering_path)?;
            }
        }
        PROGRAMS
            .iter()
            .map(|&(suffix, program)| self.open_link(covering_id, suffix, program))
            .collect()
    }

    fn link_path(&self, cgroup: u64, suffix: &str) -> PathBuf {
        self.dir.join("links").join(format!("{cgroup}-{suffix}"))
    }

    /// Whether both links of `cgroup` are pinned and still attached to a live cgroup.
    fn links_healthy(&self, cgroup: u64) -> bool {
        PROGRAMS
            .iter()
            .all(|&(suffix, program)| self.link_healthy(cgroup, suffix, program))
    }

    fn attach_links(&mut self, cgroup: &Path, id: u64) -> Result<(), ActivityError> {
        let dir = File::open(cgroup).map_err(|source| ActivityError::File {
            action: "opening cgroup",
            path: cgroup.into(),
            source,
        })?;
        std::fs::create_dir_all(self.dir.join("links")).map_err(|source| ActivityError::File {
            action: "creating",
            path: self.dir.join("links"),
            source,
        })?;
        let program_error = |name: &'static str| {
            move |e| {
                ActivityError::classify(format!("attaching `{name}`"), e, |source| {
                    ActivityError::Program {
                        name,
                        action: "attaching",
                        source,
                    }
                })
            }
        };
        let link_id = self
            .ingress
            .attach(&dir, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)
            .map_err(program_error(INGRESS_PROG))?;
        let link = fd_link(self.ingress.take_link(link_id), program_error(INGRESS_PROG))?;
        self.pin_link(link, id, "ingress")?;
        let link_id = self
            .sock_ops
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(program_error(SOCK_OPS_PROG))?;
        let link = fd_link(
            self.sock_ops.take_link(link_id),
            program_error(SOCK_OPS_PROG),
        )?;
        self.pin_link(link, id, "sock_ops")?;
        tracing::debug!(cgroup = %cgroup.display(), "lull's programs are attached");
        Ok(())
    }

    fn pin_link(&self, link: FdLink, cgroup: u64, suffix: &str) -> Result<(), ActivityError> {
        let path = self.link_path(cgroup, suffix);
        link.pin(&path).map(drop).map_err(|e| ActivityError::Pin {
            action: "pinning",
            path,
            source: e.into(),
        })
    }

    /// Unpins `cgroup`'s links; once no fd holds them, the kernel detaches them.
    fn unpin_links(&self, cgroup: u64) {
        for suffix in LINK_SUFFIXES {
            let _ = std::fs::remove_file(self.link_path(cgroup, suffix));
        }
    }

    /// This build's pin directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where extent leases of this build's table live.
    pub(crate) fn extents_dir(&self) -> PathBuf {
        self.users.extents_dir()
    }

    /// The pinned programs' kernel ids (ingress, sock_ops).
    pub(crate) fn program_ids(&self) -> [Option<u32>; 2] {
        [
            self.ingress.info().ok().map(|i| i.id()),
            self.sock_ops.info().ok().map(|i| i.id()),
        ]
    }
}

impl Drop for PinnedObject {
    fn drop(&mut self) {
        let setup = match self.users.setup_lock() {
            Ok(setup) => setup,
            Err(err) => {
                tracing::warn!("leaving lull's pins as they are: {err}");
                return;
            }
        };
        // Our own record goes first, so that it does not count as a live user.
        drop(self.record.take());
        let live = self.users.live();
        if live.is_empty() {
            remove_pins(&self.dir);
            self.users.remove_all();
            tracing::debug!("the last lull user on this host detached its programs");
        } else {
            for &cgroup in &self.cgroups {
                if !live
                    .iter()
                    .any(|user| user.cgroups.iter().any(|c| c.0 == cgroup))
                {
                    self.unpin_links(cgroup);
                }
            }
            // UDP's egress link goes with its last user, whoever else goes on using the cgroup.
            for &cgroup in &self.egress_cgroups {
                if !live.iter().any(|user| user.egress.contains(&cgroup)) {
                    let _ = std::fs::remove_file(self.link_path(cgroup, EGRESS));
                }
            }
        }
        drop(setup);
    }
}

/// A program's link, taken out of aya's bookkeeping as a plain `bpf_link` that can be pinned.
fn fd_link<L>(
    taken: Result<L, aya::programs::ProgramError>,
    program_error: impl FnOnce(aya::programs::ProgramError) -> ActivityError,
) -> Result<FdLink, ActivityError>
where
    L: TryInto<FdLink, Error = aya::programs::links::LinkError>,
{
    taken
        .map_err(program_error)?
        .try_into()
        .map_err(|e| ActivityError::Syscall {
            call: "taking a bpf_link",
            source: std::io::Error::other(e),
        })
}

/// Whether every pin of a build is in place (a user that died while making them leaves some).
fn complete(dir: &Path) -> bool {
    [
        "prog_ingress",
        "prog_sock_ops",
        "prog_egress",
        ACTIVITY_MAP,
        SLOTS_MAP,
        NOTICES_MAP,
    ]
    .iter()
    .all(|pin| dir.join(pin).exists())
}

/// Loads the object and pins its programs and maps in `dir`.
fn make_pins(object: &[u8], rows: u32, dir: &Path) -> Result<(), ActivityError> {
    std::fs::create_dir_all(dir).map_err(|source| ActivityError::File {
        action: "creating",
        path: dir.into(),
        source,
    })?;
    let offsets = match KernelBtf::load().and_then(|btf| SockOffsets::from_btf(&btf)) {
        Ok(offsets) => offsets,
        Err(err) => {
            tracing::warn!(
                "close causes (peer reset, timeout) are unavailable from the kernel side: {err}"
            );
            SockOffsets::default()
        }
    };
    let level = kernel_log_level();
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(ACTIVITY_MAP, rows)
        .map_max_entries(NOTICES_MAP, Notices::words_for(rows))
        .override_global(aya_log::LEVEL, &level, false)
        .override_global(SK_ERR_OFFSET_GLOBAL, &offsets.sk_err, true)
        .override_global(PROBES_OUT_OFFSET_GLOBAL, &offsets.probes_out, true)
        .load(object)
        .map_err(|e| {
            ActivityError::classify("loading lull's BPF object", e, ActivityError::Load)
        })?;
    let pin = |path: PathBuf| {
        move |e: aya::pin::PinError| ActivityError::Pin {
            action: "pinning",
            path: path.clone(),
            source: e.into(),
        }
    };
    let ingress: &mut CgroupSkb = program_mut(&mut ebpf, INGRESS_PROG)?;
    ingress
        .load()
        .map_err(|e| program_error(INGRESS_PROG, "loading", e))?;
    ingress
        .pin(dir.join("prog_ingress"))
        .map_err(pin(dir.join("prog_ingress")))?;
    let sock_ops: &mut SockOps = program_mut(&mut ebpf, SOCK_OPS_PROG)?;
    sock_ops
        .load()
        .map_err(|e| program_error(SOCK_OPS_PROG, "loading", e))?;
    sock_ops
        .pin(dir.join("prog_sock_ops"))
        .map_err(pin(dir.join("prog_sock_ops")))?;
    let egress: &mut CgroupSkb = program_mut(&mut ebpf, EGRESS_PROG)?;
    egress
        .load()
        .map_err(|e| program_error(EGRESS_PROG, "loading", e))?;
    egress
        .pin(dir.join("prog_egress"))
        .map_err(pin(dir.join("prog_egress")))?;
    for name in [ACTIVITY_MAP, SLOTS_MAP, NOTICES_MAP] {
        ebpf.map(name)
            .ok_or(ActivityError::MissingMap { name })?
            .pin(dir.join(name))
            .map_err(pin(dir.join(name)))?;
    }
    tracing::debug!(dir = %dir.display(), rows, "lull's programs and maps are pinned");
    Ok(())
}

/// Removes a build's pins: links first (detaching them), then programs and maps.
fn remove_pins(dir: &Path) {
    if let Ok(links) = std::fs::read_dir(dir.join("links")) {
        for link in links.flatten() {
            let _ = std::fs::remove_file(link.path());
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Removes the pins of other lull builds that nobody uses any more.
///
/// Another build that is in use is left alone: during an upgrade the old daemon and the new
/// one run side by side, and each reads only its own maps (the names differ by build), so
/// nothing is misread. Sockets in a cgroup both attach to run both builds' programs, which
/// the warning says.
fn remove_other_builds(ours: &str) -> Result<(), ActivityError> {
    let Ok(entries) = std::fs::read_dir(PIN_ROOT) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == ours || !name.starts_with("engine-") {
            continue;
        }
        let users = HostUsers::new(Path::new(RUN_DIR).join(&name));
        let _setup = users.setup_lock()?;
        let live = users.live();
        if !live.is_empty() {
            tracing::warn!(
                "{} holds another lull build's programs, in use by process(es) {:?}; this \
                 build uses its own, and sockets in a cgroup both attach to run both",
                entry.path().display(),
                live.iter().map(|u| u.pid).collect::<Vec<_>>()
            );
            continue;
        }
        remove_pins(&entry.path());
        users.remove_all();
        tracing::info!(
            "removed {}: pins of another lull build that no process uses any more",
            entry.path().display()
        );
    }
    Ok(())
}

/// `cgroup` and its ancestors up to the hierarchy's root, nearest first, with their ids.
fn ancestors(cgroup: &Path) -> Result<Vec<(u64, PathBuf)>, ActivityError> {
    let root = cgroup2_root()?;
    let mut out = Vec::new();
    let mut at = Some(cgroup);
    while let Some(path) = at {
        out.push((cgroup_id(path)?, path.to_path_buf()));
        if path == root {
            break;
        }
        at = path.parent().filter(|p| p.starts_with(&root));
    }
    Ok(out)
}

/// Mounts bpffs at `/sys/fs/bpf` unless it is mounted there already.
pub(crate) fn ensure_bpffs() -> Result<(), ActivityError> {
    let target = CString::new(BPFFS).expect("no NUL in a constant path");
    // SAFETY: all-zero is a valid `statfs`.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    if unsafe { libc::statfs(target.as_ptr(), &mut fs) } == 0 && fs.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    // A kernel without the mount point (a container image, say) can still take the mount.
    let _ = std::fs::create_dir_all(BPFFS);
    let bpf = CString::new("bpf").expect("no NUL in a constant");
    // SAFETY: NUL-terminated strings; no mount data.
    let mounted = unsafe {
        libc::mount(
            bpf.as_ptr(),
            target.as_ptr(),
            bpf.as_ptr(),
            0,
            std::ptr::null(),
        )
    } == 0;
    if mounted {
        tracing::info!("mounted bpffs at {BPFFS}");
        Ok(())
    } else {
        Err(ActivityError::Bpffs {
            why: std::io::Error::last_os_error().to_string(),
        })
    }
}

fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, ActivityError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(ActivityError::MissingProgram { name })?
        .try_into()
        .map_err(|e| program_error(name, "loading", e))
}

fn program_error(
    name: &'static str,
    action: &'static str,
    err: aya::programs::ProgramError,
) -> ActivityError {
    ActivityError::classify(format!("{action} BPF program `{name}`"), err, |source| {
        ActivityError::Program {
            name,
            action,
            source,
        }
    })
}

/// The kernel side's log level, following the userspace logger's: debug records in the
/// kernel cost a ring-buffer write each, so they are off unless asked for.
fn kernel_log_level() -> u8 {
    match log::max_level() {
        log::LevelFilter::Off => 0,
        log::LevelFilter::Error => 1,
        log::LevelFilter::Warn => 2,
        log::LevelFilter::Info => 3,
        log::LevelFilter::Debug => 4,
        log::LevelFilter::Trace => 5,
    }
}
