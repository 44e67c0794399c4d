//! The written forms of a bank analysis: report.md for people, and SVG plots (similarity
//! heatmap, within/across-kind histogram, the memories and the experience steps on the first
//! two basis directions) drawn with plotters.

use std::fmt::Write as _;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::analyze::{shorten, BankAnalysis, StepGroup};
use super::label::LabelOutcome;
use crate::error::{Error, Result};

/// File names of the plots [`write_plots`] makes, in the order report.md shows them.
pub const HEATMAP: &str = "similarity_heatmap.svg";
pub const HISTOGRAM: &str = "similarity_histogram.svg";
pub const MEMORY_SCATTER: &str = "basis_memories.svg";
pub const STEP_SCATTER: &str = "basis_steps.svg";

fn fmt_opt(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.3}")
    }
}

fn group_line(g: &StepGroup) -> String {
    let types: Vec<String> = g.action_types.iter().take(5).map(|(t, n)| format!("{t} ×{n}")).collect();
    format!("success rate {} over {} steps; actions: {}", fmt_opt(g.success_rate), g.steps.len(), types.join(", "))
}

fn steps_table(out: &mut String, g: &StepGroup) {
    out.push_str("| projection | outcome | kind | observation | action |\n|---:|---|---|---|---|\n");
    for s in &g.steps {
        let cell = |t: &str, n: usize| shorten(t, n).replace('|', "\\|").replace('\n', " ");
        let _ = writeln!(
            out,
            "| {:.3} | {} | {} | {} | {} |",
            s.projection,
            if s.success { "success" } else { "failure" },
            cell(&s.kind, 20),
            cell(&s.observation, 90),
            cell(&s.action, 40)
        );
    }
}

/// report.md: the similarity tables, the basis, and each direction's steps and label.
pub fn markdown(analysis: &BankAnalysis, bank_name: &str, experiences: Option<&str>, labels: &[Option<LabelOutcome>]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Memory bank analysis: {bank_name}\n");
    let _ = writeln!(out, "{} memories; kinds: {}.", analysis.memories.len(), {
        let mut kinds = analysis.kinds.clone();
        kinds.sort();
        kinds.dedup();
        kinds.join(", ")
    });
    if let Some(path) = experiences {
        let _ = writeln!(
            out,
            "Experiences: {path} ({} steps, read at {} with history {}).",
            analysis.steps,
            analysis.position.map_or("-".into(), |p| p.to_string()),
            analysis.history.map_or("-".into(), |h| h.to_string())
        );
    }
    out.push_str("\n## Similarity within and across kinds\n\n");
    out.push_str("Cosine similarity of the memories' directions, per layer. *Within* pairs are two memories of the same kind (e.g. distilled from disjoint halves of its episodes), *across* pairs are of different kinds.\n\n");
    out.push_str("| layer | memories | within: mean (pairs) | across: mean (pairs) | within − across |\n|---:|---:|---:|---:|---:|\n");
    for l in &analysis.layers {
        let w = l.within_summary.as_ref().map(|s| s.mean);
        let a = l.across_summary.as_ref().map(|s| s.mean);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            l.layer,
            l.memories.len(),
            w.map_or("-".into(), |m| format!("{m:.3} ({})", l.within.len())),
            a.map_or("-".into(), |m| format!("{m:.3} ({})", l.across.len())),
            match (w, a) {
                (Some(w), Some(a)) => format!("{:+.3}", w - a),
                _ => "-".into(),
            }
        );
    }
    if let (Some(w), Some(a)) = (&analysis.within_all, &analysis.across_all) {
        let _ = writeln!(
            out,
            "\nAll layers pooled: within {:.3} ± {:.3} (median {:.3}, {} pairs), across {:.3} ± {:.3} (median {:.3}, {} pairs).",
            w.mean, w.std, w.median, w.count, a.mean, a.std, a.median, a.count
        );
    }
    let _ = writeln!(out, "\n![similarity heatmap at layer {}]({HEATMAP})\n\n![within vs across]({HISTOGRAM})\n", analysis.basis_layer);
    let _ = writeln!(out, "## Basis directions at layer {}\n", analysis.basis_layer);
    out.push_str("The SVD of the memories' unit directions stacked as rows (not centred). A loading is a memory's coordinate on the direction; each direction's sign makes the loadings sum to ≥ 0.\n\n");
    out.push_str("| direction | σ | explained | cumulative | largest loadings |\n|---:|---:|---:|---:|---|\n");
    for d in &analysis.directions {
        let mut loads = d.loadings.clone();
        loads.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
        let top: Vec<String> = loads.iter().take(4).map(|(n, x)| format!("{n} {x:+.2}")).collect();
        let _ = writeln!(out, "| {} | {:.3} | {:.1}% | {:.1}% | {} |", d.index, d.singular_value, 100.0 * d.explained, 100.0 * d.cumulative, top.join(", "));
    }
    out.push_str("\nShare of the first direction at each analysed layer (a bank whose memories share one direction has it near 100%):\n\n| layer | first | second | third |\n|---:|---:|---:|---:|\n");
    for s in &analysis.spectra {
        let get = |k: usize| s.explained.get(k).map_or("-".into(), |x| format!("{:.1}%", 100.0 * x));
        let _ = writeln!(out, "| {} | {} | {} | {} |", s.layer, get(0), get(1), get(2));
    }
    let _ = writeln!(out, "\n![memories on the first two directions]({MEMORY_SCATTER})\n");
    if analysis.coordinates.is_some() {
        let _ = writeln!(out, "![experience steps on the first two directions]({STEP_SCATTER})\n");
    }
    for (k, d) in analysis.directions.iter().enumerate() {
        let Some(steps) = &d.steps else { continue };
        let _ = writeln!(out, "## Direction {}: the steps at each end\n", d.index);
        let _ = writeln!(out, "AUC of the projection, successful vs failed episodes' steps: {}.", fmt_opt(steps.success_auc));
        let kinds: Vec<String> = steps.kind_means.iter().map(|(k, m)| format!("{k} {m:+.3}")).collect();
        let _ = writeln!(out, "Mean projection per kind: {}.\n", kinds.join(", "));
        let _ = writeln!(out, "**Highest** ({})\n", group_line(&steps.top));
        steps_table(&mut out, &steps.top);
        let _ = writeln!(out, "\n**Lowest** ({})\n", group_line(&steps.bottom));
        steps_table(&mut out, &steps.bottom);
        if let Some(Some(outcome)) = labels.get(k) {
            match &outcome.label {
                Some(l) => {
                    let _ = writeln!(
                        out,
                        "\n**Label** (by the local model, attempt {}): *{}* — {} (polarity {}, confidence {:.2}; evidence: {})",
                        outcome.attempts,
                        l.label,
                        l.explanation,
                        l.polarity,
                        l.confidence,
                        l.key_evidence.join("; ")
                    );
                }
                None => {
                    let _ = writeln!(out, "\n**Label**: none valid after {} attempts; the last answer was rejected for: {}", outcome.attempts, outcome.rejected.last().map_or("-", String::as_str));
                }
            }
        }
        out.push('\n');
    }
    out
}

fn plot_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::InvalidInput(format!("drawing {}: {e}", path.display()))
}

/// Blue (−1) through white (0) to red (+1).
fn diverging(value: f64) -> RGBColor {
    let t = value.clamp(-1.0, 1.0);
    let mix = |a: u8, b: u8, f: f64| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    if t < 0.0 {
        RGBColor(mix(255, 33, -t), mix(255, 102, -t), mix(255, 172, -t))
    } else {
        RGBColor(mix(255, 178, t), mix(255, 24, t), mix(255, 43, t))
    }
}

fn heatmap(area: &DrawingArea<SVGBackend<'_>, Shift>, analysis: &BankAnalysis) -> std::result::Result<(), String> {
    let Some(sim) = analysis.layers.iter().find(|l| l.layer == analysis.basis_layer).or(analysis.layers.first()) else { return Ok(()) };
    let n = sim.memories.len();
    if n == 0 {
        return Ok(());
    }
    let names = sim.memories.clone();
    let mut chart = ChartBuilder::on(area)
        .caption(format!("cosine similarity of memories, layer {}", sim.layer), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(170)
        .build_cartesian_2d((0..n - 1).into_segmented(), (0..n - 1).into_segmented())
        .map_err(|e| e.to_string())?;
    // Names on the y axis, their numbers on the x axis (long rotated names do not fit).
    let y_label = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) if *i < names.len() => format!("{} ({i})", names[*i]),
        _ => String::new(),
    };
    let x_label = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) if *i < names.len() => i.to_string(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(n)
        .y_labels(n)
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .draw()
        .map_err(|e| e.to_string())?;
    let cells = (0..n).flat_map(|i| (0..n).map(move |j| (i, j)));
    chart
        .draw_series(cells.map(|(i, j)| {
            Rectangle::new([(SegmentValue::Exact(i), SegmentValue::Exact(j)), (SegmentValue::Exact(i + 1), SegmentValue::Exact(j + 1))], diverging(sim.cosine[i][j]).filled())
        }))
        .map_err(|e| e.to_string())?;
    if n <= 16 {
        chart
            .draw_series((0..n).flat_map(|i| (0..n).map(move |j| (i, j))).map(|(i, j)| {
                Text::new(format!("{:.2}", sim.cosine[i][j]), (SegmentValue::CenterOf(i), SegmentValue::CenterOf(j)), ("sans-serif", 11).into_font())
            }))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn histogram(area: &DrawingArea<SVGBackend<'_>, Shift>, analysis: &BankAnalysis) -> std::result::Result<(), String> {
    let within: Vec<f64> = analysis.layers.iter().flat_map(|l| l.within.iter().copied()).collect();
    let across: Vec<f64> = analysis.layers.iter().flat_map(|l| l.across.iter().copied()).collect();
    const BINS: usize = 20;
    let bin = |v: f64| (((v.clamp(-1.0, 1.0) + 1.0) / 2.0 * BINS as f64) as usize).min(BINS - 1);
    // Fractions, so that sets of very different sizes compare.
    let shares = |xs: &[f64]| -> Vec<f64> {
        let mut h = vec![0.0; BINS];
        for &x in xs {
            h[bin(x)] += 1.0 / xs.len() as f64;
        }
        h
    };
    let (hw, ha) = (shares(&within), shares(&across));
    let top = hw.iter().chain(&ha).copied().fold(0.0f64, f64::max).max(0.05) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(format!("cosine of memory pairs, {} layers pooled", analysis.layers.len()), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(-1.0f64..1.0, 0.0f64..top)
        .map_err(|e| e.to_string())?;
    chart.configure_mesh().x_desc("cosine").y_desc("share of pairs").draw().map_err(|e| e.to_string())?;
    let width = 2.0 / BINS as f64;
    for (values, color, offset, name) in [(&hw, RGBColor(178, 24, 43), 0.0, format!("within kind ({} pairs)", within.len())), (&ha, RGBColor(33, 102, 172), 0.5, format!("across kinds ({} pairs)", across.len()))] {
        chart
            .draw_series(values.iter().enumerate().filter(|(_, &v)| v > 0.0).map(|(b, &v)| {
                let x0 = -1.0 + b as f64 * width + offset * width;
                Rectangle::new([(x0, 0.0), (x0 + width / 2.0, v)], color.mix(0.8).filled())
            }))
            .map_err(|e| e.to_string())?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| e.to_string())?;
    Ok(())
}

fn range_of(values: impl Iterator<Item = f64> + Clone) -> std::ops::Range<f64> {
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return -1.0..1.0;
    }
    let pad = ((hi - lo) * 0.08).max(1e-3);
    (lo - pad)..(hi + pad)
}

fn memory_scatter(area: &DrawingArea<SVGBackend<'_>, Shift>, analysis: &BankAnalysis) -> std::result::Result<(), String> {
    let first = &analysis.directions[0];
    let second: Vec<f64> = match analysis.directions.get(1) {
        Some(d) => d.loadings.iter().map(|l| l.1).collect(),
        None => vec![0.0; first.loadings.len()],
    };
    let points: Vec<(String, f64, f64)> = first.loadings.iter().zip(&second).map(|((n, x), &y)| (n.clone(), *x, y)).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(format!("memories on the first two basis directions, layer {}", analysis.basis_layer), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(range_of(points.iter().map(|p| p.1)), range_of(points.iter().map(|p| p.2)))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(format!("direction 0 ({:.0}%)", 100.0 * first.explained))
        .y_desc(analysis.directions.get(1).map_or("direction 1 (none)".into(), |d| format!("direction 1 ({:.0}%)", 100.0 * d.explained)))
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(points.iter().map(|(name, x, y)| {
            EmptyElement::at((*x, *y)) + Circle::new((0, 0), 4, RGBColor(33, 102, 172).filled()) + Text::new(name.clone(), (6, -6), ("sans-serif", 12).into_font())
        }))
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn step_scatter(area: &DrawingArea<SVGBackend<'_>, Shift>, analysis: &BankAnalysis) -> std::result::Result<(), String> {
    let Some(c) = &analysis.coordinates else { return Ok(()) };
    let mut chart = ChartBuilder::on(area)
        .caption(format!("experience steps on the first two basis directions, layer {}", analysis.basis_layer), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(range_of(c.first.iter().copied()), range_of(c.second.iter().copied()))
        .map_err(|e| e.to_string())?;
    chart.configure_mesh().x_desc("projection on direction 0 (centred)").y_desc("projection on direction 1 (centred)").draw().map_err(|e| e.to_string())?;
    let green = RGBColor(26, 152, 80);
    let red = RGBColor(215, 48, 39);
    let pick = |want: bool| c.success.iter().enumerate().filter(move |(_, &s)| s == want).map(|(i, _)| (c.first[i], c.second[i]));
    chart
        .draw_series(pick(true).map(|p| Circle::new(p, 3, green.mix(0.7).filled())))
        .map_err(|e| e.to_string())?
        .label("step of a successful episode")
        .legend(move |(x, y)| Circle::new((x + 5, y), 3, green.filled()));
    chart
        .draw_series(pick(false).map(|p| Cross::new(p, 3, red.mix(0.8))))
        .map_err(|e| e.to_string())?
        .label("step of a failed episode")
        .legend(move |(x, y)| Cross::new((x + 5, y), 3, red));
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| e.to_string())?;
    Ok(())
}

/// Writes the SVG plots into `dir`; returns the files written.
pub fn write_plots(analysis: &BankAnalysis, dir: &Path) -> Result<Vec<String>> {
    type Draw = fn(&DrawingArea<SVGBackend<'_>, Shift>, &BankAnalysis) -> std::result::Result<(), String>;
    let mut plots: Vec<(&str, Draw, (u32, u32))> = vec![(HEATMAP, heatmap, (760, 700)), (HISTOGRAM, histogram, (760, 420)), (MEMORY_SCATTER, memory_scatter, (760, 560))];
    if analysis.coordinates.is_some() {
        plots.push((STEP_SCATTER, step_scatter, (760, 560)));
    }
    let mut written = Vec::new();
    for (name, draw, size) in plots {
        let path = dir.join(name);
        let area = SVGBackend::new(&path, size).into_drawing_area();
        area.fill(&WHITE).map_err(|e| plot_error(&path, e))?;
        draw(&area, analysis).map_err(|e| plot_error(&path, e))?;
        area.present().map_err(|e| plot_error(&path, e))?;
        written.push(name.to_string());
    }
    Ok(written)
}
