//! Instructions per probe, exactly: this binary run again under callgrind
//! (`--callgrind-child`), counting only inside [`measured_cycle`].

use std::{
    collections::HashMap,
    fs,
    os::fd::{AsRawFd, RawFd},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, ensure};

use crate::batch::{STRATEGIES, Sample, Strategy, connect, drain, measured_cycle, run_batches};

/// Probes per cell under callgrind.
pub const CALLGRIND_PROBES: usize = 8192;

/// `--callgrind-child`: each cell once, in `cells` order, as one call of `measured_cycle` of
/// `CALLGRIND_PROBES` probes, which callgrind counts and dumps as one part.
pub fn callgrind_child(sizes: &[usize]) -> Result<()> {
    let (pairs, mut sender) = connect()?;
    let peers: Vec<RawFd> = pairs.iter().map(|(_, p)| p.as_raw_fd()).collect();
    let (mut buf, mut sample) = (vec![0u8; 1 << 16], Sample::default());
    for (st, b) in cells(sizes) {
        // Outside `measured_cycle`, so that first-use costs are not counted.
        run_batches((st, false), &mut sender, b, 1, &mut sample)?;
        drain(&peers, &mut buf)?;
        let n = CALLGRIND_PROBES / b;
        measured_cycle((st, false), &mut sender, b, n, &mut sample)?;
        drain(&peers, &mut buf)?;
    }
    let failed = sample.error.is_some() || sample.eagain > 0;
    ensure!(!failed, "sends failed under callgrind");
    Ok(())
}

/// Every (strategy, B), then io_uring at the largest B again, to show the count repeats.
fn cells(sizes: &[usize]) -> Vec<(Strategy, usize)> {
    let all = sizes.iter().flat_map(|&b| STRATEGIES.map(|st| (st, b)));
    let last = (Strategy::Uring, sizes[sizes.len() - 1]);
    all.chain([last]).collect()
}

/// Instructions per probe by (strategy, B), and the repeated cell's two totals.
pub type Callgrind = Result<(HashMap<(Strategy, usize), f64>, (u64, u64))>;

/// Runs `--callgrind-child` under callgrind, counting only inside `measured_cycle` and dumping
/// a part (appended to one file) each time it returns.
pub fn callgrind(sizes: &[usize], quick: bool) -> Callgrind {
    let file = std::env::temp_dir().join(format!("probe-path.{}.callgrind", std::process::id()));
    let mut cmd = Command::new("valgrind");
    cmd.args(["--tool=callgrind", "-q", "--combine-dumps=yes"]);
    // `--dump-after` wants the exact name: it takes no wildcards.
    let f = "probe_path::batch::measured_cycle";
    cmd.args([format!("--toggle-collect={f}"), format!("--dump-after={f}")]);
    cmd.arg(format!("--callgrind-out-file={}", file.display()));
    cmd.arg(std::env::current_exe()?).arg("--callgrind-child");
    if quick {
        cmd.arg("--quick");
    }
    let out = cmd
        .stdout(Stdio::null())
        .output()
        .context("running valgrind")?;
    let text = fs::read_to_string(&file).unwrap_or_default();
    let _ = fs::remove_file(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "valgrind failed: {}", stderr.trim());
    let totals = text
        .lines()
        .filter_map(|l| l.strip_prefix("totals: ")?.parse().ok());
    let (cells, totals): (Vec<_>, Vec<u64>) = (cells(sizes), totals.collect());
    let parts = totals.len();
    ensure!(
        parts >= cells.len(),
        "callgrind wrote {parts} parts, not one per cell"
    );
    let per_probe = |(&(st, b), &t): (&(Strategy, usize), &u64)| {
        ((st, b), t as f64 / (CALLGRIND_PROBES / b * b) as f64)
    };
    let per_probe = cells.iter().zip(&totals).map(per_probe);
    let repeat = (totals[cells.len() - 4], totals[cells.len() - 1]);
    Ok((per_probe.collect(), repeat))
}
