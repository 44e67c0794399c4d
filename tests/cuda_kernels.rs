//! Every kernel family compiles through NVRTC for Ampere (sm_80) and Hopper (sm_90). NVRTC needs
//! no GPU or driver, so this runs in CI; without libnvrtc it prints why and returns, unless
//! `ENGRAM_REQUIRE_NVRTC=1` (CI sets it), when a missing NVRTC fails the test.

use engram::backend::cuda::compile::{compile_all, compile_family, nvrtc_version, FAMILIES};
use engram::backend::cuda::kernels::KERNEL_NAMES;

fn nvrtc_or_skip() -> bool {
    match nvrtc_version() {
        Ok((major, minor)) => {
            eprintln!("NVRTC {major}.{minor}");
            true
        }
        Err(reason) => {
            if std::env::var("ENGRAM_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
                panic!("ENGRAM_REQUIRE_NVRTC=1 but NVRTC is unusable: {reason}");
            }
            eprintln!("skipped: {reason}");
            false
        }
    }
}

#[test]
fn every_kernel_compiles_for_ampere_and_hopper() {
    if !nvrtc_or_skip() {
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        let compiled = compile_all(arch).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(compiled.len(), FAMILIES.len());
        for (family, ptx) in &compiled {
            assert!(ptx.contains(&format!(".target {arch}")), "kernels/{family}.cu was not compiled for {arch}");
            let names = KERNEL_NAMES.iter().find(|(f, _)| f == family).map(|(_, n)| *n).unwrap_or(&[]);
            assert!(!names.is_empty(), "kernels/{family}.cu has no kernels the backend loads");
            for name in names {
                assert!(ptx.contains(&format!(".entry {name}(")), "kernels/{family}.cu: {name} missing from the {arch} PTX");
            }
        }
    }
}

#[test]
fn a_compile_error_carries_the_log_with_file_and_line() {
    if !nvrtc_or_skip() {
        return;
    }
    let broken = "extern \"C\" __global__ void broken(float* x) {\n    x[0] = undefined_name;\n}\n";
    let message = compile_family("broken", broken, "sm_90").expect_err("must not compile").to_string();
    assert!(message.contains("kernels/broken.cu"), "{message}");
    assert!(message.contains("undefined_name"), "{message}");
    assert!(message.contains("(2)"), "the log should point at line 2 of the family file: {message}");
}

#[test]
fn compiled_kernels_are_cached_on_disk_by_source_and_arch() {
    use engram::backend::cuda::compile::KernelCache;
    if !nvrtc_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (family, source) = FAMILIES.iter().find(|(f, _)| *f == "rope").copied().unwrap();
    let first = KernelCache::new(Some(dir.path().to_path_buf())).ptx(family, source, "sm_80").unwrap();
    let files: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].starts_with("rope-") && files[0].ends_with("-sm_80.ptx"), "{files:?}");
    // A fresh cache (a new process) reads the file instead of compiling: mark it to tell.
    let path = dir.path().join(&files[0]);
    std::fs::write(&path, format!("{first}\n// read from disk\n")).unwrap();
    let second = KernelCache::new(Some(dir.path().to_path_buf())).ptx(family, source, "sm_80").unwrap();
    assert!(second.ends_with("// read from disk\n"));
    // Another architecture or changed source is another entry.
    KernelCache::new(Some(dir.path().to_path_buf())).ptx(family, source, "sm_90").unwrap();
    KernelCache::new(Some(dir.path().to_path_buf())).ptx(family, &format!("{source}\n// changed\n"), "sm_80").unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
}
