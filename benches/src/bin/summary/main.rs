//! bench-summary: gathers the JSON reports in a directory into `SUMMARY.md` and draws the
//! charts their series describe, as SVG.

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf};

use anyhow::{Context as _, Result};
use clap::Parser;
use lull_benches::{BenchReport, Series, machine_description};
use plotters::prelude::*;

/// Write SUMMARY.md and the SVG charts for the reports in a directory.
#[derive(Parser)]
struct Args {
    /// Directory holding the benchmarks' `*.json` reports (and receiving the summary).
    #[arg(long, default_value = "target/bench")]
    dir: PathBuf,
    /// The command that produced the reports, for the record.
    #[arg(long, default_value = "cargo xtask bench")]
    command: String,
}

/// Report order in the summary: cheapest to most expensive to read.
const ORDER: &[&str] = &[
    "wheel",
    "engine-sim",
    "probe-path",
    "real",
    "ebpf-overhead",
    "udp",
];

fn main() -> Result<()> {
    let args = Args::parse();
    let mut reports: Vec<BenchReport> = Vec::new();
    for entry in
        std::fs::read_dir(&args.dir).with_context(|| format!("reading {}", args.dir.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path)?;
            match serde_json::from_str::<BenchReport>(&text) {
                Ok(report) => reports.push(report),
                Err(err) => eprintln!("bench-summary: skipping {}: {err}", path.display()),
            }
        }
    }
    reports.sort_by_key(|r| {
        ORDER
            .iter()
            .position(|n| *n == r.name)
            .unwrap_or(ORDER.len())
    });

    let mut charts: BTreeMap<String, Vec<Series>> = BTreeMap::new();
    for series in reports.iter().flat_map(|r| r.series.iter()) {
        charts
            .entry(series.chart.clone())
            .or_default()
            .push(series.clone());
    }
    let mut drawn = Vec::new();
    for (chart, series) in &charts {
        let path = args.dir.join(format!("{chart}.svg"));
        draw(&path, series).with_context(|| format!("drawing {}", path.display()))?;
        drawn.push(format!("{chart}.svg"));
    }

    let mut md = format!(
        "# Benchmark summary\n\nMachine: {}\n\nCommand: `{}`\n\n",
        machine_description(),
        args.command
    );
    let (met, missed): (Vec<_>, Vec<_>) =
        reports.iter().flat_map(|r| &r.goals).partition(|g| g.met);
    let _ = writeln!(md, "Goals: {} met, {} not met.\n", met.len(), missed.len());
    for chart in &drawn {
        let _ = writeln!(md, "![{chart}]({chart})\n");
    }
    for report in &reports {
        md.push_str(&report.to_markdown());
        md.push('\n');
    }
    let summary = args.dir.join("SUMMARY.md");
    std::fs::write(&summary, md)?;
    eprintln!(
        "bench-summary: wrote {} and {} chart(s)",
        summary.display(),
        drawn.len()
    );
    Ok(())
}

fn draw(path: &std::path::Path, series: &[Series]) -> Result<()> {
    let first = &series[0];
    let points = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0f64);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 >= x1 {
        x1 = x0 + 1.0;
    }
    let y1 = if y1 <= 0.0 { 1.0 } else { y1 * 1.1 };
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(&first.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64);
    let palette = [&BLUE, &RED, &GREEN, &MAGENTA, &CYAN, &BLACK];
    macro_rules! plot {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_label_formatter(&|x| axis_number(*x))
                .y_label_formatter(&|y| axis_number(*y))
                .x_desc(first.x_label.as_str())
                .y_desc(first.y_label.as_str())
                .draw()?;
            for (i, s) in series.iter().enumerate() {
                let color = palette[i % palette.len()];
                chart
                    .draw_series(LineSeries::new(s.points.iter().copied(), color))?
                    .label(s.name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
                if !s.lines_only {
                    chart
                        .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
                }
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()?;
        }};
    }
    if first.log_x {
        // Whole decades, so that the axis always has labelled powers of ten on it.
        let x0 = 10f64.powf(x0.max(1e-9).log10().floor());
        let x1 = 10f64.powf(x1.max(x0).log10().ceil()).max(x0 * 10.0);
        plot!(builder.build_cartesian_2d((x0..x1).log_scale(), 0.0..y1)?);
    } else {
        plot!(builder.build_cartesian_2d(x0..x1, 0.0..y1)?);
    }
    root.present()?;
    Ok(())
}

/// An axis label: no decimals where the value is whole, thousands as `k` and millions as `M`.
fn axis_number(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 && (v / 1e6).fract() == 0.0 {
        format!("{:.0}M", v / 1e6)
    } else if a >= 1e4 && (v / 1e3).fract() == 0.0 {
        format!("{:.0}k", v / 1e3)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}").trim_end_matches('0').to_string()
    }
}
