//! The throughput–latency chart, as a standalone SVG file.
//!
//! SVG keeps text as text, laid out by whatever displays the file, so the chart
//! needs no font files at build or run time and stays searchable and diffable.
//! plotters is built without its font support for that reason; its built-in
//! estimate of text width is only used to leave room for labels.

use std::error::Error;
use std::fs;
use std::path::Path;
use std::path::PathBuf;

use plotters::prelude::*;

use crate::BenchError;
use crate::sweep::Curve;

const SIZE: (u32, u32) = (960, 600);

/// Writes `sweep.json` (the curves) and `sweep.svg` (their chart) into `dir`,
/// creating it if needed, and returns both paths.
pub fn save(dir: &Path, title: &str, curves: &[Curve]) -> Result<(PathBuf, PathBuf), BenchError> {
    let write_error = |path: &Path| {
        let path = path.to_owned();
        move |source| BenchError::Write { path, source }
    };
    fs::create_dir_all(dir).map_err(write_error(dir))?;
    let json_path = dir.join("sweep.json");
    let json = serde_json::to_vec_pretty(curves)?;
    fs::write(&json_path, json).map_err(write_error(&json_path))?;
    let svg_path = dir.join("sweep.svg");
    write_svg(&svg_path, title, curves)?;
    Ok((json_path, svg_path))
}

/// Draws p90 latency (y, ms) against achieved throughput (x, requests/s), one
/// coloured line with dots per curve, with a legend of the curves' labels.
/// Points without a latency (no successful request) cannot be placed and are
/// left out.
pub fn write_svg(path: &Path, title: &str, curves: &[Curve]) -> Result<(), BenchError> {
    draw(path, title, curves).map_err(|error| BenchError::Chart {
        path: path.to_owned(),
        reason: error.to_string(),
    })
}

/// (throughput, p90) of every point that has a p90.
fn series(curve: &Curve) -> Vec<(f64, f64)> {
    curve
        .points
        .iter()
        .filter_map(|p| p.p90_ms.map(|p90| (p.throughput, p90)))
        .collect()
}

/// Axis end: 10% headroom over the largest value, and never an empty range.
fn axis_end(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(0.0, f64::max).max(1e-3) * 1.1
}

fn draw(path: &Path, title: &str, curves: &[Curve]) -> Result<(), Box<dyn Error>> {
    let all: Vec<Vec<(f64, f64)>> = curves.iter().map(series).collect();
    let x_end = axis_end(all.iter().flatten().map(|p| p.0));
    let y_end = axis_end(all.iter().flatten().map(|p| p.1));

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_end, 0.0..y_end)?;
    chart
        .configure_mesh()
        .x_desc("throughput (requests/s)")
        .y_desc("p90 latency (ms)")
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 14))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;

    for (index, (curve, points)) in curves.iter().zip(all).enumerate() {
        let color = Palette99::pick(index).to_rgba();
        let line = color.stroke_width(2);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), line))?
            .label(curve.label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], line));
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::CurvePoint;

    fn curve(label: &str, scale: f64) -> Curve {
        let points = [100.0, 200.0, 400.0, 800.0]
            .into_iter()
            .map(|rate| CurvePoint {
                intended_rate: rate,
                throughput: rate * 0.99,
                requests_ok: 1000,
                errors: 0,
                p50_ms: Some(scale * rate / 200.0),
                p90_ms: Some(scale * rate / 100.0),
                p99_ms: Some(scale * rate / 50.0),
                saturated: false,
            })
            .collect();
        Curve {
            label: label.into(),
            points,
            saturated_at: None,
        }
    }

    #[test]
    fn chart_has_title_legend_and_axis_labels() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("curve.svg");
        let curves = [curve("haven 3 nodes", 1.0), curve("etcd 3 nodes", 2.0)];
        write_svg(&path, "Log app, 50% reads", &curves).expect("chart written");
        let svg = std::fs::read_to_string(&path).expect("svg readable");
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(100)]);
        for text in [
            "Log app, 50% reads",
            "haven 3 nodes",
            "etcd 3 nodes",
            "throughput (requests/s)",
            "p90 latency (ms)",
        ] {
            assert!(svg.contains(text), "missing {text}");
        }
    }

    #[test]
    fn curves_without_points_still_draw_axes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("empty.svg");
        let empty = Curve {
            label: "nothing yet".into(),
            points: Vec::new(),
            saturated_at: None,
        };
        write_svg(&path, "empty", &[empty]).expect("chart written");
        let svg = std::fs::read_to_string(&path).expect("svg readable");
        assert!(svg.contains("nothing yet"));
    }

    #[test]
    fn unwritable_path_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing-dir").join("c.svg");
        let message = write_svg(&path, "t", &[curve("a", 1.0)]).map_err(|e| e.to_string());
        let Err(message) = message else {
            panic!("writing into a missing directory succeeded")
        };
        assert!(message.contains("missing-dir"), "{message}");
    }

    #[test]
    fn save_writes_json_and_svg() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        let curve = Curve {
            label: "haven".into(),
            points: vec![curve("haven", 1.0).points.remove(0)],
            saturated_at: None,
        };
        let (json, svg) = save(&out, "title", std::slice::from_ref(&curve)).expect("saved");
        let text = fs::read_to_string(json).expect("json written");
        let back: Vec<Curve> = serde_json::from_str(&text).expect("json parses");
        assert_eq!(back, [curve]);
        assert!(
            fs::read_to_string(svg)
                .expect("svg written")
                .starts_with("<svg")
        );
    }
}
