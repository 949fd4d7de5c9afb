//! The GPU under the CUDA device: driver and NVRTC found at run time, the kernels compiled for
//! the device (and cached on disk), stream-ordered memory, and kernel launches.
//!
//! Work goes through one stream, so the order of launches is the order of the forward pass and
//! memory freed by a dropped buffer is reused only by work queued after it; [`Gpu::join`] lets a
//! second stream run one chain of work beside another and joins it back before anything else
//! is queued. The stream can be recorded as a CUDA graph ([`Gpu::capture`]); while it is,
//! other threads' work on this GPU waits, so that none of it lands in the recording.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::sys::CUresult;
use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaFunction, CudaStream};

use super::arena::Arena;
use super::kernels;
use crate::error::{Error, Result};

/// A driver error, with what was being done.
pub fn driver_err(what: &str, e: result::DriverError) -> Error {
    if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::OutOfMemory(format!("{what}: the GPU has no room left"))
    } else {
        Error::Device(format!("{what}: {e:?}"))
    }
}

/// Loads a shared library by path and keeps it loaded, so that a later `dlopen` of its soname
/// (as cudarc does) finds it.
fn preload(path: &Path) -> bool {
    // SAFETY: loading NVIDIA's libraries runs only their initializers.
    match unsafe { libloading::Library::new(path) } {
        Ok(lib) => {
            std::mem::forget(lib);
            true
        }
        Err(_) => false,
    }
}

/// Directories that may hold NVRTC: `$HADAL_NVRTC_DIR`, the CUDA toolkit's, and the
/// `nvidia-cuda-nvrtc` wheel's in Python's site-packages.
fn nvrtc_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("HADAL_NVRTC_DIR") {
        dirs.push(d.into());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(d) = std::env::var_os(var) {
            dirs.push(PathBuf::from(d).join("lib64"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    dirs.push("/usr/local/cuda/targets/x86_64-linux/lib".into());
    // The wheel installs next to Python's packages: ask the interpreter where those are.
    let script = "import site,sysconfig;print('\\n'.join([sysconfig.get_paths()['purelib'],sysconfig.get_paths()['platlib'],site.getusersitepackages()]))";
    if let Ok(out) = std::process::Command::new("python3")
        .args(["-c", script])
        .stderr(std::process::Stdio::null())
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            for sub in ["nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"] {
                dirs.push(Path::new(line.trim()).join(sub));
            }
        }
    }
    dirs
}

/// Makes NVRTC loadable, or says where it was looked for.
pub fn nvrtc() -> Result<()> {
    static FOUND: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            // SAFETY: probing for a library by name.
            if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                return Ok(());
            }
            let dirs = nvrtc_dirs();
            for d in &dirs {
                let Ok(entries) = std::fs::read_dir(d) else {
                    continue;
                };
                let names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
                let find = |prefix: &str| {
                    names.iter().find(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with(prefix) && n.contains(".so.13"))
                    })
                };
                if let Some(lib) = find("libnvrtc.so") {
                    // NVRTC opens its builtins by soname; load them first, from beside it.
                    if let Some(b) = find("libnvrtc-builtins.so") {
                        preload(b);
                    }
                    // SAFETY: probing for a library by name.
                    if preload(lib) && unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                        return Ok(());
                    }
                }
            }
            Err(format!(
                "NVRTC (libnvrtc.so.13) not found; install CUDA 13 or `pip install nvidia-cuda-nvrtc`, or set HADAL_NVRTC_DIR (looked in {})",
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
        .clone()
        .map_err(Error::Device)
}

/// Whether the CUDA driver library can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: probing for a library by name.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Number of CUDA devices (0 without a driver).
pub fn device_count() -> usize {
    if !driver_present() {
        return 0;
    }
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// Device memory, freed in stream order when dropped: on the stream the dropping thread queues
/// work on, which has seen every use of it (the buffers of a chain run beside another by
/// [`Gpu::join`] are dropped inside it, or after it has been joined back).
pub struct Buf {
    streams: Arc<Streams>,
    /// Its address.
    pub ptr: u64,
    /// Its size.
    pub bytes: usize,
    home: Home,
}

/// Where a buffer's memory came from.
#[derive(Clone, Copy, PartialEq)]
enum Home {
    /// The stream's allocator.
    Stream,
    /// The workspace of a step being recorded, at this offset.
    Workspace(usize),
    /// The stream's allocator, while a step was recorded and the workspace had no room.
    Spill,
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Home::Workspace(at) = self.home {
            // (Dropped after its recording ended, which then failed: the workspace is not
            // used again by that recording.)
            if let Some((_, w)) = self.streams.arena().as_mut() {
                w.give(at, self.bytes);
            }
            return;
        }
        if self.home == Home::Spill {
            if let Some((_, w)) = self.streams.arena().as_mut() {
                w.unspilled(self.bytes);
            }
        }
        // A failure here has no one to report to; the driver reports a broken context at the
        // next synchronization.
        let _ = self.streams.ctx.bind_to_thread();
        // SAFETY: `ptr` came from `cuMemAllocAsync` and is freed once, after its last use in
        // the order of the current stream.
        let _ = unsafe { result::free_async(self.ptr, self.streams.current().cu_stream()) };
    }
}

/// The GPU's two streams: `main`, which all work goes through, and `side`, on which
/// [`Gpu::join`] queues one chain of work beside another.
struct Streams {
    ctx: Arc<CudaContext>,
    main: Arc<CudaStream>,
    side: Arc<CudaStream>,
    /// Held by the thread queueing work on `side`.
    side_lock: Mutex<()>,
    /// Where `side` starts (recorded on `main`) and where it ends (recorded on `side`).
    fork: CudaEvent,
    rejoin: CudaEvent,
    /// While a step is recorded, the workspace its buffers come from: its address and
    /// bookkeeping.
    workspace: Mutex<Option<(u64, Arena)>>,
}

thread_local! {
    /// The [`Streams`] (by address) whose side stream this thread queues work on, or 0.
    static ON_SIDE: Cell<usize> = const { Cell::new(0) };
}

impl Streams {
    /// The workspace of the step being recorded, if one is.
    fn arena(&self) -> MutexGuard<'_, Option<(u64, Arena)>> {
        self.workspace.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn on_side(&self) -> bool {
        ON_SIDE.with(|s| s.get()) == self as *const Self as usize
    }

    /// The stream the calling thread queues work on.
    fn current(&self) -> &Arc<CudaStream> {
        if self.on_side() {
            &self.side
        } else {
            &self.main
        }
    }
}

/// Sends the calling thread's work back to the main stream when dropped.
struct SideGuard;

impl Drop for SideGuard {
    fn drop(&mut self) {
        ON_SIDE.with(|s| s.set(0));
    }
}

/// Kernel arguments, packed as the driver wants them: one pointer to each value.
#[derive(Default)]
pub struct Args {
    words: Vec<u64>,
    starts: Vec<usize>,
}

impl Args {
    /// Empty arguments.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a value (a scalar, an address, or a `#[repr(C)]` struct the kernel declares
    /// identically).
    pub fn push<T: Copy>(&mut self, v: T) -> &mut Self {
        let n = std::mem::size_of::<T>().div_ceil(8);
        let start = self.words.len();
        self.words.resize(start + n.max(1), 0);
        // SAFETY: the destination has room for `T`, and u64 words satisfy its alignment (<= 8).
        unsafe {
            std::ptr::copy_nonoverlapping(
                &v as *const T as *const u8,
                self.words.as_mut_ptr().add(start) as *mut u8,
                std::mem::size_of::<T>(),
            )
        };
        self.starts.push(start);
        self
    }
}

/// A recorded stream of work, replayed by [`Gpu::replay`], and the workspace its buffers are in.
pub struct Graph {
    graph: cudarc::driver::CudaGraph,
    _workspace: Option<Arc<Buf>>,
}

// SAFETY: a graph is used by one thread at a time (its owner keeps it behind a lock).
unsafe impl Send for Graph {}

/// Keeps other threads' work off the stream while one thread records it.
#[derive(Default)]
struct Gate {
    lock: Mutex<()>,
    /// The recording thread's number (0: none).
    owner: AtomicU64,
}

/// A number for the calling thread, never 0.
fn thread_number() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local!(static ME: u64 = NEXT.fetch_add(1, Ordering::Relaxed));
    ME.with(|m| *m)
}

impl Gate {
    /// Waits while another thread records; the recording thread itself passes.
    fn enter(&self) -> Option<MutexGuard<'_, ()>> {
        (self.owner.load(Ordering::Acquire) != thread_number())
            .then(|| self.lock.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The first workspace of recorded steps (batch-1 decode needs a few MiB).
const WORKSPACE_START: usize = 64 << 20;

/// A CUDA device with hadal's kernels loaded.
pub struct Gpu {
    /// The context.
    pub ctx: Arc<CudaContext>,
    streams: Arc<Streams>,
    funcs: HashMap<String, CudaFunction>,
    /// `NVIDIA H200`.
    pub name: String,
    /// Device index.
    pub ordinal: usize,
    /// Multiprocessors.
    pub sms: u32,
    /// Shared memory in bytes: of an SM, the most a block may opt into, and what the system
    /// reserves of an SM's for each block.
    smem: (u32, u32, u32),
    /// Compute capability.
    pub arch: (i32, i32),
    /// Whether kernels are launched to overlap the one before (programmatic dependent launch:
    /// compute capability 9.0 and later, unless `HADAL_CUDA_PDL=0`).
    pub overlap: bool,
    /// The launch priority of the side stream's work in recorded (decode) steps: the device's
    /// greatest (more negative is higher), or 0, the default, with `HADAL_CUDA_PRIORITY=0`.
    /// There the second chain of a join is the longer one and bound by latency (the router and
    /// routed experts, the CSA indexer); when an SM frees, its blocks go before the other
    /// chain's waiting ones. Not in a prefill, where both chains are long: there the indexer's
    /// chain crowded the main one (docs/cuda.md has the measurements).
    side_priority: i32,
    gate: Gate,
    /// The workspace of recorded steps ([`super::arena`]), and the size the next one needs;
    /// none with `HADAL_CUDA_WORKSPACE=0` (buffers from the stream, to compare).
    workspace: Mutex<(Option<Arc<Buf>>, usize)>,
    use_workspace: bool,
    /// [`Gpu::clusters_fit`]'s answers by kernel, threads, shared memory and cluster size.
    cluster_fits: Mutex<HashMap<(String, u32, u32, u32), bool>>,
}

impl Gpu {
    /// Opens device `ordinal` and loads the kernels, compiling them for it on first use.
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>> {
        if !driver_present() {
            return Err(Error::Device(
                "no CUDA driver (libcuda.so) on this machine".into(),
            ));
        }
        let n = device_count();
        if ordinal >= n {
            return Err(Error::Device(format!(
                "cuda:{ordinal} requested; this machine has {n} CUDA device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("opening the device", e))?;
        // The order of launches on a stream orders everything, and `join` orders its two
        // streams by events, so per-buffer events are not needed. SAFETY: buffers are raw
        // allocations, never cudarc's slices. Streams of their own, not the legacy default
        // one, because only such streams can be recorded.
        unsafe { ctx.disable_event_tracking() };
        let stream = || {
            ctx.new_stream()
                .map_err(|e| driver_err("creating a stream", e))
        };
        let event = || {
            ctx.new_event(None)
                .map_err(|e| driver_err("creating an event", e))
        };
        let streams = Arc::new(Streams {
            ctx: ctx.clone(),
            main: stream()?,
            side: stream()?,
            side_lock: Mutex::new(()),
            fork: event()?,
            rejoin: event()?,
            workspace: Mutex::new(None),
        });
        let arch = ctx
            .compute_capability()
            .map_err(|e| driver_err("reading the compute capability", e))?;
        let side_priority = if !std::env::var("HADAL_CUDA_PRIORITY").is_ok_and(|v| v == "0") {
            let (mut least, mut greatest) = (0, 0);
            ctx.bind_to_thread()
                .map_err(|e| driver_err("binding the context", e))?;
            // SAFETY: two out-parameters, with the context current.
            unsafe { sys::cuCtxGetStreamPriorityRange(&mut least, &mut greatest) }
                .result()
                .map_err(|e| driver_err("reading the priority range", e))?;
            greatest
        } else {
            0
        };
        let name = ctx.name().map_err(|e| driver_err("reading the name", e))?;
        let sms =
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(|e| driver_err("reading the multiprocessor count", e))? as u32;
        let smem_attr = |a, what| {
            ctx.attribute(a)
                .map(|v| v as u32)
                .map_err(|e| driver_err(what, e))
        };
        let smem_sm = smem_attr(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
            "reading the shared memory of an SM",
        )?;
        let smem_block = smem_attr(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            "reading the shared memory of a block",
        )?;
        let smem_reserved = smem_attr(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK,
            "reading the shared memory reserved a block",
        )?;
        keep_freed_memory(&ctx)?;
        let cubin = kernels::cubin(arch)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(|e| driver_err("loading the kernels", e))?;
        let mut funcs = HashMap::new();
        for &name in kernels::NAMES {
            let f = module
                .load_function(name)
                .map_err(|e| driver_err(&format!("kernel {name}"), e))?;
            // The one-token expert passes size their blocks' shared memory to spread them
            // over every SM (`Gpu::spread_smem`), which holds for the largest carveout.
            if name.starts_with("mma_experts_") && name.ends_with("_x1") {
                f.set_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                    100,
                )
                .map_err(|e| driver_err(&format!("kernel {name}: carveout"), e))?;
            }
            funcs.insert(name.to_string(), f);
        }
        Ok(Arc::new(Gpu {
            ctx,
            streams,
            funcs,
            name,
            ordinal,
            sms,
            smem: (smem_sm, smem_block, smem_reserved),
            arch,
            overlap: arch >= (9, 0) && !std::env::var("HADAL_CUDA_PDL").is_ok_and(|v| v == "0"),
            side_priority,
            gate: Gate::default(),
            workspace: Mutex::new((None, WORKSPACE_START)),
            use_workspace: !std::env::var("HADAL_CUDA_WORKSPACE").is_ok_and(|v| v == "0"),
            cluster_fits: Mutex::new(HashMap::new()),
        }))
    }

    /// Records the work `f` queues on the stream instead of running it, and returns it as a
    /// graph (with what `f` returned). Nothing `f` queues may wait for the device, and every
    /// buffer `f` allocates must be dropped inside `f`.
    pub fn capture<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<(T, Graph)> {
        let _held = self.gate.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.gate.owner.store(thread_number(), Ordering::Release);
        let out = (|| {
            let workspace = if self.use_workspace {
                let w = self.workspace()?;
                *self.streams.arena() = Some((w.ptr, Arena::new(w.bytes)));
                Some(w)
            } else {
                None
            };
            self.streams
                .main
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                .map_err(|e| driver_err("starting a recording", e))?;
            let r = f();
            // The recording ends whatever `f` did, so that the stream runs work again.
            let g = self
                .streams
                .main
                .end_capture(
                    sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY,
                )
                .map_err(|e| driver_err("recording the work", e));
            let t = r?;
            let g = g?.ok_or_else(|| Error::Device("an empty recording".into()))?;
            dump_graph(&g);
            Ok((
                t,
                Graph {
                    graph: g,
                    _workspace: workspace,
                },
            ))
        })();
        self.gate.owner.store(0, Ordering::Release);
        let Some((_, arena)) = self.streams.arena().take() else {
            return out;
        };
        // Where the workspace had no room, the next one has (recordings made before keep
        // the workspace they address).
        {
            let mut w = self.workspace.lock().unwrap_or_else(|e| e.into_inner());
            w.1 = w.1.max(arena.peak().next_power_of_two());
        }
        if out.is_ok() && arena.live() > 0 {
            return Err(Error::Device(format!(
                "a recorded step kept {} of its buffers past its end",
                arena.live()
            )));
        }
        out
    }

    /// The workspace for the next recording: the last one, or a larger one where a recording
    /// needed more.
    fn workspace(&self) -> Result<Arc<Buf>> {
        let mut w = self.workspace.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = w.0.as_ref().filter(|b| b.bytes >= w.1) {
            return Ok(Arc::clone(b));
        }
        // (Before the recording starts: from the stream.)
        let b = Arc::new(self.alloc(w.1)?);
        w.0 = Some(Arc::clone(&b));
        Ok(b)
    }

    /// The stream the calling thread queues work on.
    fn stream(&self) -> &Arc<CudaStream> {
        self.streams.current()
    }

    /// Whether the calling thread queues its work on the side stream (inside the second chain
    /// of a [`Gpu::join`]).
    pub fn on_side(&self) -> bool {
        self.streams.on_side()
    }

    /// Queues `a` on the stream, then `b` on the side stream, which starts where the stream
    /// stood before `a`; the stream then waits for `b`'s work, so work queued after this call
    /// follows both. Each is lent `x` in turn. Neither chain may read what the other writes;
    /// one that waits for the device (outside a recording) waits for its own stream. Unless
    /// `side_by_side`, inside another join's second chain, or while another thread uses the
    /// side stream, both go on the calling thread's stream one after the other.
    pub fn join<X: ?Sized, A, B>(
        &self,
        side_by_side: bool,
        x: &mut X,
        a: impl FnOnce(&mut X) -> Result<A>,
        b: impl FnOnce(&mut X) -> Result<B>,
    ) -> Result<(A, B)> {
        let s = &self.streams;
        let held = if !side_by_side || s.on_side() {
            None
        } else {
            s.side_lock.try_lock().ok()
        };
        let Some(_held) = held else {
            let ra = a(x)?;
            return Ok((ra, b(x)?));
        };
        let err = |what: &'static str| move |e| driver_err(what, e);
        {
            let _g = self.gate.enter();
            s.fork.record(&s.main).map_err(err("marking a fork"))?;
            if let Some((_, w)) = s.arena().as_mut() {
                w.fork();
            }
        }
        // Until the side stream waits at the fork, nothing needs joining back.
        let ra = a(x)?;
        let rb = {
            let _g = self.gate.enter();
            s.side.wait(&s.fork).map_err(err("waiting at a fork"))?;
            drop(_g);
            ON_SIDE.with(|c| c.set(Arc::as_ptr(s) as usize));
            let _back = SideGuard;
            b(x)
        };
        // Joined back whatever `b` did: a recording ends only with its streams joined.
        {
            let _g = self.gate.enter();
            s.rejoin.record(&s.side).map_err(err("marking a join"))?;
            s.main.wait(&s.rejoin).map_err(err("waiting at a join"))?;
            if let Some((_, w)) = s.arena().as_mut() {
                w.join();
            }
        }
        Ok((ra, rb?))
    }

    /// Whether the calling thread is recording a graph.
    pub fn capturing(&self) -> bool {
        self.gate.owner.load(Ordering::Acquire) == thread_number()
    }

    /// Queues a recorded graph.
    pub fn replay(&self, g: &Graph) -> Result<()> {
        let _g = self.gate.enter();
        g.graph
            .launch()
            .map_err(|e| driver_err("replaying a recording", e))
    }

    /// `bytes` of device memory, contents undefined.
    pub fn alloc(&self, bytes: usize) -> Result<Buf> {
        let _g = self.gate.enter();
        self.bind()?;
        let mut home = Home::Stream;
        if self.capturing() {
            let mut ws = self.streams.arena();
            if let Some((base, w)) = ws.as_mut() {
                match w.take(bytes) {
                    Some(at) => {
                        return Ok(Buf {
                            streams: self.streams.clone(),
                            ptr: *base + at as u64,
                            bytes,
                            home: Home::Workspace(at),
                        });
                    }
                    None => {
                        w.spilled(bytes);
                        home = Home::Spill;
                    }
                }
            }
        }
        let n = bytes.max(16).next_multiple_of(16);
        // SAFETY: the contents are written before they are read (or `zeros` clears them).
        let ptr = unsafe { result::malloc_async(self.stream().cu_stream(), n) }.map_err(|e| {
            driver_err(
                &format!("allocating {}", crate::inspect::bytes(n as u64)),
                e,
            )
        })?;
        Ok(Buf {
            streams: self.streams.clone(),
            ptr,
            bytes,
            home,
        })
    }

    /// `bytes` of zeroed device memory.
    pub fn zeros(&self, bytes: usize) -> Result<Buf> {
        let b = self.alloc(bytes)?;
        self.memset(b.ptr, b.bytes.max(16).next_multiple_of(16))?;
        Ok(b)
    }

    /// Makes the context current on the calling thread (the server's engine thread, say).
    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_err("binding the context", e))
    }

    /// Zeroes `bytes` at `ptr`.
    pub fn memset(&self, ptr: u64, bytes: usize) -> Result<()> {
        self.memset_value(ptr, 0, bytes)
    }

    /// Sets `bytes` at `ptr` to `value`.
    pub fn memset_value(&self, ptr: u64, value: u8, bytes: usize) -> Result<()> {
        let _g = self.gate.enter();
        self.bind()?;
        // SAFETY: the range lies in a live allocation of this context.
        unsafe { result::memset_d8_async(ptr, value, bytes, self.stream().cu_stream()) }
            .map_err(|e| driver_err("setting memory", e))
    }

    /// A copy of `data` on the device.
    pub fn upload<T: Copy>(&self, data: &[T]) -> Result<Buf> {
        let bytes = std::mem::size_of_val(data);
        let b = self.alloc(bytes)?;
        self.write(b.ptr, data)?;
        Ok(b)
    }

    /// Writes `data` at `ptr` (the host data is copied before this returns).
    pub fn write<T: Copy>(&self, ptr: u64, data: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(data);
        if bytes == 0 {
            return Ok(());
        }
        let _g = self.gate.enter();
        self.bind()?;
        // SAFETY: `ptr` has room for `bytes`; a pageable host source is staged synchronously.
        unsafe {
            result::memcpy_htod_async(
                ptr,
                std::slice::from_raw_parts(data.as_ptr() as *const u8, bytes),
                self.stream().cu_stream(),
            )
        }
        .map_err(|e| driver_err("copying to the device", e))
    }

    /// `n` values of type `T` read from `ptr` (waits for the stream).
    pub fn read<T: Copy + Default>(&self, ptr: u64, n: usize) -> Result<Vec<T>> {
        let _g = self.gate.enter();
        let mut out = vec![T::default(); n];
        if n == 0 {
            return Ok(out);
        }
        self.bind()?;
        // SAFETY: `out` has room for n values; the stream is synchronized before returning.
        unsafe {
            let dst = std::slice::from_raw_parts_mut(
                out.as_mut_ptr() as *mut u8,
                n * std::mem::size_of::<T>(),
            );
            result::memcpy_dtoh_async(dst, ptr, self.stream().cu_stream())
                .map_err(|e| driver_err("copying from the device", e))?;
        }
        self.stream()
            .synchronize()
            .map_err(|e| driver_err("running kernels", e))?;
        Ok(out)
    }

    /// Copies `bytes` from `src` to `dst` on the device.
    pub fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let _g = self.gate.enter();
        self.bind()?;
        // SAFETY: both ranges lie in live allocations.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream().cu_stream()) }
            .map_err(|e| driver_err("copying on the device", e))
    }

    /// Waits for all queued work; a kernel's fault surfaces here.
    pub fn sync(&self) -> Result<()> {
        let _g = self.gate.enter();
        self.stream()
            .synchronize()
            .map_err(|e| driver_err("running kernels", e))
    }

    /// Free and total device memory.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| driver_err("reading free memory", e))
    }

    /// Launches `name` on `grid` blocks of `block` threads with `smem` bytes of dynamic shared
    /// memory.
    pub fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &mut Args,
    ) -> Result<()> {
        self.launch_clustered(name, grid, block, smem, 0, args)
    }

    /// Whether at least one cluster of `cluster` blocks of `name` (`block` threads, `smem`
    /// bytes of dynamic shared memory) can be resident on this GPU at once: a slice of a
    /// partitioned GPU (MIG) may not hold 16 blocks together. Asked of the driver once.
    pub fn clusters_fit(&self, name: &str, block: u32, smem: u32, cluster: u32) -> bool {
        let key = (name.to_string(), block, smem, cluster);
        let mut fits = self.cluster_fits.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&f) = fits.get(&key) {
            return f;
        }
        let answer = self.max_active_clusters(name, block, smem, cluster);
        if answer == 0 {
            eprintln!(
                "hadal: warning: {name}: clusters of {cluster} blocks do not fit this GPU; its \
                 other kernel runs instead"
            );
        }
        fits.insert(key, answer > 0);
        answer > 0
    }

    fn max_active_clusters(&self, name: &str, block: u32, smem: u32, cluster: u32) -> i32 {
        if self.bind().is_err() {
            return 0;
        }
        let Ok(f) = self.kernel(name, smem, cluster) else {
            return 0;
        };
        let mut attr = cluster_dim(cluster);
        let config = sys::CUlaunchConfig {
            gridDimX: cluster,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: std::ptr::null_mut(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        let mut n = 0;
        // SAFETY: a query about a loaded kernel with a well-formed configuration.
        let ok = unsafe { sys::cuOccupancyMaxActiveClusters(&mut n, f.cu_function(), &config) };
        if ok.result().is_ok() {
            n
        } else {
            0
        }
    }

    /// [`Gpu::launch`] in clusters of `cluster` consecutive blocks along x (thread block
    /// clusters, compute capability 9.0; more than 8 a cluster is allowed on the kernel first;
    /// 0: no clusters). Kernels that use the cluster's shared memory need the launch to say
    /// so, even for a cluster of one block.
    pub fn launch_clustered(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        cluster: u32,
        args: &mut Args,
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let f = self.kernel(name, smem, cluster)?;
        let _g = self.gate.enter();
        self.bind()?;
        let mut params: Vec<*mut c_void> = args
            .starts
            .iter()
            .map(|&s| args.words[s..].as_mut_ptr() as *mut c_void)
            .collect();
        // Every kernel waits for the work before it (`pdl_wait` in prelude.cuh), so it may be
        // launched while that work runs: its launch and the first loads of its weights overlap
        // the kernel before it.
        let mut attrs = Vec::with_capacity(3);
        if self.overlap {
            attrs.push(sys::CUlaunchAttribute {
                id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
                pad: [0; 4],
                value: sys::CUlaunchAttributeValue {
                    programmaticStreamSerializationAllowed: 1,
                },
            });
        }
        if cluster > 0 {
            attrs.push(cluster_dim(cluster));
        }
        if self.side_priority != 0 && self.on_side() && self.capturing() {
            attrs.push(sys::CUlaunchAttribute {
                id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PRIORITY,
                pad: [0; 4],
                value: sys::CUlaunchAttributeValue {
                    priority: self.side_priority,
                },
            });
        }
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: self.stream().cu_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: attrs.len() as u32,
        };
        // SAFETY: the arguments match the kernel's declaration (each launch site mirrors it) and
        // every address they carry is live until the stream reaches the kernel.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                f.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
            .result()
        }
        .map_err(|e| driver_err(&format!("launching {name}"), e))
    }

    /// The dynamic shared memory that keeps `blocks` blocks of a single wave spread over every
    /// SM (at least `need` bytes): so much that an SM holds no more than its share of them.
    /// Where the block scheduler fills an SM up to its limit before the next, a grid smaller
    /// than the GPU's capacity leaves SMs idle (the one-token down projection's 1,536 one-warp
    /// blocks, 16 an SM by their registers: 358 -> 314 us a 20-layer step spread, 2026-12-02).
    /// For kernels with the largest carveout.
    pub fn spread_smem(&self, blocks: u32, need: u32) -> u32 {
        let (sm, most, reserved) = self.smem;
        let per = blocks.div_ceil(self.sms).max(1);
        // (1 KiB more for a kernel's static shared memory: one block too many an SM is better
        // than a second wave.)
        (sm / per)
            .saturating_sub(reserved + 1024)
            .clamp(need, most.max(need))
    }

    /// Kernel `name`, allowed `smem` bytes of dynamic shared memory and clusters of `cluster`
    /// blocks (past 48 KiB with its static shared memory, and past 8 blocks, the kernel must
    /// opt in).
    fn kernel(&self, name: &str, smem: u32, cluster: u32) -> Result<&CudaFunction> {
        let f = self.func(name)?;
        let fixed = if smem > 0 {
            f.shared_size_bytes()
                .map_err(|e| driver_err(&format!("kernel {name}: shared memory"), e))?
                as u32
        } else {
            0
        };
        if smem + fixed > 48 * 1024 {
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| driver_err(&format!("kernel {name}: shared memory"), e))?;
        }
        if cluster > 8 {
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
                1,
            )
            .map_err(|e| driver_err(&format!("kernel {name}: clusters of {cluster}"), e))?;
        }
        Ok(f)
    }

    fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs
            .get(name)
            .ok_or_else(|| Error::Device(format!("kernel {name} is not loaded")))
    }
}

/// With `HADAL_CUDA_GRAPH_DOT=PREFIX`, writes each recorded graph's nodes and edges (kernels,
/// memory nodes, the edges' kinds) to `PREFIX.N.dot`, Graphviz's format: how a recording
/// came out, for a person to read.
fn dump_graph(g: &cudarc::driver::CudaGraph) {
    static N: AtomicU64 = AtomicU64::new(0);
    let Some(prefix) = std::env::var_os("HADAL_CUDA_GRAPH_DOT") else {
        return;
    };
    let path = format!(
        "{}.{}.dot",
        prefix.to_string_lossy(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let Ok(path) = std::ffi::CString::new(path) else {
        return;
    };
    // SAFETY: a live graph and a NUL-terminated path; a failure only leaves no file.
    let _ = unsafe { sys::cuGraphDebugDotPrint(g.cu_graph(), path.as_ptr(), 0) };
}

/// The launch attribute of clusters of `x` blocks along x.
fn cluster_dim(x: u32) -> sys::CUlaunchAttribute {
    sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION,
        pad: [0; 4],
        value: sys::CUlaunchAttributeValue {
            clusterDim: sys::CUlaunchAttributeValue_union__bindgen_ty_1 { x, y: 1, z: 1 },
        },
    }
}

/// Keeps memory freed by the stream in the device's pool instead of returning it to the driver
/// at every synchronization (the default), so that the activations of each step reuse it.
fn keep_freed_memory(ctx: &Arc<CudaContext>) -> Result<()> {
    let mut pool = std::ptr::null_mut();
    // SAFETY: plain driver queries on a live context.
    unsafe {
        ctx.bind_to_thread()
            .map_err(|e| driver_err("binding the context", e))?;
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(|e| driver_err("reading the memory pool", e))?;
        let mut threshold: u64 = u64::MAX;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut c_void,
        )
        .result()
        .map_err(|e| driver_err("configuring the memory pool", e))?;
    }
    Ok(())
}
