//! Finding a usable CUDA device without panicking: the driver library, its version, the device
//! count and the device's facts (name, compute capability, memory, SM count).

use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};

/// The oldest driver the `cuda-13000` bindings and NVRTC 13.0's PTX run on (the 580 series).
pub const MIN_DRIVER_VERSION: i32 = 13000;

/// Why no CUDA device can be used; each variant says it in words a user can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaUnavailable {
    /// libcuda (the driver library) cannot be loaded: no NVIDIA driver on this machine.
    NoDriver,
    /// The driver is older than the CUDA version the kernels are built for.
    DriverTooOld { found: i32, needed: i32 },
    /// The driver loads but sees no device.
    NoDevice,
    /// `cuda:N` names a device that does not exist.
    NoSuchDevice { ordinal: usize, count: usize },
    /// Anything else the driver reported while opening the device.
    Failed(String),
}

fn version_text(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

impl std::fmt::Display for CudaUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CudaUnavailable::NoDriver => write!(f, "no NVIDIA driver (libcuda cannot be loaded)"),
            CudaUnavailable::DriverTooOld { found, needed } => write!(
                f,
                "the NVIDIA driver supports CUDA {} but engram's kernels need CUDA {} (driver 580 or newer)",
                version_text(*found),
                version_text(*needed)
            ),
            CudaUnavailable::NoDevice => write!(f, "the NVIDIA driver sees no CUDA device"),
            CudaUnavailable::NoSuchDevice { ordinal, count } => write!(f, "no CUDA device {ordinal} (this machine has {count})"),
            CudaUnavailable::Failed(message) => write!(f, "CUDA device unusable: {message}"),
        }
    }
}

impl std::error::Error for CudaUnavailable {}

/// What `engram info` and the backend name report about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (9, 0) on Hopper.
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
    pub multiprocessors: u32,
    /// As `cuDriverGetVersion` reports it, e.g. 13000 for CUDA 13.0.
    pub driver_version: i32,
}

impl DeviceInfo {
    /// The NVRTC target of this device, e.g. `sm_90`.
    pub fn arch(&self) -> String {
        arch_for(self.compute_capability)
    }
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cuda:{} {} ({}, {:.1} GiB, {} SMs, driver CUDA {})",
            self.ordinal,
            self.name,
            self.arch(),
            self.total_memory as f64 / (1u64 << 30) as f64,
            self.multiprocessors,
            version_text(self.driver_version)
        )
    }
}

/// `sm_XY` for compute capability X.Y.
pub fn arch_for((major, minor): (i32, i32)) -> String {
    format!("sm_{major}{minor}")
}

/// Runs a driver call that may panic inside cudarc (a missing symbol in an old driver) and turns
/// the panic into an error value.
fn guarded<T>(what: &str, call: impl FnOnce() -> Result<T, CudaUnavailable>) -> Result<T, CudaUnavailable> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).unwrap_or_else(|panic| {
        let message = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
        Err(CudaUnavailable::Failed(format!("{what}: {message}")))
    })
}

/// The driver's CUDA version, after checking that the driver library loads at all.
pub fn driver_version() -> Result<i32, CudaUnavailable> {
    // SAFETY: only tries to dlopen libcuda; no symbol is called.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaUnavailable::NoDriver);
    }
    guarded("cuDriverGetVersion", || {
        let mut version = 0i32;
        // SAFETY: the library is present and the out-pointer is a live local.
        let status = unsafe { sys::cuDriverGetVersion(&mut version) };
        if status != sys::CUresult::CUDA_SUCCESS {
            return Err(CudaUnavailable::Failed(format!("cuDriverGetVersion: {status:?}")));
        }
        Ok(version)
    })
}

/// Number of CUDA devices, or why there are none to use.
pub fn device_count() -> Result<usize, CudaUnavailable> {
    let version = driver_version()?;
    if version < MIN_DRIVER_VERSION {
        return Err(CudaUnavailable::DriverTooOld { found: version, needed: MIN_DRIVER_VERSION });
    }
    guarded("cuInit", || match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) => Err(CudaUnavailable::NoDevice),
        Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => Err(CudaUnavailable::NoDevice),
        Err(e) => Err(CudaUnavailable::Failed(format!("cuInit: {e}"))),
    })
}

/// Opens device `ordinal` (its primary context) and reads its facts.
pub fn open(ordinal: usize) -> Result<(Arc<CudaContext>, DeviceInfo), CudaUnavailable> {
    let count = device_count()?;
    if ordinal >= count {
        return Err(CudaUnavailable::NoSuchDevice { ordinal, count });
    }
    let driver_version = driver_version()?;
    guarded("opening the device", || {
        let failed = |what: &str, e: cudarc::driver::DriverError| CudaUnavailable::Failed(format!("{what}: {e}"));
        let ctx = CudaContext::new(ordinal).map_err(|e| failed("creating a context", e))?;
        let name = ctx.name().map_err(|e| failed("device name", e))?;
        let compute_capability = ctx.compute_capability().map_err(|e| failed("compute capability", e))?;
        let total_memory = ctx.total_mem().map_err(|e| failed("device memory", e))?;
        let multiprocessors = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| failed("multiprocessor count", e))? as u32;
        Ok((ctx, DeviceInfo { ordinal, name, compute_capability, total_memory, multiprocessors, driver_version }))
    })
}

/// The facts of device `ordinal`, or why it cannot be used.
pub fn probe(ordinal: usize) -> Result<DeviceInfo, CudaUnavailable> {
    open(ordinal).map(|(_, info)| info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names_follow_compute_capability() {
        assert_eq!(arch_for((9, 0)), "sm_90");
        assert_eq!(arch_for((8, 6)), "sm_86");
        assert_eq!(arch_for((12, 0)), "sm_120");
    }

    #[test]
    fn probing_never_panics() {
        // On a machine without CUDA this is an error value; with a GPU it is the device's facts.
        match probe(0) {
            Ok(info) => assert!(!info.name.is_empty()),
            Err(reason) => assert!(!reason.to_string().is_empty()),
        }
        assert!(probe(usize::MAX).is_err());
    }

    #[test]
    fn reasons_read_as_sentences() {
        let old = CudaUnavailable::DriverTooOld { found: 12040, needed: MIN_DRIVER_VERSION };
        assert_eq!(old.to_string(), "the NVIDIA driver supports CUDA 12.4 but engram's kernels need CUDA 13.0 (driver 580 or newer)");
    }
}
