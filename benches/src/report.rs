//! [`BenchReport`], the one report format of every benchmark: tables, goals, notes and chart
//! series, printed as text and written as JSON and Markdown.

use std::{fmt::Write as _, fs, path::Path};

use serde::Serialize;

use crate::machine::machine_description;

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
    /// The headline figures as plain numbers, under the keys the issues name, for tools to
    /// read without parsing tables (absent for benchmarks that define none).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub figures: serde_json::Value,
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
        self.render(Format::Text)
    }

    /// Markdown rendering for `target/bench/` and BENCHMARKS.md.
    pub fn to_markdown(&self) -> String {
        self.render(Format::Markdown)
    }

    /// The layout every format shares: a heading, the tables, the goals (if any), the notes.
    fn render(&self, format: Format) -> String {
        let mut out = format.heading(self);
        for table in &self.tables {
            out += &format.table(table);
            out.push('\n');
        }
        if !self.goals.is_empty() {
            out += format.goals_heading();
            for goal in &self.goals {
                out += &format.goal(goal);
            }
            out.push('\n');
        }
        for note in &self.notes {
            out += &format.note(note);
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

/// A rendering of a report: each part as one format writes it, side by side, for
/// [`BenchReport::render`] to put in order.
#[derive(Clone, Copy)]
enum Format {
    Text,
    Markdown,
}

impl Format {
    fn heading(self, r: &BenchReport) -> String {
        match self {
            Self::Text => format!("== {} ==\nmachine: {}\n\n", r.name, r.machine),
            Self::Markdown => format!("## {}\n\n`{}` on {}\n\n", r.name, r.command, r.machine),
        }
    }

    fn table(self, table: &Table) -> String {
        match self {
            Self::Text => table.to_text(),
            Self::Markdown => table.to_markdown(),
        }
    }

    fn goals_heading(self) -> &'static str {
        match self {
            Self::Text => "goals\n",
            Self::Markdown => "| goal | target | measured | status |\n|---|---|---|---|\n",
        }
    }

    fn goal(self, g: &Goal) -> String {
        let Goal {
            name,
            target,
            measured,
            met,
        } = g;
        match self {
            Self::Text => {
                let status = if *met { "met" } else { "NOT MET" };
                format!("  [{status}] {name}: {measured} (target {target})\n")
            }
            Self::Markdown => {
                let status = if *met { "met" } else { "**not met**" };
                format!("| {name} | {target} | {measured} | {status} |\n")
            }
        }
    }

    fn note(self, note: &str) -> String {
        match self {
            Self::Text => format!("note: {note}\n"),
            Self::Markdown => format!("- {note}\n"),
        }
    }
}

/// `n` with a comma between each group of three digits, as tables print counts: "60,000".
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
