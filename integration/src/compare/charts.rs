//! Draws the comparison's SVG charts: one per metric group and kernel, a line per
//! dataplane across the cluster sizes. Entry point: [`draw`].
//!
//! Text is left to the viewer (no font files: `plotters` estimates text sizes and the SVG
//! names the `sans-serif` family), so captions and labels stay plain.

use std::path::Path;

use anyhow::Context;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

use super::{KernelRun, Metric, Unit, size_label, thousands};

/// One chart written by [`draw`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chart {
    /// The file's name inside the directory it was drawn into (`host-initial-sync.svg`).
    pub file: String,
    /// What it shows, for alt text.
    pub title: String,
}

/// What a chart plots per dataplane and cluster size.
#[derive(Clone, Copy)]
enum Source {
    Median(Metric),
    /// [`KernelRun::rate_ratio`]: paired per round, so it is not a ratio of medians.
    RateRatio,
}

#[derive(Clone, Copy)]
enum Scale {
    /// For values that grow by orders of magnitude with the cluster.
    Log,
    /// From zero up to at least `floor`, so a flat line reads as flat and not as noise.
    Linear { floor: f64 },
}

struct Spec {
    slug: &'static str,
    title: &'static str,
    source: Source,
    scale: Scale,
    unit: Unit,
    /// The y axis's description, with its unit.
    axis: &'static str,
    /// Where the lines are least likely to be.
    legend: SeriesLabelPosition,
}

const SPECS: [Spec; 7] = [
    Spec {
        slug: "initial-sync",
        title: "initial sync",
        source: Source::Median(Metric::InitialSync),
        scale: Scale::Log,
        unit: Unit::Seconds,
        axis: "every Service into an empty node, seconds (log scale)",
        legend: SeriesLabelPosition::UpperLeft,
    },
    Spec {
        slug: "change",
        title: "one-Service change",
        source: Source::Median(Metric::Change),
        scale: Scale::Log,
        unit: Unit::Seconds,
        axis: "sync after one change, seconds (log scale)",
        legend: SeriesLabelPosition::UpperLeft,
    },
    Spec {
        slug: "read-back",
        title: "read-back",
        source: Source::Median(Metric::ReadBack),
        scale: Scale::Log,
        unit: Unit::Seconds,
        axis: "reading the kernel back, seconds (log scale)",
        legend: SeriesLabelPosition::UpperLeft,
    },
    Spec {
        slug: "rate-ratio",
        title: "connect rate, ClusterIP / direct",
        source: Source::RateRatio,
        scale: Scale::Linear { floor: 1.1 },
        unit: Unit::Share,
        axis: "new connections/s, ClusterIP / direct",
        legend: SeriesLabelPosition::LowerLeft,
    },
    Spec {
        slug: "kernel-objects",
        title: "kernel objects",
        source: Source::Median(Metric::KernelObjects),
        scale: Scale::Log,
        unit: Unit::Count,
        axis: "objects read back (log scale)",
        legend: SeriesLabelPosition::UpperLeft,
    },
    Spec {
        slug: "agent-rss",
        title: "agent memory (RSS)",
        source: Source::Median(Metric::AgentRss),
        scale: Scale::Linear { floor: 1.0 },
        unit: Unit::Mebibytes,
        axis: "resident memory, MiB",
        legend: SeriesLabelPosition::UpperLeft,
    },
    Spec {
        slug: "programming-latency",
        title: "manifest edit to first packet",
        source: Source::Median(Metric::ProgrammingLatency),
        scale: Scale::Log,
        unit: Unit::Seconds,
        axis: "edit to first connection, seconds (log scale)",
        legend: SeriesLabelPosition::UpperLeft,
    },
];

const SIZE: (u32, u32) = (720, 440);

/// Draws every chart `run` has data for into `dir` as `<prefix>-<chart>.svg`, in a fixed
/// order. A chart with nothing to plot is left out, and so is a point with no value (or,
/// on a log scale, a value that is not positive): the report's tables show those.
pub fn draw(run: &KernelRun, dir: &Path, prefix: &str) -> anyhow::Result<Vec<Chart>> {
    let mut charts = Vec::new();
    for spec in &SPECS {
        let lines = lines(run, spec);
        if lines.iter().all(|(_, points)| points.is_empty()) {
            continue;
        }
        let svg = render(run, spec, &lines)
            .with_context(|| format!("drawing the {} chart", spec.title))?;
        let file = format!("{prefix}-{}.svg", spec.slug);
        std::fs::write(dir.join(&file), svg)
            .with_context(|| format!("writing {}", dir.join(&file).display()))?;
        charts.push(Chart {
            file,
            title: format!("{}: {}", spec.title, run.label()),
        });
    }
    Ok(charts)
}

/// Per dataplane, the (column, value) points a chart can show.
fn lines<'a>(run: &'a KernelRun, spec: &Spec) -> Vec<(&'a str, Vec<(i32, f64)>)> {
    run.dataplanes
        .iter()
        .map(|dataplane| {
            let points = run
                .sizes
                .iter()
                .enumerate()
                .filter_map(|(i, &services)| {
                    let value = match spec.source {
                        Source::Median(metric) => run.median(dataplane, services, metric),
                        Source::RateRatio => run.rate_ratio(dataplane, services),
                    }?;
                    let plottable = value.is_finite()
                        && match spec.scale {
                            Scale::Log => value > 0.0,
                            Scale::Linear { .. } => true,
                        };
                    plottable.then_some((column(i), value))
                })
                .collect();
            (dataplane.as_str(), points)
        })
        .collect()
}

/// Where the `i`th cluster size sits on the x axis: odd columns, so every size has half a
/// column of room on either side (`plotters` formats no custom ticks on an `f64` axis).
fn column(i: usize) -> i32 {
    2 * i as i32 + 1
}

/// The lowest and highest value of every point.
fn bounds(lines: &[(&str, Vec<(i32, f64)>)]) -> (f64, f64) {
    lines
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.1))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), v| {
            (low.min(v), high.max(v))
        })
}

/// The whole decades (`10^low ..= 10^high`) around positive `low ..= high`, with room so
/// no point sits on the frame.
fn decades(low: f64, high: f64) -> (i32, i32) {
    let low = (low / 1.2).log10().floor() as i32;
    let high = ((high * 1.2).log10().ceil() as i32).max(low + 1);
    (low, high)
}

/// Labelled ticks on a log axis (1, 2 and 5 of each decade while there are few decades,
/// else only the decades), and grid lines at every step of every decade.
fn log_ticks((low, high): (i32, i32)) -> (Vec<f64>, Vec<f64>) {
    let steps = |multipliers: &[f64]| -> Vec<f64> {
        (low..=high)
            .flat_map(|decade| multipliers.iter().map(move |m| m * 10f64.powi(decade)))
            .filter(|v| *v <= 10f64.powi(high) * 1.001)
            .collect()
    };
    let labelled: &[f64] = if high - low <= 3 {
        &[1.0, 2.0, 5.0]
    } else {
        &[1.0]
    };
    let grid: Vec<f64> = (1..10).map(f64::from).collect();
    (steps(labelled), steps(&grid))
}

fn render(
    run: &KernelRun,
    spec: &Spec,
    lines: &[(&str, Vec<(i32, f64)>)],
) -> anyhow::Result<String> {
    let (low, high) = bounds(lines);
    match spec.scale {
        Scale::Log => {
            let decades = decades(low, high);
            let (labelled, grid) = log_ticks(decades);
            // Slightly past the outer decades, so their ticks are inside the axis.
            let y = (10f64.powi(decades.0) * 0.999..10f64.powi(decades.1) * 1.001)
                .log_scale()
                .with_key_points(labelled)
                .with_light_points(grid);
            plot(run, spec, lines, y)
        }
        Scale::Linear { floor } => plot(run, spec, lines, low.min(0.0)..(high * 1.1).max(floor)),
    }
}

fn plot<Y>(
    run: &KernelRun,
    spec: &Spec,
    lines: &[(&str, Vec<(i32, f64)>)],
    y: Y,
) -> anyhow::Result<String>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    // The sizes are categories (0, 1k, 10k), evenly spaced whatever their values.
    let sizes = run.sizes.clone();
    let x =
        (0..2 * sizes.len().max(1) as i32).with_key_points((0..sizes.len()).map(column).collect());
    let unit = spec.unit;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("{}: {}", spec.title, run.label()),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(80)
            .build_cartesian_2d(x, y)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("Services in the cluster")
            .y_desc(spec.axis)
            .x_label_formatter(&|&v| {
                usize::try_from(v / 2)
                    .ok()
                    .and_then(|i| sizes.get(i))
                    .map(|&n| size_label(n))
                    .unwrap_or_default()
            })
            .y_label_formatter(&|v| axis_label(unit, *v))
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 14))
            .draw()?;
        for (dataplane, points) in lines {
            if points.is_empty() {
                continue;
            }
            let colour = colour(dataplane);
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(2),
                ))?
                .label(*dataplane)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2))
                });
            chart.draw_series(
                points
                    .iter()
                    .map(|&point| Circle::new(point, 4, colour.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .position(spec.legend.clone())
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 13))
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// Each dataplane's colour, the same in every chart.
fn colour(dataplane: &str) -> RGBColor {
    match dataplane {
        "iptables" => RGBColor(31, 119, 180),
        "ipvs" => RGBColor(255, 127, 14),
        "ebpf" => RGBColor(44, 160, 44),
        _ => RGBColor(90, 90, 90),
    }
}

/// A y axis label: the table's units, without the table's trailing zeros (`10 s`,
/// `200 µs`).
fn axis_label(unit: Unit, value: f64) -> String {
    match unit {
        Unit::Seconds if value >= 1.0 => format!("{} s", trim(value)),
        Unit::Seconds if value >= 1e-3 => format!("{} ms", trim(value * 1e3)),
        Unit::Seconds => format!("{} µs", trim(value * 1e6)),
        Unit::Count if value >= 1.0 => thousands(value.round() as u64),
        Unit::Count => trim(value),
        _ => unit.format(value),
    }
}

/// `2.50` → `2.5`, `10.00` → `10`.
fn trim(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::Sample;

    fn run(dataplanes: &[&str], sizes: &[usize], samples: Vec<Sample>) -> KernelRun {
        KernelRun {
            name: "host".into(),
            kernel: "6.18.0".into(),
            ebpf_jit: true,
            dataplanes: dataplanes.iter().map(|d| d.to_string()).collect(),
            sizes: sizes.to_vec(),
            rounds: 1,
            samples,
            ..KernelRun::default()
        }
    }

    fn read(dir: &Path, chart: &Chart) -> String {
        std::fs::read_to_string(dir.join(&chart.file)).unwrap()
    }

    #[test]
    fn every_measured_group_gets_a_chart_with_a_line_per_dataplane() {
        let dataplanes = ["iptables", "ipvs", "ebpf"];
        let mut samples = Vec::new();
        for (d, dataplane) in dataplanes.iter().enumerate() {
            for (s, services) in [0, 1000, 10_000].into_iter().enumerate() {
                let scale = (1 + d + s * 10) as f64;
                samples.extend([
                    Sample::new(dataplane, services, 0, Metric::InitialSync, 0.01 * scale),
                    Sample::new(dataplane, services, 0, Metric::Change, 0.001 * scale),
                    Sample::new(dataplane, services, 0, Metric::ReadBack, 0.002 * scale),
                    Sample::new(dataplane, services, 0, Metric::ClusterIpRate, 900.0),
                    Sample::new(dataplane, services, 0, Metric::DirectRate, 1000.0),
                    Sample::new(dataplane, services, 0, Metric::KernelObjects, 100.0 * scale),
                    Sample::new(dataplane, services, 0, Metric::AgentRss, 10.0 + scale),
                    Sample::new(dataplane, services, 0, Metric::ProgrammingLatency, 0.3),
                ]);
            }
        }
        let run = run(&dataplanes, &[0, 1000, 10_000], samples);
        let dir = tempfile::tempdir().unwrap();
        let charts = draw(&run, dir.path(), "host").unwrap();

        let files: Vec<&str> = charts.iter().map(|c| c.file.as_str()).collect();
        assert_eq!(
            files,
            [
                "host-initial-sync.svg",
                "host-change.svg",
                "host-read-back.svg",
                "host-rate-ratio.svg",
                "host-kernel-objects.svg",
                "host-agent-rss.svg",
                "host-programming-latency.svg",
            ]
        );
        for chart in &charts {
            let svg = read(dir.path(), chart);
            assert!(svg.contains("<svg"), "{}", chart.file);
            for text in [
                "iptables",
                "ipvs",
                "ebpf",
                "1k",
                "10k",
                "Services in the cluster",
            ] {
                assert!(svg.contains(text), "{} lacks {text}", chart.file);
            }
            assert!(svg.contains("host, Linux 6.18.0 (eBPF JIT-compiled)"));
            assert!(
                chart
                    .title
                    .ends_with("host, Linux 6.18.0 (eBPF JIT-compiled)")
            );
        }
        // A dataplane keeps its colour from chart to chart.
        let blue = "#1F77B4";
        assert!(charts.iter().all(|c| read(dir.path(), c).contains(blue)));
    }

    #[test]
    fn degenerate_runs_draw_what_they_can_without_panicking() {
        let dir = tempfile::tempdir().unwrap();

        // Nothing measured: no charts.
        let empty = run(&["iptables"], &[0, 1000], Vec::new());
        assert!(draw(&empty, dir.path(), "empty").unwrap().is_empty());
        let nothing = run(&[], &[], Vec::new());
        assert!(draw(&nothing, dir.path(), "nothing").unwrap().is_empty());

        // One size, one dataplane, one value everywhere, zero kernel objects.
        let single = run(
            &["ebpf"],
            &[1000],
            vec![
                Sample::new("ebpf", 1000, 0, Metric::InitialSync, 1.0),
                Sample::new("ebpf", 1000, 0, Metric::AgentRss, 0.0),
                Sample::new("ebpf", 1000, 0, Metric::KernelObjects, 0.0),
                Sample::new("ebpf", 1000, 0, Metric::ClusterIpRate, 0.0),
                Sample::new("ebpf", 1000, 0, Metric::DirectRate, 0.0),
            ],
        );
        let charts = draw(&single, dir.path(), "single").unwrap();
        let files: Vec<&str> = charts.iter().map(|c| c.file.as_str()).collect();
        // Zero objects cannot sit on a log scale; a zero direct rate makes no ratio.
        assert_eq!(files, ["single-initial-sync.svg", "single-agent-rss.svg"]);
        assert!(read(dir.path(), &charts[0]).contains("ebpf"));

        // Some zeros among the kernel objects; a size no dataplane reached.
        let zeros = run(
            &["iptables", "ipvs"],
            &[0, 1000, 10_000],
            vec![
                Sample::new("iptables", 0, 0, Metric::KernelObjects, 0.0),
                Sample::new("iptables", 1000, 0, Metric::KernelObjects, 4000.0),
                Sample::new("ipvs", 0, 0, Metric::KernelObjects, 12.0),
                Sample::new("ipvs", 1000, 0, Metric::KernelObjects, 12.0),
            ],
        );
        let charts = draw(&zeros, dir.path(), "zeros").unwrap();
        assert_eq!(charts.len(), 1);
        let svg = read(dir.path(), &charts[0]);
        assert!(svg.contains("iptables") && svg.contains("ipvs"));
    }
}
