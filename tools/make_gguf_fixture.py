#!/usr/bin/env python3
"""Reference fixtures for engram's GGUF reader and dequantizers, made with gguf-py and transformers.

Writes
  tests/fixtures/gguf_py_reference.gguf  a small GGUF written by gguf-py's GGUFWriter: metadata of
      every value type (nested arrays included) and, for each of Q8_0/Q4_0/Q4_1/F16/BF16, a tensor
      quantized by gguf-py from random data, plus that random data as an F32 tensor `<name>.src`;
  tests/fixtures/gguf_reference.json     the FNV-1a 64 hash of the f32 bytes gguf-py's
      `gguf.quants.dequantize` gives for each of those tensors, and, when the default model is
      present, the same for tensors of models/SmolLM2-135M-Instruct.Q4_1.gguf, with q_proj/k_proj
      taken from transformers loading that GGUF (Hugging Face layout, llama.cpp's permutation undone).

Run: /opt/refenv/bin/python tools/make_gguf_fixture.py   (from the repository root)
"""
import json
import os
import sys

import numpy as np
import gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def fnv1a64(a: np.ndarray) -> str:
    data = np.ascontiguousarray(a, dtype="<f4").tobytes()
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def summary(a: np.ndarray, ggml_type: str) -> dict:
    a = np.asarray(a, dtype=np.float32)
    return {"type": ggml_type, "shape": list(a.shape), "fnv1a64": fnv1a64(a), "first": [float(x) for x in a.reshape(-1)[:8]]}


def small_file(out: dict) -> None:
    path = os.path.join(FIX, "gguf_py_reference.gguf")
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_float32("test.f32", 0.1)
    w.add_uint64("test.u64", 2**63 + 5)
    w.add_int64("test.i64", -(2**62))
    w.add_float64("test.f64", 0.1)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "héllo ✓")
    w.add_array("test.array_i32", [1, -2, 3])
    w.add_array("test.array_str", ["a", "", "ü"])
    w.add_array("test.array_nested", [[1, 2], [3]])
    rng = np.random.default_rng(1234)
    for ty, shape in [("Q8_0", (3, 64)), ("Q4_0", (5, 32)), ("Q4_1", (2, 96)), ("F16", (3, 7)), ("BF16", (2, 5))]:
        qt = gguf.GGMLQuantizationType[ty]
        src = (rng.standard_normal(shape) * 2.0 + 0.05).astype(np.float32)
        q = gguf.quants.quantize(src, qt)
        w.add_tensor(f"{ty.lower()}.src", src)
        w.add_tensor(f"{ty.lower()}", q, raw_dtype=qt)
        out[ty.lower()] = summary(gguf.quants.dequantize(q, qt), ty)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def model_tensors(out: dict) -> None:
    if not os.path.exists(MODEL):
        print(f"{MODEL} absent: skipping the model's tensors", file=sys.stderr)
        return
    import torch
    from transformers import AutoModelForCausalLM

    r = gguf.GGUFReader(MODEL)
    tensors = {t.name: t for t in r.tensors}
    for gname, hname in [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
        ("blk.29.ffn_gate.weight", "model.layers.29.mlp.gate_proj.weight"),
        ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"),
        ("output_norm.weight", "model.norm.weight"),
    ]:
        t = tensors[gname]
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        out[hname] = summary(values, t.tensor_type.name)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(MODEL), gguf_file=os.path.basename(MODEL), dtype=torch.float32
    )
    sd = model.state_dict()
    for hname, gname in [
        ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"),
        ("model.layers.0.self_attn.k_proj.weight", "blk.0.attn_k.weight"),
        ("model.layers.17.self_attn.q_proj.weight", "blk.17.attn_q.weight"),
        ("model.layers.17.self_attn.k_proj.weight", "blk.17.attn_k.weight"),
    ]:
        out[hname] = summary(sd[hname].numpy(), tensors[gname].tensor_type.name)


def main() -> None:
    out: dict = {}
    small_file(out)
    model_tensors(out)
    with open(os.path.join(FIX, "gguf_reference.json"), "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
