#!/usr/bin/env python3
"""Make the reference fixtures that engram's Rust tests compare against.

Requirements (run with the reference venv, e.g. /opt/refenv/bin/python):
  - torch (CPU is enough), transformers >= 5 (GGUF loading), accelerate (transformers
    refuses to load a GGUF without it), gguf (gguf-py, for gguf.quants.dequantize and the
    GGUF reader), numpy
  - llama-cpp-python (for the token ids; see tools/README.md for how it is installed)
  - the default model in models/ (tools/fetch_model.sh)
Nothing is downloaded: HF_HUB_OFFLINE=1 is forced below.

Usage:
  /opt/refenv/bin/python tools/make_reference.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]
                                                 [--out tests/fixtures/smollm2]

What it writes into --out:
  reference.json        prompts, token ids, residual norms, greedy continuations (see below)
  logits_<case>.npy     float32 [vocab] logits at the last prompt position
  dequant.json          raw-row dequantization fixtures for a few tensors
  dequant_<...>.npy     float32 [rows, ne0] arrays referenced by dequant.json

How the reference is computed:
  - The GGUF is loaded with transformers (which dequantizes every tensor to float32 with
    gguf-py and un-permutes attn_q / attn_k back to the Hugging Face layout); the forward
    pass runs in float32 on the CPU.
  - Token ids come from llama.cpp's tokenizer (vocab-only load of the same GGUF), because
    that is what the true Hugging Face SmolLM2 tokenizer produces (the GGUF's pre-tokenizer
    type "smollm" splits digits individually like SmolLM2's tokenizer.json); transformers'
    GGUF tokenizer converter is not guaranteed to match, so each case records whether it
    agrees. The llama.cpp ids are what the model is fed.
  - Greedy decoding is a manual loop over the KV cache (no EOS stop), cross-checked by one
    full no-cache forward over prompt + continuation.
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
GREEDY_STEPS = 32

LONG_TEXT = (
    "The history of the printing press is often told as the story of a single inventor, but the "
    "reality is more complicated and more interesting. Long before Johannes Gutenberg set up his "
    "workshop in Mainz, craftsmen in China and Korea had experimented with movable type made of "
    "clay, wood and metal. What changed in fifteenth-century Europe was not only the technology "
    "itself but the economic and social conditions around it. Paper had become cheaper, literacy "
    "was slowly spreading beyond monasteries and royal courts, and a growing class of merchants, "
    "lawyers and students wanted books that they could own rather than borrow. Gutenberg combined "
    "several innovations: a hand mould that allowed letters to be cast quickly and uniformly, an "
    "oil-based ink that adhered well to metal type, and a press adapted from the screw presses "
    "used to make wine and olive oil. Within fifty years, printing shops had appeared in more than "
    "two hundred cities, and millions of volumes were in circulation. The consequences were "
    "profound. Scholars could compare identical copies of the same text, which made errors easier "
    "to find and corrections easier to share. Religious reformers used pamphlets to spread their "
    "arguments faster than the authorities could suppress them. Scientists published detailed "
    "diagrams and tables, building on one another's work across great distances. Governments "
    "learned to use print for laws, proclamations and propaganda. Some historians argue that the "
    "press did not simply spread ideas but changed the way people thought, encouraging a culture "
    "of standardization, careful citation and individual reading. Others caution that oral "
    "traditions, manuscripts and images remained important for centuries. Either way, the quiet "
    "clatter of the press marked the beginning of a new era in how knowledge was stored, copied "
    "and shared, and in summary the most important lesson of that era is"
)

CASES = [
    {"name": "plain_english", "text": "The capital of France is Paris, and the capital of Germany is"},
    {
        "name": "chat_question",
        "messages": [
            {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
            {"role": "user", "content": "What is the boiling point of water at sea level in Celsius?"},
        ],
    },
    {"name": "digits", "text": "In 2024 the company sold 12345 units for $678.90."},
    {
        "name": "code",
        "text": (
            "def fibonacci(n: int) -> int:\n"
            "    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
            "    if n < 2:\n"
            "        return n\n"
            "    a, b = 0, 1\n"
            "    for _ in range(n - 1):\n"
            "        a, b = b, a + b\n"
            "    return b\n\n"
            "def main():\n"
            "    for i in range(10):\n"
            "        print("
        ),
    },
    {
        "name": "non_ascii",
        "text": "Café naïve façade — 東京は日本の首都です。Привет, мир! 🚀🔥👍🏽 ¿Qué tal? Ελληνικά ñ ü ß",
    },
    {"name": "long", "text": LONG_TEXT},
]


# Tokenizer-only cases (no forward pass): edge cases for engram's BPE tokenizer.
TOKENIZER_CASES = [
    "",
    " ",
    "Hello world",
    " Hello  world",
    "  leading spaces and trailing   ",
    "line one\nline two\n\n\tindented\r\nwindows",
    "don't I'll we're THEY'VE it's",
    "x1000 v2.0.1 3.14159 -42 1e-5 0x1F 1,000,000",
    "<|im_start|>user\nhi<|im_end|>",
    "text with <|im_end|> inside and <|endoftext|> too",
    "emoji 👩\u200d💻 and combining e\u0301 and CJK 中文字符",
    "tabs\tand\u00a0nbsp and\u3000ideographic space",
    "    def f(x):\n        return x  # comment",
    "https://example.com/path?query=1&b=2#frag",
]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


# --------------------------------------------------------------------------------------------
# dequantization fixtures
# --------------------------------------------------------------------------------------------

DEQUANT_TENSORS = [
    "token_embd.weight",        # Q8_0
    "blk.0.attn_q.weight",      # Q4_1
    "blk.0.ffn_down.weight",    # Q4_1
    "blk.0.attn_norm.weight",   # F32 (1-D: a single row)
]
DEQUANT_ROWS = 4


def make_dequant(reader, model, out: Path) -> dict:
    from gguf.quants import dequantize

    tensors = {t.name: t for t in reader.tensors}
    entries = []
    raw_rows = {}
    for name in DEQUANT_TENSORS + ["blk.0.attn_k.weight"]:
        t = tensors[name]
        ne = [int(x) for x in t.shape]            # ggml order: ne[0] is the row length
        torch_shape = list(reversed(ne))
        # t.data is [rows, bytes_per_row] (uint8) for quantized types, [.., ne0] for float
        # types; either way its first axis indexes rows in raw file order.
        data = t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim > 1 else t.data.reshape(1, -1)
        nrows = min(DEQUANT_ROWS, data.shape[0])
        rows = dequantize(np.ascontiguousarray(data[:nrows]), t.tensor_type).astype(np.float32)
        rows = rows.reshape(nrows, ne[0])
        raw_rows[name] = rows
        if name not in DEQUANT_TENSORS:
            continue
        fname = f"dequant_{name.replace('.', '_')}.npy"
        np.save(out / fname, rows)
        entries.append({
            "tensor": name,
            "ggml_type": t.tensor_type.name,
            "ggml_type_id": int(t.tensor_type),
            "shape_ne": ne,
            "shape_torch": torch_shape,
            "rows": nrows,
            "file": fname,
            "array_shape": list(rows.shape),
        })

    # transformers' un-permuted q/k weights. convert_hf_to_gguf.py permutes q/k rows per head
    # so that llama.cpp's interleaved (GPT-J style) RoPE works; transformers undoes that when
    # loading. HF row r of head h (head_dim D) is GGUF row h*D + 2r for r < D/2 and
    # h*D + 2(r - D/2) + 1 otherwise; so HF rows 0..3 are GGUF rows 0, 2, 4, 6.
    attn = model.model.layers[0].self_attn
    hf_entries = []
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for gguf_name, hf_name, mod in [
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", attn.q_proj),
        ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", attn.k_proj),
    ]:
        w = mod.weight.detach().to(torch.float32).numpy()
        rows = np.ascontiguousarray(w[:DEQUANT_ROWS])
        fname = f"hf_{hf_name.replace('.', '_')}.npy"
        np.save(out / fname, rows)
        # Verify the documented mapping against a full dequantization of the GGUF tensor.
        t = tensors[gguf_name]
        full = dequantize(np.ascontiguousarray(t.data), t.tensor_type).reshape(-1, int(t.shape[0]))
        expected_gguf_rows = [2 * r if r < head_dim // 2 else 2 * (r - head_dim // 2) + 1
                              for r in range(DEQUANT_ROWS)]
        for r, g in enumerate(expected_gguf_rows):
            if not np.array_equal(rows[r], full[g]):
                raise SystemExit(f"{hf_name} row {r} != GGUF {gguf_name} row {g}: un-permute differs")
        hf_entries.append({
            "tensor": hf_name,
            "gguf_tensor": gguf_name,
            "shape_torch": list(w.shape),
            "rows": DEQUANT_ROWS,
            "file": fname,
            "array_shape": list(rows.shape),
            "gguf_rows": expected_gguf_rows,
            "head_dim": head_dim,
        })

    # Transformers' token embedding must be exactly the dequantized GGUF tensor (no permute).
    emb = model.model.embed_tokens.weight.detach()[:DEQUANT_ROWS].numpy()
    if not np.array_equal(emb, raw_rows["token_embd.weight"]):
        raise SystemExit("transformers' embed_tokens differs from gguf dequantize of token_embd")

    return {
        "note": (
            "Rows are the first `rows` rows in RAW GGUF order (ggml ne[1] index; each row has "
            "ne[0] elements), dequantized to float32 with gguf-py's gguf.quants.dequantize, no "
            "un-permuting. shape_ne is ggml order (ne[0] first), shape_torch the reversed "
            "(PyTorch / row-major) order. 1-D tensors have a single row. `transformers` holds the "
            "first rows of transformers' loaded q_proj / k_proj (after its un-permute); "
            "`gguf_rows` names the raw GGUF row each one equals exactly (checked)."
        ),
        "tensors": entries,
        "transformers": hf_entries,
    }


# --------------------------------------------------------------------------------------------
# forward-pass fixtures
# --------------------------------------------------------------------------------------------

def top2_margin(logits: torch.Tensor) -> tuple[int, float]:
    v, i = torch.topk(logits, 2)
    return int(i[0]), float(v[0] - v[1])


@torch.no_grad()
def run_case(model, ids: list[int], steps: int):
    num_layers = model.config.num_hidden_layers
    x = torch.tensor([ids], dtype=torch.long)

    # Capture the raw output of the last decoder block (before the final norm) so that the
    # note about hidden_states[-1] is checked, not assumed.
    captured = {}

    def hook(_mod, _inp, out):
        captured["last_block"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

    h = model.model.layers[-1].register_forward_hook(hook)
    try:
        out = model(input_ids=x, output_hidden_states=True, use_cache=True)
    finally:
        h.remove()
    hs = out.hidden_states
    assert len(hs) == num_layers + 1, len(hs)
    last_pre_norm = captured["last_block"][0, -1]
    normed = model.model.norm(captured["last_block"])[0, -1]
    if torch.allclose(hs[-1][0, -1], normed, rtol=0, atol=0):
        last_kind = "final_norm_applied"
    elif torch.allclose(hs[-1][0, -1], last_pre_norm, rtol=0, atol=0):
        last_kind = "raw_block_output"
    else:
        raise SystemExit("hidden_states[-1] is neither the last block output nor its norm")
    residual_norms = [float(torch.linalg.vector_norm(hs[i][0, -1])) for i in range(num_layers + 1)]
    last_block_norm = float(torch.linalg.vector_norm(last_pre_norm))

    logits = out.logits[0, -1].to(torch.float32)
    # Greedy continuation over the KV cache, no EOS stop.
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

    # Cross-check the cached loop with one full forward over prompt + continuation.
    full = model(input_ids=torch.tensor([ids + greedy[:-1]]), use_cache=False).logits[0]
    check = full[len(ids) - 1:].argmax(-1).tolist()
    for k, (a, b) in enumerate(zip(check, greedy)):
        if a != b and margins[k] > 1e-3:
            raise SystemExit(f"greedy step {k}: cached {b} vs full {a} (margin {margins[k]})")

    return {
        "logits": logits.numpy().astype(np.float32),
        "residual_norms": residual_norms,
        "last_kind": last_kind,
        "last_block_norm": last_block_norm,
        "greedy": greedy,
        "margins": margins,
    }


def compare_with_llama_cpp(llama_cpp, model_path: Path, cases: list, threads: int, out: Path,
                           key: str, f32_kv: bool = False):
    """Record, per case under `key`, how far llama.cpp's forward pass lands from the reference.

    With the Q4_1 file llama.cpp multiplies quantized weights with Q8-quantized activations, so
    its logits differ from the f32 dequantized reference by more than rounding: a yardstick for
    a correct quantized implementation. With the F32 file (the exact dequantization, made by
    tools/bench_llamacpp.py --make-types f32) and an f32 KV cache it validates the reference.
    """
    kw = {"type_k": 0, "type_v": 0} if f32_kv else {}  # GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=1024, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False, **kw)
    # (logits_all: without it llama-cpp-python 0.3.x no longer copies logits into .scores)
    for c in cases:
        llm.reset()
        llm.eval(c["token_ids"])
        got = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        ref = np.load(out / c["logits_file"])
        d = got - ref
        c[key] = {
            "model_file": model_path.name,
            "kv_cache": "f32" if f32_kv else "f16",
            "max_abs_diff": float(np.max(np.abs(d))),
            "rms_diff": float(np.sqrt(np.mean(d * d))),
            "argmax": int(np.argmax(got)),
            "argmax_agrees": int(np.argmax(got)) == int(np.argmax(ref)),
        }
    del llm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import gguf
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is required for the token ids (see tools/README.md)", file=sys.stderr)
        return 1

    torch.set_num_threads(args.threads)
    model_path = args.model.absolute()  # not resolve(): models/ may hold symlinks
    if not model_path.exists():
        print(f"{model_path} missing; run tools/fetch_model.sh", file=sys.stderr)
        return 1
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    reader = gguf.GGUFReader(str(model_path))
    chat_template = gguf_field(reader, "tokenizer.chat_template")
    gguf_add_bos = gguf_field(reader, "tokenizer.ggml.add_bos_token")
    bos_id = gguf_field(reader, "tokenizer.ggml.bos_token_id")

    print("loading model with transformers ...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    )
    model.eval()

    llm = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    # llama.cpp adds BOS only when the vocab says so (tokenizer.ggml.add_bos_token; default for
    # a gpt2/BPE vocab without the key: true). Ask llama.cpp itself rather than re-deriving it.
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)))
    if gguf_add_bos is not None and bool(gguf_add_bos) != add_bos:
        raise SystemExit(f"GGUF add_bos_token={gguf_add_bos} but llama.cpp says {add_bos}")

    cases_out = []
    for case in CASES:
        name = case["name"]
        entry = {"name": name}
        if "messages" in case:
            chat_text = tok.apply_chat_template(
                case["messages"], chat_template=chat_template, tokenize=False,
                add_generation_prompt=True,
            )
            text = chat_text
            entry["text"] = text
            entry["messages"] = case["messages"]
            entry["chat_text"] = chat_text
        else:
            text = case["text"]
            entry["text"] = text

        ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        tf_ids = tok(text, add_special_tokens=False)["input_ids"]
        if add_bos:
            tf_ids = [bos_id] + tf_ids
        entry["add_bos"] = add_bos
        entry["token_ids"] = ids
        entry["num_tokens"] = len(ids)
        entry["transformers_agrees"] = tf_ids == ids
        if tf_ids != ids:
            entry["transformers_token_ids"] = tf_ids
        # Round trip: llama.cpp detokenization must give the text back.
        if llm.detokenize(ids, special=True).decode("utf-8") != text:
            raise SystemExit(f"{name}: llama.cpp detokenize does not round-trip")

        print(f"{name}: {len(ids)} tokens, transformers_agrees={tf_ids == ids}", file=sys.stderr)
        r = run_case(model, ids, GREEDY_STEPS)
        logits_file = f"logits_{name}.npy"
        np.save(out / logits_file, r["logits"])
        entry["logits_file"] = logits_file
        entry["logits_argmax"] = int(np.argmax(r["logits"]))
        entry["residual_norms"] = r["residual_norms"]
        entry["residual_norms_note"] = (
            f"L2 norm at the last prompt position of transformers' hidden_states[i], i = 0..="
            f"{model.config.num_hidden_layers}: [0] is the token embedding, [i] (1 <= i < "
            f"{model.config.num_hidden_layers}) the residual stream after decoder block i-1, and "
            + ("the last entry has the FINAL RMSNorm (with its weight) applied, i.e. it is the "
               "input of lm_head, not the raw residual; the raw output of the last block has norm "
               "`last_block_norm`."
               if r["last_kind"] == "final_norm_applied" else
               "the last entry is the raw output of the last block (no final norm).")
        )
        entry["last_block_norm"] = r["last_block_norm"]
        entry["greedy_tokens"] = r["greedy"]
        entry["greedy_text"] = llm.detokenize(r["greedy"], special=True).decode("utf-8", "replace")
        entry["greedy_margins"] = r["margins"]
        cases_out.append(entry)

    tok_cases = []
    for text in TOKENIZER_CASES:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        tf_ids = tok(text, add_special_tokens=False)["input_ids"]
        if add_bos:
            tf_ids = [bos_id] + tf_ids
        tc = {"text": text, "token_ids": ids, "transformers_agrees": tf_ids == ids}
        if tf_ids != ids:
            tc["transformers_token_ids"] = tf_ids
        tok_cases.append(tc)
    n_agree = sum(tc["transformers_agrees"] for tc in tok_cases)
    print(f"tokenizer cases: transformers agrees on {n_agree}/{len(tok_cases)}", file=sys.stderr)

    compare_with_llama_cpp(llama_cpp, model_path, cases_out, args.threads, out,
                           "llama_cpp_q4_1_vs_reference")
    f32_path = model_path.with_name(model_path.name.replace(".Q4_1.", ".F32."))
    if f32_path != model_path and f32_path.exists():
        compare_with_llama_cpp(llama_cpp, f32_path, cases_out, args.threads, out,
                               "llama_cpp_f32_vs_reference", f32_kv=True)
    else:
        print(f"{f32_path.name} missing: skipping the llama.cpp F32 cross-check "
              "(make it with tools/bench_llamacpp.py --make-types f32)", file=sys.stderr)

    ref = {
        "model_file": model_path.name,
        "model_sha256": sha256_file(model_path),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        "llama_cpp_python": llama_cpp.__version__,
        "numpy": np.__version__,
        "dtype": "float32",
        "tokenizer": "llama.cpp (llama-cpp-python, vocab_only, special=True)",
        "add_bos": add_bos,
        "gguf_add_bos_token": gguf_add_bos,
        "chat_template": chat_template,
        "num_layers": model.config.num_hidden_layers,
        "hidden_size": model.config.hidden_size,
        "vocab_size": model.config.vocab_size,
        "greedy_steps": GREEDY_STEPS,
        "greedy_note": (
            "greedy_tokens[k] is the argmax after prompt + greedy_tokens[:k]; no EOS stop; "
            "greedy_margins[k] is top1 - top2 logit at that step (small margins may flip "
            "under a different but correct implementation)."
        ),
        "cases": cases_out,
        "tokenizer_cases_note": (
            "tokenizer-only cases: llama.cpp ids (special=True, so special-token text is "
            "parsed as the special token), no forward pass"
        ),
        "tokenizer_cases": tok_cases,
    }
    with open(out / "reference.json", "w", encoding="utf-8") as f:
        json.dump(ref, f, indent=1, ensure_ascii=False)
        f.write("\n")

    dq = make_dequant(reader, model, out)
    dq["model_file"] = model_path.name
    dq["gguf"] = ref["gguf"]
    with open(out / "dequant.json", "w", encoding="utf-8") as f:
        json.dump(dq, f, indent=1)
        f.write("\n")
    print(f"wrote fixtures to {out}", file=sys.stderr)
    return 0


def _dist_version(name: str):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
