//! Zero-order neighbours: points on the sphere of the base noise's norm at a fixed cosine
//! similarity from it, in a seeded random direction.

use crate::noise::{torch_randn, Noise, RandnKernel};

/// The neighbour of `base` at cosine similarity `threshold` in the direction drawn with
/// `direction_seed`:
///
/// `v = randn(direction_seed)` (float32, as torch draws it, widened to float64),
/// `u = x / |x|`, `w = (v - (v.u) u) / |v - (v.u) u|`,
/// `neighbor = |x| (t u + sqrt(1 - t^2) w)`, rounded to float32.
///
/// This is the original's `generate_neighbors` formula with a reproducible direction, so the
/// neighbour can be rebuilt from (base seed, direction seed, threshold) in any language.
pub fn neighbor(base: &Noise, threshold: f64, direction_seed: u64, kernel: RandnKernel) -> Noise {
    let v = torch_randn(direction_seed, &base.shape, kernel);
    let norm = base
        .data
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    let inv = 1.0 / norm.max(1e-12);
    let dot: f64 = base
        .data
        .iter()
        .zip(&v.data)
        .map(|(&x, &v)| f64::from(x) * inv * f64::from(v))
        .sum();
    let ortho: Vec<f64> = base
        .data
        .iter()
        .zip(&v.data)
        .map(|(&x, &v)| f64::from(v) - dot * f64::from(x) * inv)
        .collect();
    let ortho_norm = ortho.iter().map(|o| o * o).sum::<f64>().sqrt().max(1e-12);
    let s = (1.0 - threshold * threshold).max(0.0).sqrt();
    let data = base
        .data
        .iter()
        .zip(&ortho)
        .map(|(&x, &o)| (norm * (threshold * f64::from(x) * inv + s * o / ortho_norm)) as f32)
        .collect();
    Noise {
        shape: base.shape.clone(),
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &[f32], b: &[f32]) -> f64 {
        let dot: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum();
        let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        dot / (na * nb)
    }

    #[test]
    fn neighbor_lies_on_the_same_sphere_at_the_threshold_cosine() {
        let base = torch_randn(7, &[1, 4, 8, 8], RandnKernel::Portable);
        for t in [0.5, 0.9, 0.95, 0.999] {
            let n = neighbor(&base, t, 99, RandnKernel::Portable);
            assert!((cosine(&base.data, &n.data) - t).abs() < 1e-5, "t={t}");
            let nb: f64 = base.data.iter().map(|x| f64::from(*x).powi(2)).sum();
            let nn: f64 = n.data.iter().map(|x| f64::from(*x).powi(2)).sum();
            assert!((nb.sqrt() - nn.sqrt()).abs() / nb.sqrt() < 1e-5);
        }
    }

    #[test]
    fn the_direction_seed_decides_the_neighbor() {
        let base = torch_randn(7, &[1, 4, 8, 8], RandnKernel::Portable);
        let a = neighbor(&base, 0.95, 1, RandnKernel::Portable);
        let b = neighbor(&base, 0.95, 1, RandnKernel::Portable);
        let c = neighbor(&base, 0.95, 2, RandnKernel::Portable);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
