//! Shared support for lull's benchmarks: one report format for every benchmark.
//!
//! A benchmark prints its [`BenchReport`] as plain tables on stdout and, with `--out DIR`,
//! writes `DIR/<name>.json` and `DIR/<name>.md`, which `cargo xtask bench` gathers into
//! `target/bench/SUMMARY.md`. Benchmarks never pass or fail on timing: goals are reported as
//! met or not met, with the measured figure next to the target.

use std::{fmt::Write as _, fs, path::Path};

use serde::Serialize;

/// A benchmark's results.
#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub struct BenchReport {
    /// Short name, also the output file stem (e.g. `ebpf-overhead`).
    pub name: String,
    /// The command line that produced it.
    pub command: String,
    /// Where it ran (kernel, CPU count, model).
    pub machine: String,
    /// Result tables.
    pub tables: Vec<Table>,
    /// Goals with their measured figures.
    pub goals: Vec<Goal>,
    /// Free-form remarks: what the figures mean, what they leave out.
    pub notes: Vec<String>,
    /// Data for charts: `cargo xtask bench` draws one SVG per distinct `chart`.
    #[serde(default)]
    pub series: Vec<Series>,
}

/// One line of a chart.
#[derive(Debug, Default, Clone, Serialize, serde::Deserialize)]
pub struct Series {
    /// Chart file stem, e.g. `cpu-vs-connections`; series with the same chart share a plot.
    pub chart: String,
    /// The chart's title.
    pub title: String,
    /// Legend entry.
    pub name: String,
    /// Axis labels.
    pub x_label: String,
    /// Axis labels.
    pub y_label: String,
    /// Plot the x axis on a log scale.
    pub log_x: bool,
    /// (x, y) points.
    pub points: Vec<(f64, f64)>,
    /// Draw the line without a marker at each point (for dense lines such as distributions).
    #[serde(default)]
    pub lines_only: bool,
}

/// One table of results.
#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub struct Table {
    /// Title shown above the table.
    pub title: String,
    /// Column headers.
    pub columns: Vec<String>,
    /// Rows of cells, already formatted.
    pub rows: Vec<Vec<String>>,
}

/// One goal from the issue tracker, with what was measured.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Goal {
    /// What is measured, e.g. "round trips lost with the program attached".
    pub name: String,
    /// The target, e.g. "<= 3%".
    pub target: String,
    /// The measured figure, formatted.
    pub measured: String,
    /// Whether the measured figure meets the target.
    pub met: bool,
}

impl Table {
    /// A table with the given title and columns.
    pub fn new(title: impl Into<String>, columns: &[&str]) -> Self {
        Self {
            title: title.into(),
            columns: columns.iter().map(|c| (*c).to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn widths(&self) -> Vec<usize> {
        let mut widths: Vec<usize> = self.columns.iter().map(|c| c.len()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(cell.chars().count());
                }
            }
        }
        widths
    }

    /// Plain-text rendering, columns aligned.
    pub fn to_text(&self) -> String {
        let widths = self.widths();
        let mut out = format!("{}\n", self.title);
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = cells.get(i).map_or("", String::as_str);
                if i == 0 {
                    let _ = write!(s, "  {cell:<w$}");
                } else {
                    let _ = write!(s, "  {cell:>w$}");
                }
            }
            s.trim_end().to_string() + "\n"
        };
        out += &line(&self.columns);
        out += &format!(
            "  {}\n",
            "-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1))
        );
        for row in &self.rows {
            out += &line(row);
        }
        out
    }

    /// Markdown rendering.
    pub fn to_markdown(&self) -> String {
        let mut out = format!("**{}**\n\n| {} |\n|", self.title, self.columns.join(" | "));
        for i in 0..self.columns.len() {
            out += if i == 0 { "---|" } else { "---:|" };
        }
        out.push('\n');
        for row in &self.rows {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        out
    }
}

impl BenchReport {
    /// An empty report for benchmark `name`, recording the command line and machine.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            machine: machine_description(),
            ..Self::default()
        }
    }

    /// Records a goal.
    pub fn goal(&mut self, name: &str, target: &str, measured: String, met: bool) {
        self.goals.push(Goal {
            name: name.to_string(),
            target: target.to_string(),
            measured,
            met,
        });
    }

    /// Plain-text rendering for stdout.
    pub fn to_text(&self) -> String {
        let mut out = format!("== {} ==\nmachine: {}\n\n", self.name, self.machine);
        for table in &self.tables {
            out += &table.to_text();
            out.push('\n');
        }
        if !self.goals.is_empty() {
            out += "goals\n";
            for g in &self.goals {
                let _ = writeln!(
                    out,
                    "  [{}] {}: {} (target {})",
                    if g.met { "met" } else { "NOT MET" },
                    g.name,
                    g.measured,
                    g.target
                );
            }
            out.push('\n');
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        out
    }

    /// Markdown rendering for `target/bench/` and BENCHMARKS.md.
    pub fn to_markdown(&self) -> String {
        let mut out = format!(
            "## {}\n\n`{}` on {}\n\n",
            self.name, self.command, self.machine
        );
        for table in &self.tables {
            out += &table.to_markdown();
            out.push('\n');
        }
        if !self.goals.is_empty() {
            out += "| goal | target | measured | status |\n|---|---|---|---|\n";
            for g in &self.goals {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} |",
                    g.name,
                    g.target,
                    g.measured,
                    if g.met { "met" } else { "**not met**" }
                );
            }
            out.push('\n');
        }
        for note in &self.notes {
            let _ = writeln!(out, "- {note}");
        }
        out
    }

    /// Prints the report, and writes `<name>.json` and `<name>.md` into `out` if given.
    pub fn emit(&self, out: Option<&Path>) -> anyhow::Result<()> {
        print!("{}", self.to_text());
        if let Some(dir) = out {
            fs::create_dir_all(dir)?;
            fs::write(
                dir.join(format!("{}.json", self.name)),
                serde_json::to_string_pretty(self)?,
            )?;
            fs::write(dir.join(format!("{}.md", self.name)), self.to_markdown())?;
        }
        Ok(())
    }
}

/// "Linux 6.18.44, 2 CPUs (Model name), 24 GiB".
pub fn machine_description() -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let mem_kib: u64 = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    format!(
        "Linux {}, {cpus} CPUs ({model}), {} GiB",
        kernel.trim(),
        (mem_kib + (1 << 19)) >> 20
    )
}

/// Median of a non-empty slice (sorts a copy).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `n` with a comma between each group of three digits: "60,000".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// CPU time (user + system) of this process so far, in nanoseconds.
pub fn process_cpu_ns() -> u64 {
    rusage_ns(libc::RUSAGE_SELF)
}

/// CPU time (user + system) of the calling thread so far, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    rusage_ns(libc::RUSAGE_THREAD)
}

fn rusage_ns(who: libc::c_int) -> u64 {
    // SAFETY: rusage is plain integers; `ru` is a valid out-pointer.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
