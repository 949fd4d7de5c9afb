//! The model configuration, read from a Hugging Face `config.json` with `model_type: deepseek_v4`.
//!
//! Every value comes from the file; nothing is hard-coded per model size. Keys that later V4
//! releases add and that hadal does not implement (the DSpark drafter) are refused by name.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// YaRN context extension, applied to the RoPE of compressed layers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// Always `yarn` for V4.
    #[serde(rename = "type", alias = "rope_type")]
    pub kind: String,
    /// Interpolation factor for low frequencies.
    pub factor: f64,
    /// Context length the base frequencies were trained for.
    pub original_max_position_embeddings: u64,
    /// Number of rotations above which a frequency is left alone.
    pub beta_fast: f64,
    /// Number of rotations below which a frequency is fully interpolated.
    pub beta_slow: f64,
}

/// The FP8 quantization a checkpoint declares.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    /// `fp8`.
    pub quant_method: String,
    /// `e4m3`.
    pub fmt: String,
    /// `ue8m0`: power-of-two scales.
    #[serde(default)]
    pub scale_fmt: Option<String>,
    /// `[128, 128]`.
    pub weight_block_size: Vec<usize>,
    /// `dynamic`: activations are quantized on the fly.
    #[serde(default)]
    pub activation_scheme: Option<String>,
}

/// How the router turns gate logits into expert scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoringFunc {
    /// `sqrt(softplus(x))` (V4).
    Sqrtsoftplus,
    /// `sigmoid(x)`.
    Sigmoid,
    /// `softmax(x)` over experts.
    Softmax,
}

/// A DeepSeek V4 configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Must be `deepseek_v4`.
    pub model_type: String,
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// Hidden size D.
    pub hidden_size: usize,
    /// Number of main blocks.
    pub num_hidden_layers: usize,
    /// Leading blocks that route experts by token id.
    pub num_hash_layers: usize,
    /// Number of MTP blocks.
    pub num_nextn_predict_layers: usize,
    /// Query heads H.
    pub num_attention_heads: usize,
    /// KV heads: V4 shares one KV head.
    #[serde(default = "one")]
    pub num_key_value_heads: usize,
    /// Routed experts E.
    pub n_routed_experts: usize,
    /// Shared experts (V4: 1).
    #[serde(default = "one")]
    pub n_shared_experts: usize,
    /// Routed experts per token.
    pub num_experts_per_tok: usize,
    /// Expert width F.
    pub moe_intermediate_size: usize,
    /// Router score function.
    pub scoring_func: ScoringFunc,
    /// Factor on the normalized routing weights.
    pub routed_scaling_factor: f64,
    /// Whether the selected scores are renormalized (V4: true).
    #[serde(default = "yes")]
    pub norm_topk_prob: bool,
    /// Clamp inside SwiGLU (0 disables it).
    #[serde(default)]
    pub swiglu_limit: f64,
    /// Activation (V4: silu).
    #[serde(default = "silu")]
    pub hidden_act: String,
    /// Low-rank query width.
    pub q_lora_rank: usize,
    /// Head dim Dh, also the KV width.
    pub head_dim: usize,
    /// RoPE dims R at the end of each head.
    pub qk_rope_head_dim: usize,
    /// Output projection groups G.
    pub o_groups: usize,
    /// Output low rank per group.
    pub o_lora_rank: usize,
    /// Sliding window W.
    pub sliding_window: usize,
    /// Compress ratio per main block, then per MTP block (0, 4 or 128).
    pub compress_ratios: Vec<usize>,
    /// RoPE base of compressed layers.
    pub compress_rope_theta: f64,
    /// RoPE base of window-only layers.
    pub rope_theta: f64,
    /// YaRN; absent means plain RoPE everywhere.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Lightning indexer heads.
    pub index_n_heads: usize,
    /// Lightning indexer head dim.
    pub index_head_dim: usize,
    /// Compressed blocks a CSA query attends to.
    pub index_topk: usize,
    /// Hyper-connection copies M.
    pub hc_mult: usize,
    /// Sinkhorn iterations of the mHC mixing matrix.
    pub hc_sinkhorn_iters: usize,
    /// Epsilon inside mHC.
    pub hc_eps: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Longest supported context.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token.
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// V4 never ties embeddings.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// `fp4` for packed FP4 routed experts; absent means FP8 experts.
    #[serde(default)]
    pub expert_dtype: Option<String>,
    /// FP8 block quantization; absent means an unquantized (BF16) checkpoint.
    #[serde(default)]
    pub quantization_config: Option<QuantizationConfig>,
    /// Keys of later releases that are refused (kept to name them in the error).
    #[serde(default, skip_serializing)]
    dspark_target_layer_ids: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    dspark_block_size: Option<serde_json::Value>,
}

fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}

/// The attention flavour of a block, from its compress ratio.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum LayerKind {
    /// c = 0: sliding window only.
    Window,
    /// c = 4: compressed sparse attention with the lightning indexer.
    Csa,
    /// c = 128: heavily compressed dense attention.
    Hca,
}

impl LayerKind {
    /// Name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            LayerKind::Window => "window (c=0)",
            LayerKind::Csa => "CSA (c=4)",
            LayerKind::Hca => "HCA (c=128)",
        }
    }
}

impl Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// Parses and validates a configuration from JSON text.
    pub fn from_json(text: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::Config(format!("not JSON: {e}")))?;
        match value.get("model_type").and_then(|v| v.as_str()) {
            Some("deepseek_v4") => {}
            Some(other) => {
                return Err(Error::Config(format!(
                    "model_type is {other:?}; hadal runs only \"deepseek_v4\""
                )))
            }
            None => return Err(Error::Config("missing key `model_type`".into())),
        }
        let cfg: Config = serde_json::from_value(value).map_err(|e| {
            let msg = e.to_string();
            Error::Config(msg.replace("missing field", "missing key"))
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.dspark_target_layer_ids.is_some() || self.dspark_block_size.is_some() {
            return bad("the DSpark drafter (`dspark_target_layer_ids`, `dspark_block_size`) is not supported by this version of hadal".into());
        }
        let expected = self.num_hidden_layers + self.num_nextn_predict_layers;
        if self.compress_ratios.len() != expected {
            return bad(format!(
                "compress_ratios has {} entries; expected num_hidden_layers + num_nextn_predict_layers = {expected} (longer lists belong to releases with extra MTP/DSpark blocks, which are not supported)",
                self.compress_ratios.len()
            ));
        }
        if let Some((i, c)) = self
            .compress_ratios
            .iter()
            .enumerate()
            .find(|(_, c)| ![0, 4, 128].contains(*c))
        {
            return bad(format!(
                "compress_ratios[{i}] = {c}; only 0, 4 and 128 are defined"
            ));
        }
        let checks: [(bool, String); 16] = [
            (self.num_key_value_heads == 1, format!("num_key_value_heads = {}; V4 attention has one shared KV head", self.num_key_value_heads)),
            (self.n_shared_experts == 1, format!("n_shared_experts = {}; only 1 is supported", self.n_shared_experts)),
            (self.hidden_act == "silu", format!("hidden_act = {:?}; only \"silu\" is supported", self.hidden_act)),
            (!self.tie_word_embeddings, "tie_word_embeddings = true is not a V4 layout".into()),
            (self.qk_rope_head_dim.is_multiple_of(2) && self.qk_rope_head_dim < self.head_dim, format!("qk_rope_head_dim = {} must be even and below head_dim = {}", self.qk_rope_head_dim, self.head_dim)),
            (self.head_dim.saturating_sub(self.qk_rope_head_dim).is_multiple_of(64), format!("head_dim - qk_rope_head_dim = {} must be a multiple of 64 (FP8 KV blocks)", self.head_dim.saturating_sub(self.qk_rope_head_dim))),
            (self.num_attention_heads.is_multiple_of(self.o_groups.max(1)) && self.o_groups > 0, format!("num_attention_heads = {} is not divisible by o_groups = {}", self.num_attention_heads, self.o_groups)),
            (self.index_head_dim.is_power_of_two() && self.index_head_dim.is_multiple_of(32) && self.index_head_dim >= self.qk_rope_head_dim, format!("index_head_dim = {} must be a power of two, a multiple of 32 and at least qk_rope_head_dim", self.index_head_dim)),
            (self.num_experts_per_tok >= 1 && self.num_experts_per_tok <= self.n_routed_experts, format!("num_experts_per_tok = {} with n_routed_experts = {}", self.num_experts_per_tok, self.n_routed_experts)),
            (self.hc_mult >= 1 && self.hc_sinkhorn_iters >= 1, format!("hc_mult = {}, hc_sinkhorn_iters = {} must be at least 1", self.hc_mult, self.hc_sinkhorn_iters)),
            (self.sliding_window >= 1, "sliding_window must be at least 1".into()),
            (self.index_topk >= 1, "index_topk must be at least 1".into()),
            (self.num_hash_layers <= self.num_hidden_layers, format!("num_hash_layers = {} exceeds num_hidden_layers = {}", self.num_hash_layers, self.num_hidden_layers)),
            (self.vocab_size >= 1 && self.hidden_size >= 1, "vocab_size and hidden_size must be positive".into()),
            (self.quantization_config.as_ref().is_none_or(|q| q.quant_method == "fp8" && q.fmt == "e4m3" && q.weight_block_size == [128, 128]), "quantization_config must be fp8 e4m3 with weight_block_size [128, 128]".into()),
            (matches!(self.expert_dtype.as_deref(), None | Some("fp4") | Some("fp8")), format!("expert_dtype = {:?}; expected \"fp4\" or \"fp8\"", self.expert_dtype)),
        ];
        for (ok, msg) in checks {
            if !ok {
                return bad(msg);
            }
        }
        // Sizes far beyond any V4 model are refused, so that size arithmetic cannot overflow.
        for (name, v, max) in [
            ("vocab_size", self.vocab_size, 1 << 22),
            ("hidden_size", self.hidden_size, 1 << 16),
            ("num_hidden_layers", self.num_hidden_layers, 1 << 10),
            (
                "num_nextn_predict_layers",
                self.num_nextn_predict_layers,
                16,
            ),
            ("num_attention_heads", self.num_attention_heads, 1 << 10),
            ("n_routed_experts", self.n_routed_experts, 1 << 12),
            ("moe_intermediate_size", self.moe_intermediate_size, 1 << 16),
            ("q_lora_rank", self.q_lora_rank, 1 << 16),
            ("o_lora_rank", self.o_lora_rank, 1 << 16),
            ("head_dim", self.head_dim, 1 << 12),
            ("sliding_window", self.sliding_window, 1 << 20),
            ("index_n_heads", self.index_n_heads, 1 << 10),
            ("index_head_dim", self.index_head_dim, 1 << 12),
            ("index_topk", self.index_topk, 1 << 24),
            ("hc_mult", self.hc_mult, 16),
            ("hc_sinkhorn_iters", self.hc_sinkhorn_iters, 1 << 10),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 30,
            ),
        ] {
            if v > max {
                return bad(format!(
                    "{name} = {v} is beyond any supported model (at most {max})"
                ));
            }
        }
        // Activations entering an FP8/FP4 linear are quantized in blocks of 128.
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("q_lora_rank", self.q_lora_rank),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("o_groups * o_lora_rank", self.o_groups * self.o_lora_rank),
        ] {
            if v == 0 || v % 128 != 0 {
                return bad(format!(
                    "{name} = {v} must be a positive multiple of 128 (FP8 activation blocks)"
                ));
            }
        }
        if let Some(r) = &self.rope_scaling {
            if r.kind != "yarn" {
                return bad(format!(
                    "rope_scaling.type = {:?}; only \"yarn\" is supported",
                    r.kind
                ));
            }
        }
        Ok(())
    }

    /// The model cut to its first `n` main blocks, without MTP blocks (what `hadal bench` and
    /// `hadal score --config` run when a whole model does not fit or is not needed).
    pub fn first_layers(&self, n: usize) -> Result<Config> {
        if n == 0 || n > self.num_hidden_layers {
            return Err(Error::Config(format!(
                "--layers {n}: the model has {} main layers",
                self.num_hidden_layers
            )));
        }
        let mut c = self.clone();
        c.num_hidden_layers = n;
        c.num_nextn_predict_layers = 0;
        c.num_hash_layers = c.num_hash_layers.min(n);
        c.compress_ratios.truncate(n);
        c.validate()?;
        Ok(c)
    }

    /// Number of blocks with weights: main blocks then MTP blocks.
    pub fn total_blocks(&self) -> usize {
        self.compress_ratios.len()
    }

    /// Compress ratio of block `i` (main blocks first, then MTP blocks).
    pub fn ratio(&self, i: usize) -> usize {
        self.compress_ratios[i]
    }

    /// Attention flavour of block `i`.
    pub fn kind(&self, i: usize) -> LayerKind {
        match self.compress_ratios[i] {
            0 => LayerKind::Window,
            4 => LayerKind::Csa,
            _ => LayerKind::Hca,
        }
    }

    /// Whether routed experts are packed FP4.
    pub fn fp4_experts(&self) -> bool {
        self.expert_dtype.as_deref() == Some("fp4")
    }

    /// Whether dense linears are FP8 (false for an unquantized checkpoint).
    pub fn fp8(&self) -> bool {
        self.quantization_config.is_some()
    }
}
