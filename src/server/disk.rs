//! The prefix cache's disk tier: finished requests' decode states in a directory, kept across
//! restarts, found by their token prefix, the least recently used evicted past a byte budget.
//!
//! Each entry is a state file ([`crate::state::file`]) named after a hash of its tokens, holding
//! the state at the end of the request and the point where its prompt ended, so that a resent
//! conversation resumes from either. Files are written by a thread of their own (a request
//! never waits for the disk) and read by another. Opening indexes the files of this model
//! (header and tokens checked); a file of another model or format is skipped and left alone,
//! one found damaged when read is a miss and is deleted; both are counted. A failed write (full
//! or read-only directory) only skips the entry.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use crate::backend::Seq;
use crate::checkpoint::Fingerprint;
use crate::error::{Error, Result};
use crate::server::metrics::Metrics;
use crate::state::file::{self, Saved};
use crate::state::{Mark, SeqState};

/// Where the disk tier lives and how much it may hold.
#[derive(Clone, Debug)]
pub struct DiskOptions {
    /// The directory (created if missing).
    pub dir: PathBuf,
    /// Bytes of state files kept; the least recently used go beyond it.
    pub max_bytes: u64,
}

/// A state file in the directory.
#[derive(Clone)]
struct Entry {
    name: String,
    tokens: Vec<u32>,
    /// Tokens of its prompt, when its prompt point was saved.
    prompt_len: Option<usize>,
    bytes: u64,
    /// Last use, on the index's clock.
    used: u64,
}

#[derive(Default)]
struct Index {
    entries: Vec<Entry>,
    bytes: u64,
    clock: u64,
}

/// A decode state to write: shared with the memory cache (host states, written in place), or
/// already copied to the host.
pub enum Snapshot {
    /// A host state also held by the memory cache.
    Shared(Arc<Seq>),
    /// A device state's host copy.
    Owned(SeqState),
}

/// One finished request to keep.
pub struct Write {
    /// Its tokens (prompt, then generated ones the state consumed).
    pub tokens: Vec<u32>,
    /// Tokens of its prompt.
    pub prompt_len: usize,
    /// The state after `tokens`.
    pub state: Snapshot,
    /// A mark on it at the prompt's end.
    pub prompt: Option<Mark>,
}

/// A prefix found on disk.
#[derive(Clone, Debug)]
pub struct Hit {
    name: String,
    /// Tokens it covers.
    pub len: usize,
    /// Whether it is the whole entry (else its prompt point).
    whole: bool,
}

/// The disk tier.
pub struct Disk {
    dir: PathBuf,
    max_bytes: u64,
    model: Fingerprint,
    index: Mutex<Index>,
    writes: SyncSender<Write>,
    metrics: Arc<Metrics>,
}

/// Writes waiting for the writer thread; more are skipped.
const QUEUE: usize = 4;

fn entry_name(tokens: &[u32]) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(bytemuck::cast_slice::<u32, u8>(tokens));
    let hex: String = h[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}.hst")
}

fn warn(what: std::fmt::Arguments) {
    eprintln!("hadal: warning: {what}");
}

impl Disk {
    /// Opens (creating) the directory and indexes the states in it that belong to `model`;
    /// starts the writer thread.
    pub fn open(
        opts: &DiskOptions,
        model: Fingerprint,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Disk>> {
        std::fs::create_dir_all(&opts.dir).map_err(|e| Error::io(&opts.dir, e))?;
        let mut index = Index::default();
        let list = std::fs::read_dir(&opts.dir).map_err(|e| Error::io(&opts.dir, e))?;
        let mut found: Vec<(std::time::SystemTime, Entry)> = Vec::new();
        for e in list.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if file::is_temporary(&name) {
                // A write that a crash interrupted.
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            if !name.ends_with(".hst") {
                continue;
            }
            match file::read_tokens(&e.path(), Some(&model)) {
                Ok((h, tokens)) => {
                    let meta = e.metadata().ok();
                    let bytes = meta.as_ref().map_or(0, |m| m.len());
                    let mtime = meta
                        .and_then(|m| m.modified().ok())
                        .unwrap_or(std::time::UNIX_EPOCH);
                    found.push((
                        mtime,
                        Entry {
                            name,
                            prompt_len: h.prompt.map(|p| p.pos),
                            tokens,
                            bytes,
                            used: 0,
                        },
                    ));
                }
                Err(err) => {
                    metrics.disk_read_errors.inc();
                    warn(format_args!("state cache: skipping {err}"));
                }
            }
        }
        // Oldest first, so that the clock orders them as their files' times do.
        found.sort_by_key(|(t, _)| *t);
        for (_, mut e) in found {
            index.clock += 1;
            e.used = index.clock;
            index.bytes += e.bytes;
            index.entries.push(e);
        }
        let (writes, rx) = sync_channel(QUEUE);
        let disk = Arc::new(Disk {
            dir: opts.dir.clone(),
            max_bytes: opts.max_bytes,
            model,
            index: Mutex::new(index),
            writes,
            metrics,
        });
        disk.evict();
        disk.publish();
        let d = Arc::clone(&disk);
        std::thread::Builder::new()
            .name("hadal-state-writer".into())
            .spawn(move || d.writer(rx))
            .map_err(|e| Error::io(&opts.dir, e))?;
        Ok(disk)
    }

    fn publish(&self) {
        let i = self.index.lock().expect("index lock");
        self.metrics.disk_bytes.set(i.bytes as i64);
        self.metrics.disk_entries.set(i.entries.len() as i64);
    }

    /// The longest prefix of `prompt` (leaving at least one token to feed) that an entry
    /// holds, longer than `than`.
    pub fn lookup(&self, prompt: &[u32], than: usize) -> Option<Hit> {
        let i = self.index.lock().expect("index lock");
        let mut best: Option<Hit> = None;
        for e in &i.entries {
            let points = [(e.tokens.len(), true)]
                .into_iter()
                .chain(e.prompt_len.map(|p| (p, false)));
            for (len, whole) in points {
                if len > than
                    && len < prompt.len()
                    && best.as_ref().is_none_or(|b| len > b.len)
                    && e.tokens[..len] == prompt[..len]
                {
                    best = Some(Hit {
                        name: e.name.clone(),
                        len,
                        whole,
                    });
                }
            }
        }
        best
    }

    /// Reads a hit's state (returned to the prompt's end where the hit is that point) and
    /// marks its entry used. A file that fails its checks is dropped from the index.
    pub fn load(&self, hit: &Hit, prompt: &[u32]) -> Result<SeqState> {
        let path = self.dir.join(&hit.name);
        let read = file::read(&path, Some(&self.model)).and_then(|f| {
            let mut s = f.state;
            if !hit.whole {
                let mark = f.prompt.ok_or_else(|| Error::State {
                    path: path.clone(),
                    reason: "no prompt point".into(),
                })?;
                s.rewind(mark);
            }
            if s.pos != hit.len || f.tokens.get(..hit.len) != prompt.get(..hit.len) {
                return Err(Error::State {
                    path: path.clone(),
                    reason: "its tokens changed since it was indexed".into(),
                });
            }
            Ok(s)
        });
        let mut i = self.index.lock().expect("index lock");
        match &read {
            Ok(_) => {
                i.clock += 1;
                let now = i.clock;
                if let Some(e) = i.entries.iter_mut().find(|e| e.name == hit.name) {
                    e.used = now;
                }
                // Its file's time records the use across restarts.
                if let Ok(f) = std::fs::File::options().append(true).open(&path) {
                    let _ = f.set_modified(std::time::SystemTime::now());
                }
                self.metrics.disk_hits.inc();
            }
            Err(_) => {
                // It was indexed as this model's, in this format: it is damaged, and goes.
                self.metrics.disk_read_errors.inc();
                if let Some(k) = i.entries.iter().position(|e| e.name == hit.name) {
                    let e = i.entries.remove(k);
                    i.bytes -= e.bytes;
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        drop(i);
        self.publish();
        read
    }

    /// Queues a finished request's state for writing; skipped (and counted) when the writer
    /// is behind.
    pub fn store(&self, w: Write) {
        if let Err(TrySendError::Full(_)) = self.writes.try_send(w) {
            self.metrics.disk_skipped.inc();
        }
    }

    fn writer(&self, rx: Receiver<Write>) {
        for w in rx {
            let name = entry_name(&w.tokens);
            {
                let mut i = self.index.lock().expect("index lock");
                i.clock += 1;
                let now = i.clock;
                if let Some(e) = i.entries.iter_mut().find(|e| e.name == name) {
                    // The same tokens give the same state: only its use is news.
                    e.used = now;
                    continue;
                }
            }
            let state: &SeqState = match &w.state {
                Snapshot::Shared(seq) => match &**seq {
                    Seq::Host(s) => s,
                    _ => continue,
                },
                Snapshot::Owned(s) => s,
            };
            let path = self.dir.join(&name);
            let saved = Saved {
                model: self.model,
                tokens: &w.tokens,
                state,
                prompt: w.prompt.as_ref(),
                extra: serde_json::json!({"server": {"prompt_tokens": w.prompt_len}}),
            };
            match file::write(&path, &saved) {
                Ok(bytes) => {
                    self.metrics.disk_writes.inc();
                    let mut i = self.index.lock().expect("index lock");
                    i.clock += 1;
                    let used = i.clock;
                    i.bytes += bytes;
                    i.entries.push(Entry {
                        name,
                        prompt_len: w.prompt.as_ref().map(|_| w.prompt_len),
                        tokens: w.tokens,
                        bytes,
                        used,
                    });
                    drop(i);
                    self.evict();
                }
                Err(e) => {
                    self.metrics.disk_write_errors.inc();
                    warn(format_args!("state cache: not written: {e}"));
                }
            }
            self.publish();
        }
    }

    /// Deletes the least recently used entries until the rest fit the budget.
    fn evict(&self) {
        let mut i = self.index.lock().expect("index lock");
        while i.bytes > self.max_bytes && !i.entries.is_empty() {
            let k = (0..i.entries.len())
                .min_by_key(|&k| i.entries[k].used)
                .expect("not empty");
            let e = i.entries.remove(k);
            i.bytes -= e.bytes;
            if let Err(err) = std::fs::remove_file(self.dir.join(&e.name)) {
                warn(format_args!("state cache: cannot remove {}: {err}", e.name));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(pos: usize) -> SeqState {
        let mut s = SeqState::new(&[0, 4]);
        s.pos = pos;
        for b in &mut s.blocks {
            b.window = vec![pos as u8; 1000];
            if let Some(c) = &mut b.compressor {
                c.entries.len = pos / 4;
                c.entries.data = vec![1; pos / 4 * 10];
                c.kv = vec![0.5; pos % 4];
            }
        }
        s
    }

    fn settle(d: &Disk, writes: u64) {
        for _ in 0..400 {
            if d.metrics.disk_writes.get() + d.metrics.disk_write_errors.get() >= writes {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("the writer did not finish");
    }

    /// Prefix lookups pick the longest entry or prompt point; the byte budget evicts the least
    /// recently used; a file damaged after indexing is a miss and leaves the index.
    #[test]
    fn lookups_eviction_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::new());
        let opts = DiskOptions {
            dir: dir.path().to_path_buf(),
            max_bytes: 16_000,
        };
        let fp = Fingerprint([1; 32]);
        let d = Disk::open(&opts, fp, m.clone()).unwrap();
        let toks: Vec<u32> = (0..100).collect();
        // Entry A: 40 tokens, its prompt's end at 30 (a mark as one taken at 30).
        let a = state(40);
        let m30 = state(30).mark();
        d.store(Write {
            tokens: toks[..40].to_vec(),
            prompt_len: 30,
            state: Snapshot::Owned(a.clone()),
            prompt: Some(m30),
        });
        settle(&d, 1);
        let hit = d.lookup(&toks[..50], 0).unwrap();
        assert_eq!((hit.len, hit.whole), (40, true));
        assert_eq!(d.load(&hit, &toks[..50]).unwrap(), a);
        // Another prompt sharing only the first 30 tokens gets the prompt point.
        let mut other = toks[..35].to_vec();
        other[32] = 999;
        let hit = d.lookup(&other, 0).unwrap();
        assert_eq!((hit.len, hit.whole), (30, false));
        assert_eq!(d.load(&hit, &other).unwrap().pos, 30);
        assert!(
            d.lookup(&toks[..50], 40).is_none(),
            "memory already has as much"
        );
        // Fill past the budget: the least recently used go.
        for i in 0..8u32 {
            let t: Vec<u32> = (1000 * (i + 1)..1000 * (i + 1) + 200).collect();
            d.store(Write {
                tokens: t,
                prompt_len: 100,
                state: Snapshot::Owned(state(200)),
                prompt: None,
            });
            settle(&d, 2 + i as u64);
        }
        let i = d.index.lock().unwrap();
        assert!(
            i.bytes <= opts.max_bytes && i.entries.len() < 9,
            "{} bytes",
            i.bytes
        );
        let names: Vec<String> = i.entries.iter().map(|e| e.name.clone()).collect();
        drop(i);
        let on_disk = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(on_disk, names.len());
        // Damage the newest entry: its load fails, counts, and drops it from the index.
        let newest = names.last().unwrap().clone();
        let path = dir.path().join(&newest);
        let mut b = std::fs::read(&path).unwrap();
        let n = b.len();
        b[n - 1] ^= 1;
        std::fs::write(&path, &b).unwrap();
        let t: Vec<u32> = (8000..8300).collect();
        let hit = d.lookup(&t, 0).unwrap();
        assert!(d.load(&hit, &t).is_err());
        assert_eq!(m.disk_read_errors.get(), 1);
        assert!(d.lookup(&t, 0).is_none());
        assert!(!path.exists(), "a damaged entry is deleted");
        // Reopened, the directory's entries come back; another model's file is skipped.
        std::fs::write(dir.path().join("other.hst"), b"HADALST\n").unwrap();
        let again = Disk::open(&opts, fp, Arc::new(Metrics::new())).unwrap();
        assert_eq!(again.index.lock().unwrap().entries.len(), names.len() - 1);
        assert_eq!(again.metrics.disk_read_errors.get(), 1);
        assert!(dir.path().join("other.hst").exists());
    }
}
