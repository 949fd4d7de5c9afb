//! Decode states on disk.
//!
//! A state file holds one sequence's [`SeqState`], the token ids it covers, optionally the
//! point where its prompt ended (the window rings and pending compressor rows there, and how
//! many compressed entries existed then: a [`Mark`], so the prompt's state comes back too), and
//! a caller's JSON (a chat's messages). A model with another [`Fingerprint`], a reader of
//! another format version, and a changed or missing byte anywhere make it refused.
//!
//! Layout, little-endian:
//!
//! | bytes | what |
//! |---|---|
//! | 8 | magic `HADALST\n` |
//! | 4 | format version ([`VERSION`]) |
//! | 4 | header length `H` |
//! | H | the [`Header`], JSON |
//! | 4 | CRC-32 of everything before it |
//! | ... | the sections the header lists, in its order, each with its length and CRC-32 there |
//!
//! Sections are the state's own buffers, written from and read into place (f32 values as their
//! bytes, packed rows as stored): a state never has a second copy in memory on its way. A file
//! is written under a temporary name in its directory, synced, then renamed over the target, so
//! neither a reader nor a crash ever sees part of one.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::{BlockState, CompressorState, Mark, Rows, SeqState};
use crate::checkpoint::Fingerprint;
use crate::error::{Error, Result};

#[cfg(target_endian = "big")]
compile_error!("state files hold f32 values as little-endian bytes, read in place");

/// The first 8 bytes of every state file.
pub const MAGIC: &[u8; 8] = b"HADALST\n";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Largest header accepted (a chat's messages live there).
const MAX_HEADER: u64 = 1 << 28;
/// Bytes read or checked at a time.
const CHUNK: usize = 8 << 20;

/// What a state file says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// The model's fingerprint (hex).
    pub model: String,
    /// When it was written (seconds since the Unix epoch).
    pub created: u64,
    /// Tokens the state has consumed.
    pub pos: usize,
    /// See [`SeqState::prompt_end`].
    pub prompt_end: usize,
    /// Number of token ids stored (`pos` of them, or more).
    pub tokens: usize,
    /// Per block, the compressed entries of its attention and indexer compressors (absent
    /// where the block has none).
    pub blocks: Vec<BlockShape>,
    /// Where the prompt ended, when it was saved.
    pub prompt: Option<PromptPoint>,
    /// The writer's own data.
    #[serde(default)]
    pub extra: serde_json::Value,
    /// The sections that follow, in order.
    pub sections: Vec<Section>,
}

/// Compressed entries of one block's compressors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockShape {
    /// Attention compressor entries.
    pub attn: Option<usize>,
    /// Indexer compressor entries.
    pub index: Option<usize>,
}

/// The end of the prompt: its position and the compressors' entry counts there (in block
/// order, attention before indexer).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptPoint {
    /// Tokens of the prompt.
    pub pos: usize,
    /// Compressed entries each compressor had.
    pub entries: Vec<usize>,
}

/// One section: its name, length and CRC-32.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Section {
    /// What it holds (`tokens`, `b3.window`, `b3.attn.kv`, `prompt.b3.window`, ...).
    pub name: String,
    /// Length in bytes.
    pub bytes: u64,
    /// CRC-32 (IEEE) of its bytes.
    pub crc32: u32,
}

/// What to save.
pub struct Saved<'a> {
    /// The model the state belongs to.
    pub model: Fingerprint,
    /// Token ids the state covers (at least its first `pos`).
    pub tokens: &'a [u32],
    /// The state.
    pub state: &'a SeqState,
    /// A mark taken on `state` where its prompt ended.
    pub prompt: Option<&'a Mark>,
    /// The caller's data.
    pub extra: serde_json::Value,
}

/// A state read back.
pub struct Loaded {
    /// Its header.
    pub header: Header,
    /// The token ids it covers.
    pub tokens: Vec<u32>,
    /// The state.
    pub state: SeqState,
    /// The mark to return `state` to the end of its prompt, when one was saved.
    pub prompt: Option<Mark>,
}

const COMPRESSORS: [&str; 2] = ["attn", "index"];
const PENDING: [&str; 4] = ["kv", "score", "prev_kv", "prev_score"];

fn pending(c: &CompressorState) -> [&Vec<f32>; 4] {
    [&c.kv, &c.score, &c.prev_kv, &c.prev_score]
}

fn pending_mut(c: &mut CompressorState) -> [&mut Vec<f32>; 4] {
    [&mut c.kv, &mut c.score, &mut c.prev_kv, &mut c.prev_score]
}

/// The sections of a state, in file order, as byte views of its buffers.
fn views<'a>(
    tokens: &'a [u32],
    s: &'a SeqState,
    prompt: Option<&'a Mark>,
) -> Vec<(String, &'a [u8])> {
    let mut v: Vec<(String, &[u8])> = vec![("tokens".into(), bytemuck::cast_slice(tokens))];
    for (i, b) in s.blocks.iter().enumerate() {
        v.push((format!("b{i}.window"), &b.window));
        for (k, c) in [&b.compressor, &b.indexer].into_iter().enumerate() {
            if let Some(c) = c {
                for (f, x) in PENDING.iter().zip(pending(c)) {
                    v.push((
                        format!("b{i}.{}.{f}", COMPRESSORS[k]),
                        bytemuck::cast_slice(x),
                    ));
                }
                v.push((format!("b{i}.{}.entries", COMPRESSORS[k]), &c.entries.data));
            }
        }
    }
    if let Some(m) = prompt {
        for (i, w) in m.windows.iter().enumerate() {
            v.push((format!("prompt.b{i}.window"), w));
            for (comp, c) in COMPRESSORS.iter().zip(&m.compressors[2 * i..2 * i + 2]) {
                if let Some((c, _)) = c {
                    for (f, x) in PENDING.iter().zip(pending(c)) {
                        v.push((format!("prompt.b{i}.{comp}.{f}"), bytemuck::cast_slice(x)));
                    }
                }
            }
        }
    }
    v
}

/// The section names a header's shape implies, in order.
fn expected_names(blocks: &[BlockShape], prompt: bool) -> Vec<String> {
    let mut v = vec!["tokens".to_string()];
    let comps = |b: &BlockShape| [b.attn.is_some(), b.index.is_some()];
    for (i, b) in blocks.iter().enumerate() {
        v.push(format!("b{i}.window"));
        for (k, has) in comps(b).into_iter().enumerate() {
            if has {
                for f in PENDING.iter().chain(&["entries"]) {
                    v.push(format!("b{i}.{}.{f}", COMPRESSORS[k]));
                }
            }
        }
    }
    if prompt {
        for (i, b) in blocks.iter().enumerate() {
            v.push(format!("prompt.b{i}.window"));
            for (k, has) in comps(b).into_iter().enumerate() {
                if has {
                    for f in PENDING {
                        v.push(format!("prompt.b{i}.{}.{f}", COMPRESSORS[k]));
                    }
                }
            }
        }
    }
    v
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes `s` as a state file to `w`; returns the bytes written.
pub fn write_to(w: &mut impl Write, s: &Saved<'_>) -> std::io::Result<u64> {
    let views = views(s.tokens, s.state, s.prompt);
    let header = Header {
        model: s.model.to_string(),
        created: now(),
        pos: s.state.pos,
        prompt_end: s.state.prompt_end,
        tokens: s.tokens.len(),
        blocks: s
            .state
            .blocks
            .iter()
            .map(|b| BlockShape {
                attn: b.compressor.as_ref().map(|c| c.entries.len),
                index: b.indexer.as_ref().map(|c| c.entries.len),
            })
            .collect(),
        prompt: s.prompt.map(|m| PromptPoint {
            pos: m.pos,
            entries: m.compressors.iter().flatten().map(|(_, n)| *n).collect(),
        }),
        extra: s.extra.clone(),
        sections: views
            .iter()
            .map(|(name, b)| Section {
                name: name.clone(),
                bytes: b.len() as u64,
                crc32: crc32fast::hash(b),
            })
            .collect(),
    };
    let json = serde_json::to_vec(&header)?;
    let mut head = Vec::with_capacity(json.len() + 20);
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&(json.len() as u32).to_le_bytes());
    head.extend_from_slice(&json);
    let crc = crc32fast::hash(&head);
    head.extend_from_slice(&crc.to_le_bytes());
    w.write_all(&head)?;
    let mut n = head.len() as u64;
    for (_, b) in &views {
        w.write_all(b)?;
        n += b.len() as u64;
    }
    w.flush()?;
    Ok(n)
}

/// Writes `s` to `path` atomically: into a temporary file beside it, synced, then renamed over
/// `path` (and the directory synced). Returns the file's size.
pub fn write(path: &Path, s: &Saved<'_>) -> Result<u64> {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::Input(format!("{}: not a file name", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        SERIAL.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        let n = write_to(&mut w, s)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(n)
    })();
    match written {
        Ok(n) => {
            // The rename itself reaches the disk with the directory.
            if let Ok(d) = File::open(&dir) {
                let _ = d.sync_all();
            }
            Ok(n)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(Error::io(path, e))
        }
    }
}

/// Whether a directory entry is a write that never finished (see [`write`]).
pub fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

/// What went wrong reading a file: its contents, or the OS.
enum Bad {
    Format(String),
    Io(std::io::Error),
}

impl From<std::io::Error> for Bad {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Bad::Format("truncated".into())
        } else {
            Bad::Io(e)
        }
    }
}

impl Bad {
    fn at(self, path: &Path) -> Error {
        match self {
            Bad::Format(reason) => Error::State {
                path: path.to_path_buf(),
                reason,
            },
            Bad::Io(e) => Error::io(path, e),
        }
    }
}

fn bad<T>(reason: impl Into<String>) -> Result<T, Bad> {
    Err(Bad::Format(reason.into()))
}

/// Reads and checks the header of a file of `len` bytes; returns it and where sections start.
fn read_header(r: &mut impl Read, len: u64, model: Option<&Fingerprint>) -> Result<Header, Bad> {
    let mut fixed = [0u8; 16];
    r.read_exact(&mut fixed)?;
    if &fixed[..8] != MAGIC {
        return bad("not a hadal state file");
    }
    let version = u32::from_le_bytes(fixed[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return bad(format!(
            "state format version {version}; this hadal reads version {VERSION}"
        ));
    }
    let hlen = u32::from_le_bytes(fixed[12..16].try_into().expect("4 bytes")) as u64;
    if hlen > MAX_HEADER || 20 + hlen > len {
        return bad(format!(
            "header of {hlen} bytes in a file of {len}: truncated"
        ));
    }
    let mut json = vec![0u8; hlen as usize];
    r.read_exact(&mut json)?;
    let mut crc = [0u8; 4];
    r.read_exact(&mut crc)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&fixed);
    h.update(&json);
    if h.finalize() != u32::from_le_bytes(crc) {
        return bad("header checksum mismatch (the file is corrupt)");
    }
    let header: Header =
        serde_json::from_slice(&json).or_else(|e| bad(format!("header does not parse: {e}")))?;
    if let Some(m) = model {
        if header.model != m.to_string() {
            return bad(format!(
                "a state of model {}, not of the loaded model {m}",
                header.model
            ));
        }
    }
    let names: Vec<&str> = header.sections.iter().map(|s| s.name.as_str()).collect();
    if names != expected_names(&header.blocks, header.prompt.is_some()) {
        return bad("its sections do not match its header");
    }
    let body: u64 = header.sections.iter().map(|s| s.bytes).sum();
    if 20 + hlen + body != len {
        return bad(format!(
            "{} bytes of sections after the header, {} expected: {}",
            len - 20 - hlen,
            body,
            if 20 + hlen + body > len {
                "truncated"
            } else {
                "trailing bytes"
            }
        ));
    }
    if header.tokens < header.pos || header.sections[0].bytes != 4 * header.tokens as u64 {
        return bad("fewer token ids than the state's position");
    }
    if let Some(p) = &header.prompt {
        let counts: Vec<usize> = header
            .blocks
            .iter()
            .flat_map(|b| [b.attn, b.index])
            .flatten()
            .collect();
        if p.pos > header.pos
            || p.entries.len() != counts.len()
            || p.entries.iter().zip(&counts).any(|(a, b)| a > b)
        {
            return bad("its prompt point lies beyond its state");
        }
    }
    Ok(header)
}

/// Reads one section into `dst` (its length), checking its CRC.
fn read_section(r: &mut impl Read, dst: &mut [u8], s: &Section) -> Result<(), Bad> {
    let mut h = crc32fast::Hasher::new();
    for c in dst.chunks_mut(CHUNK) {
        r.read_exact(c)?;
        h.update(c);
    }
    if h.finalize() != s.crc32 {
        return bad(format!("section {} is corrupt (checksum mismatch)", s.name));
    }
    Ok(())
}

/// Asks for huge pages behind a large buffer not touched yet: filling it then costs one page
/// fault per 2 MiB instead of per 4 KiB, which on a virtual machine is most of a read's time.
fn advise_huge<T>(v: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (start, len) = (v.as_mut_ptr() as usize, std::mem::size_of_val(v));
        let first = start.next_multiple_of(HUGE);
        let end = (start + len) / HUGE * HUGE;
        if end > first {
            // SAFETY: advice on whole pages inside a live allocation; no memory is changed.
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
            }
        }
    }
    let _ = v;
}

/// A zeroed buffer of `n` values for a section to be read into.
fn buffer<T: bytemuck::Zeroable + Clone>(n: usize) -> Vec<T> {
    let mut v = vec![T::zeroed(); n];
    advise_huge(&mut v);
    v
}

fn f32s(n: u64, name: &str) -> Result<Vec<f32>, Bad> {
    if !n.is_multiple_of(4) {
        return bad(format!(
            "section {name}: {n} bytes is not a whole number of f32s"
        ));
    }
    Ok(buffer((n / 4) as usize))
}

fn read_all(r: &mut impl Read, len: u64, model: Option<&Fingerprint>) -> Result<Loaded, Bad> {
    let header = read_header(r, len, model)?;
    let shell = |attn: Option<usize>| {
        attn.map(|n| CompressorState {
            entries: Rows {
                data: Vec::new(),
                len: n,
            },
            ..CompressorState::default()
        })
    };
    let mut state = SeqState {
        pos: header.pos,
        prompt_end: header.prompt_end,
        blocks: header
            .blocks
            .iter()
            .map(|b| BlockState {
                window: Vec::new(),
                compressor: shell(b.attn),
                indexer: shell(b.index),
            })
            .collect(),
    };
    let mut prompt = header.prompt.as_ref().map(|p| {
        let mut counts = p.entries.iter();
        Mark {
            pos: p.pos,
            windows: vec![Vec::new(); header.blocks.len()],
            compressors: header
                .blocks
                .iter()
                .flat_map(|b| [b.attn, b.index])
                .map(|c| c.and_then(|_| Some((CompressorState::default(), *counts.next()?))))
                .collect(),
        }
    });
    let mut tokens = buffer::<u32>(header.tokens);
    let mut sections = header.sections.iter();
    let first = sections.next().expect("the tokens section is checked");
    read_section(r, bytemuck::cast_slice_mut(&mut tokens), first)?;
    for s in sections {
        let (owner, rest) = match s.name.strip_prefix("prompt.") {
            Some(rest) => (prompt.as_mut(), rest),
            None => (None, s.name.as_str()),
        };
        let mut parts = rest.split('.');
        let i: usize = parts
            .next()
            .and_then(|b| b.strip_prefix('b')?.parse().ok())
            .unwrap_or(0);
        let (what, field) = (parts.next().unwrap_or(""), parts.next());
        let buf: &mut [u8] = match (owner, what, field) {
            (None, "window", None) => {
                state.blocks[i].window = buffer(s.bytes as usize);
                &mut state.blocks[i].window
            }
            (Some(m), "window", None) => {
                m.windows[i] = buffer(s.bytes as usize);
                &mut m.windows[i]
            }
            (owner, comp, Some(field)) => {
                let k = COMPRESSORS.iter().position(|c| *c == comp).unwrap_or(0);
                let c = match owner {
                    None => {
                        let b = &mut state.blocks[i];
                        if k == 0 {
                            b.compressor.as_mut()
                        } else {
                            b.indexer.as_mut()
                        }
                    }
                    Some(m) => m.compressors[2 * i + k].as_mut().map(|c| &mut c.0),
                }
                .expect("sections are checked against the header");
                if field == "entries" {
                    c.entries.data = buffer(s.bytes as usize);
                    &mut c.entries.data
                } else {
                    let f = PENDING.iter().position(|p| *p == field).unwrap_or(0);
                    let v = pending_mut(c).into_iter().nth(f).expect("four fields");
                    *v = f32s(s.bytes, &s.name)?;
                    bytemuck::cast_slice_mut(v.as_mut_slice())
                }
            }
            _ => return bad(format!("unknown section {}", s.name)),
        };
        read_section(r, buf, s)?;
    }
    Ok(Loaded {
        header,
        tokens,
        state,
        prompt,
    })
}

/// Reads the state file at `path`. With `model`, a state of another model is refused.
pub fn read(path: &Path, model: Option<&Fingerprint>) -> Result<Loaded> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    read_all(&mut BufReader::with_capacity(1 << 20, f), len, model).map_err(|e| e.at(path))
}

/// Reads a file's header and token ids (checked), not its state.
pub fn read_tokens(path: &Path, model: Option<&Fingerprint>) -> Result<(Header, Vec<u32>)> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut r = BufReader::new(f);
    let run = |r: &mut BufReader<File>| {
        let header = read_header(r, len, model)?;
        let mut tokens = vec![0u32; header.tokens];
        read_section(
            r,
            bytemuck::cast_slice_mut(&mut tokens),
            &header.sections[0],
        )?;
        Ok((header, tokens))
    };
    run(&mut r).map_err(|e: Bad| e.at(path))
}

/// Checks every byte of the file at `path` against its checksums, a chunk at a time (the state
/// is not assembled); returns its header.
pub fn verify(path: &Path) -> Result<Header> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut r = BufReader::with_capacity(1 << 20, f);
    let run = |r: &mut BufReader<File>| {
        let header = read_header(r, len, None)?;
        let mut buf = vec![0u8; CHUNK];
        for s in &header.sections {
            let mut h = crc32fast::Hasher::new();
            let mut left = s.bytes as usize;
            while left > 0 {
                let n = left.min(CHUNK);
                r.read_exact(&mut buf[..n])?;
                h.update(&buf[..n]);
                left -= n;
            }
            if h.finalize() != s.crc32 {
                return bad(format!("section {} is corrupt (checksum mismatch)", s.name));
            }
        }
        Ok(header)
    };
    run(&mut r).map_err(|e: Bad| e.at(path))
}
