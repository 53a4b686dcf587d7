//! `tt-scale collage`: one PNG per prompt of a run folder, the per-round best images in one row,
//! each labelled `i=<round>` at its top-left corner.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};

/// Why collages could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CollageError {
    /// The folder could not be listed.
    #[error("cannot read the folder {path}: {source}")]
    ReadDir {
        /// The folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The folder holds no per-round results.
    #[error("{0} holds no per-round results (prompt@..._hash@..._i@<round>_s@<seed>.json); pass a run folder such as output/sd-v1.5/gemini/overall_score/20250101_120000")]
    NoResults(PathBuf),
    /// The collage could not be written.
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
}

/// One per-round result found in a run folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundFile {
    /// The sanitised prompt part of the name.
    pub name: String,
    /// The 8-hex-digit prompt hash.
    pub hash: String,
    /// The search round.
    pub round: usize,
    /// The file stem (the best image is `<stem>.png`).
    pub stem: String,
}

/// Parses a per-round JSON file name `prompt@<name>_hash@<sha8>_i@<round>_s@<label>.json`.
pub fn parse_round_file(file_name: &str) -> Option<RoundFile> {
    let stem = file_name.strip_suffix(".json")?;
    let rest = stem.strip_prefix("prompt@")?;
    let h = rest.rfind("_hash@")?;
    let name = &rest[..h];
    let after = &rest[h + "_hash@".len()..];
    let (hash, after) = after.split_once("_i@")?;
    if hash.len() != 8 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let (round, label) = after.split_once("_s@")?;
    let round: usize = round.parse().ok()?;
    if label.is_empty() {
        return None;
    }
    Some(RoundFile {
        name: name.to_string(),
        hash: hash.to_string(),
        round,
        stem: stem.to_string(),
    })
}

/// Makes one collage per prompt (grouped by prompt hash) in `dir` and returns their paths:
/// `collage_<name>_i@<min>-<max>.png` (with `_hash@<sha8>` added when two prompts share a
/// name).
pub fn make_collages(dir: &Path) -> Result<Vec<PathBuf>, CollageError> {
    let entries = std::fs::read_dir(dir).map_err(|source| CollageError::ReadDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut groups: BTreeMap<String, Vec<RoundFile>> = BTreeMap::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if let Some(rf) = parse_round_file(&file_name) {
            groups.entry(rf.hash.clone()).or_default().push(rf);
        }
    }
    if groups.is_empty() {
        return Err(CollageError::NoResults(dir.to_path_buf()));
    }
    let mut name_count: BTreeMap<String, usize> = BTreeMap::new();
    for files in groups.values() {
        *name_count.entry(files[0].name.clone()).or_default() += 1;
    }
    let mut written = Vec::new();
    for (hash, mut files) in groups {
        files.sort_by_key(|f| f.round);
        let mut images = Vec::with_capacity(files.len());
        for f in &files {
            let path = dir.join(format!("{}.png", f.stem));
            // A missing or corrupt image (an interrupted run, a disk error) leaves its place
            // out of this collage; the other collages are still made. A video shows its
            // first frame.
            match crate::output::media::read_media(&path) {
                Ok(media) => images.push((f.round, media.poster().into_owned())),
                Err(e) => tracing::warn!("collage: skipping {}: {e}", path.display()),
            }
        }
        if images.is_empty() {
            continue;
        }
        let collage = row_collage(&images);
        let name = &files[0].name;
        let (min, max) = (files[0].round, files[files.len() - 1].round);
        let suffix = if name_count.get(name).copied().unwrap_or(0) > 1 {
            format!("_hash@{hash}")
        } else {
            String::new()
        };
        let out = dir.join(format!("collage_{name}{suffix}_i@{min}-{max}.png"));
        crate::output::media::write_media(&out, &crate::media::Media::Image(collage))?;
        written.push(out);
    }
    Ok(written)
}

/// Pastes the images in one row, each in a cell the size of the first image (like diffusers'
/// `make_image_grid`), each labelled `i=<round>` at its top-left corner.
pub fn row_collage(images: &[(usize, RgbImage)]) -> RgbImage {
    let (w, h) = images
        .first()
        .map(|(_, i)| (i.width(), i.height()))
        .unwrap_or((1, 1));
    let mut canvas = RgbImage::new(w * images.len().max(1) as u32, h);
    for (k, (round, img)) in images.iter().enumerate() {
        let x0 = w * k as u32;
        for (x, y, p) in img.enumerate_pixels() {
            if x < w && y < h {
                canvas.put_pixel(x0 + x, y, *p);
            }
        }
        let scale = (h / 64).max(1);
        let margin = (h / 50).max(1);
        draw_text(
            &mut canvas,
            x0 + margin,
            margin,
            &format!("i={round}"),
            scale,
            x0 + w,
        );
    }
    canvas
}

/// 5x7 bitmap glyphs for the label characters, one row per byte (bit 4 is the leftmost pixel).
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'i' => [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        _ => [0; 7],
    }
}

/// Draws `text` in ivory with a dark outline at (x, y), `scale` pixels per font pixel, clipped
/// at `x_limit` and the canvas edges.
fn draw_text(canvas: &mut RgbImage, x: u32, y: u32, text: &str, scale: u32, x_limit: u32) {
    let ivory = Rgb([255, 255, 240]);
    let shadow = Rgb([0, 0, 0]);
    let (cw, ch) = (canvas.width().min(x_limit), canvas.height());
    let mut put = |px: u32, py: u32, color: Rgb<u8>| {
        if px < cw && py < ch {
            canvas.put_pixel(px, py, color);
        }
    };
    for pass in 0..2 {
        let (off, color) = if pass == 0 {
            (scale.div_ceil(2), shadow)
        } else {
            (0, ivory)
        };
        for (k, c) in text.chars().enumerate() {
            let gx = x + off + k as u32 * 6 * scale;
            for (row, bits) in glyph(c).iter().enumerate() {
                for col in 0..5u32 {
                    if bits & (0x10 >> col) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                put(
                                    gx + col * scale + dx,
                                    y + off + row as u32 * scale + dy,
                                    color,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_file_names_parse() {
        let f = parse_round_file("prompt@a_cat_hash@1234abcd_i@3_s@42.json").unwrap();
        assert_eq!(
            (f.name.as_str(), f.hash.as_str(), f.round),
            ("a_cat", "1234abcd", 3)
        );
        assert_eq!(f.stem, "prompt@a_cat_hash@1234abcd_i@3_s@42");
        let n = parse_round_file("prompt@x_hash@1234abcd_i@2_s@7-n99.json").unwrap();
        assert_eq!(n.round, 2);
        assert!(parse_round_file("config.json").is_none());
        assert!(parse_round_file("prompt@x_hash@1234abcd_i@2_failed.json").is_none());
        assert!(parse_round_file("prompt@x_hash@1234abcd_i@2_s@7.png").is_none());
    }

    #[test]
    fn collage_is_one_row_of_cells_with_labels() {
        let a = RgbImage::from_pixel(64, 64, Rgb([10, 20, 30]));
        let b = RgbImage::from_pixel(64, 64, Rgb([200, 100, 50]));
        let c = row_collage(&[(1, a), (2, b)]);
        assert_eq!(c.dimensions(), (128, 64));
        // Away from the label the cells keep their images.
        assert_eq!(*c.get_pixel(60, 60), Rgb([10, 20, 30]));
        assert_eq!(*c.get_pixel(124, 60), Rgb([200, 100, 50]));
        // The label is drawn in ivory near the top-left corner of each cell.
        let ivory = Rgb([255, 255, 240]);
        let has_label =
            |x0: u32| (x0..x0 + 32).any(|x| (0..16).any(|y| *c.get_pixel(x, y) == ivory));
        assert!(has_label(0) && has_label(64));
    }
}
