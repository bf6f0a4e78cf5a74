//! Hardware profiles, device detection, and the memory settings of a run resolved from flags,
//! the workflow, the environment and detection into one [`MemoryConfig`].
//!
//! A profile fixes what the planner may do on a class of device: the budget it targets, the
//! headroom kept free (driver, context, fragmentation), the activation precision, which weight
//! quantizations are allowed, the default and smallest tile, how many chunks are cut ahead of
//! the workers (prefetch depth), and which kernels to prefer.
//!
//! Detection loads NVML (`libnvidia-ml.so.1`) at run time with `libloading`, so neither the
//! build nor the tests need a driver; without one the device is the CPU, the profile is
//! `CPU_SAFE`, and the reason is kept for the log. Compute capability and total memory choose
//! among the NVIDIA profiles. `AMD_ROCM` and `INTEL_XPU` are chosen by name only (no ROCm or
//! Level Zero probe yet).

use crate::node::memory::Bytes;
use serde::Serialize;
use std::fmt;

/// Activation precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    /// Bytes per element.
    pub fn bytes(self) -> u64 {
        match self {
            Precision::F32 => 4,
            Precision::F16 | Precision::Bf16 => 2,
        }
    }
}

/// A named class of device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ProfileId {
    #[serde(rename = "PASCAL_2G")]
    Pascal2G,
    #[serde(rename = "PASCAL_4G")]
    Pascal4G,
    #[serde(rename = "PASCAL_6G_8G")]
    Pascal6G8G,
    #[serde(rename = "RTX_MODERN")]
    RtxModern,
    #[serde(rename = "AMD_ROCM")]
    AmdRocm,
    #[serde(rename = "INTEL_XPU")]
    IntelXpu,
    #[serde(rename = "CPU_SAFE")]
    CpuSafe,
}

impl ProfileId {
    /// Every profile, smallest device first.
    pub const ALL: [ProfileId; 7] = [
        ProfileId::Pascal2G,
        ProfileId::Pascal4G,
        ProfileId::Pascal6G8G,
        ProfileId::RtxModern,
        ProfileId::AmdRocm,
        ProfileId::IntelXpu,
        ProfileId::CpuSafe,
    ];

    /// The profile's name as users write it.
    pub fn name(self) -> &'static str {
        match self {
            ProfileId::Pascal2G => "PASCAL_2G",
            ProfileId::Pascal4G => "PASCAL_4G",
            ProfileId::Pascal6G8G => "PASCAL_6G_8G",
            ProfileId::RtxModern => "RTX_MODERN",
            ProfileId::AmdRocm => "AMD_ROCM",
            ProfileId::IntelXpu => "INTEL_XPU",
            ProfileId::CpuSafe => "CPU_SAFE",
        }
    }

    /// Parses a name, case-insensitively.
    pub fn parse(s: &str) -> Result<ProfileId, String> {
        ProfileId::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                let names: Vec<&str> = ProfileId::ALL.iter().map(|p| p.name()).collect();
                format!("unknown profile '{s}' (one of {})", names.join(", "))
            })
    }

    /// The profile's settings.
    pub fn spec(self) -> Profile {
        let base = Profile {
            id: self,
            description: "",
            device_memory: None,
            headroom: Bytes::mib(512),
            precision: Precision::F16,
            quantization: &["fp16", "q8_0"],
            tile: 512,
            min_tile: 64,
            prefetch_depth: 1,
            kernels: "",
        };
        match self {
            ProfileId::Pascal2G => Profile {
                description: "GTX 1050 class, 2 GiB: fp16 storage, fp32 math, small tiles",
                device_memory: Some(Bytes::gib(2)),
                headroom: Bytes::mib(320),
                quantization: &["fp16", "q8_0", "q4_0"],
                tile: 256,
                min_tile: 32,
                prefetch_depth: 1,
                kernels: "fp32 accumulate (no fast fp16 on Pascal), no fused attention",
                ..base
            },
            ProfileId::Pascal4G => Profile {
                description: "GTX 1050 Ti / 1650 class, 4 GiB",
                device_memory: Some(Bytes::gib(4)),
                headroom: Bytes::mib(448),
                quantization: &["fp16", "q8_0", "q4_0"],
                tile: 384,
                min_tile: 32,
                prefetch_depth: 1,
                kernels: "fp32 accumulate (no fast fp16 on Pascal), no fused attention",
                ..base
            },
            ProfileId::Pascal6G8G => Profile {
                description: "GTX 1060 6 GB to GTX 1080, 6-8 GiB",
                device_memory: Some(Bytes::gib(6)),
                headroom: Bytes::mib(512),
                tile: 512,
                prefetch_depth: 2,
                kernels: "fp32 accumulate (no fast fp16 on Pascal), no fused attention",
                ..base
            },
            ProfileId::RtxModern => Profile {
                description: "RTX 20xx and newer (compute capability 7.0+), 8 GiB and up",
                device_memory: Some(Bytes::gib(8)),
                headroom: Bytes::mib(768),
                precision: Precision::F16,
                quantization: &["fp16", "bf16", "q8_0"],
                tile: 1024,
                min_tile: 64,
                prefetch_depth: 2,
                kernels: "tensor cores, fused attention",
                ..base
            },
            ProfileId::AmdRocm => Profile {
                description: "AMD GPU under ROCm, 8 GiB and up",
                device_memory: Some(Bytes::gib(8)),
                headroom: Bytes::mib(768),
                tile: 768,
                prefetch_depth: 2,
                kernels: "fp16 math, no fused attention",
                ..base
            },
            ProfileId::IntelXpu => Profile {
                description: "Intel Arc / XPU, 8 GiB and up",
                device_memory: Some(Bytes::gib(8)),
                headroom: Bytes::mib(768),
                tile: 768,
                prefetch_depth: 2,
                kernels: "fp16 math, no fused attention",
                ..base
            },
            ProfileId::CpuSafe => Profile {
                description: "CPU only: budget simulated from system memory, fp32",
                device_memory: None,
                headroom: Bytes::mib(256),
                precision: Precision::F32,
                quantization: &["q8_0"],
                tile: 512,
                min_tile: 32,
                prefetch_depth: 1,
                kernels: "candle CPU kernels (gemm, rayon)",
                ..base
            },
        }
    }
}

impl fmt::Display for ProfileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a profile fixes.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Profile {
    pub id: ProfileId,
    pub description: &'static str,
    /// The device memory the profile is sized for; `None` for the CPU (read from the system).
    pub device_memory: Option<Bytes>,
    /// Kept free of the budget for the driver, context and fragmentation.
    pub headroom: Bytes,
    /// Activation precision for model nodes (IMAGE values stay f32, ComfyUI's convention).
    pub precision: Precision,
    /// Weight quantizations the profile allows for quantizable nodes.
    pub quantization: &'static [&'static str],
    /// Default tile side.
    pub tile: usize,
    /// The smallest tile side the planner goes down to before refusing.
    pub min_tile: usize,
    /// Chunks cut ahead of the workers (and model blocks prefetched ahead of use).
    pub prefetch_depth: usize,
    /// Kernel preferences, in words.
    pub kernels: &'static str,
}

/// One GPU as the driver reports it.
#[derive(Clone, Debug, Serialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub total: Bytes,
    pub free: Bytes,
    pub compute_capability: (i32, i32),
}

/// What detection found, and why it chose its profile.
#[derive(Clone, Debug, Serialize)]
pub struct Detection {
    pub gpus: Vec<GpuInfo>,
    /// Physical memory of the machine, when readable.
    pub system_memory: Option<Bytes>,
    pub profile: ProfileId,
    /// Why this profile (e.g. "NVML not found: ..., using CPU_SAFE").
    pub reason: String,
}

/// Chooses a profile for an NVIDIA GPU from its compute capability and memory.
pub fn profile_for_gpu(compute_capability: (i32, i32), total: Bytes) -> ProfileId {
    if compute_capability.0 >= 7 {
        ProfileId::RtxModern
    } else if total <= Bytes::mib(2560) {
        ProfileId::Pascal2G
    } else if total <= Bytes::mib(4608) {
        ProfileId::Pascal4G
    } else {
        ProfileId::Pascal6G8G
    }
}

/// Detects the device: the first NVIDIA GPU through NVML, else the CPU.
pub fn detect() -> Detection {
    let system_memory = system_memory();
    match nvml::gpus() {
        Ok(gpus) if !gpus.is_empty() => {
            let g = &gpus[0];
            let profile = profile_for_gpu(g.compute_capability, g.total);
            let reason = format!(
                "GPU 0 {} (compute {}.{}, {}) chose {profile}",
                g.name, g.compute_capability.0, g.compute_capability.1, g.total
            );
            Detection {
                gpus,
                system_memory,
                profile,
                reason,
            }
        }
        Ok(_) => Detection {
            gpus: vec![],
            system_memory,
            profile: ProfileId::CpuSafe,
            reason: "NVML reports no GPU; using CPU_SAFE".into(),
        },
        Err(why) => Detection {
            gpus: vec![],
            system_memory,
            profile: ProfileId::CpuSafe,
            reason: format!("{why}; using CPU_SAFE"),
        },
    }
}

/// Physical memory from `/proc/meminfo`.
fn system_memory() -> Option<Bytes> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(Bytes(kib * 1024))
}

/// NVML, loaded at run time.
mod nvml {
    use super::{Bytes, GpuInfo};
    use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

    #[repr(C)]
    struct Memory {
        total: u64,
        free: u64,
        used: u64,
    }

    type Handle = *mut c_void;

    /// Lists the GPUs, or says why it cannot.
    pub fn gpus() -> Result<Vec<GpuInfo>, String> {
        // SAFETY: loading NVML runs its initialisers, which have no preconditions; the symbols
        // are looked up with the signatures of NVML's public C API (nvml.h, stable since
        // CUDA 6), and every pointer handed to them points at a live local of the right type.
        unsafe {
            let lib = libloading::Library::new("libnvidia-ml.so.1")
                .or_else(|_| libloading::Library::new("libnvidia-ml.so"))
                .map_err(|e| format!("NVML not found ({e})"))?;
            let sym = |name: &[u8]| -> Result<*mut c_void, String> {
                lib.get::<*mut c_void>(name)
                    .map(|s| *s)
                    .map_err(|e| format!("NVML lacks {}: {e}", String::from_utf8_lossy(name)))
            };
            let init: extern "C" fn() -> c_int = std::mem::transmute(sym(b"nvmlInit_v2\0")?);
            let count: extern "C" fn(*mut c_uint) -> c_int =
                std::mem::transmute(sym(b"nvmlDeviceGetCount_v2\0")?);
            let by_index: extern "C" fn(c_uint, *mut Handle) -> c_int =
                std::mem::transmute(sym(b"nvmlDeviceGetHandleByIndex_v2\0")?);
            let memory: extern "C" fn(Handle, *mut Memory) -> c_int =
                std::mem::transmute(sym(b"nvmlDeviceGetMemoryInfo\0")?);
            let cc: extern "C" fn(Handle, *mut c_int, *mut c_int) -> c_int =
                std::mem::transmute(sym(b"nvmlDeviceGetCudaComputeCapability\0")?);
            let name: extern "C" fn(Handle, *mut c_char, c_uint) -> c_int =
                std::mem::transmute(sym(b"nvmlDeviceGetName\0")?);
            let rc = init();
            if rc != 0 {
                return Err(format!("NVML failed to initialise (code {rc})"));
            }
            let mut n: c_uint = 0;
            if count(&mut n) != 0 {
                return Err("NVML could not count devices".into());
            }
            let mut out = Vec::new();
            for i in 0..n {
                let mut h: Handle = std::ptr::null_mut();
                if by_index(i, &mut h) != 0 {
                    continue;
                }
                let mut m = Memory {
                    total: 0,
                    free: 0,
                    used: 0,
                };
                let (mut major, mut minor) = (0, 0);
                let mut buf = [0 as c_char; 96];
                if memory(h, &mut m) != 0 || cc(h, &mut major, &mut minor) != 0 {
                    continue;
                }
                let label = if name(h, buf.as_mut_ptr(), buf.len() as c_uint) == 0 {
                    CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
                } else {
                    format!("GPU {i}")
                };
                out.push(GpuInfo {
                    index: i,
                    name: label,
                    total: Bytes(m.total),
                    free: Bytes(m.free),
                    compute_capability: (major, minor),
                });
            }
            Ok(out)
        }
    }
}

/// What admission control does with a job whose forecast does not fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Admission {
    /// Refuse it before it runs.
    Enforce,
    /// Log the refusal and run it anyway.
    DryRun,
    /// Do not check.
    Off,
}

impl Admission {
    /// The name `parse` reads.
    pub fn as_str(&self) -> &'static str {
        match self {
            Admission::Enforce => "enforce",
            Admission::DryRun => "dry-run",
            Admission::Off => "off",
        }
    }

    /// Parses `enforce`, `dry-run` or `off`.
    pub fn parse(s: &str) -> Result<Admission, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "enforce" | "on" => Ok(Admission::Enforce),
            "dry-run" | "dryrun" | "log" => Ok(Admission::DryRun),
            "off" => Ok(Admission::Off),
            _ => Err(format!(
                "unknown admission mode '{s}' (enforce, dry-run, off)"
            )),
        }
    }
}

/// Memory settings one might give a run; unset fields fall through to the next source.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemoryOverrides {
    pub profile: Option<ProfileId>,
    pub budget: Option<Bytes>,
    pub headroom: Option<Bytes>,
    pub admission: Option<Admission>,
    /// Fraction added to the forecast before it is compared with the budget.
    pub safety_margin: Option<f64>,
    /// Tile side override (pixels).
    pub tile: Option<usize>,
}

impl MemoryOverrides {
    /// Reads `NOVA_PROFILE`, `NOVA_VRAM_BUDGET`, `NOVA_HEADROOM`, `NOVA_ADMISSION`,
    /// `NOVA_SAFETY_MARGIN` and `NOVA_TILE_SIZE` through `get`.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<MemoryOverrides, String> {
        let read = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let named = |k: &str, e: String| format!("{k}: {e}");
        Ok(MemoryOverrides {
            profile: read("NOVA_PROFILE")
                .map(|v| ProfileId::parse(&v).map_err(|e| named("NOVA_PROFILE", e)))
                .transpose()?,
            budget: read("NOVA_VRAM_BUDGET")
                .map(|v| Bytes::parse(&v).map_err(|e| named("NOVA_VRAM_BUDGET", e)))
                .transpose()?,
            headroom: read("NOVA_HEADROOM")
                .map(|v| Bytes::parse(&v).map_err(|e| named("NOVA_HEADROOM", e)))
                .transpose()?,
            admission: read("NOVA_ADMISSION")
                .map(|v| Admission::parse(&v).map_err(|e| named("NOVA_ADMISSION", e)))
                .transpose()?,
            safety_margin: read("NOVA_SAFETY_MARGIN")
                .map(|v| parse_margin(&v).map_err(|e| named("NOVA_SAFETY_MARGIN", e)))
                .transpose()?,
            tile: read("NOVA_TILE_SIZE")
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|e| named("NOVA_TILE_SIZE", e.to_string()))
                })
                .transpose()?,
        })
    }

    /// Reads the `nova` object of a workflow's `extra_data` (`{"profile": "PASCAL_4G",
    /// "vram_budget": "3GiB", "headroom": "256MiB", "admission": "dry-run",
    /// "safety_margin": 0.1, "tile_size": 256}`).
    pub fn from_json(v: &serde_json::Value) -> Result<MemoryOverrides, String> {
        let obj = v.as_object().ok_or("extra_data.nova must be an object")?;
        let s = |k: &str| -> Result<Option<String>, String> {
            match obj.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string())),
                Some(other) => Err(format!(
                    "extra_data.nova.{k}: expected a string, got {other}"
                )),
            }
        };
        let named = |k: &str, e: String| format!("extra_data.nova.{k}: {e}");
        for k in obj.keys() {
            if ![
                "profile",
                "vram_budget",
                "headroom",
                "admission",
                "safety_margin",
                "tile_size",
            ]
            .contains(&k.as_str())
            {
                return Err(format!("extra_data.nova.{k}: unknown setting"));
            }
        }
        Ok(MemoryOverrides {
            profile: s("profile")?
                .map(|v| ProfileId::parse(&v).map_err(|e| named("profile", e)))
                .transpose()?,
            budget: s("vram_budget")?
                .map(|v| Bytes::parse(&v).map_err(|e| named("vram_budget", e)))
                .transpose()?,
            headroom: s("headroom")?
                .map(|v| Bytes::parse(&v).map_err(|e| named("headroom", e)))
                .transpose()?,
            admission: s("admission")?
                .map(|v| Admission::parse(&v).map_err(|e| named("admission", e)))
                .transpose()?,
            safety_margin: s("safety_margin")?
                .map(|v| parse_margin(&v).map_err(|e| named("safety_margin", e)))
                .transpose()?,
            tile: s("tile_size")?
                .map(|v| {
                    v.parse::<usize>()
                        .map_err(|e| named("tile_size", e.to_string()))
                })
                .transpose()?,
        })
    }

    /// Fills unset fields from `lower`.
    pub fn or(self, lower: MemoryOverrides) -> MemoryOverrides {
        MemoryOverrides {
            profile: self.profile.or(lower.profile),
            budget: self.budget.or(lower.budget),
            headroom: self.headroom.or(lower.headroom),
            admission: self.admission.or(lower.admission),
            safety_margin: self.safety_margin.or(lower.safety_margin),
            tile: self.tile.or(lower.tile),
        }
    }
}

/// A safety margin: a fraction in `[0, 1]` (`0.1`) or a percentage (`10%`).
pub fn parse_margin(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| format!("'{s}' is not a margin (0.1 or 10%)"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("margin '{s}' must lie between 0 and 100%"));
    }
    Ok(v)
}

/// Where a run's budget came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetSource {
    /// `--vram-budget`, the environment or the workflow.
    Given,
    /// The detected GPU's total memory.
    Device,
    /// The profile's nominal size.
    Profile,
    /// Half the machine's physical memory (CPU).
    System,
    /// Nothing could be read: admitted without a limit.
    Unknown,
}

impl BudgetSource {
    /// Where the budget came from, for people.
    pub fn describe(&self) -> &'static str {
        match self {
            BudgetSource::Given => "given",
            BudgetSource::Device => "the device's total",
            BudgetSource::Profile => "the profile's size",
            BudgetSource::System => "half of system memory",
            BudgetSource::Unknown => "unknown",
        }
    }
}

/// The resolved memory settings of one run: the one place they live.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryConfig {
    pub profile: Profile,
    /// The device memory the run may use, headroom included; `None` when it could not be read.
    pub budget: Option<Bytes>,
    pub budget_source: BudgetSource,
    pub headroom: Bytes,
    pub admission: Admission,
    pub safety_margin: f64,
    /// Largest tile side (the profile's unless overridden); the planner goes smaller to fit.
    pub tile: usize,
    /// Why the profile was chosen, or that it was given.
    pub reason: String,
}

/// The default safety margin added to forecasts.
pub const DEFAULT_SAFETY_MARGIN: f64 = 0.05;

impl MemoryConfig {
    /// Resolves settings: `overrides` (already merged in precedence order: flags, then
    /// workflow, then environment) over `detection`.
    pub fn resolve(overrides: &MemoryOverrides, detection: &Detection) -> MemoryConfig {
        let (id, reason) = match overrides.profile {
            Some(p) => (p, format!("{p} was asked for")),
            None => (detection.profile, detection.reason.clone()),
        };
        let profile = id.spec();
        let gpu_total = detection.gpus.first().map(|g| g.total);
        let (budget, budget_source) = match (overrides.budget, id) {
            (Some(b), _) => (Some(b), BudgetSource::Given),
            (None, ProfileId::CpuSafe) => match detection.system_memory {
                Some(m) => (Some(Bytes(m.0 / 2)), BudgetSource::System),
                None => (None, BudgetSource::Unknown),
            },
            // A detected GPU of this profile: its real size; else the profile's nominal size.
            (None, _) if overrides.profile.is_none() && gpu_total.is_some() => {
                (gpu_total, BudgetSource::Device)
            }
            (None, _) => (profile.device_memory, BudgetSource::Profile),
        };
        // The profile's headroom is sized for its own device: a smaller budget keeps the same
        // share of itself free (CPU_SAFE, sized by the machine: at most an eighth), unless a
        // headroom was given.
        let headroom = overrides
            .headroom
            .unwrap_or(match (budget, profile.device_memory) {
                (Some(b), Some(nominal)) if b < nominal => {
                    Bytes((profile.headroom.0 as u128 * b.0 as u128 / nominal.0 as u128) as u64)
                }
                (Some(b), None) => Bytes(profile.headroom.0.min(b.0 / 8)),
                _ => profile.headroom,
            });
        MemoryConfig {
            headroom,
            admission: overrides.admission.unwrap_or(Admission::Enforce),
            safety_margin: overrides.safety_margin.unwrap_or(DEFAULT_SAFETY_MARGIN),
            tile: overrides.tile.unwrap_or(profile.tile),
            profile,
            budget,
            budget_source,
            reason,
        }
    }

    /// What the planner may fill: the budget minus headroom (`None`: unknown, no limit).
    pub fn usable(&self) -> Option<Bytes> {
        self.budget.map(|b| b.saturating_sub(self.headroom))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(system: Option<Bytes>) -> Detection {
        Detection {
            gpus: vec![],
            system_memory: system,
            profile: ProfileId::CpuSafe,
            reason: "no NVML".into(),
        }
    }

    #[test]
    fn gpus_choose_profiles_by_capability_and_memory() {
        assert_eq!(profile_for_gpu((6, 1), Bytes::gib(2)), ProfileId::Pascal2G);
        assert_eq!(profile_for_gpu((6, 1), Bytes::gib(4)), ProfileId::Pascal4G);
        assert_eq!(
            profile_for_gpu((6, 1), Bytes::gib(8)),
            ProfileId::Pascal6G8G
        );
        assert_eq!(
            profile_for_gpu((8, 6), Bytes::gib(12)),
            ProfileId::RtxModern
        );
        assert_eq!(
            profile_for_gpu((9, 0), Bytes::gib(80)),
            ProfileId::RtxModern
        );
    }

    #[test]
    fn every_profile_parses_by_name() {
        for p in ProfileId::ALL {
            assert_eq!(ProfileId::parse(&p.name().to_lowercase()), Ok(p));
            let s = p.spec();
            assert!(s.min_tile <= s.tile && s.prefetch_depth >= 1);
        }
        assert!(ProfileId::parse("GTX_TITAN")
            .unwrap_err()
            .contains("PASCAL_2G"));
    }

    #[test]
    fn flags_beat_workflow_beat_environment_beat_detection() {
        let env = MemoryOverrides::from_env(|k| match k {
            "NOVA_PROFILE" => Some("PASCAL_4G".into()),
            "NOVA_VRAM_BUDGET" => Some("3GiB".into()),
            _ => None,
        })
        .unwrap();
        let wf = MemoryOverrides::from_json(&serde_json::json!({"vram_budget": "2GiB"})).unwrap();
        let flags = MemoryOverrides {
            profile: Some(ProfileId::Pascal2G),
            ..Default::default()
        };
        let c = MemoryConfig::resolve(&flags.clone().or(wf).or(env), &cpu(Some(Bytes::gib(16))));
        assert_eq!(c.profile.id, ProfileId::Pascal2G);
        assert_eq!(c.budget, Some(Bytes::gib(2)));
        assert_eq!(c.budget_source, BudgetSource::Given);
        assert_eq!(
            c.usable(),
            Some(Bytes::gib(2).saturating_sub(Bytes::mib(320)))
        );
        // A budget below the profile's size keeps the same share free.
        let small = MemoryOverrides {
            budget: Some(Bytes::gib(1)),
            ..flags.clone()
        };
        let c = MemoryConfig::resolve(&small, &cpu(None));
        assert_eq!(c.headroom, Bytes::mib(160));
        // CPU_SAFE keeps at most an eighth of a small budget.
        let cpu_small = MemoryOverrides {
            budget: Some(Bytes::mib(64)),
            ..Default::default()
        };
        let c = MemoryConfig::resolve(&cpu_small, &cpu(None));
        assert_eq!(c.headroom, Bytes::mib(8));
    }

    #[test]
    fn cpu_budget_is_half_the_system_memory_and_unknown_memory_fails_open() {
        let c = MemoryConfig::resolve(&MemoryOverrides::default(), &cpu(Some(Bytes::gib(16))));
        assert_eq!(
            (c.budget, c.budget_source),
            (Some(Bytes::gib(8)), BudgetSource::System)
        );
        let c = MemoryConfig::resolve(&MemoryOverrides::default(), &cpu(None));
        assert_eq!((c.budget, c.usable()), (None, None));
        assert_eq!(c.budget_source, BudgetSource::Unknown);
    }

    #[test]
    fn bad_settings_name_their_source() {
        let e = MemoryOverrides::from_env(|k| (k == "NOVA_VRAM_BUDGET").then(|| "big".into()))
            .unwrap_err();
        assert!(e.starts_with("NOVA_VRAM_BUDGET"), "{e}");
        let e = MemoryOverrides::from_json(&serde_json::json!({"profil": "X"})).unwrap_err();
        assert!(e.contains("profil"), "{e}");
        assert!(parse_margin("150%").is_err());
        assert_eq!(parse_margin("10%"), Ok(0.1));
    }

    #[test]
    fn detection_without_a_driver_falls_back_to_cpu_with_a_reason() {
        let d = detect();
        if d.gpus.is_empty() {
            assert_eq!(d.profile, ProfileId::CpuSafe);
            assert!(d.reason.contains("CPU_SAFE"), "{}", d.reason);
        } else {
            assert_ne!(d.profile, ProfileId::CpuSafe);
        }
    }
}
