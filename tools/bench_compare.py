#!/usr/bin/env python3
"""engram next to llama.cpp on the same weights, measured in one run with the two interleaved.

Each round runs `engram bench` (one repeat per dtype) and `tools/bench_llamacpp.py` (one repeat
per GGUF file) back to back, alternating which goes first, so drifting load on a shared machine
hits both alike. The figure is the median over rounds; the ratio is engram / llama.cpp.

Pairs compared (same values in memory):
  engram f32  (Q4_1 GGUF dequantized exactly to f32)  vs  llama.cpp F32 GGUF (same dequantization)
  engram f16  (dequantized, rounded to f16)            vs  llama.cpp F16 GGUF
  engram bf16 (dequantized, rounded to bf16)           vs  llama.cpp F16 GGUF (nearest 16-bit peer)

Requirements: the release binary (`cargo build --release`), llama-cpp-python in the Python that
runs this script, and the F32/F16 GGUFs (`python tools/bench_llamacpp.py --make-types f32,f16`).

Usage: python tools/bench_compare.py [--threads 2] [--rounds 5] [--json FILE] [--markdown FILE]
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
PAIRS = [("f32", "F32"), ("f16", "F16"), ("bf16", "F16")]


def run_engram(binary: Path, threads: int, n_prompt: int, n_gen: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            [str(binary), "bench", "-m", str(MODELS / f"{BASE}.Q4_1.gguf"), "--dtypes", "f32,f16,bf16",
             "--threads", str(threads), "--repeats", "1", "-p", str(n_prompt), "-n", str(n_gen), "--json", out.name],
            check=True, stdout=subprocess.DEVNULL)
        report = json.load(open(out.name))
    figures = {}
    for r in report["results"]:
        figures[r["dtype"]] = {"pp": r["prefill_tokens_per_second"]["median"], "tg": r["decode_tokens_per_second"]["median"],
                               "floor": r["decode_floor_tokens_per_second"]}
    figures["bandwidth_gbs"] = report["memory_bandwidth_bytes_per_second"] / 1e9
    return figures


def run_llamacpp(threads: int, n_prompt: int, n_gen: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        files = [str(MODELS / f"{BASE}.{t}.gguf") for t in ("F32", "F16")]
        subprocess.run(
            [sys.executable, str(REPO / "tools/bench_llamacpp.py"), "--threads", str(threads), "--repeats", "1",
             "--n-prompt", str(n_prompt), "--n-gen", str(n_gen), "--json", out.name, *files],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        report = json.load(open(out.name))
    figures = {r["label"]: {"pp": r[f"pp{n_prompt}"]["tokens_per_s_median"], "tg": r[f"tg{n_gen}"]["tokens_per_s_median"]}
               for r in report["results"]}
    figures["version"] = report["llama_cpp"]
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--engram", type=Path, default=REPO / "target/release/engram")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    for needed in [args.engram] + [MODELS / f"{BASE}.{t}.gguf" for t in ("Q4_1", "F32", "F16")]:
        if not needed.exists():
            sys.exit(f"missing {needed} (see this script's docstring)")

    engram_rounds, llama_rounds, loads = [], [], []
    for r in range(args.rounds):
        order = [("engram", run_engram), ("llama", run_llamacpp)]
        if r % 2:
            order.reverse()
        for name, fn in order:
            result = fn(args.engram, args.threads, args.n_prompt, args.n_gen) if name == "engram" else fn(args.threads, args.n_prompt, args.n_gen)
            (engram_rounds if name == "engram" else llama_rounds).append(result)
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} done (load {loads[-1]:.2f})", file=sys.stderr)

    med = lambda xs: statistics.median(xs)
    rows = []
    for ours, theirs in PAIRS:
        row = {"engram_dtype": ours, "llama_cpp_file": f"{BASE}.{theirs}.gguf"}
        for phase in ("pp", "tg"):
            e = [x[ours][phase] for x in engram_rounds]
            l = [x[theirs][phase] for x in llama_rounds]
            ratios = [a / b for a, b in zip(e, l)]
            row[phase] = {"engram": med(e), "llama_cpp": med(l), "ratio_median": med(ratios),
                          "ratio_min": min(ratios), "ratio_max": max(ratios), "engram_all": e, "llama_cpp_all": l}
        row["decode_floor"] = med([x[ours]["floor"] for x in engram_rounds])
        rows.append(row)
    bandwidth = med([x["bandwidth_gbs"] for x in engram_rounds])

    lines = [f"| engram dtype | llama.cpp file | pp{args.n_prompt} engram | pp llama.cpp | ratio | tg{args.n_gen} engram | tg llama.cpp | ratio | decode floor | engram of floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        pp, tg = row["pp"], row["tg"]
        lines.append(f"| {row['engram_dtype']} | {theirs_label(row)} | {pp['engram']:.1f} | {pp['llama_cpp']:.1f} | {pp['ratio_median']:.2f} "
                     f"| {tg['engram']:.1f} | {tg['llama_cpp']:.1f} | {tg['ratio_median']:.2f} | {row['decode_floor']:.1f} | {100 * tg['engram'] / row['decode_floor']:.0f}% |")
    version = llama_rounds[0]["version"]
    footer = (f"\n{args.rounds} rounds interleaved, medians; threads={args.threads}; streaming-read bandwidth {bandwidth:.1f} GB/s "
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


def theirs_label(row: dict) -> str:
    return row["llama_cpp_file"].replace(f"{BASE}.", "")


if __name__ == "__main__":
    raise SystemExit(main())
