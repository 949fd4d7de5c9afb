//! Mixture of experts: a router picks `num_experts_per_tok` routed experts per token (by token id
//! in the first `num_hash_layers` blocks, by score elsewhere), plus one shared expert.
//!
//! Scores are `sqrt(softplus(gate @ y))`; the selection adds `e_score_correction_bias`, the
//! weights do not: they are the selected scores over their sum, times `routed_scaling_factor`.
//! Each expert is SwiGLU with `swiglu_limit` clamps, the routing weight applied before `w2`.

use crate::backend::cpu::{linear, linear_plain, ops, ops::silu, top_k, Numerics};
use crate::checkpoint::Checkpoint;
use crate::config::{Config, ScoringFunc};
use crate::error::{Error, Result};
use crate::weights::Matrix;

/// One SwiGLU expert.
pub struct Expert {
    /// Gate projection, `F x D`.
    pub w1: Matrix,
    /// Down projection, `D x F`.
    pub w2: Matrix,
    /// Up projection, `F x D`.
    pub w3: Matrix,
}

impl Expert {
    fn load(ck: &mut Checkpoint, prefix: &str, d: usize, f: usize) -> Result<Self> {
        Ok(Expert {
            w1: Matrix::load(ck, &format!("{prefix}.w1"), f, d)?,
            w2: Matrix::load(ck, &format!("{prefix}.w2"), d, f)?,
            w3: Matrix::load(ck, &format!("{prefix}.w3"), f, d)?,
        })
    }

    /// `w2((silu(min(w1 x, L)) * clamp(w3 x, -L, L)) * weight)` for `rows x D` inputs.
    pub fn forward(
        &self,
        x: &[f32],
        weights: Option<&[f32]>,
        limit: f32,
        num: Numerics,
    ) -> Vec<f32> {
        let gate = linear(&self.w1, x, num);
        let up = linear(&self.w3, x, num);
        let f = self.w1.rows;
        let mut h: Vec<f32> = gate
            .iter()
            .zip(&up)
            .map(|(&g, &u)| {
                let (g, u) = if limit > 0.0 {
                    (g.min(limit), u.clamp(-limit, limit))
                } else {
                    (g, u)
                };
                silu(g) * u
            })
            .collect();
        if let Some(w) = weights {
            for (row, &w) in h.chunks_mut(f).zip(w) {
                row.iter_mut().for_each(|v| *v *= w);
            }
        }
        linear(&self.w2, &h, num)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.w1.bytes() + self.w2.bytes() + self.w3.bytes()
    }
}

/// How a block picks experts.
enum Routing {
    /// By token id: `tid2eid[token]`.
    Hash(Vec<u32>),
    /// By score plus a selection bias.
    Score(Vec<f32>),
}

/// The MoE feed-forward of one block.
pub struct Moe {
    gate: Matrix,
    routing: Routing,
    /// Routed experts, addressable one by one.
    pub experts: Vec<Expert>,
    /// The always-on shared expert.
    pub shared: Expert,
    topk: usize,
    scale: f32,
    func: ScoringFunc,
    limit: f32,
}

impl Moe {
    /// Loads `{prefix}.gate`, `.experts.*`, `.shared_experts` of a block that routes by hash
    /// when `hash`.
    pub fn load(ck: &mut Checkpoint, prefix: &str, cfg: &Config, hash: bool) -> Result<Self> {
        let (d, f, e, k) = (
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.n_routed_experts,
            cfg.num_experts_per_tok,
        );
        let routing = if hash {
            let name = format!("{prefix}.gate.tid2eid");
            let t = ck.take(&name)?;
            t.expect_shape(&[cfg.vocab_size, k])?;
            let ids = t.to_i64()?;
            if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= e) {
                return Err(Error::Checkpoint(format!(
                    "tensor {name}: expert id {bad} outside 0..{e}"
                )));
            }
            Routing::Hash(ids.into_iter().map(|i| i as u32).collect())
        } else {
            Routing::Score(ck.take_f32(&format!("{prefix}.gate.bias"), &[e])?)
        };
        let gate = Matrix::load(ck, &format!("{prefix}.gate"), e, d)?;
        let experts = (0..e)
            .map(|i| Expert::load(ck, &format!("{prefix}.experts.{i}"), d, f))
            .collect::<Result<Vec<_>>>()?;
        Ok(Moe {
            gate,
            routing,
            experts,
            shared: Expert::load(ck, &format!("{prefix}.shared_experts"), d, f)?,
            topk: k,
            scale: cfg.routed_scaling_factor as f32,
            func: cfg.scoring_func,
            limit: cfg.swiglu_limit as f32,
        })
    }

    /// Experts and routing weights for each of `T` tokens (`T x topk` each).
    pub fn route(&self, y: &[f32], tokens: &[u32], num: Numerics) -> (Vec<usize>, Vec<f32>) {
        let e = self.experts.len();
        let mut scores = linear_plain(&self.gate, y, num);
        for row in scores.chunks_mut(e) {
            match self.func {
                ScoringFunc::Sqrtsoftplus => {
                    row.iter_mut().for_each(|v| *v = ops::softplus(*v).sqrt())
                }
                ScoringFunc::Sigmoid => row.iter_mut().for_each(|v| *v = ops::sigmoid_vec(*v)),
                ScoringFunc::Softmax => ops::softmax(row),
            }
        }
        let k = self.topk;
        let mut ids = Vec::with_capacity(tokens.len() * k);
        let mut ws = Vec::with_capacity(tokens.len() * k);
        for (t, row) in scores.chunks(e).enumerate() {
            let pick: Vec<usize> = match &self.routing {
                Routing::Hash(map) => map[tokens[t] as usize * k..(tokens[t] as usize + 1) * k]
                    .iter()
                    .map(|&i| i as usize)
                    .collect(),
                Routing::Score(bias) => {
                    let biased: Vec<f32> = row.iter().zip(bias).map(|(s, b)| s + b).collect();
                    top_k(&biased, k)
                }
            };
            let mut w: Vec<f32> = pick.iter().map(|&i| row[i]).collect();
            if self.func != ScoringFunc::Softmax {
                let s: f32 = w.iter().sum();
                w.iter_mut().for_each(|v| *v /= s);
            }
            w.iter_mut().for_each(|v| *v *= self.scale);
            ids.extend(pick);
            ws.extend(w);
        }
        (ids, ws)
    }

    /// The MoE output for `T x D` normed inputs.
    pub fn forward(&self, y: &[f32], tokens: &[u32], num: Numerics) -> Vec<f32> {
        let d = self.gate.cols;
        let (ids, ws) = self.route(y, tokens, num);
        let k = self.topk;
        let mut out = vec![0f32; y.len()];
        // Experts in ascending order, as the reference accumulates them.
        let mut by_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); self.experts.len()];
        for (i, (&e, &w)) in ids.iter().zip(&ws).enumerate() {
            by_expert[e].push((i / k, w));
        }
        for (e, rows) in by_expert.iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let x: Vec<f32> = rows
                .iter()
                .flat_map(|&(t, _)| &y[t * d..(t + 1) * d])
                .copied()
                .collect();
            let w: Vec<f32> = rows.iter().map(|&(_, w)| w).collect();
            let r = self.experts[e].forward(&x, Some(&w), self.limit, num);
            for (&(t, _), rr) in rows.iter().zip(r.chunks(d)) {
                for (o, v) in out[t * d..(t + 1) * d].iter_mut().zip(rr) {
                    *o += v;
                }
            }
        }
        let s = self.shared.forward(y, None, self.limit, num);
        for (o, v) in out.iter_mut().zip(&s) {
            *o += v;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::RawTensor;

    const D: usize = 128;
    const F: usize = 128;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2246822519).wrapping_add(seed) >> 9) % 997) as f32
                    / 4000.0
                    - 0.12
            })
            .collect()
    }

    fn moe(hash: bool) -> Moe {
        let mut cfg =
            Config::from_json(include_str!("../../tests/fixtures/tiny-a/config.json")).unwrap();
        (
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.n_routed_experts,
            cfg.num_experts_per_tok,
        ) = (D, F, 4, 2);
        (cfg.vocab_size, cfg.routed_scaling_factor, cfg.swiglu_limit) = (3, 1.5, 0.5);
        let mut t = vec![RawTensor::f32("m.gate.weight", &[4, D], &values(4 * D, 1))];
        if hash {
            let ids: Vec<u8> = [3i32, 1, 0, 2, 2, 2]
                .iter()
                .flat_map(|i| i.to_le_bytes())
                .collect();
            let mut r = RawTensor::f32("m.gate.tid2eid", &[3, 2], &[0.0; 6]);
            (r.dtype, r.data) = (
                safetensors::Dtype::I32,
                crate::checkpoint::Bytes::owned(ids),
            );
            t.push(r);
        } else {
            t.push(RawTensor::f32("m.gate.bias", &[4], &[0.0, 0.0, 10.0, 0.0]));
        }
        for (e, p) in (0..4)
            .map(|e| (e, format!("m.experts.{e}")))
            .chain([(4, "m.shared_experts".to_string())])
        {
            for (w, shape) in [("w1", [F, D]), ("w2", [D, F]), ("w3", [F, D])] {
                t.push(RawTensor::f32(
                    &format!("{p}.{w}.weight"),
                    &shape,
                    &values(F * D, 10 + e as u32),
                ));
            }
        }
        let mut ck = Checkpoint::from_tensors(t);
        let m = Moe::load(&mut ck, "m", &cfg, hash).unwrap();
        ck.finish().unwrap();
        m
    }

    #[test]
    fn bias_selects_but_does_not_weigh() {
        let m = moe(false);
        let y = values(D, 7);
        let (ids, ws) = m.route(&y, &[0], Numerics::BatchInvariant);
        // Expert 2 has a large selection bias, so it is always picked ...
        assert!(ids.contains(&2), "{ids:?}");
        // ... but the weights are its unbiased scores, normalized, times the scaling factor.
        let logits = linear_plain(&m.gate, &y, Numerics::BatchInvariant);
        let s: Vec<f32> = logits.iter().map(|&l| ops::softplus(l).sqrt()).collect();
        let sum: f32 = ids.iter().map(|&i| s[i]).sum();
        for (&i, &w) in ids.iter().zip(&ws) {
            assert!((w - s[i] / sum * 1.5).abs() < 1e-6);
        }
    }

    #[test]
    fn hash_layers_route_by_token_id() {
        let m = moe(true);
        let y = values(3 * D, 5);
        let (ids, ws) = m.route(&y, &[0, 1, 2], Numerics::BatchInvariant);
        assert_eq!(ids, vec![3, 1, 0, 2, 2, 2]);
        assert!((ws[4] + ws[5] - 1.5).abs() < 1e-6);
    }

    #[test]
    fn output_sums_routed_and_shared_experts() {
        let m = moe(true);
        let y = values(2 * D, 3);
        let out = m.forward(&y, &[0, 1], Numerics::BatchInvariant);
        let (ids, ws) = m.route(&y, &[0, 1], Numerics::BatchInvariant);
        for t in 0..2 {
            let x = &y[t * D..(t + 1) * D];
            let mut pairs: Vec<(usize, f32)> =
                (0..2).map(|j| (ids[t * 2 + j], ws[t * 2 + j])).collect();
            pairs.sort_by_key(|p| p.0);
            let mut want = vec![0f32; D];
            for (e, w) in pairs {
                let r = m.experts[e].forward(x, Some(&[w]), m.limit, Numerics::BatchInvariant);
                want.iter_mut().zip(&r).for_each(|(a, b)| *a += b);
            }
            let s = m.shared.forward(x, None, m.limit, Numerics::BatchInvariant);
            want.iter_mut().zip(&s).for_each(|(a, b)| *a += b);
            assert_eq!(&out[t * D..(t + 1) * D], &want[..]);
        }
    }

    #[test]
    fn swiglu_clamps_gate_and_up() {
        let m = moe(true);
        let e = &m.experts[0];
        let x = values(D, 2);
        let g = linear_plain(&e.w1, &x, Numerics::BatchInvariant);
        let u = linear_plain(&e.w3, &x, Numerics::BatchInvariant);
        let h: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| silu(g.min(0.5)) * u.clamp(-0.5, 0.5))
            .collect();
        assert_eq!(
            e.forward(&x, None, 0.5, Numerics::BatchInvariant),
            linear_plain(&e.w2, &h, Numerics::BatchInvariant)
        );
    }
}
