//! Host tensors: a shape plus row-major data in one of the weight dtypes engram computes with.

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::model::quant::{self, GgmlType};

/// How weights are held in memory (activations are always f32): a float type, a GGUF
/// block-quantized type computed on directly, or `Native`, which keeps each tensor in the type
/// its file stores it in whenever engram computes on that type (f32 otherwise).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q4_K,
    Q6_K,
    Native,
}

impl DType {
    /// Bytes per element of the float types (`None` for block-quantized and `Native`).
    pub fn size_in_bytes(self) -> Option<usize> {
        match self {
            DType::F32 => Some(4),
            DType::F16 | DType::BF16 => Some(2),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q5_0 => "q5_0",
            DType::Q4_K => "q4_k",
            DType::Q6_K => "q6_k",
            DType::Native => "native",
        }
    }

    /// The ggml block type of a quantized dtype.
    pub fn quant_type(self) -> Option<GgmlType> {
        match self {
            DType::Q8_0 => Some(GgmlType::Q8_0),
            DType::Q4_0 => Some(GgmlType::Q4_0),
            DType::Q4_1 => Some(GgmlType::Q4_1),
            DType::Q5_0 => Some(GgmlType::Q5_0),
            DType::Q4_K => Some(GgmlType::Q4_K),
            DType::Q6_K => Some(GgmlType::Q6_K),
            _ => None,
        }
    }

    /// The dtype that holds a ggml type as it is, if engram computes on it.
    pub fn of_ggml(ty: GgmlType) -> Option<DType> {
        match ty {
            GgmlType::F32 => Some(DType::F32),
            GgmlType::F16 => Some(DType::F16),
            GgmlType::BF16 => Some(DType::BF16),
            GgmlType::Q8_0 => Some(DType::Q8_0),
            GgmlType::Q4_0 => Some(DType::Q4_0),
            GgmlType::Q4_1 => Some(DType::Q4_1),
            GgmlType::Q5_0 => Some(DType::Q5_0),
            GgmlType::Q4_K => Some(DType::Q4_K),
            GgmlType::Q6_K => Some(DType::Q6_K),
            _ => None,
        }
    }
}

impl std::str::FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "q8_0" => Ok(DType::Q8_0),
            "q4_0" => Ok(DType::Q4_0),
            "q4_1" => Ok(DType::Q4_1),
            "q5_0" => Ok(DType::Q5_0),
            "q4_k" => Ok(DType::Q4_K),
            "q6_k" => Ok(DType::Q6_K),
            "native" => Ok(DType::Native),
            other => Err(Error::InvalidInput(format!(
                "unknown dtype '{other}' (expected f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q4_k, q6_k or native)"
            ))),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Row-major element storage.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    /// GGUF blocks of `ty` (Q8_0, Q4_0, Q4_1, Q5_0, Q4_K or Q6_K), each row a whole number of blocks.
    Quantized { ty: GgmlType, bytes: Vec<u8> },
}

/// A named-free host tensor: shape (outermost first, as in PyTorch) and data.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl HostTensor {
    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(Error::Shape(format!("shape {shape:?} needs {expected} elements, got {}", data.len())));
        }
        Ok(HostTensor { shape, data: TensorData::F32(data) })
    }

    /// A tensor of GGUF blocks; checks that `ty` is one engram computes on and that `bytes` holds
    /// exactly the blocks `shape` needs, rows being whole blocks.
    pub fn quantized(shape: Vec<usize>, ty: GgmlType, bytes: Vec<u8>) -> Result<Self> {
        if DType::of_ggml(ty).and_then(DType::quant_type).is_none() {
            return Err(Error::Unsupported(format!("computing on {ty} weights (engram computes on Q8_0, Q4_0, Q4_1, Q5_0, Q4_K and Q6_K)")));
        }
        let row = shape.last().copied().unwrap_or(0);
        let elements: usize = shape.iter().product();
        if !row.is_multiple_of(ty.block_size()) || ty.bytes_for(elements as u64) != Some(bytes.len() as u64) {
            return Err(Error::Shape(format!(
                "{ty} tensor of shape {shape:?}: {} bytes do not make rows of whole {}-element blocks",
                bytes.len(),
                ty.block_size()
            )));
        }
        Ok(HostTensor { shape, data: TensorData::Quantized { ty, bytes } })
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
            TensorData::Quantized { ty, .. } => DType::of_ggml(ty).expect("only computable types are stored"),
        }
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Converts to the requested dtype: the 16-bit types round to nearest even, the quantized
    /// ones quantize each row (rows must be whole blocks: 32 values, 256 for the K types),
    /// and `Native` keeps the tensor as it is.
    pub fn to_dtype(self, dtype: DType) -> Result<HostTensor> {
        if dtype == DType::Native || self.dtype() == dtype {
            return Ok(self);
        }
        let values = self.to_f32_vec();
        let data = match dtype {
            DType::F32 => TensorData::F32(values),
            DType::F16 => TensorData::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
            DType::BF16 => TensorData::BF16(values.iter().map(|&v| bf16::from_f32(v)).collect()),
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q4_K | DType::Q6_K => {
                let ty = dtype.quant_type().expect("quantized dtype");
                let row = self.shape.last().copied().unwrap_or(0);
                if !row.is_multiple_of(ty.block_size()) {
                    return Err(Error::Shape(format!(
                        "a tensor of shape {:?} cannot be stored as {dtype}: its rows of {row} values are not whole blocks of {}",
                        self.shape,
                        ty.block_size()
                    )));
                }
                return HostTensor::quantized(self.shape, ty, quant::quantize(ty, &values)?);
            }
            DType::Native => unreachable!("returned above"),
        };
        Ok(HostTensor { shape: self.shape, data })
    }

    /// The values widened (dequantized) to f32 (a copy).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            TensorData::F32(v) => v.clone(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorData::Quantized { ty, bytes } => {
                quant::dequantize(*ty, bytes, self.len()).expect("block count checked when the tensor was made")
            }
        }
    }

    /// Raw little-endian bytes of the data (for writing files).
    pub fn as_bytes(&self) -> &[u8] {
        match &self.data {
            TensorData::F32(v) => bytemuck::cast_slice(v),
            TensorData::F16(v) => bytemuck::cast_slice(v),
            TensorData::BF16(v) => bytemuck::cast_slice(v),
            TensorData::Quantized { bytes, .. } => bytes,
        }
    }

    /// Returns an error naming `what` if any value is NaN or infinite.
    pub fn check_finite(&self, what: &str) -> Result<()> {
        let bad = match &self.data {
            TensorData::F32(v) => v.iter().position(|x| !x.is_finite()),
            TensorData::F16(v) => v.iter().position(|x| !x.is_finite()),
            TensorData::BF16(v) => v.iter().position(|x| !x.is_finite()),
            TensorData::Quantized { ty, bytes } => quant::first_non_finite(*ty, bytes),
        };
        match bad {
            Some(i) => Err(Error::InvalidInput(format!("{what}: non-finite value at element {i}"))),
            None => Ok(()),
        }
    }
}
