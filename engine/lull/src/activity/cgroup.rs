use std::path::{Path, PathBuf};

use super::ActivityError;

const MOUNTS: &str = "/proc/mounts";

/// The root of the cgroup v2 hierarchy, as mounted on this host.
///
/// It is read from `/proc/mounts`, not assumed: hosts mount it at `/sys/fs/cgroup` (unified
/// mode), at `/sys/fs/cgroup/unified` (hybrid mode), or elsewhere.
pub fn cgroup2_root() -> Result<PathBuf, ActivityError> {
    let mounts = std::fs::read_to_string(MOUNTS).map_err(|source| ActivityError::File {
        action: "reading",
        path: MOUNTS.into(),
        source,
    })?;
    find_cgroup2(&mounts).ok_or_else(|| ActivityError::NoCgroup2 {
        mounts: MOUNTS.into(),
    })
}

fn find_cgroup2(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| Path::new(&unescape_octal(target)).to_path_buf())
    })
}

/// `/proc/mounts` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(digits, 8) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_mount_tables() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n",
                Some("/sys/fs/cgroup"),
            ),
            (
                "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                 cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                 cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n",
                Some("/sys/fs/cgroup/unified"),
            ),
            ("none /my\\040cgroups cgroup2 rw 0 0\n", Some("/my cgroups")),
            ("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n", None),
            ("", None),
        ];
        for (mounts, want) in cases {
            assert_eq!(
                find_cgroup2(mounts).as_deref(),
                want.map(Path::new),
                "{mounts:?}"
            );
        }
    }
}
