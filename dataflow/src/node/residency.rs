//! The residency registry: where each model asset's weights live, and moving them.
//!
//! An asset is a weights file a node loaded (a [`WeightSource`], e.g. a memory-mapped
//! safetensors file from `nova-operators`). Its state is one of [`AssetState`]:
//! `UNLOADED` → `CPU_MMAP` (mapped, nothing read) → `CPU_HOT` (tensors decoded into a host
//! cache) → `GPU_FULL` (every tensor on the device) or `GPU_PARTIAL` (blocks streamed to the
//! device just ahead of use and released after). "GPU" names the compute device: on the CPU
//! device the same states are kept and device copies are counted by the run's accountant, so
//! residency is testable without a GPU.
//!
//! Invariants:
//! - Device copies of weights are always counted by the run's [`Accountant`] ([`DeviceWeights`]
//!   leases them), and released when the node that used them is done.
//! - Eviction is LRU over assets no running node holds (the pin set); the registry keeps at
//!   most `max_models` assets mapped and `max_cache_bytes` decoded in the host cache.
//! - Every state change is recorded as a [`ResidencyDelta`], which the run announces as a
//!   `telemetry.residency_delta` event.

use crate::node::memory::{Accountant, Bytes, Lease};
use crate::node::NodeError;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Where an asset's weights are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AssetState {
    Unloaded,
    CpuMmap,
    CpuHot,
    GpuFull,
    GpuPartial,
}

/// A source of named weight tensors, read lazily (a memory-mapped file).
pub trait WeightSource: Send + Sync {
    /// Where the weights come from, for messages.
    fn path(&self) -> &Path;
    /// Tensor names, in file order.
    fn names(&self) -> Vec<String>;
    /// A tensor's shape.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Bytes of a tensor once read as f32.
    fn f32_bytes(&self, name: &str) -> Option<u64>;
    /// Reads a tensor as f32 on the host.
    fn read(&self, name: &str) -> Result<Tensor, NodeError>;
}

/// One state change of an asset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResidencyDelta {
    pub asset: String,
    pub from: AssetState,
    pub to: AssetState,
    /// Bytes of the asset on the device after the change.
    pub bytes_on_device: u64,
    pub reason: String,
}

/// A phase of a node's work on its weights and data, as the registry and the engine see it
/// begin: opening and indexing a weights file, reading its tensors, moving them to the
/// device, computing, replaying a result from a cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Indexing,
    Prefetching,
    Warming,
    Running,
    CachedReplay,
}

/// What a node's work left for telemetry since the log was last drained: residency changes,
/// phases entered, and time the registry spent loading (`load_ns`: opening, indexing, reading
/// weights) and moving tensors to the device (`transfer_ns`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkNotes {
    pub deltas: Vec<ResidencyDelta>,
    pub phases: Vec<Phase>,
    pub load_ns: u64,
    pub transfer_ns: u64,
}

impl WorkNotes {
    /// Whether there is nothing to tell.
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
            && self.phases.is_empty()
            && self.load_ns == 0
            && self.transfer_ns == 0
    }
}

#[derive(Debug, Default)]
struct LogInner {
    notes: WorkNotes,
    last_phase: Option<Phase>,
}

/// Where the registry records what a node's work did to residency and time: one log per node
/// of a run, shared by that node's operators, each of which drains it ([`DeltaLog::take`])
/// into telemetry records after its calls into node code. Nothing here reaches the run's
/// driver directly.
#[derive(Clone, Debug, Default)]
pub struct DeltaLog {
    inner: Arc<Mutex<LogInner>>,
}

fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

impl DeltaLog {
    fn with<T>(&self, f: impl FnOnce(&mut LogInner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Records a residency change.
    pub fn push(&self, delta: ResidencyDelta) {
        self.with(|l| l.notes.deltas.push(delta));
    }

    /// The residency changes recorded and not yet drained.
    pub fn deltas(&self) -> Vec<ResidencyDelta> {
        self.with(|l| l.notes.deltas.clone())
    }

    /// Records that the node entered `phase` (a repeat of the last phase is not recorded).
    pub fn enter(&self, phase: Phase) {
        self.with(|l| {
            if l.last_phase != Some(phase) {
                l.last_phase = Some(phase);
                l.notes.phases.push(phase);
            }
        });
    }

    /// Back to `running` after a replay (nothing is recorded otherwise).
    pub fn leave_replay(&self) {
        self.with(|l| {
            if l.last_phase == Some(Phase::CachedReplay) {
                l.last_phase = Some(Phase::Running);
                l.notes.phases.push(Phase::Running);
            }
        });
    }

    /// Time spent opening, indexing or reading weights.
    pub fn load(&self, d: Duration) {
        self.with(|l| l.notes.load_ns += ns(d));
    }

    /// Time spent moving tensors to the device.
    pub fn transfer(&self, d: Duration) {
        self.with(|l| l.notes.transfer_ns += ns(d));
    }

    /// Everything recorded since the last call.
    pub fn take(&self) -> WorkNotes {
        self.with(|l| std::mem::take(&mut l.notes))
    }
}

/// What the registry tells about one asset.
#[derive(Clone, Debug, Serialize)]
pub struct AssetStatus {
    pub name: String,
    pub path: PathBuf,
    pub state: AssetState,
    pub bytes_total: u64,
    pub bytes_on_device: u64,
    pub bytes_hot: u64,
    /// Measured time to read every tensor from the file, once known.
    pub load_ms: Option<f64>,
    /// Measured time to move every tensor to the device, once known.
    pub transfer_ms: Option<f64>,
    /// Registry clock tick of the last use (larger is more recent).
    pub last_use: u64,
    /// Higher is evicted later among unpinned assets.
    pub pin_priority: i32,
    /// Whether the asset must not be quantized or approximated.
    pub quality_critical: bool,
    /// Whether a running node holds it.
    pub pinned: bool,
}

/// A model asset known to the registry.
pub struct Asset {
    name: String,
    source: Box<dyn WeightSource>,
    bytes_total: u64,
    state: Mutex<AssetState>,
    on_device: AtomicU64,
    hot: Mutex<HashMap<String, Tensor>>,
    hot_bytes: AtomicU64,
    last_use: AtomicU64,
    pins: AtomicUsize,
    load_ms: Mutex<Option<f64>>,
    transfer_ms: Mutex<Option<f64>>,
    pub pin_priority: i32,
    pub quality_critical: bool,
}

impl std::fmt::Debug for Asset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Asset")
            .field("name", &self.name)
            .field("path", &self.source.path())
            .field("state", &self.state())
            .finish()
    }
}

impl Asset {
    /// The name the workflow gave (e.g. the file name).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The weights.
    pub fn source(&self) -> &dyn WeightSource {
        self.source.as_ref()
    }
    /// Bytes of every tensor as f32.
    pub fn bytes_total(&self) -> u64 {
        self.bytes_total
    }
    /// The current state.
    pub fn state(&self) -> AssetState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state(&self, to: AssetState, reason: &str, log: Option<&DeltaLog>) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if *s == to {
            return;
        }
        let delta = ResidencyDelta {
            asset: self.name.clone(),
            from: *s,
            to,
            bytes_on_device: self.on_device.load(Ordering::SeqCst),
            reason: reason.to_string(),
        };
        *s = to;
        drop(s);
        if let Some(log) = log {
            log.push(delta);
        }
    }

    /// The state an asset falls back to when nothing is on the device.
    fn host_state(&self) -> AssetState {
        if self.hot_bytes.load(Ordering::SeqCst) > 0 {
            AssetState::CpuHot
        } else {
            AssetState::CpuMmap
        }
    }

    /// A tensor on the host: from the hot cache, or read from the source.
    fn host_tensor(&self, name: &str) -> Result<Tensor, NodeError> {
        if let Some(t) = self.hot.lock().unwrap_or_else(|p| p.into_inner()).get(name) {
            return Ok(t.clone());
        }
        self.source.read(name)
    }
}

/// Limits of the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RegistryLimits {
    /// Assets kept mapped at once (`NOVA_MAX_MODELS_IN_MEMORY`).
    pub max_models: usize,
    /// Bytes of decoded tensors kept in the host cache (`NOVA_MAX_CACHE_SIZE_GB`).
    pub max_cache_bytes: u64,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        RegistryLimits {
            max_models: 4,
            max_cache_bytes: Bytes::gib(2).0,
        }
    }
}

impl RegistryLimits {
    /// The defaults, overridden by `NOVA_MAX_MODELS_IN_MEMORY` and `NOVA_MAX_CACHE_SIZE_GB`
    /// (read through `var`); a bad value is an error naming the variable.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<RegistryLimits, String> {
        let mut l = RegistryLimits::default();
        if let Some(v) = var("NOVA_MAX_MODELS_IN_MEMORY") {
            l.max_models = v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or(format!(
                    "NOVA_MAX_MODELS_IN_MEMORY: '{v}' is not a count of at least 1"
                ))?;
        }
        if let Some(v) = var("NOVA_MAX_CACHE_SIZE_GB") {
            let gb: f64 = v
                .trim()
                .parse()
                .ok()
                .filter(|g: &f64| *g >= 0.0 && g.is_finite())
                .ok_or(format!(
                    "NOVA_MAX_CACHE_SIZE_GB: '{v}' is not a size in GiB"
                ))?;
            l.max_cache_bytes = (gb * (1u64 << 30) as f64) as u64;
        }
        Ok(l)
    }
}

/// The process's model assets.
pub struct Registry {
    limits: RegistryLimits,
    assets: Mutex<BTreeMap<PathBuf, Arc<Asset>>>,
    clock: AtomicU64,
}

impl Registry {
    /// An empty registry.
    pub fn new(limits: RegistryLimits) -> Arc<Registry> {
        Arc::new(Registry {
            limits,
            assets: Mutex::new(BTreeMap::new()),
            clock: AtomicU64::new(0),
        })
    }

    /// The process-wide registry, with limits from the environment (defaults where unset or
    /// unreadable; the CLI checks the variables before it runs anything).
    pub fn global() -> Arc<Registry> {
        static GLOBAL: OnceLock<Arc<Registry>> = OnceLock::new();
        GLOBAL
            .get_or_init(|| {
                Registry::new(
                    RegistryLimits::from_env(|k| std::env::var(k).ok()).unwrap_or_default(),
                )
            })
            .clone()
    }

    /// The limits.
    pub fn limits(&self) -> RegistryLimits {
        self.limits
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The asset at `path`, mapped by `open` if the registry does not hold it yet. Opening
    /// may evict the least recently used unpinned asset to stay within `max_models`.
    pub fn asset(
        &self,
        name: &str,
        path: &Path,
        open: impl FnOnce() -> Result<Box<dyn WeightSource>, NodeError>,
        log: Option<&DeltaLog>,
    ) -> Result<Arc<Asset>, NodeError> {
        let mut assets = self.assets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = assets.get(path) {
            a.last_use.store(self.tick(), Ordering::SeqCst);
            return Ok(a.clone());
        }
        if let Some(l) = log {
            l.enter(Phase::Indexing);
        }
        let opened = Instant::now();
        let source = open();
        if let Some(l) = log {
            l.load(opened.elapsed());
        }
        let source = source?;
        let bytes_total = source
            .names()
            .iter()
            .filter_map(|n| source.f32_bytes(n))
            .sum();
        let asset = Arc::new(Asset {
            name: name.to_string(),
            source,
            bytes_total,
            state: Mutex::new(AssetState::Unloaded),
            on_device: AtomicU64::new(0),
            hot: Mutex::new(HashMap::new()),
            hot_bytes: AtomicU64::new(0),
            last_use: AtomicU64::new(self.tick()),
            pins: AtomicUsize::new(0),
            load_ms: Mutex::new(None),
            transfer_ms: Mutex::new(None),
            pin_priority: 0,
            quality_critical: false,
        });
        asset.set_state(AssetState::CpuMmap, "mapped", log);
        assets.insert(path.to_path_buf(), asset.clone());
        // Over the model limit: unmap the least recently used assets nobody holds.
        while assets.len() > self.limits.max_models {
            let victim = assets
                .iter()
                .filter(|(_, a)| !Self::pinned(a))
                .min_by_key(|(_, a)| (a.pin_priority, a.last_use.load(Ordering::SeqCst)))
                .map(|(p, _)| p.clone());
            let Some(victim) = victim else { break };
            if let Some(a) = assets.remove(&victim) {
                a.hot.lock().unwrap_or_else(|p| p.into_inner()).clear();
                a.hot_bytes.store(0, Ordering::SeqCst);
                a.set_state(AssetState::Unloaded, "evicted (model limit)", log);
            }
        }
        Ok(asset)
    }

    /// Held by someone besides the registry and its own map entry.
    fn pinned(a: &Arc<Asset>) -> bool {
        a.pins.load(Ordering::SeqCst) > 0
    }

    /// Unmaps every asset no running node holds and drops its host cache (the server's
    /// cleanup). Pinned assets are left alone. Returns the state changes.
    pub fn release_unpinned(&self) -> Vec<ResidencyDelta> {
        let log = DeltaLog::default();
        let mut assets = self.assets.lock().unwrap_or_else(|p| p.into_inner());
        let victims: Vec<PathBuf> = assets
            .iter()
            .filter(|(_, a)| !Self::pinned(a))
            .map(|(p, _)| p.clone())
            .collect();
        for path in victims {
            if let Some(a) = assets.remove(&path) {
                a.hot.lock().unwrap_or_else(|p| p.into_inner()).clear();
                a.hot_bytes.store(0, Ordering::SeqCst);
                a.set_state(AssetState::Unloaded, "released (cleanup)", Some(&log));
            }
        }
        drop(assets);
        log.deltas()
    }

    /// Every asset's status, most recently used first.
    pub fn status(&self) -> Vec<AssetStatus> {
        let assets = self.assets.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<AssetStatus> = assets
            .iter()
            .map(|(path, a)| AssetStatus {
                name: a.name.clone(),
                path: path.clone(),
                state: a.state(),
                bytes_total: a.bytes_total,
                bytes_on_device: a.on_device.load(Ordering::SeqCst),
                bytes_hot: a.hot_bytes.load(Ordering::SeqCst),
                load_ms: *a.load_ms.lock().unwrap_or_else(|p| p.into_inner()),
                transfer_ms: *a.transfer_ms.lock().unwrap_or_else(|p| p.into_inner()),
                last_use: a.last_use.load(Ordering::SeqCst),
                pin_priority: a.pin_priority,
                quality_critical: a.quality_critical,
                pinned: Self::pinned(a),
            })
            .collect();
        v.sort_by_key(|s| std::cmp::Reverse(s.last_use));
        v
    }

    /// Keeps `asset`'s decoded tensors in the host cache if they fit `max_cache_bytes`,
    /// evicting the host caches of least recently used unpinned assets to make room.
    fn cache_hot(&self, asset: &Arc<Asset>, tensors: &HashMap<String, Tensor>, log: &DeltaLog) {
        if asset.hot_bytes.load(Ordering::SeqCst) > 0 || asset.bytes_total == 0 {
            return;
        }
        if asset.bytes_total > self.limits.max_cache_bytes {
            return;
        }
        let assets = self.assets.lock().unwrap_or_else(|p| p.into_inner());
        let mut used: u64 = assets
            .values()
            .map(|a| a.hot_bytes.load(Ordering::SeqCst))
            .sum();
        let mut lru: Vec<&Arc<Asset>> = assets
            .values()
            .filter(|a| !Arc::ptr_eq(a, asset) && !Self::pinned(a))
            .filter(|a| a.hot_bytes.load(Ordering::SeqCst) > 0)
            .collect();
        lru.sort_by_key(|a| (a.pin_priority, a.last_use.load(Ordering::SeqCst)));
        for a in lru {
            if used + asset.bytes_total <= self.limits.max_cache_bytes {
                break;
            }
            used -= a.hot_bytes.swap(0, Ordering::SeqCst);
            a.hot.lock().unwrap_or_else(|p| p.into_inner()).clear();
            a.set_state(AssetState::CpuMmap, "host cache evicted (LRU)", Some(log));
        }
        if used + asset.bytes_total <= self.limits.max_cache_bytes {
            *asset.hot.lock().unwrap_or_else(|p| p.into_inner()) = tensors.clone();
            asset.hot_bytes.store(asset.bytes_total, Ordering::SeqCst);
        }
    }
}

/// How a node holds its weights on the device while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum WeightMode {
    /// Every tensor on the device for the whole node.
    Resident,
    /// Blocks moved to the device just ahead of use (`depth` blocks ahead of the one in use)
    /// and released after.
    Streamed { depth: usize },
}

/// What a node needs to put weights on the device for one run.
#[derive(Clone)]
pub struct WeightContext {
    pub registry: Arc<Registry>,
    pub acct: Arc<Accountant>,
    pub log: DeltaLog,
    pub device: Device,
    /// The plan's decision for this node.
    pub mode: WeightMode,
}

impl std::fmt::Debug for WeightContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightContext")
            .field("mode", &self.mode)
            .field("device", &self.device)
            .finish()
    }
}

impl WeightContext {
    /// A context that counts against `acct` and keeps every tensor resident.
    pub fn resident(acct: Arc<Accountant>) -> WeightContext {
        WeightContext {
            registry: Registry::global(),
            acct,
            log: DeltaLog::default(),
            device: Device::Cpu,
            mode: WeightMode::Resident,
        }
    }
}

/// One node's weights on the device: resident for its whole run, or streamed block by block.
/// Pins the asset while it lives; on drop, device copies are released and the asset returns
/// to a host state.
pub struct DeviceWeights {
    asset: Arc<Asset>,
    ctx: WeightContext,
    resident: HashMap<String, Tensor>,
    _lease: Option<Lease>,
}

impl std::fmt::Debug for DeviceWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceWeights")
            .field("asset", &self.asset.name)
            .field("mode", &self.ctx.mode)
            .finish()
    }
}

impl DeviceWeights {
    /// Puts `asset`'s weights on the device as `ctx.mode` says: every tensor now (counted
    /// against the accountant), or nothing yet (blocks are streamed by [`Self::stream`]).
    pub fn new(asset: Arc<Asset>, ctx: WeightContext) -> Result<DeviceWeights, NodeError> {
        Self::part(asset, ctx, "")
    }

    /// Like [`Self::new`] for the tensors whose names start with `prefix` (one model of a
    /// single-file checkpoint, e.g. its UNet); the asset is `GPU_PARTIAL` while only part of
    /// it is on the device.
    pub fn part(
        asset: Arc<Asset>,
        ctx: WeightContext,
        prefix: &str,
    ) -> Result<DeviceWeights, NodeError> {
        asset.pins.fetch_add(1, Ordering::SeqCst);
        asset.last_use.store(ctx.registry.tick(), Ordering::SeqCst);
        let mut w = DeviceWeights {
            asset,
            ctx,
            resident: HashMap::new(),
            _lease: None,
        };
        match w.ctx.mode {
            WeightMode::Resident => {
                let names: Vec<String> = w
                    .asset
                    .source
                    .names()
                    .into_iter()
                    .filter(|n| n.starts_with(prefix))
                    .collect();
                let bytes: u64 = names
                    .iter()
                    .filter_map(|n| w.asset.source.f32_bytes(n))
                    .sum();
                let whole = bytes == w.asset.bytes_total;
                let lease = w.ctx.acct.lease(bytes);
                let was_hot = w.asset.hot_bytes.load(Ordering::SeqCst) > 0;
                if !was_hot {
                    w.ctx.log.enter(Phase::Prefetching);
                }
                let started = Instant::now();
                let mut host = HashMap::new();
                for name in names {
                    let t = w.asset.host_tensor(&name)?;
                    host.insert(name, t);
                }
                let read = started.elapsed();
                w.ctx.log.load(read);
                w.ctx.log.enter(Phase::Warming);
                let started = Instant::now();
                for (name, t) in &host {
                    w.resident.insert(name.clone(), t.to_device(&w.ctx.device)?);
                }
                let moved = started.elapsed();
                w.ctx.log.transfer(moved);
                w.ctx.log.enter(Phase::Running);
                if !was_hot && whole {
                    *w.asset.load_ms.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(read.as_secs_f64() * 1e3);
                    w.ctx.registry.cache_hot(&w.asset, &host, &w.ctx.log);
                }
                *w.asset
                    .transfer_ms
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(moved.as_secs_f64() * 1e3);
                w.asset.on_device.fetch_add(bytes, Ordering::SeqCst);
                let (state, why) = if whole {
                    (AssetState::GpuFull, "loaded for a node")
                } else {
                    (AssetState::GpuPartial, "part loaded for a node")
                };
                w.asset.set_state(state, why, Some(&w.ctx.log));
                w._lease = Some(lease);
            }
            WeightMode::Streamed { .. } => {
                w.asset.set_state(
                    AssetState::GpuPartial,
                    "streaming: weights exceed the budget",
                    Some(&w.ctx.log),
                );
            }
        }
        Ok(w)
    }

    /// The asset.
    pub fn asset(&self) -> &Arc<Asset> {
        &self.asset
    }

    /// How the weights are held.
    pub fn mode(&self) -> WeightMode {
        self.ctx.mode
    }

    /// A pass over `blocks` (each a list of tensor names), in order.
    pub fn stream<'a>(&'a self, blocks: &'a [Vec<String>]) -> WeightStream<'a> {
        WeightStream {
            weights: self,
            blocks,
            loaded: VecDeque::new(),
        }
    }

    /// A resident tensor by name (resident mode only).
    pub fn get(&self, name: &str) -> Result<&Tensor, NodeError> {
        self.resident.get(name).ok_or_else(|| {
            NodeError::Other(format!(
                "tensor '{name}' of {} is not resident",
                self.asset.name
            ))
        })
    }

    /// Moves one block to the device, counted.
    fn load_block(&self, names: &[String]) -> Result<(Vec<Tensor>, Lease), NodeError> {
        let bytes: u64 = names
            .iter()
            .map(|n| self.asset.source.f32_bytes(n).unwrap_or(0))
            .sum();
        let lease = self.ctx.acct.lease(bytes);
        let mut tensors = Vec::with_capacity(names.len());
        for n in names {
            let started = Instant::now();
            let host = self.asset.host_tensor(n)?;
            self.ctx.log.load(started.elapsed());
            let started = Instant::now();
            tensors.push(host.to_device(&self.ctx.device)?);
            self.ctx.log.transfer(started.elapsed());
        }
        self.asset.on_device.fetch_add(bytes, Ordering::SeqCst);
        Ok((tensors, lease))
    }
}

impl Drop for DeviceWeights {
    fn drop(&mut self) {
        if let Some(l) = &self._lease {
            self.asset
                .on_device
                .fetch_sub(l.bytes().0, Ordering::SeqCst);
        }
        self.resident.clear();
        self._lease = None;
        let left = self.asset.pins.fetch_sub(1, Ordering::SeqCst) == 1;
        if left {
            let to = self.asset.host_state();
            self.asset
                .set_state(to, "released after the node", Some(&self.ctx.log));
        }
    }
}

/// One pass over a model's blocks: in resident mode each block is looked up; in streamed
/// mode the block in use and `depth` blocks after it are on the device, and earlier ones are
/// released as the pass moves on.
pub struct WeightStream<'a> {
    weights: &'a DeviceWeights,
    blocks: &'a [Vec<String>],
    loaded: VecDeque<(usize, Vec<Tensor>, Lease)>,
}

impl WeightStream<'_> {
    /// The tensors of block `i`, in the order its names were given. Blocks must be asked for
    /// in increasing order in streamed mode.
    pub fn block(&mut self, i: usize) -> Result<Vec<Tensor>, NodeError> {
        let names = self
            .blocks
            .get(i)
            .ok_or_else(|| NodeError::Other(format!("no weight block {i}")))?;
        let depth = match self.weights.ctx.mode {
            WeightMode::Resident => {
                return names.iter().map(|n| self.weights.get(n).cloned()).collect();
            }
            WeightMode::Streamed { depth } => depth,
        };
        // Release blocks before `i`, then make sure `i ..= i + depth` are on the device.
        while self.loaded.front().is_some_and(|(b, _, _)| *b < i) {
            if let Some((_, _, lease)) = self.loaded.pop_front() {
                self.weights
                    .asset
                    .on_device
                    .fetch_sub(lease.bytes().0, Ordering::SeqCst);
            }
        }
        let next = self.loaded.back().map(|(b, _, _)| b + 1).unwrap_or(i);
        for b in next..=(i + depth).min(self.blocks.len() - 1) {
            let (tensors, lease) = self.weights.load_block(&self.blocks[b])?;
            self.loaded.push_back((b, tensors, lease));
        }
        self.loaded
            .iter()
            .find(|(b, _, _)| *b == i)
            .map(|(_, t, _)| t.clone())
            .ok_or_else(|| NodeError::Other(format!("weight block {i} was asked out of order")))
    }
}

impl Drop for WeightStream<'_> {
    fn drop(&mut self) {
        for (_, _, lease) in self.loaded.drain(..) {
            self.weights
                .asset
                .on_device
                .fetch_sub(lease.bytes().0, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_taken_in_order_without_repeats() {
        let log = DeltaLog::default();
        log.enter(Phase::Indexing);
        log.enter(Phase::Indexing);
        log.enter(Phase::Warming);
        log.load(Duration::from_millis(3));
        let first = log.take();
        assert_eq!(first.phases, [Phase::Indexing, Phase::Warming]);
        assert_eq!(first.load_ns, 3_000_000);
        log.enter(Phase::Warming);
        assert!(log.take().is_empty());
        log.enter(Phase::CachedReplay);
        log.leave_replay();
        assert_eq!(log.take().phases, [Phase::CachedReplay, Phase::Running]);
    }

    /// Weights held in memory: `n` tensors of `len` f32 each.
    struct Fake {
        path: PathBuf,
        n: usize,
        len: usize,
    }

    impl WeightSource for Fake {
        fn path(&self) -> &Path {
            &self.path
        }
        fn names(&self) -> Vec<String> {
            (0..self.n).map(|i| format!("w{i}")).collect()
        }
        fn shape(&self, _name: &str) -> Option<Vec<usize>> {
            Some(vec![self.len])
        }
        fn f32_bytes(&self, _name: &str) -> Option<u64> {
            Some(self.len as u64 * 4)
        }
        fn read(&self, name: &str) -> Result<Tensor, NodeError> {
            let i: f32 = name[1..].parse().unwrap();
            Ok(Tensor::full(i, self.len, &Device::Cpu)?)
        }
    }

    fn open(reg: &Registry, name: &str, n: usize, log: &DeltaLog) -> Arc<Asset> {
        let path = PathBuf::from(format!("/models/{name}"));
        let p = path.clone();
        reg.asset(
            name,
            &path,
            move || {
                Ok(Box::new(Fake {
                    path: p,
                    n,
                    len: 256,
                }))
            },
            Some(log),
        )
        .unwrap()
    }

    fn ctx(
        reg: &Arc<Registry>,
        acct: &Arc<Accountant>,
        log: &DeltaLog,
        mode: WeightMode,
    ) -> WeightContext {
        WeightContext {
            registry: reg.clone(),
            acct: acct.clone(),
            log: log.clone(),
            device: Device::Cpu,
            mode,
        }
    }

    #[test]
    fn resident_weights_are_counted_and_released_with_state_changes() {
        let reg = Registry::new(RegistryLimits::default());
        let log: DeltaLog = Default::default();
        let acct = Accountant::unlimited();
        let a = open(&reg, "m", 4, &log);
        assert_eq!(a.bytes_total(), 4 * 1024);
        {
            let w = DeviceWeights::new(a.clone(), ctx(&reg, &acct, &log, WeightMode::Resident))
                .unwrap();
            assert_eq!(acct.current(), Bytes(4096));
            assert_eq!(w.get("w2").unwrap().to_vec1::<f32>().unwrap()[0], 2.0);
            assert!(reg.status()[0].pinned);
        }
        assert_eq!(acct.current(), Bytes(0));
        let states: Vec<_> = log.deltas().iter().map(|d| d.to).collect();
        assert_eq!(
            states,
            [AssetState::CpuMmap, AssetState::GpuFull, AssetState::CpuHot]
        );
        assert_eq!(reg.status()[0].bytes_hot, 4096);
    }

    #[test]
    fn release_unpinned_unmaps_idle_assets_and_keeps_held_ones() {
        let reg = Registry::new(RegistryLimits::default());
        let log: DeltaLog = Default::default();
        let acct = Accountant::unlimited();
        let idle = open(&reg, "idle", 2, &log);
        let held = open(&reg, "held", 2, &log);
        {
            // Warm the idle one's host cache, then let go of it.
            DeviceWeights::new(idle.clone(), ctx(&reg, &acct, &log, WeightMode::Resident)).unwrap();
        }
        assert_eq!(idle.state(), AssetState::CpuHot);
        let _w =
            DeviceWeights::new(held.clone(), ctx(&reg, &acct, &log, WeightMode::Resident)).unwrap();
        let deltas = reg.release_unpinned();
        assert_eq!(deltas.len(), 1);
        assert_eq!(deltas[0].asset, "idle");
        assert_eq!(deltas[0].to, AssetState::Unloaded);
        let left: Vec<String> = reg.status().into_iter().map(|s| s.name).collect();
        assert_eq!(left, ["held"]);
    }

    #[test]
    fn streamed_blocks_hold_at_most_depth_plus_one_on_the_device() {
        let reg = Registry::new(RegistryLimits::default());
        let log: DeltaLog = Default::default();
        let acct = Accountant::unlimited();
        let a = open(&reg, "big", 8, &log);
        let w = DeviceWeights::new(
            a.clone(),
            ctx(&reg, &acct, &log, WeightMode::Streamed { depth: 1 }),
        )
        .unwrap();
        let blocks: Vec<Vec<String>> = (0..8).map(|i| vec![format!("w{i}")]).collect();
        let mut s = w.stream(&blocks);
        for i in 0..8 {
            let t = s.block(i).unwrap();
            assert_eq!(t[0].to_vec1::<f32>().unwrap()[0], i as f32);
            assert!(
                acct.current().0 <= 2 * 1024,
                "block {i}: {}",
                acct.current()
            );
        }
        drop(s);
        assert_eq!(acct.current(), Bytes(0));
        assert_eq!(acct.peak(), Bytes(2048));
        assert_eq!(a.state(), AssetState::GpuPartial);
        drop(w);
        assert_eq!(a.state(), AssetState::CpuMmap);
    }

    #[test]
    fn the_least_recently_used_unpinned_asset_is_evicted_over_the_model_limit() {
        let reg = Registry::new(RegistryLimits {
            max_models: 2,
            max_cache_bytes: 1 << 20,
        });
        let log: DeltaLog = Default::default();
        let acct = Accountant::unlimited();
        let a = open(&reg, "a", 1, &log);
        let _held =
            DeviceWeights::new(a.clone(), ctx(&reg, &acct, &log, WeightMode::Resident)).unwrap();
        let _b = open(&reg, "b", 1, &log);
        let _c = open(&reg, "c", 1, &log);
        let names: Vec<String> = reg.status().into_iter().map(|s| s.name).collect();
        // "a" is pinned by a running node, so "b" (least recent of the rest) went.
        assert_eq!(names, ["c", "a"]);
        assert!(log
            .deltas()
            .iter()
            .any(|d| d.asset == "b" && d.to == AssetState::Unloaded));
    }

    #[test]
    fn limits_come_from_the_environment_and_bad_values_name_the_variable() {
        let l = RegistryLimits::from_env(|k| match k {
            "NOVA_MAX_MODELS_IN_MEMORY" => Some("3".into()),
            "NOVA_MAX_CACHE_SIZE_GB" => Some("0.5".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!((l.max_models, l.max_cache_bytes), (3, 1 << 29));
        let e =
            RegistryLimits::from_env(|k| (k == "NOVA_MAX_MODELS_IN_MEMORY").then(|| "zero".into()))
                .unwrap_err();
        assert!(e.contains("NOVA_MAX_MODELS_IN_MEMORY"), "{e}");
    }
}
