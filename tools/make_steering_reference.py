#!/usr/bin/env python3
"""Make the steering reference fixture: SmolLM2 under a control vector, computed by transformers.

Requirements (run with the reference venv, e.g. /opt/refenv/bin/python): torch (CPU is enough),
transformers >= 5 (GGUF loading), accelerate, gguf (gguf-py), numpy; the default model in models/
(tools/fetch_model.sh); and tests/fixtures/smollm2/reference.json (tools/make_reference.py),
whose token ids are reused, so no tokenizer (and no llama-cpp-python) is needed here.
Nothing is downloaded: HF_HUB_OFFLINE=1 is forced below.

Usage:
  /opt/refenv/bin/python tools/make_steering_reference.py [--model M.gguf] [--out DIR]
                                                          [--threads 2] [--seed 1234]

Layer convention: steering "at layer i" adds alpha * v[i] to the residual stream at the OUTPUT
of decoder block i (transformers' hidden_states[i+1], llama.cpp's direction.{i}): a forward
hook on model.model.layers[i] that adds to the block's output hidden states, at ALL positions
(every prompt token and every generated token).

What it writes into --out:
  steering_vector.gguf         a llama.cpp control vector (general.architecture = controlvector,
                               controlvector.model_hint = llama, controlvector.layer_count = 30
                               (uint32), F32 1-D tensors direction.{i} for i in 8..=20 only)
  steer_<case>_<cond>.npy      float32 [vocab] logits at the last prompt position, steered
  steering.json                cases, greedy continuations, margins, residual norms (see below)

The vector: for each layer i in 8..=20 a Gaussian direction from numpy RandomState(seed),
scaled to norm FRACTION * (mean over reference.json's cases of the last-position residual norm
at the output of block i). Checked at run time: scale 0 through the same hook gives logits
bit-identical to no hook (max_abs_logit_change and unsteered_argmax are taken against these
unsteered logits of this run), and the unsteered logits are within 1e-3 of reference.json's
logits_<case>.npy (recorded as reference_logits_max_abs_diff: ~3e-5-5e-5 when made, with the same
library versions as reference.json but on another machine; plain forward, output_hidden_states
and the thread count made no difference there).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "smollm2"
VECTOR_FILE = "steering_vector.gguf"
VECTOR_LAYERS = list(range(8, 21))          # 8..=20
FRACTION = 0.06                             # |v[i]| / typical |h| at the output of block i
GREEDY_STEPS = 16
PROMPT_CASES = ["plain_english", "chat_question", "code"]
# (condition name, scale, inclusive layer range actually steered)
CONDITIONS = [("all", 1.0, (8, 20)), ("mid_neg2", -2.0, (12, 16))]
CONVENTION = ("hook adds alpha*v[i] to the output of model.model.layers[i] (hidden_states[i+1]) "
              "at all positions")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dist_version(name: str):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------
# the vector
# --------------------------------------------------------------------------------------------

def make_vector(reference: dict, hidden: int, seed: int, fraction: float) -> dict[int, np.ndarray]:
    """Gaussian directions for VECTOR_LAYERS, each scaled to fraction * the typical residual norm
    at the output of that block (reference residual_norms[i+1], mean over all cases)."""
    rng = np.random.RandomState(seed)
    directions = {}
    for layer in VECTOR_LAYERS:
        d = rng.standard_normal(hidden)
        typical = float(np.mean([c["residual_norms"][layer + 1] for c in reference["cases"]]))
        d = d / np.linalg.norm(d) * (fraction * typical)
        directions[layer] = d.astype(np.float32)
    return directions


def write_control_vector(path: Path, directions: dict[int, np.ndarray], layer_count: int) -> None:
    """As tools/make_controlvector_fixture.py (repeng's export_gguf), except that layer_count is
    the model's layer count rather than the number of directions (llama.cpp reads neither)."""
    import gguf

    arch = "controlvector"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", "llama")
    writer.add_uint32(f"{arch}.layer_count", layer_count)
    for layer in sorted(directions):
        writer.add_tensor(f"direction.{layer}", directions[layer])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_control_vector(path: Path) -> dict[int, np.ndarray]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    out = {}
    for t in reader.tensors:
        assert t.name.startswith("direction.") and t.tensor_type == gguf.GGMLQuantizationType.F32
        out[int(t.name.split(".")[1])] = np.array(t.data, dtype=np.float32).reshape(-1)
    return out


# --------------------------------------------------------------------------------------------
# steering hooks
# --------------------------------------------------------------------------------------------

class Steering:
    """Forward hooks on model.model.layers[i] adding scale * v[i] to the block output at every
    position, for the layers in [lo, hi] that have a direction; plus a capture of the raw output of
    the LAST block (whether steered or not) and of each steered block output (to check that
    transformers' hidden_states see the modified output)."""

    def __init__(self, model, directions: dict[int, np.ndarray], scale: float, lo: int, hi: int):
        self.model = model
        self.scale = scale
        self.vectors = {i: torch.from_numpy(directions[i].copy()) for i in directions if lo <= i <= hi}
        self.handles = []
        self.captured: dict[int, torch.Tensor] = {}
        self.output_types: set[str] = set()

    def _hook(self, index: int):
        delta = None if index not in self.vectors else self.scale * self.vectors[index]

        def hook(_mod, _inp, out):
            self.output_types.add(type(out).__name__)
            h = out[0] if isinstance(out, tuple) else out
            if delta is not None:
                h = h + delta  # broadcasts over batch and positions
            self.captured[index] = h.detach()
            if delta is None:
                return None
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

        return hook

    def __enter__(self):
        layers = self.model.model.layers
        for i in range(len(layers)):
            # prepend=True: transformers 5 records output_hidden_states with its own forward hooks
            # on the decoder layers, installed lazily on first use and never removed; a hook
            # registered after them runs after them, so hidden_states would show the UNSTEERED
            # block outputs. Running first makes hidden_states[i+1] the steered output (checked).
            self.handles.append(layers[i].register_forward_hook(self._hook(i), prepend=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def top2_margin(logits: torch.Tensor) -> tuple[int, float]:
    v, i = torch.topk(logits, 2)
    return int(i[0]), float(v[0] - v[1])


@torch.no_grad()
def run_steered(model, ids: list[int], directions, scale: float, lo: int, hi: int, steps: int):
    num_layers = model.config.num_hidden_layers
    with Steering(model, directions, scale, lo, hi) as st:
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=True)
        hs = out.hidden_states
        assert len(hs) == num_layers + 1, len(hs)
        # hidden_states[i+1] must be the (steered) output of block i, i < num_layers - 1.
        for i in range(num_layers - 1):
            if not torch.equal(hs[i + 1], st.captured[i]):
                raise SystemExit(f"hidden_states[{i + 1}] is not the hooked output of block {i}")
        last_raw = st.captured[num_layers - 1][0, -1]
        normed = model.model.norm(st.captured[num_layers - 1])[0, -1]
        if not torch.equal(hs[-1][0, -1], normed):
            raise SystemExit("hidden_states[-1] is not the final norm of the last block output")
        residual_norms = [float(torch.linalg.vector_norm(hs[i][0, -1])) for i in range(num_layers + 1)]
        last_block_norm = float(torch.linalg.vector_norm(last_raw))
        logits = out.logits[0, -1].to(torch.float32).clone()

        past = out.past_key_values
        greedy, margins = [], []
        cur = logits
        for step in range(steps):
            tok, margin = top2_margin(cur)
            greedy.append(tok)
            margins.append(margin)
            if step == steps - 1:
                break
            o = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = o.past_key_values
            cur = o.logits[0, -1].to(torch.float32)

        # Cross-check the cached loop with one full steered forward over prompt + continuation.
        full = model(input_ids=torch.tensor([ids + greedy[:-1]]), use_cache=False).logits[0]
        check = full[len(ids) - 1:].argmax(-1).tolist()
        for k, (a, b) in enumerate(zip(check, greedy)):
            if a != b and margins[k] > 1e-3:
                raise SystemExit(f"greedy step {k}: cached {b} vs full {a} (margin {margins[k]})")
        output_types = sorted(st.output_types)

    return {
        "logits": logits.numpy().astype(np.float32),
        "residual_norms": residual_norms,
        "last_block_norm": last_block_norm,
        "greedy": greedy,
        "margins": margins,
        "output_types": output_types,
    }


@torch.no_grad()
def plain_logits(model, ids: list[int]) -> np.ndarray:
    return model(input_ids=torch.tensor([ids])).logits[0, -1].to(torch.float32).numpy().copy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--fraction", type=float, default=FRACTION)
    args = ap.parse_args()

    import gguf
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    model_path = args.model.absolute()
    if not model_path.exists():
        print(f"{model_path} missing; run tools/fetch_model.sh", file=sys.stderr)
        return 1
    out = args.out
    ref_path = out / "reference.json"
    reference = json.load(open(ref_path, encoding="utf-8"))
    model_sha = sha256_file(model_path)
    if reference["model_sha256"] != model_sha:
        raise SystemExit(f"{model_path.name} sha256 differs from {ref_path}'s")
    ref_cases = {c["name"]: c for c in reference["cases"]}

    print("loading model with transformers ...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    )
    model.eval()
    num_layers = model.config.num_hidden_layers
    hidden = model.config.hidden_size

    directions = make_vector(reference, hidden, args.seed, args.fraction)
    vec_path = out / VECTOR_FILE
    write_control_vector(vec_path, directions, num_layers)
    read_back = read_control_vector(vec_path)
    assert sorted(read_back) == VECTOR_LAYERS
    for i in VECTOR_LAYERS:
        assert np.array_equal(read_back[i], directions[i]), i
    directions = read_back  # steer with exactly what the file holds

    cases_out = []
    output_types = set()
    for pname in PROMPT_CASES:
        ids = ref_cases[pname]["token_ids"]
        base = plain_logits(model, ids)
        ref_logits = np.load(out / ref_cases[pname]["logits_file"])
        ref_diff = float(np.max(np.abs(base - ref_logits)))
        if ref_diff > 1e-3:
            raise SystemExit(f"{pname}: unsteered logits differ from {ref_cases[pname]['logits_file']} by {ref_diff}")
        for cond, scale, (lo, hi) in CONDITIONS:
            # scale 0 through the same hooks must reproduce the unsteered logits exactly
            zero = run_steered(model, ids, directions, 0.0, lo, hi, 1)
            if not np.array_equal(zero["logits"], base):
                raise SystemExit(f"{pname}/{cond}: scale 0 is not bit-identical to no hook "
                                 f"(max diff {np.max(np.abs(zero['logits'] - base))})")
            r = run_steered(model, ids, directions, scale, lo, hi, GREEDY_STEPS)
            output_types.update(r["output_types"])
            name = f"{pname}_{cond}"
            logits_file = f"steer_{name}.npy"
            np.save(out / logits_file, r["logits"])
            change = float(np.max(np.abs(r["logits"] - base)))
            entry = {
                "name": name,
                "prompt_case": pname,
                "token_ids": ids,
                "scale": scale,
                "layers": [lo, hi],
                "logits_file": logits_file,
                "unsteered_argmax": int(np.argmax(base)),
                "steered_argmax": int(np.argmax(r["logits"])),
                "max_abs_logit_change": change,
                "greedy_tokens": r["greedy"],
                "greedy_margins": r["margins"],
                "residual_norms": r["residual_norms"],
                "last_block_norm": r["last_block_norm"],
                "greedy_text": tok.decode(r["greedy"]),
                "unsteered_greedy_tokens": ref_cases[pname]["greedy_tokens"][:GREEDY_STEPS],
                "reference_logits_max_abs_diff": ref_diff,
            }
            cases_out.append(entry)
            print(f"{name}: argmax {entry['unsteered_argmax']} -> {entry['steered_argmax']}, "
                  f"max |dlogit| {change:.3f}, min margin {min(r['margins']):.4f}, "
                  f"greedy {entry['greedy_text']!r}", file=sys.stderr)

    result = {
        "model_file": model_path.name,
        "model_sha256": model_sha,
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
            "numpy": np.__version__,
        },
        "dtype": "float32",
        "vector_file": VECTOR_FILE,
        "vector_layers": VECTOR_LAYERS,
        "vector_norms": {str(i): float(np.linalg.norm(directions[i].astype(np.float64))) for i in VECTOR_LAYERS},
        "vector_note": (
            f"numpy RandomState({args.seed}) standard normal per layer (in layer order, {hidden} "
            f"values each), scaled to norm {args.fraction} * mean over reference.json's cases of "
            "residual_norms[i+1] (the last-position residual at the output of block i), stored as float32"
        ),
        "convention": CONVENTION,
        "layer_output_types": sorted(output_types),
        "greedy_steps": GREEDY_STEPS,
        "greedy_note": (
            "greedy_tokens[k] is the argmax after prompt + greedy_tokens[:k] with the hooks active "
            "at every position (prompt and generated); no EOS stop; greedy_margins[k] is top1 - top2 "
            "logit at that step; unsteered_greedy_tokens are reference.json's first greedy tokens"
        ),
        "residual_norms_note": (
            f"L2 norm at the last prompt position of transformers' hidden_states[i], i = 0..={num_layers}, "
            "in the steered run (hidden_states[i+1] is checked to be the hooked, i.e. steered, output "
            "of block i); the last entry has the final RMSNorm applied; the raw (steered) output of "
            "the last block has norm last_block_norm"
        ),
        "scale0_bit_identical": True,
        "cases": cases_out,
    }
    with open(out / "steering.json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {out / 'steering.json'}, {vec_path.name} and {len(cases_out)} logits files",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
