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
