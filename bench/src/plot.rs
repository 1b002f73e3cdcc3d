//! SVG plots: of a `bench run` report, 4 KiB blocks/s against RTT, one line per system, one
//! chart per workload and link rate; of `bench rpo`, RPO over time. Text is written as SVG `<text>`, so no system fonts
//! are needed to draw it.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::run::{Report, Row};

/// Writes `STEM-WORKLOAD-RATEmbit.svg` for every workload and rate of `report`; returns
/// the paths written.
pub fn blocks_vs_rtt(report: &Report, stem: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for w in &report.workloads {
        for &rate in &report.plan.rate_mbit {
            let rows: Vec<&Row> = report
                .rows
                .iter()
                .filter(|r| r.workload == w.name && r.rate_mbit == rate)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let path = PathBuf::from(format!("{}-{}-{rate}mbit.svg", stem.display(), w.name));
            draw(
                &path,
                &format!("{}, {rate} Mbit/s ({})", w.name, report.mode),
                &rows,
            )
            .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
            written.push(path);
        }
    }
    Ok(written)
}

fn draw(path: &Path, title: &str, rows: &[&Row]) -> Result<(), Box<dyn std::error::Error>> {
    let mut systems: Vec<&str> = Vec::new();
    for r in rows {
        if !systems.contains(&r.system.as_str()) {
            systems.push(&r.system);
        }
    }
    let max_x = rows.iter().map(|r| r.rtt_ms).max().unwrap_or(0).max(1) as f64;
    let max_y = rows.iter().map(|r| r.blocks_per_sec).fold(1.0, f64::max) * 1.1;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    let mut chart = axes(
        &root,
        title,
        ("RTT (ms)", max_x * 1.05, 0),
        ("4 KiB blocks/s", max_y, 0),
    )?;
    for (i, system) in systems.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mut points: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.system == *system)
            .map(|r| (r.rtt_ms as f64, r.blocks_per_sec))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(*system)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
    }
    finish(&mut chart, &root)
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A white chart on `root` with `title` and two axes from 0, each given as (description,
/// maximum, decimals of its tick labels).
fn axes<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
    title: &str,
    (x_desc, x_max, x_decimals): (&str, f64, usize),
    (y_desc, y_max, y_decimals): (&str, f64, usize),
) -> Result<Chart<'a, 'b>, Box<dyn std::error::Error>> {
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|v| format!("{v:.x_decimals$}"))
        .y_label_formatter(&|v| format!("{v:.y_decimals$}"))
        .draw()?;
    Ok(chart)
}

/// Draws the legend of `chart`, top right, and writes the file.
fn finish<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    root: &DrawingArea<SVGBackend<'b>, Shift>,
) -> Result<(), Box<dyn std::error::Error>> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Writes an SVG of RPO (seconds) over time (seconds since the churn started) to `path`,
/// with the target drawn as a dashed horizontal line.
pub fn rpo_over_time(path: &Path, title: &str, points: &[(f64, f64)], target: f64) -> Result<()> {
    draw_rpo(path, title, points, target).map_err(|e| anyhow!("drawing {}: {e}", path.display()))
}

fn draw_rpo(
    path: &Path,
    title: &str,
    points: &[(f64, f64)],
    target: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    let max_x = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let max_y = points.iter().map(|p| p.1).fold(target, f64::max) * 1.1;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    let mut chart = axes(
        &root,
        title,
        ("time since the churn started (s)", max_x * 1.02, 0),
        ("RPO (s)", max_y, 1),
    )?;
    let color = Palette99::pick(0).to_rgba();
    chart
        .draw_series(LineSeries::new(points.to_vec(), color.stroke_width(2)))?
        .label("RPO")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    chart
        .draw_series(DashedLineSeries::new(
            [(0.0, target), (max_x * 1.02, target)],
            8,
            6,
            RED.stroke_width(1),
        ))?
        .label(format!("target {target} s"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    finish(&mut chart, &root)
}
