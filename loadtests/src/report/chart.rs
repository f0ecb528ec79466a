//! `chart.svg`: throughput, latency, errors and CPU over time, one panel
//! each and one line per run, every run on the same axes.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::Report;
use crate::cpu::CpuSecond;
use crate::record::Point;

/// One colour per mode, in the order the modes first ran; later runs of a
/// mode (rounds, refining passes) take lighter shades of it.
const COLORS: [RGBColor; 12] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(23, 190, 207),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(127, 127, 127),
    RGBColor(0, 0, 128),
    RGBColor(128, 0, 0),
];

/// A panel of the chart, on the SVG being drawn.
type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Throughput, latency, errors and CPU over time, one line per run.
pub(super) fn chart(report: &Report, path: &Path) -> anyhow::Result<()> {
    let watched = report.runs.iter().any(|r| !r.series.watchers.is_empty());
    let (panels, height) = if watched { (5, 1800) } else { (4, 1450) };
    let root = SVGBackend::new(path, (1200, height)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let root = root
        .titled(
            &format!(
                "Gavel load test: {} (x: seconds since the start)",
                report.scenario
            ),
            ("sans-serif", 22),
        )
        .map_err(plot_error)?;
    let panels = root.split_evenly((panels, 1));
    let x_max = report
        .runs
        .iter()
        .map(|r| r.series.bids.len())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    throughput_panel(report, &panels[0], x_max)?;
    latency_panel(report, &panels[1], x_max)?;
    errors_panel(report, &panels[2], x_max)?;
    cpu_panel(report, &panels[3], x_max)?;
    if watched {
        watchers_panel(report, &panels[4], x_max)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

/// The colour of the `i`th run: its mode's, lighter for each run of that
/// mode before it, so that every mode keeps one hue however many rounds.
pub(super) fn color(report: &Report, i: usize) -> RGBColor {
    let mode = &report.runs[i].mode;
    let mut modes: Vec<&str> = Vec::new();
    for run in &report.runs[..=i] {
        if !modes.contains(&run.mode.as_str()) {
            modes.push(&run.mode);
        }
    }
    let hue = modes.iter().position(|m| m == mode).unwrap_or(0);
    let earlier = report.runs[..i].iter().filter(|r| &r.mode == mode).count();
    let lighter = (earlier as f64 * 0.15).min(0.75);
    let RGBColor(r, g, b) = COLORS[hue % COLORS.len()];
    let toward_white = |c: u8| c + ((255 - c) as f64 * lighter) as u8;
    RGBColor(toward_white(r), toward_white(g), toward_white(b))
}

/// Throughput: offered (thin) and answered 2xx (thick), per second.
fn throughput_panel(report: &Report, area: &Area, x_max: f64) -> anyhow::Result<()> {
    let y_max = report
        .runs
        .iter()
        .flat_map(|r| r.series.bids.iter().map(|p| p.offered.max(p.completed_ok)))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.1;
    let mut c = panel(
        area,
        "Bids per second: answered 2xx (thick), offered (thin)",
    )
    .build_cartesian_2d(0f64..x_max, 0f64..y_max)
    .map_err(plot_error)?;
    c.configure_mesh()
        .y_desc("bids/s")
        .draw()
        .map_err(plot_error)?;
    for (i, r) in report.runs.iter().enumerate() {
        let color = color(report, i);
        let points = |f: fn(&Point) -> u64| {
            r.series
                .bids
                .iter()
                .map(move |p| (p.t as f64, f(p) as f64))
                .collect::<Vec<_>>()
        };
        c.draw_series(LineSeries::new(
            points(|p| p.completed_ok),
            color.stroke_width(2),
        ))
        .map_err(plot_error)?
        .label(report.label(r))
        .legend(legend_line(color));
        c.draw_series(LineSeries::new(points(|p| p.offered), color.mix(0.5)))
            .map_err(plot_error)?;
    }
    draw_legend(&mut c)
}

/// Latency, log scale: p99 (thick) and p50 (thin) of bids answered 2xx,
/// and the disk's slowest flush of each second.
fn latency_panel(report: &Report, area: &Area, x_max: f64) -> anyhow::Result<()> {
    let lat_max = report
        .runs
        .iter()
        .flat_map(|r| {
            let bids = r.series.bids.iter().filter_map(|p| p.p99_ms);
            bids.chain(r.series.disk.iter().map(|s| s.max_ms))
        })
        .fold(10.0f64, f64::max)
        * 1.5;
    let mut c = panel(area, "Bid latency from the intended send time: p99 (thick), p50 (thin); the disk's slowest flush (x)")
        .build_cartesian_2d(0f64..x_max, (0.1f64..lat_max).log_scale())
        .map_err(plot_error)?;
    c.configure_mesh().y_desc("ms").draw().map_err(plot_error)?;
    for (i, r) in report.runs.iter().enumerate() {
        let color = color(report, i);
        let points = |f: fn(&Point) -> Option<f64>| {
            r.series
                .bids
                .iter()
                .filter_map(move |p| f(p).map(|v| (p.t as f64, v.max(0.1))))
                .collect::<Vec<_>>()
        };
        c.draw_series(LineSeries::new(points(|p| p.p99_ms), color.stroke_width(2)))
            .map_err(plot_error)?
            .label(report.label(r))
            .legend(legend_line(color));
        c.draw_series(LineSeries::new(points(|p| p.p50_ms), color.mix(0.6)))
            .map_err(plot_error)?;
        // Every bid waits for a flush: a slow one shows beside the spike it causes.
        let flushes = r
            .series
            .disk
            .iter()
            .enumerate()
            .filter(|(_, s)| s.flushes > 0);
        c.draw_series(
            flushes.map(|(t, s)| Cross::new((t as f64, s.max_ms.max(0.1)), 3, color.mix(0.7))),
        )
        .map_err(plot_error)?;
    }
    draw_legend(&mut c)
}

/// Errors: 5xx, timeouts and transport errors per second.
fn errors_panel(report: &Report, area: &Area, x_max: f64) -> anyhow::Result<()> {
    let err_max = report
        .runs
        .iter()
        .flat_map(|r| r.series.bids.iter().map(|p| p.errors))
        .max()
        .unwrap_or(0)
        .max(1) as f64
        * 1.1;
    let mut c = panel(
        area,
        "Bid errors per second (5xx, timeouts, transport errors)",
    )
    .build_cartesian_2d(0f64..x_max, 0f64..err_max)
    .map_err(plot_error)?;
    c.configure_mesh()
        .y_desc("errors/s")
        .draw()
        .map_err(plot_error)?;
    for (i, r) in report.runs.iter().enumerate() {
        let color = color(report, i);
        c.draw_series(LineSeries::new(
            r.series.bids.iter().map(|p| (p.t as f64, p.errors as f64)),
            color.stroke_width(2),
        ))
        .map_err(plot_error)?
        .label(report.label(r))
        .legend(legend_line(color));
    }
    draw_legend(&mut c)
}

/// CPU: the machine busy and stolen, as a share of its cores.
fn cpu_panel(report: &Report, area: &Area, x_max: f64) -> anyhow::Result<()> {
    let mut c = panel(
        area,
        "CPU: the machine busy (thick), stolen by the hypervisor (thin), % of the cores",
    )
    .build_cartesian_2d(0f64..x_max, 0f64..105f64)
    .map_err(plot_error)?;
    c.configure_mesh()
        .x_desc("seconds")
        .y_desc("%")
        .draw()
        .map_err(plot_error)?;
    for (i, r) in report.runs.iter().enumerate() {
        let Some(cpu) = &r.series.cpu else {
            continue;
        };
        let color = color(report, i);
        let share = |f: fn(&CpuSecond) -> f64| {
            let cores = cpu.cores.max(1) as f64;
            cpu.seconds
                .iter()
                .enumerate()
                .map(move |(t, s)| (t as f64, 100.0 * f(s) / cores))
                .collect::<Vec<_>>()
        };
        c.draw_series(LineSeries::new(share(|s| s.busy), color.stroke_width(2)))
            .map_err(plot_error)?
            .label(report.label(r))
            .legend(legend_line(color));
        c.draw_series(LineSeries::new(share(|s| s.steal), color.mix(0.6)))
            .map_err(plot_error)?;
    }
    draw_legend(&mut c)
}

/// Watchers, log scale: versions received per second (thick) and streams
/// open (thin).
fn watchers_panel(report: &Report, area: &Area, x_max: f64) -> anyhow::Result<()> {
    let y_max = (report.runs.iter())
        .flat_map(|r| r.series.watchers.iter())
        .map(|s| s.versions.max(u64::from(s.open)))
        .max()
        .unwrap_or(1)
        .max(10) as f64
        * 1.5;
    let mut c = panel(
        area,
        "Watchers: versions received per second (thick), streams open (thin)",
    )
    .build_cartesian_2d(0f64..x_max, (1f64..y_max).log_scale())
    .map_err(plot_error)?;
    c.configure_mesh()
        .x_desc("seconds")
        .draw()
        .map_err(plot_error)?;
    for (i, r) in report.runs.iter().enumerate() {
        let seconds = || r.series.watchers.iter().enumerate();
        let color = color(report, i);
        let versions = seconds().map(|(t, s)| (t as f64, (s.versions as f64).max(1.0)));
        c.draw_series(LineSeries::new(versions, color.stroke_width(2)))
            .map_err(plot_error)?
            .label(report.label(r))
            .legend(legend_line(color));
        let open = seconds().map(|(t, s)| (t as f64, f64::from(s.open).max(1.0)));
        c.draw_series(LineSeries::new(open, color.mix(0.6)))
            .map_err(plot_error)?;
    }
    draw_legend(&mut c)
}

/// A chart panel with its caption and the margins every panel shares.
fn panel<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    caption: &str,
) -> ChartBuilder<'a, 'static, DB> {
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70);
    builder
}

/// The legend's sample of a mode's line.
fn legend_line(color: RGBColor) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
}

/// Draws a panel's legend: one entry per mode.
fn draw_legend<'a, 'b: 'a, CT: CoordTranslate>(
    c: &mut ChartContext<'a, SVGBackend<'b>, CT>,
) -> anyhow::Result<()> {
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)
}

fn plot_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {e:?}")
}
