#!/usr/bin/env python3
"""engram next to llama.cpp on the same GGUF files, measured in one run with the two interleaved.

Each round runs, for every file, `engram bench --dtypes native` (engram computes on the file's
own types: Q4_1/Q8_0/Q4_0 blocks, f16, f32) and `tools/bench_llamacpp.py` on the same file, back
to back, alternating which engine goes first, so drifting load on a shared machine hits both
alike. The figure is the median over rounds; the ratio is engram / llama.cpp, taken round by round.

Files: models/SmolLM2-135M-Instruct.<TYPE>.gguf. The Q4_1 file is the shipped model; the others
are made from it when missing (both engines then read the same bytes): q8_0, q4_0, f16, bf16,
f32 with `engram quantize`; the llama.cpp mixes q4_k_m, q6_k and q5_0 with llama.cpp's own
quantizer (llama-cpp-python's `llama_model_quantize`) from the F32 file, as users make them.
SmolLM2-135M's rows of 576 are not whole 256-element super-blocks, so llama.cpp stores those
matrices of a K file in its fallback types (Q5_0 for Q4_K, Q8_0 for Q6_K): only ffn_down (rows
of 1536) and, in Q4_K_M, a few more are Q4_K/Q6_K.

Requirements: the release binary (`cargo build --release`) and llama-cpp-python in the Python
that runs this script (`pip install llama-cpp-python` builds llama.cpp from source).

Usage: python tools/bench_compare.py [--types q4_1,q8_0,f16,f32] [--threads 2] [--rounds 5]
                                     [--context N] [--json FILE] [--markdown FILE]
(--context N: decode is timed after N untimed context tokens, in both engines; each keeps its
default cache, f16 entries in both.)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
BASE = "SmolLM2-135M-Instruct"


def model_file(ty: str) -> Path:
    return MODELS / f"{BASE}.{ty.upper()}.gguf"


# llama_ftype values of the files made with llama.cpp's quantizer.
LLAMA_FTYPES = {"q4_k_m": 15, "q6_k": 18, "q5_0": 8}


def ensure_file(binary: Path, ty: str) -> Path:
    path = model_file(ty)
    if path.exists():
        return path
    if ty in LLAMA_FTYPES:
        import ctypes
        import llama_cpp
        source = ensure_file(binary, "f32")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPES[ty]
        if llama_cpp.llama_model_quantize(str(source).encode(), str(path).encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama.cpp could not quantize {source} to {ty}")
    else:
        subprocess.run([str(binary), "quantize", str(model_file("q4_1")), str(path), "--type", ty], check=True)
    return path


def run_engram(binary: Path, ty: str, threads: int, n_prompt: int, n_gen: int, context: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            [str(binary), "bench", "-m", str(model_file(ty)), "--dtypes", "native", "--device", "cpu",
             "--threads", str(threads), "--repeats", "1", "-p", str(n_prompt), "-n", str(n_gen), "--context", str(context),
             "--json", out.name],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        report = json.load(open(out.name))
    r = report["results"][0]
    return {"pp": r["prefill_tokens_per_second"]["median"], "tg": r["decode_tokens_per_second"]["median"],
            "floor": r["decode_floor_tokens_per_second"], "bandwidth_gbs": report["memory_bandwidth_bytes_per_second"] / 1e9}


def run_llamacpp(ty: str, threads: int, n_prompt: int, n_gen: int, context: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            [sys.executable, str(REPO / "tools/bench_llamacpp.py"), "--threads", str(threads), "--repeats", "1",
             "--n-prompt", str(n_prompt), "--n-gen", str(n_gen), "--context", str(context), "--json", out.name, str(model_file(ty))],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        report = json.load(open(out.name))
    r = report["results"][0]
    return {"pp": r[f"pp{n_prompt}"]["tokens_per_s_median"], "tg": r[f"tg{n_gen}"]["tokens_per_s_median"],
            "version": report["llama_cpp"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--context", type=int, default=0,
                    help="tokens in the context before decode is timed (both engines; prefilled untimed)")
    ap.add_argument("--engram", type=Path, default=REPO / "target/release/engram")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--types", default="q4_1,q8_0,f16,f32", help="comma-separated file types to compare")
    args = ap.parse_args()
    types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    for needed in [args.engram, model_file("q4_1")]:
        if not needed.exists():
            sys.exit(f"missing {needed} (see this script's docstring)")
    for ty in types:
        ensure_file(args.engram, ty)

    engram_rounds = {ty: [] for ty in types}
    llama_rounds = {ty: [] for ty in types}
    loads = []
    for r in range(args.rounds):
        for ty in types:
            order = ["engram", "llama"] if r % 2 == 0 else ["llama", "engram"]
            for name in order:
                if name == "engram":
                    engram_rounds[ty].append(run_engram(args.engram, ty, args.threads, args.n_prompt, args.n_gen, args.context))
                else:
                    llama_rounds[ty].append(run_llamacpp(ty, args.threads, args.n_prompt, args.n_gen, args.context))
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} done (load {loads[-1]:.2f})", file=sys.stderr)

    med = lambda xs: statistics.median(xs)
    rows = []
    for ty in types:
        row = {"file": model_file(ty).name, "type": ty}
        for phase in ("pp", "tg"):
            e = [x[phase] for x in engram_rounds[ty]]
            l = [x[phase] for x in llama_rounds[ty]]
            ratios = [a / b for a, b in zip(e, l)]
            row[phase] = {"engram": med(e), "llama_cpp": med(l), "ratio_median": med(ratios),
                          "ratio_min": min(ratios), "ratio_max": max(ratios), "engram_all": e, "llama_cpp_all": l}
        row["decode_floor"] = med([x["floor"] for x in engram_rounds[ty]])
        rows.append(row)
    all_rounds = [x for rounds in engram_rounds.values() for x in rounds]
    bandwidth = med([x["bandwidth_gbs"] for x in all_rounds])

    lines = [f"| file (both engines) | pp{args.n_prompt} engram | pp llama.cpp | ratio | tg{args.n_gen} engram | tg llama.cpp | ratio | decode floor | engram of floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        pp, tg = row["pp"], row["tg"]
        lines.append(f"| {row['type'].upper()} | {pp['engram']:.1f} | {pp['llama_cpp']:.1f} | {pp['ratio_median']:.2f} "
                     f"| {tg['engram']:.1f} | {tg['llama_cpp']:.1f} | {tg['ratio_median']:.2f} | {row['decode_floor']:.1f} | {100 * tg['engram'] / row['decode_floor']:.0f}% |")
    version = llama_rounds[types[0]][0]["version"]
    footer = (f"\n{args.rounds} rounds interleaved, medians; threads={args.threads}; decode after {args.context} context tokens; streaming-read bandwidth {bandwidth:.1f} GB/s "
              f"(measured by engram bench in each round); llama-cpp-python {version.get('llama_cpp_python')} "
              f"ggml {version.get('ggml_version')}; load average {min(loads):.2f}..{max(loads):.2f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    text = "\n".join(lines) + footer
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "rounds": args.rounds, "bandwidth_gbs": bandwidth,
                                         "loadavg": loads, "llama_cpp": version, "pairs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
