//! The V4 tokenizer (Hugging Face `tokenizer.json`, through the `tokenizers` crate).
//!
//! Prompts carry their special tokens as text (`<｜begin▁of▁sentence｜>`, `<｜User｜>`, ...), so
//! encoding adds none of its own. A copy of the real V4 tokenizer is built into the binary.

use std::path::Path;

use crate::error::{Error, Result};

/// The real V4 `tokenizer.json`.
pub const BUNDLED: &[u8] = include_bytes!("../assets/tokenizer/tokenizer.json");

/// A loaded tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|e| Error::Input(format!("{}: {e}", path.display())))
    }

    /// The V4 tokenizer built into hadal.
    pub fn bundled() -> Self {
        Self::from_bytes(BUNDLED).expect("the bundled tokenizer.json parses")
    }

    /// The checkpoint's own tokenizer when `dir` has one, else the bundled one.
    pub fn for_model(dir: &Path) -> Result<Self> {
        let p = dir.join("tokenizer.json");
        if p.exists() {
            Self::from_file(&p)
        } else {
            Ok(Self::bundled())
        }
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| Error::Input(format!("not a tokenizer.json: {e}")))?;
        Ok(Tokenizer { inner })
    }

    /// Token ids of a prompt (special tokens recognized in the text, none added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Input(format!("cannot tokenize: {e}")))
    }

    /// Text of token ids, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Input(format!("cannot decode: {e}")))
    }

    /// The id of a token, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
