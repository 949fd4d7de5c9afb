//! Mixture of experts: a router picks `num_experts_per_tok` routed experts per token (by token id
//! in the first `num_hash_layers` blocks, by score elsewhere), plus one shared expert.
//!
//! Scores are `sqrt(softplus(gate @ y))`; the selection adds `e_score_correction_bias`, the
//! weights do not: they are the selected scores over their sum, times `routed_scaling_factor`.
//! Each expert is SwiGLU with `swiglu_limit` clamps, `w2(silu(min(w1 y, L)) * clamp(w3 y, -L,
//! L))`, the routing weight applied before `w2`.

use crate::backend::Device;
use crate::config::{Config, ScoringFunc};
use crate::error::{Error, Result};
use crate::model::Loader;

/// One SwiGLU expert.
pub struct Expert<D: Device> {
    /// Gate projection, `F x D`.
    pub w1: D::Weight,
    /// Down projection, `D x F`.
    pub w2: D::Weight,
    /// Up projection, `F x D`.
    pub w3: D::Weight,
}

impl<D: Device> Expert<D> {
    /// Loads `{prefix}.w1`, `.w2`, `.w3`, kept in host memory where `host`.
    fn load(l: &mut Loader<D>, prefix: &str, d: usize, f: usize, host: bool) -> Result<Self> {
        let mut m = |name: &str, rows: usize, cols: usize| {
            let name = format!("{prefix}.{name}");
            if host {
                l.host_matrix(&name, rows, cols)
            } else {
                l.matrix(&name, rows, cols)
            }
        };
        Ok(Expert {
            w1: m("w1", f, d)?,
            w2: m("w2", d, f)?,
            w3: m("w3", f, d)?,
        })
    }

    /// The expert without a routing weight (the shared expert).
    pub fn forward(&self, dev: &D, x: &D::Tensor, limit: f32) -> Result<D::Tensor> {
        let (gate, up) = dev.linear_pair(&self.w1, &self.w3, x)?;
        let h = dev.swiglu(&gate, &up, limit)?;
        dev.linear(&self.w2, &h)
    }
}

/// How a block picks experts.
pub enum Routing<D: Device> {
    /// By token id: `tid2eid[token]` (`V x topk`).
    Hash(D::Table),
    /// By score plus a selection bias.
    Score(D::Vector),
}

/// The MoE feed-forward of one block.
pub struct Moe<D: Device> {
    /// The router's weights, `E x D`.
    pub gate: D::Weight,
    /// How experts are picked.
    pub routing: Routing<D>,
    /// Routed experts, addressable one by one.
    pub experts: Vec<Expert<D>>,
    /// The experts as a set, as the device indexes them.
    pub set: D::Experts,
    /// The always-on shared expert.
    pub shared: Expert<D>,
    /// Experts per token.
    pub topk: usize,
    /// `routed_scaling_factor`.
    pub scale: f32,
    /// Gate scores from logits.
    pub func: ScoringFunc,
    /// SwiGLU clamp (0: none).
    pub limit: f32,
    /// Hidden size D.
    pub hidden: usize,
    /// Expert width F.
    pub inter: usize,
    /// While tracing, the distinct experts of the last batch routed.
    pub trace: std::sync::Mutex<Option<usize>>,
}

impl<D: Device> Moe<D> {
    /// Loads `{prefix}.gate`, `.experts.*`, `.shared_experts` of block `block` (MTP blocks
    /// after the main ones), which routes by hash when `hash`.
    pub fn load(
        l: &mut Loader<D>,
        prefix: &str,
        cfg: &Config,
        block: usize,
        hash: bool,
    ) -> Result<Self> {
        let (d, f, e, k) = (
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.n_routed_experts,
            cfg.num_experts_per_tok,
        );
        let routing = if hash {
            let name = format!("{prefix}.gate.tid2eid");
            let t = l.ck.take(&name)?;
            t.expect_shape(&[cfg.vocab_size, k])?;
            let ids = t.to_i64()?;
            if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= e) {
                return Err(Error::Checkpoint(format!(
                    "tensor {name}: expert id {bad} outside 0..{e}"
                )));
            }
            let ids: Vec<u32> = ids.into_iter().map(|i| i as u32).collect();
            Routing::Hash(l.dev.table(&ids)?)
        } else {
            Routing::Score(l.vector(&format!("{prefix}.gate.bias"), &[e])?)
        };
        let gate = l.matrix(&format!("{prefix}.gate"), e, d)?;
        let host = l.dev.experts_on_host(block, cfg.num_hidden_layers);
        let experts = (0..e)
            .map(|i| Expert::load(l, &format!("{prefix}.experts.{i}"), d, f, host))
            .collect::<Result<Vec<_>>>()?;
        Ok(Moe {
            gate,
            routing,
            set: l.dev.expert_set(&experts)?,
            experts,
            shared: Expert::load(l, &format!("{prefix}.shared_experts"), d, f, false)?,
            topk: k,
            scale: cfg.routed_scaling_factor as f32,
            func: cfg.scoring_func,
            limit: cfg.swiglu_limit as f32,
            hidden: d,
            inter: f,
            trace: std::sync::Mutex::new(None),
        })
    }

    /// The MoE output for the batch's `T x D` normed inputs.
    pub fn forward(&self, dev: &D, b: &D::Batch<'_>, y: &D::Tensor) -> Result<D::Tensor> {
        let (mut routed, shared) = self.forward_parts(dev, b, y)?;
        dev.add(&mut routed, &shared)?;
        Ok(routed)
    }

    /// The MoE output's two terms: the routed experts' sum and the shared expert's.
    pub fn forward_parts(
        &self,
        dev: &D,
        b: &D::Batch<'_>,
        y: &D::Tensor,
    ) -> Result<(D::Tensor, D::Tensor)> {
        // The routed experts and the shared one are independent until their sum: a device may
        // run them side by side (beside routed experts in host memory, the shared expert runs
        // on the GPU while the CPU computes them). The router's product comes first, alone:
        // the routed chain is the longer one, and beside the shared expert's first product its
        // blocks would wait for that one's to finish. The routed chain is the first of the
        // join, which follows the work before it directly (on a GPU, without a second stream's
        // start between).
        let mut logits = Some(dev.linear_plain(&self.gate, y)?);
        let ((route, out), shared) = dev.join(
            &mut logits,
            |l| {
                let logits = l.take().expect("the router's logits");
                let route = dev.route(self, b, logits)?;
                let out = dev.experts(self, &route, y)?;
                Ok((route, out))
            },
            |_| self.shared.forward(dev, y, self.limit),
        )?;
        if let Some(t) = self.trace.lock().expect("trace lock").as_mut() {
            *t = dev.distinct_experts(&route)?;
        }
        Ok((out, shared))
    }
}
