//! `tt-scale report`: one self-contained `report.html` for a run folder (and `summary.csv` /
//! `summary.json`, [`crate::sweep::summary_rows`]). Across prompts, the scaling curve: the best
//! score so far against NFEs spent and against wall time, mean and spread (min to max) over the
//! prompts, one panel per metric the verifiers recorded; per prompt, each round's candidates as
//! thumbnails with their scores, the round's choice framed. No script and no external resource:
//! the thumbnails are embedded PNGs, the charts inline SVG.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::media::{Media, Video};
use crate::sweep::{self, RunStatus, StatusError, SummaryRow};

/// Stroke colour of the curves (the screenshot check looks for it).
pub const CURVE_COLOUR: &str = "#d62728";
/// Frame colour of the chosen candidates' thumbnails (the screenshot check looks for it).
pub const CHOSEN_COLOUR: &str = "#1f77b4";
/// Thumbnail edge, pixels.
pub const THUMB: u32 = 96;

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The run folder could not be read.
    #[error(transparent)]
    Status(#[from] StatusError),
    /// No prompt of the run has finished.
    #[error("{0}: no prompt has finished yet, so there is nothing to report (tt-scale status shows where it stands)")]
    Empty(PathBuf),
    /// A file could not be written.
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
}

/// What `tt-scale report` wrote.
#[derive(Debug)]
pub struct Report {
    /// `report.html`.
    pub html: PathBuf,
    /// Prompts and rows reported.
    pub prompts: usize,
    /// Rows (prompt × round).
    pub rows: usize,
}

/// One point of a curve: the mean over prompts and its spread.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CurvePoint {
    /// The x value (mean NFEs or seconds spent by then).
    pub x: f64,
    /// Mean of the prompts' best so far.
    pub mean: f64,
    /// The lowest prompt's.
    pub min: f64,
    /// The highest prompt's.
    pub max: f64,
}

/// The scaling curve of `metric` by round: for each round number, over the prompts that reached
/// it, the mean of `x(row)` and the mean, min and max of the best so far (for the selection
/// metric, the best score so far; for another metric, that metric's score of the image that is
/// best so far under the selection metric: what the search does to the metrics it does not
/// optimise).
pub fn curve(
    rows: &[SummaryRow],
    metric: &str,
    x: impl Fn(&SummaryRow) -> Option<f64>,
) -> Vec<CurvePoint> {
    let mut by_round: BTreeMap<usize, Vec<(f64, f64)>> = BTreeMap::new();
    let mut carried: BTreeMap<&str, f64> = BTreeMap::new();
    for r in rows {
        let chosen_now = r.best_score.is_some() && r.best_score == r.best_so_far;
        let value = if r.metric == metric {
            r.best_so_far
        } else {
            if chosen_now {
                if let Some(v) = r.scores.get(metric) {
                    carried.insert(&r.prompt, *v);
                }
            }
            carried.get(r.prompt.as_str()).copied()
        };
        if let (Some(v), Some(xv)) = (value, x(r)) {
            by_round.entry(r.round).or_default().push((xv, v));
        }
    }
    by_round
        .values()
        .map(|pts| {
            let n = pts.len() as f64;
            CurvePoint {
                x: pts.iter().map(|p| p.0).sum::<f64>() / n,
                mean: pts.iter().map(|p| p.1).sum::<f64>() / n,
                min: pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min),
                max: pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max),
            }
        })
        .collect()
}

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An SVG line chart of `points` (mean line, min-max band), `w`×`h` pixels.
fn chart(points: &[CurvePoint], title: &str, x_label: &str) -> String {
    let (w, h, pad) = (420.0, 260.0, 48.0);
    let mut svg = format!(
        "<svg class=\"chart\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" xmlns=\"http://www.w3.org/2000/svg\"><title>{}</title>",
        esc(title)
    );
    let _ = write!(
        svg,
        "<rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"#ffffff\" stroke=\"#cccccc\"/>"
    );
    if points.is_empty() {
        svg.push_str("<text x=\"20\" y=\"40\">no data</text></svg>");
        return svg;
    }
    let (x0, x1) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.x), b.max(p.x))
        });
    let (y0, y1) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.min), b.max(p.max))
        });
    let span = |a: f64, b: f64| if (b - a).abs() < 1e-12 { 1.0 } else { b - a };
    let px = |x: f64| pad + (x - x0) / span(x0, x1) * (w - 2.0 * pad);
    let py = |y: f64| h - pad - (y - y0) / span(y0, y1) * (h - 2.0 * pad);
    let band: Vec<String> = points
        .iter()
        .map(|p| format!("{:.1},{:.1}", px(p.x), py(p.max)))
        .chain(
            points
                .iter()
                .rev()
                .map(|p| format!("{:.1},{:.1}", px(p.x), py(p.min))),
        )
        .collect();
    let _ = write!(
        svg,
        "<polygon points=\"{}\" fill=\"{CURVE_COLOUR}\" fill-opacity=\"0.15\" stroke=\"none\"/>",
        band.join(" ")
    );
    let line: Vec<String> = points
        .iter()
        .map(|p| format!("{:.1},{:.1}", px(p.x), py(p.mean)))
        .collect();
    let _ = write!(
        svg,
        "<polyline points=\"{}\" fill=\"none\" stroke=\"{CURVE_COLOUR}\" stroke-width=\"3\"/>",
        line.join(" ")
    );
    for p in points {
        let _ = write!(
            svg,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{CURVE_COLOUR}\"><title>{:.4} (min {:.4}, max {:.4}) at {:.1}</title></circle>",
            px(p.x),
            py(p.mean),
            p.mean,
            p.min,
            p.max,
            p.x
        );
    }
    let _ = write!(
        svg,
        "<line x1=\"{pad}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#333\"/><line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{0}\" stroke=\"#333\"/>",
        h - pad,
        w - pad
    );
    let _ = write!(
        svg,
        "<text x=\"{pad}\" y=\"{}\" font-size=\"11\">{x0:.digits$}</text><text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">{x1:.digits$}</text>",
        h - pad + 16.0,
        w - pad,
        h - pad + 16.0,
        digits = if x1 - x0 < 10.0 { 2 } else { 0 }
    );
    let _ = write!(
        svg,
        "<text x=\"4\" y=\"{}\" font-size=\"11\">{y0:.3}</text><text x=\"4\" y=\"{}\" font-size=\"11\">{y1:.3}</text>",
        h - pad,
        pad + 4.0
    );
    let _ = write!(
        svg,
        "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\">{}</text><text x=\"{}\" y=\"18\" font-size=\"13\" text-anchor=\"middle\" font-weight=\"bold\">{}</text></svg>",
        w / 2.0,
        h - 8.0,
        esc(x_label),
        w / 2.0,
        esc(title)
    );
    svg
}

/// A thumbnail of the media file at `path` as a `data:` URL (PNG; a video's an animated PNG
/// that plays in the page), or `None` if it cannot be read.
fn thumbnail(path: &Path) -> Option<String> {
    use base64::Engine as _;
    let media = crate::output::media::read_media(path).ok()?;
    let (w, h) = media.dimensions();
    let scale = f64::from(THUMB) / f64::from(w.max(h).max(1));
    let small = |img: &image::RgbImage| {
        image::imageops::thumbnail(
            img,
            ((f64::from(w) * scale).round() as u32).max(1),
            ((f64::from(h) * scale).round() as u32).max(1),
        )
    };
    let bytes = match &media {
        Media::Image(img) => {
            let mut bytes = std::io::Cursor::new(Vec::new());
            small(img)
                .write_to(&mut bytes, image::ImageFormat::Png)
                .ok()?;
            bytes.into_inner()
        }
        Media::Video(v) => crate::output::media::encode_apng(&Video {
            frames: v.frames.iter().map(small).collect(),
            fps: v.fps,
        })
        .ok()?,
    };
    Some(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

/// The HTML of one prompt: its rounds, each a row of candidate thumbnails with scores.
fn prompt_section(run_dir: &Path, prompt: &str, rows: &[&SummaryRow]) -> String {
    let mut out = format!("<section class=\"prompt\"><h2>{}</h2>", esc(prompt));
    for r in rows {
        let json_name = r.best_image.as_ref().map(|b| b.replace(".png", ".json"));
        let round: Option<serde_json::Value> = json_name
            .and_then(|n| std::fs::read(run_dir.join(n)).ok())
            .and_then(|b| serde_json::from_slice(&b).ok());
        let _ = write!(
            out,
            "<div class=\"round\" data-prompt=\"{}\" data-round=\"{}\"><h3>round {} · best {} = <span class=\"best\" data-score=\"{}\">{}</span> · best so far <span class=\"so-far\" data-score=\"{}\">{}</span> · NFEs so far {}</h3><div class=\"cands\">",
            esc(prompt),
            r.round,
            r.round,
            esc(&r.metric),
            r.best_score.map_or_else(String::new, |v| v.to_string()),
            r.best_score.map_or_else(|| "-".into(), |v| format!("{v:.4}")),
            r.best_so_far.map_or_else(String::new, |v| v.to_string()),
            r.best_so_far.map_or_else(|| "-".into(), |v| format!("{v:.4}")),
            r.nfe_so_far.map_or_else(|| "?".into(), |v| v.to_string()),
        );
        let candidates = round
            .as_ref()
            .and_then(|v| v["candidates"].as_array().cloned())
            .unwrap_or_default();
        for c in &candidates {
            let file = c["img_path"]
                .as_str()
                .and_then(|p| Path::new(p).file_name())
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_default();
            let chosen = Some(&file) == r.best_image.as_ref();
            let score = c["score"]["score"].as_f64();
            let src = thumbnail(&run_dir.join(&file)).unwrap_or_default();
            let _ = write!(
                out,
                "<figure class=\"cand{}\"><img src=\"{src}\" alt=\"{}\" width=\"{THUMB}\"><figcaption data-score=\"{}\">{}</figcaption></figure>",
                if chosen { " chosen" } else { "" },
                esc(c["label"].as_str().unwrap_or_default()),
                score.map_or_else(String::new, |v| v.to_string()),
                score.map_or_else(|| "failed".into(), |v| format!("{v:.4}")),
            );
        }
        out.push_str("</div></div>");
    }
    out.push_str("</section>");
    out
}

/// Writes `report.html`, `summary.csv` and `summary.json` into `run_dir`.
pub fn report(run_dir: &Path) -> Result<Report, ReportError> {
    let status: RunStatus = sweep::status(run_dir)?;
    let rows = sweep::summary_rows(run_dir, &status)?;
    if rows.is_empty() {
        return Err(ReportError::Empty(run_dir.to_path_buf()));
    }
    sweep::write_summaries(run_dir, &status, &rows)?;
    let selection = rows[0].metric.clone();
    let mut metrics: Vec<String> = vec![selection.clone()];
    for m in rows.iter().flat_map(|r| r.scores.keys()) {
        if !metrics.contains(m) {
            metrics.push(m.clone());
        }
    }
    let mut html = String::from(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>tt-scale report</title><style>\
         body{font-family:sans-serif;margin:16px;color:#222;background:#fafafa}\
         .charts{display:flex;flex-wrap:wrap;gap:12px}\
         .cands{display:flex;flex-wrap:wrap;gap:6px}\
         figure{margin:0;padding:3px;border:3px solid transparent;text-align:center;font-size:11px}\
         figure.chosen{border-color:",
    );
    html.push_str(CHOSEN_COLOUR);
    html.push_str(
        "}h2{font-size:16px;margin-top:24px}h3{font-size:13px;font-weight:normal}</style></head><body>",
    );
    let done = status.count(sweep::PromptState::Done);
    let _ = write!(
        html,
        "<h1>tt-scale report</h1><p>{} · {} of {} prompt(s) finished · selection metric <b>{}</b> · NFEs {} · verifier calls {}</p>",
        esc(&run_dir.display().to_string()),
        done,
        status.prompts.len(),
        esc(&selection),
        status.nfe.map_or_else(|| "unknown".into(), |n| n.to_string()),
        status.verifier_calls
    );
    html.push_str(
        "<h2>Scaling: best so far, mean over prompts (band: min to max)</h2><div class=\"charts\">",
    );
    for m in &metrics {
        let by_nfe = curve(&rows, m, |r| r.nfe_so_far.map(|n| n as f64));
        let by_time = curve(&rows, m, |r| r.elapsed_s);
        html.push_str(&chart(&by_nfe, &format!("{m} vs NFEs"), "NFEs spent"));
        html.push_str(&chart(
            &by_time,
            &format!("{m} vs wall time"),
            "seconds (prompt start to round end)",
        ));
    }
    html.push_str("</div>");
    let mut by_prompt: Vec<(&str, Vec<&SummaryRow>)> = Vec::new();
    for r in &rows {
        match by_prompt.last_mut() {
            Some((p, v)) if *p == r.prompt => v.push(r),
            _ => by_prompt.push((&r.prompt, vec![r])),
        }
    }
    for (prompt, prompt_rows) in &by_prompt {
        html.push_str(&prompt_section(run_dir, prompt, prompt_rows));
    }
    html.push_str("</body></html>\n");
    let path = run_dir.join("report.html");
    crate::output::write_atomic(&path, html.as_bytes())?;
    Ok(Report {
        html: path,
        prompts: by_prompt.len(),
        rows: rows.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(prompt: &str, round: usize, best: f64, so_far: f64, other: f64) -> SummaryRow {
        SummaryRow {
            prompt: prompt.into(),
            shard: 0,
            round,
            candidates: 2,
            metric: "m".into(),
            best_label: Some("1".into()),
            best_score: Some(best),
            best_so_far: Some(so_far),
            nfe: Some(10),
            nfe_so_far: Some(10 * round as u64),
            verifier_calls_so_far: 2 * round as u64,
            elapsed_s: Some(round as f64),
            best_image: None,
            scores: [("other".to_string(), other)].into_iter().collect(),
        }
    }

    #[test]
    fn the_curve_averages_the_best_so_far_and_carries_other_metrics_of_the_chosen_image() {
        let rows = vec![
            row("a", 1, 1.0, 1.0, 0.5),
            row("a", 2, 0.5, 1.0, 0.9), // not better: the chosen image stays round 1's
            row("b", 1, 3.0, 3.0, 0.1),
            row("b", 2, 4.0, 4.0, 0.3),
        ];
        let c = curve(&rows, "m", |r| r.nfe_so_far.map(|n| n as f64));
        assert_eq!(c.len(), 2);
        assert_eq!(
            (c[0].x, c[0].mean, c[0].min, c[0].max),
            (10.0, 2.0, 1.0, 3.0)
        );
        assert_eq!((c[1].x, c[1].mean), (20.0, 2.5));
        let o = curve(&rows, "other", |r| r.elapsed_s);
        assert_eq!(o[1].mean, (0.5 + 0.3) / 2.0);
        assert!(chart(&c, "t", "x").contains(CURVE_COLOUR));
        assert!(esc("<a&\"b\">") == "&lt;a&amp;&quot;b&quot;&gt;");
    }
}
