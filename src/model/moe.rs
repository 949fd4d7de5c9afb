//! Mixture of experts: a router picks `num_experts_per_tok` routed experts per token (by token id
//! in the first `num_hash_layers` blocks, by score elsewhere), plus one shared expert.
//!
//! Scores are `sqrt(softplus(gate @ y))`; the selection adds `e_score_correction_bias`, the
//! weights do not: they are the selected scores over their sum, times `routed_scaling_factor`.
//! Each expert is SwiGLU with `swiglu_limit` clamps, the routing weight applied before `w2`.

use crate::backend::cpu::{linear, linear_plain, ops, ops::silu};
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
    pub fn forward(&self, x: &[f32], weights: Option<&[f32]>, limit: f32) -> Vec<f32> {
        let gate = linear(&self.w1, x);
        let up = linear(&self.w3, x);
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
        linear(&self.w2, &h)
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
    pub fn route(&self, y: &[f32], tokens: &[u32]) -> (Vec<usize>, Vec<f32>) {
        let e = self.experts.len();
        let mut scores = linear_plain(&self.gate, y);
        for row in scores.chunks_mut(e) {
            match self.func {
                ScoringFunc::Sqrtsoftplus => {
                    row.iter_mut().for_each(|v| *v = ops::softplus(*v).sqrt())
                }
                ScoringFunc::Sigmoid => row.iter_mut().for_each(|v| *v = ops::sigmoid(*v)),
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
                    ops::top_k(&biased, k)
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
    pub fn forward(&self, y: &[f32], tokens: &[u32]) -> Vec<f32> {
        let d = self.gate.cols;
        let (ids, ws) = self.route(y, tokens);
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
            let r = self.experts[e].forward(&x, Some(&w), self.limit);
            for (&(t, _), rr) in rows.iter().zip(r.chunks(d)) {
                for (o, v) in out[t * d..(t + 1) * d].iter_mut().zip(rr) {
                    *o += v;
                }
            }
        }
        let s = self.shared.forward(y, None, self.limit);
        for (o, v) in out.iter_mut().zip(&s) {
            *o += v;
        }
        out
    }
}
