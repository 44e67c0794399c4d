//! The compiled kernels of one device: every family loaded as a module and each kernel looked up
//! once by name, so launches never search by string and a missing kernel fails at start-up.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction};

use super::compile::{KernelCache, FAMILIES};
use crate::error::{Error, Result};

/// Declares [`Kernels`] (one field per kernel) and [`KERNEL_NAMES`] from one list, so the two
/// cannot disagree.
macro_rules! kernel_table {
    ($($family:literal => [$($name:ident),* $(,)?]),* $(,)?) => {
        /// Every kernel of kernels/*.cu, by its `extern "C"` name.
        pub struct Kernels {
            $($(pub $name: CudaFunction,)*)*
        }

        /// `(family, kernels)` as listed in [`Kernels`].
        pub const KERNEL_NAMES: &[(&str, &[&str])] = &[$(($family, &[$(stringify!($name)),*])),*];

        impl Kernels {
            /// Compiles (or takes from `cache`) every family for `arch` and loads it on `ctx`.
            pub fn load(ctx: &Arc<CudaContext>, cache: &KernelCache, arch: &str) -> Result<Self> {
                cache.prefetch(arch)?;
                $(
                    let module = load_family(ctx, cache, $family, arch)?;
                    $(
                        let $name = module.load_function(stringify!($name)).map_err(|e| {
                            Error::Device(format!("kernel {} missing from kernels/{}.cu: {e}", stringify!($name), $family))
                        })?;
                    )*
                )*
                Ok(Kernels { $($($name,)*)* })
            }
        }
    };
}

kernel_table! {
    "attention" => [kv_write, kv_copy_prefix, attention_decode_partial, attention_decode_combine, attention_prefill],
    "elementwise" => [add_bias, silu_mul, gather_rows, f32_to_bf16_bits, f32_to_f16_bits],
    "embedding" => [embed_bf16_vec8, embed_f16_vec8, embed_bf16_scalar, embed_f16_scalar],
    "gemv" => [
        gemv_bf16_vec8, gemv_f16_vec8, gemv_bf16_scalar, gemv_f16_scalar,
        gemv_silu_mul_bf16_vec8, gemv_silu_mul_f16_vec8, gemv_silu_mul_bf16_scalar, gemv_silu_mul_f16_scalar,
    ],
    "norm" => [rms_norm, head_rms_norm],
    "residual" => [residual_step_vec4, residual_step_scalar],
    "rope" => [rope],
    "sampling" => [argmax_rows, sample_rows],
}

fn source_of(family: &str) -> Result<&'static str> {
    FAMILIES
        .iter()
        .find(|(name, _)| *name == family)
        .map(|(_, source)| *source)
        .ok_or_else(|| Error::Device(format!("kernels/{family}.cu is not embedded in this build")))
}

/// Loads one family's PTX; cached PTX the driver rejects is recompiled once.
fn load_family(ctx: &Arc<CudaContext>, cache: &KernelCache, family: &str, arch: &str) -> Result<Arc<cudarc::driver::CudaModule>> {
    let source = source_of(family)?;
    let ptx = cache.ptx(family, source, arch)?;
    match ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)) {
        Ok(module) => Ok(module),
        Err(_) => {
            cache.forget(family, source, arch);
            let ptx = cache.ptx(family, source, arch)?;
            ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                .map_err(|e| Error::Device(format!("the driver rejected kernels/{family}.cu compiled for {arch}: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_kernel_is_defined_in_its_family() {
        for (family, names) in KERNEL_NAMES {
            let source = source_of(family).unwrap();
            for name in *names {
                assert!(
                    source.contains(&format!("extern \"C\" __global__ void {name}(")),
                    "kernel {name} is listed for kernels/{family}.cu but not defined there"
                );
            }
        }
    }

    #[test]
    fn every_defined_kernel_is_listed() {
        for (family, source) in FAMILIES {
            let listed = KERNEL_NAMES.iter().find(|(f, _)| f == family).map(|(_, n)| *n).unwrap_or(&[]);
            for part in source.split("extern \"C\" __global__ void ").skip(1) {
                let name = part.split('(').next().unwrap_or_default().trim();
                assert!(listed.contains(&name), "kernels/{family}.cu defines {name}, which the backend does not load");
            }
        }
    }
}
