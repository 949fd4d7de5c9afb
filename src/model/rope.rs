//! Rotary position embedding on the last R dims of a head, with YaRN for compressed layers.
//!
//! Pairs are adjacent dims (2i, 2i+1) rotated as complex numbers. Frequencies and angles are
//! computed in f32 in the reference's order (`angle = f32(t) * freq`), so positions far into the
//! context rotate by exactly the reference's angle.

use crate::backend::Device;
use crate::config::Config;
use crate::error::Result;

/// A block's rotation: its frequencies on the host and on the device.
pub struct Rope<D: Device> {
    /// The frequencies.
    pub freqs: Freqs,
    /// The same, where the device reads them.
    pub table: D::Vector,
}

impl<D: Device> Rope<D> {
    /// The RoPE of a block with compress ratio `ratio` (see [`Freqs::for_ratio`]).
    pub fn for_ratio(dev: &D, cfg: &Config, ratio: usize) -> Result<Self> {
        let freqs = Freqs::for_ratio(cfg, ratio);
        Ok(Rope {
            table: dev.vector(&freqs.freqs)?,
            freqs,
        })
    }
}

/// Frequencies of one RoPE flavour.
#[derive(Clone, Debug)]
pub struct Freqs {
    /// `freq_i`, one per rotated pair.
    pub freqs: Vec<f32>,
}

/// `cos`/`sin` of every frequency at one position.
pub type CosSin = Vec<(f32, f32)>;

impl Freqs {
    /// The RoPE of a block with compress ratio `ratio`: plain `rope_theta` for window-only
    /// blocks, `compress_rope_theta` with YaRN otherwise.
    pub fn for_ratio(cfg: &Config, ratio: usize) -> Self {
        let dim = cfg.qk_rope_head_dim;
        if ratio == 0 {
            return Self::new(dim, cfg.rope_theta, None);
        }
        let yarn = cfg.rope_scaling.as_ref().map(|r| Yarn {
            factor: r.factor,
            original: r.original_max_position_embeddings as f64,
            beta_fast: r.beta_fast,
            beta_slow: r.beta_slow,
        });
        Self::new(dim, cfg.compress_rope_theta, yarn)
    }

    /// Plain RoPE over `dim` dims with base `base`.
    pub fn plain(dim: usize, base: f64) -> Self {
        Self::new(dim, base, None)
    }

    fn new(dim: usize, base: f64, yarn: Option<Yarn>) -> Self {
        let half = dim / 2;
        let mut freqs: Vec<f32> = (0..half)
            .map(|i| {
                let e = (2 * i) as f32 / dim as f32;
                1.0 / ((base as f32 as f64).powf(e as f64) as f32)
            })
            .collect();
        if let Some(y) = yarn.filter(|y| y.original > 0.0) {
            let corr = |rot: f64| {
                dim as f64 * (y.original / (rot * 2.0 * std::f64::consts::PI)).ln()
                    / (2.0 * base.ln())
            };
            let low = corr(y.beta_fast).floor().max(0.0);
            let mut high = corr(y.beta_slow).ceil().min(dim as f64 - 1.0);
            if low == high {
                high += 0.001;
            }
            let factor = y.factor as f32;
            for (i, f) in freqs.iter_mut().enumerate() {
                let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
                let smooth = 1.0 - ramp;
                *f = *f / factor * (1.0 - smooth) + *f * smooth;
            }
        }
        Freqs { freqs }
    }

    /// `cos`/`sin` of each frequency at position `pos`, in f32 as the reference's `torch.polar`
    /// (the C library's `cosf`/`sinf`).
    pub fn at(&self, pos: usize) -> CosSin {
        self.freqs
            .iter()
            .map(|f| {
                let a = pos as f32 * f;
                (a.cos(), a.sin())
            })
            .collect()
    }

    /// Rotates the last `2 * freqs` dims of `x` by `cs` (by its inverse when `inverse`).
    pub fn apply(x: &mut [f32], cs: &CosSin, inverse: bool) {
        let start = x.len() - 2 * cs.len();
        for (p, &(c, s)) in x[start..].chunks_exact_mut(2).zip(cs) {
            let (a, b) = (p[0], p[1]);
            if inverse {
                p[0] = a * c + b * s;
                p[1] = b * c - a * s;
            } else {
                p[0] = a * c - b * s;
                p[1] = a * s + b * c;
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Yarn {
    factor: f64,
    original: f64,
    beta_fast: f64,
    beta_slow: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_undoes_rotation() {
        let r = Freqs::new(8, 10000.0, None);
        let mut x = [0.5, 1.0, -2.0, 3.0, 0.25, -1.0, 4.0, 2.0, 1.5, -0.5];
        let orig = x;
        let cs = r.at(1234);
        Freqs::apply(&mut x, &cs, false);
        assert_ne!(x, orig);
        assert_eq!(x[..2], orig[..2]);
        Freqs::apply(&mut x, &cs, true);
        for (a, b) in x.iter().zip(orig) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn yarn_interpolates_only_low_frequencies() {
        let plain = Freqs::new(64, 160000.0, None);
        let y = Yarn {
            factor: 16.0,
            original: 65536.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
        };
        let yarn = Freqs::new(64, 160000.0, Some(y));
        // Highest frequencies (many rotations over the original context) are untouched.
        assert_eq!(plain.freqs[0], yarn.freqs[0]);
        // Lowest frequencies are divided by the factor.
        let last = plain.freqs.len() - 1;
        assert!((yarn.freqs[last] * 16.0 / plain.freqs[last] - 1.0).abs() < 1e-6);
        // Base frequencies: theta^(-2i/d).
        assert!((plain.freqs[1] - 160000f32.powf(-2.0 / 64.0)).abs() < 1e-7);
    }
}
