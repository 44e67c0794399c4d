#!/usr/bin/env python3
"""Control-vector fixture for engram's steering-vector reader, written by gguf-py; and a checker.

Writes (default mode)
  tests/fixtures/controlvector_gguf_py.gguf  a control vector exactly as repeng's
      `ControlVector.export_gguf` writes one: `gguf.GGUFWriter(path, "controlvector")` (which sets
      general.architecture), `controlvector.model_hint` (string), `controlvector.layer_count`
      (uint32, = the NUMBER of directions, as repeng writes it), then one float32 1-D tensor
      `direction.{layer}` per layer. Layers 1, 2 and 4 of a 5-layer, 8-wide model carry a
      direction; layer 0 (which llama.cpp refuses) and layer 3 do not.
  tests/fixtures/controlvector_gguf_py.npy   the same values as a float32 [5, 8] array, one row
      per layer, all-zero rows for layers without a direction (engram's .npy layout).

Check mode
  --check FILE.gguf  reads FILE with gguf-py's GGUFReader and asserts what llama.cpp's
      `common_control_vector_load_one` needs: every tensor named direction.N with N >= 1, F32,
      one dimension, one width for all; also general.architecture == "controlvector". Prints the
      metadata and one line per tensor. Exit status 1 on any violation.

Run: /opt/refenv/bin/python tools/make_controlvector_fixture.py   (from the repository root)
"""
import os
import sys

import numpy as np
import gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
HIDDEN = 8
LAYERS = 5


def make():
    rng = np.random.default_rng(20240611)
    table = np.zeros((LAYERS, HIDDEN), dtype=np.float32)
    directions = {}
    for layer in (1, 2, 4):
        v = rng.standard_normal(HIDDEN).astype(np.float32)
        v[0] = np.float32(layer)  # an exactly known element per layer
        directions[layer] = v
        table[layer] = v

    path = os.path.join(FIX, "controlvector_gguf_py.gguf")
    arch = "controlvector"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_string(f"{arch}.model_hint", "llama")
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for layer in directions.keys():
        writer.add_tensor(f"direction.{layer}", directions[layer])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    np.save(os.path.join(FIX, "controlvector_gguf_py.npy"), table)
    print(f"wrote {path} and its .npy twin")


def field_value(reader, key):
    f = reader.get_field(key)
    if f is None:
        return None
    return f.contents()


def check(path):
    reader = gguf.GGUFReader(path)
    problems = []
    for key in ("general.architecture", "controlvector.model_hint", "controlvector.layer_count"):
        f = reader.get_field(key)
        kind = None if f is None else [t.name for t in f.types]
        print(f"{key} = {field_value(reader, key)!r} ({kind})")
    if field_value(reader, "general.architecture") != "controlvector":
        problems.append("general.architecture is not 'controlvector'")
    width = None
    for t in reader.tensors:
        print(f"{t.name}: type {t.tensor_type.name}, shape {list(t.shape)}, first {t.data[:3].tolist()}")
        prefix, _, index = t.name.partition(".")
        if prefix != "direction" or not index.isdigit():
            problems.append(f"{t.name}: not named direction.N")
        elif int(index) == 0:
            problems.append(f"{t.name}: llama.cpp refuses layer index 0 and skips the whole file")
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            problems.append(f"{t.name}: not F32")
        if len([d for d in t.shape if d != 1]) > 1 or len(t.shape) != 1:
            problems.append(f"{t.name}: not one-dimensional")
        if width is None:
            width = int(t.n_elements)
        elif width != int(t.n_elements):
            problems.append(f"{t.name}: width {t.n_elements} differs from {width}")
        if not np.all(np.isfinite(t.data)):
            problems.append(f"{t.name}: non-finite values")
    if not reader.tensors:
        problems.append("no direction tensors")
    for p in problems:
        print("PROBLEM:", p)
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        sys.exit(check(sys.argv[2]))
    elif len(sys.argv) == 1:
        make()
    else:
        print(__doc__)
        sys.exit(2)
