//! NVRTC: compiles the kernel families embedded by build.rs for one GPU architecture, and caches
//! the PTX in memory and on disk (keyed by source hash, NVRTC version and architecture).
//! NVRTC needs no driver or GPU, so every kernel can be checked to compile on any machine.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

mod sources {
    include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));
}

pub use sources::{FAMILIES, PRELUDE};

/// Whether libnvrtc can be loaded, and its version `(major, minor)`; the error says why not.
pub fn nvrtc_version() -> std::result::Result<(i32, i32), String> {
    // SAFETY: only tries to dlopen libnvrtc.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("libnvrtc cannot be loaded (install the nvidia-cuda-nvrtc wheel with tools/install_nvrtc.sh and add its lib dir to LD_LIBRARY_PATH)".into());
    }
    guarded("nvrtcVersion", || {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: the library is present; both out-pointers are live locals.
        let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(format!("nvrtcVersion: {status:?}"));
        }
        Ok((major, minor))
    })
}

/// Runs an NVRTC call that cudarc may panic in (a missing symbol, an unreadable log) and turns
/// the panic into an error message.
fn guarded<T>(what: &str, call: impl FnOnce() -> std::result::Result<T, String>) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).unwrap_or_else(|panic| {
        let message = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
        Err(format!("{what} panicked: {message}"))
    })
}

/// The program NVRTC compiles for `family`: the prelude, then the family, with `#line` markers
/// so that compile errors name the right file and line.
pub fn program_text(family: &str, source: &str) -> String {
    format!("#line 1 \"kernels/prelude.cuh\"\n{PRELUDE}\n#line 1 \"kernels/{family}.cu\"\n{source}")
}

/// NVRTC options for `arch` (e.g. `sm_90`). Precise math: results must match the CPU backend.
fn options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()]
}

/// Compiles one family for `arch` and returns its PTX; the error carries NVRTC's log.
pub fn compile_family(family: &str, source: &str, arch: &str) -> Result<String> {
    if !arch.starts_with("sm_") || !arch[3..].chars().all(|c| c.is_ascii_alphanumeric()) || arch.len() < 5 {
        return Err(Error::InvalidInput(format!("'{arch}' is not a GPU architecture name like sm_90")));
    }
    nvrtc_version().map_err(Error::Device)?;
    let text = program_text(family, source);
    let compile_options = cudarc::nvrtc::CompileOptions { options: options(arch), name: Some(format!("{family}.cu")), ..Default::default() };
    let result = guarded("NVRTC", || cudarc::nvrtc::compile_ptx_with_opts(&text, compile_options).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => format!("NVRTC failed to compile kernels/{family}.cu for {arch}:\n{}", log.to_string_lossy()),
        other => format!("NVRTC failed on kernels/{family}.cu for {arch}: {other}"),
    }))
    .map_err(Error::Device)?;
    Ok(result.to_src())
}

/// Compiles every embedded family for `arch` (no GPU needed), one thread per family (NVRTC
/// programs are independent); returns `(family, ptx)` pairs in [`FAMILIES`] order.
pub fn compile_all(arch: &str) -> Result<Vec<(&'static str, String)>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = FAMILIES.iter().map(|&(family, source)| (family, scope.spawn(move || compile_family(family, source, arch)))).collect();
        handles
            .into_iter()
            .map(|(family, handle)| {
                let ptx = handle.join().map_err(|_| Error::Device(format!("the NVRTC thread for kernels/{family}.cu panicked")))??;
                Ok((family, ptx))
            })
            .collect()
    })
}

/// 64-bit FNV-1a: a stable content hash for cache file names (std's hasher may change between
/// Rust releases, which would silently invalidate or, worse, alias cache entries).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &byte in *part {
            hash ^= byte as u64;
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separator so that ("ab", "c") and ("a", "bc") differ.
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Where compiled kernels are kept between runs: `$ENGRAM_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/engram/kernels`, else `~/.cache/engram/kernels`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("ENGRAM_KERNEL_CACHE") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))?;
    Some(base.join("engram").join("kernels"))
}

/// Compiled PTX by (family, arch), in memory and (when a directory is given) on disk.
pub struct KernelCache {
    dir: Option<PathBuf>,
    memory: Mutex<HashMap<(String, String), String>>,
}

impl KernelCache {
    pub fn new(dir: Option<PathBuf>) -> Self {
        KernelCache { dir, memory: Mutex::new(HashMap::new()) }
    }

    fn file_for(&self, family: &str, source: &str, arch: &str) -> Option<PathBuf> {
        let (major, minor) = nvrtc_version().ok()?;
        let version = format!("nvrtc {major}.{minor}");
        let text = program_text(family, source);
        let options = options(arch).join(" ");
        let hash = fnv1a(&[text.as_bytes(), options.as_bytes(), version.as_bytes()]);
        Some(self.dir.as_ref()?.join(format!("{family}-{hash:016x}-{arch}.ptx")))
    }

    /// The PTX of `family` for `arch`: from memory, from disk, or compiled now (and stored).
    pub fn ptx(&self, family: &str, source: &str, arch: &str) -> Result<String> {
        let key = (family.to_string(), arch.to_string());
        if let Some(ptx) = self.memory.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(ptx.clone());
        }
        let file = self.file_for(family, source, arch);
        let cached = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok())
            // Unreadable or damaged files (no kernels, embedded NULs the driver loader would
            // choke on) are recompiled rather than trusted.
            .filter(|ptx| ptx.contains(".entry") && !ptx.contains('\0'));
        let ptx = match cached {
            Some(ptx) => ptx,
            None => {
                let ptx = compile_family(family, source, arch)?;
                if let Some(file) = &file {
                    // The disk cache only saves start-up time: failing to write it is not an error.
                    let _ = store(file, &ptx);
                }
                ptx
            }
        };
        self.memory.lock().unwrap_or_else(|e| e.into_inner()).insert(key, ptx.clone());
        Ok(ptx)
    }

    /// Makes sure every family is cached for `arch`, compiling the missing ones in parallel (the
    /// first start on a machine compiles everything; later starts read the disk cache).
    pub fn prefetch(&self, arch: &str) -> Result<()> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = FAMILIES.iter().map(|&(family, source)| (family, scope.spawn(move || self.ptx(family, source, arch)))).collect();
            for (family, handle) in handles {
                handle.join().map_err(|_| Error::Device(format!("the NVRTC thread for kernels/{family}.cu panicked")))??;
            }
            Ok(())
        })
    }

    /// Drops a cached entry (memory and disk), e.g. when the driver rejects cached PTX.
    pub fn forget(&self, family: &str, source: &str, arch: &str) {
        self.memory.lock().unwrap_or_else(|e| e.into_inner()).remove(&(family.to_string(), arch.to_string()));
        if let Some(file) = self.file_for(family, source, arch) {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Writes through a temporary file and a rename, so a concurrent reader never sees half a file.
fn store(file: &Path, ptx: &str) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let temporary = file.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&temporary, ptx)?;
    std::fs::rename(&temporary, file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_embedded() {
        let names: Vec<&str> = FAMILIES.iter().map(|(name, _)| *name).collect();
        for family in ["attention", "elementwise", "embedding", "gemv", "norm", "residual", "rope", "sampling"] {
            assert!(names.contains(&family), "kernels/{family}.cu is not embedded: {names:?}");
        }
        assert!(PRELUDE.contains("bf16_to_f32"));
    }

    #[test]
    fn kernels_are_header_free() {
        for (family, source) in FAMILIES.iter().copied().chain([("prelude", PRELUDE)]) {
            assert!(!source.lines().any(|line| line.trim_start().starts_with("#include")), "kernels/{family} must not #include anything (NVRTC has no toolkit headers here)");
        }
    }

    #[test]
    fn cache_names_change_with_the_source() {
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        assert_ne!(fnv1a(&[b"kernel v1"]), fnv1a(&[b"kernel v2"]));
    }

    #[test]
    fn bad_architecture_names_are_rejected_without_nvrtc() {
        assert!(matches!(compile_family("rope", "", "compute"), Err(Error::InvalidInput(_))));
        assert!(matches!(compile_family("rope", "", "sm_9;0"), Err(Error::InvalidInput(_))));
    }
}
