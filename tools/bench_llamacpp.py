#!/usr/bin/env python3
"""Measure llama.cpp's CPU throughput on GGUF files, as the baseline engram is compared with.

Requirements: llama-cpp-python (builds llama.cpp from source; this script installs nothing):
    CMAKE_ARGS="-DGGML_NATIVE=ON" nice -n 10 /opt/refenv/bin/pip install llama-cpp-python
On a machine whose VM does not grant AMX tile state (a native build then dies with a general
protection fault in ggml_backend_amx_mul_mat), build the AVX-512 paths without AMX:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
      -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF \
      -DGGML_AMX_INT8=OFF" pip install --no-cache-dir --force-reinstall llama-cpp-python
and numpy is not needed. Run with the Python that has it, e.g. /opt/refenv/bin/python.

Usage:
  # make F32 / F16 / Q8_0 GGUFs next to the Q4_1 default model (models/, git-ignored)
  python tools/bench_llamacpp.py --make-types f32,f16,q8_0
  # benchmark (defaults: every models/SmolLM2-135M-Instruct.*.gguf, 2 threads, 5 repeats)
  python tools/bench_llamacpp.py --json bench.json [FILE.gguf ...]

What is measured (mirrors llama.cpp's llama-bench, through the low-level C API so that no
high-level wrapper work -- tokenization, sampling, logits copies -- is timed):
  pp512  prefill: a fresh context per repeat (created outside the timer); the timer covers one
         llama_decode of a 512-token batch (pseudo-random token ids, positions 0..511, logits
         requested for the last token only, since llama_batch_get_one leaves batch.logits NULL)
         plus llama_synchronize.  tokens/s = 512 / elapsed.
  tg128  decode: a fresh context per repeat, a short untimed prompt (16 tokens, or --context
         tokens to measure decode at a long context), then 128
         single-token llama_decode + llama_synchronize calls, each with logits for its token;
         the timer covers the 128 calls (tokens are pseudo-random, no sampling, like
         llama-bench).  tokens/s = 128 / elapsed.
Each file gets one untimed warm-up (a pp and a few tg tokens). Repeats are interleaved across
files (repeat 1: all files, repeat 2: all files, ...) so that drifting machine load hits every
file alike; the reported figure is the median over repeats (min and max are in the JSON).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"
BASE_NAME = "SmolLM2-135M-Instruct"
SOURCE_MODEL = MODELS_DIR / f"{BASE_NAME}.Q4_1.gguf"

# llama_ftype values (llama.h)
FTYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_1": 3, "q4_0": 2, "bf16": 32}


def load_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed; see the top of this file")
    return llama_cpp


def ggml_version_info(llama_cpp) -> dict:
    """llama.cpp / ggml version strings as the loaded shared libraries report them."""
    info = {"llama_cpp_python": llama_cpp.__version__}
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for fn in ("ggml_version", "ggml_commit"):
        for lib in sorted(lib_dir.glob("libggml-base.so*")) + sorted(lib_dir.glob("libggml.so*")):
            try:
                f = getattr(ctypes.CDLL(str(lib)), fn)
            except (OSError, AttributeError):
                continue
            f.restype = ctypes.c_char_p
            info[fn] = f().decode()
            break
    try:
        lib = llama_cpp.llama_cpp._lib  # the loaded libllama
        lib.llama_version.restype = ctypes.c_char_p
        info["llama_version"] = lib.llama_version().decode()
    except (AttributeError, OSError):
        pass
    info["system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    return info


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------------------------
# --make-types
# --------------------------------------------------------------------------------------------

def make_types(llama_cpp, types: list[str], source: Path, threads: int) -> None:
    for t in types:
        t = t.strip().lower()
        if t not in FTYPES:
            sys.exit(f"unknown type {t!r}; known: {', '.join(FTYPES)}")
        dest = source.parent / f"{BASE_NAME}.{t.upper()}.gguf"
        if dest.exists():
            print(f"{dest.name}: exists, skipped")
            continue
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES[t]
        params.allow_requantize = True  # the source is already quantized
        params.nthread = threads
        tmp = dest.with_suffix(".gguf.part")
        t0 = time.perf_counter()
        rc = llama_cpp.llama_model_quantize(
            str(source).encode(), str(tmp).encode(), ctypes.byref(params)
        )
        if rc != 0:
            tmp.unlink(missing_ok=True)
            sys.exit(f"llama_model_quantize to {t} failed (rc={rc})")
        tmp.rename(dest)
        print(f"{dest.name}: written in {time.perf_counter() - t0:.1f}s "
              f"({dest.stat().st_size / 2**20:.0f} MiB)")


# --------------------------------------------------------------------------------------------
# benchmark
# --------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, llama_cpp, path: Path, threads: int, n_prompt: int, n_gen: int,
                 n_ctx: int, flash_attn: int, reuse_context: bool = False, context: int = 0):
        self.L = llama_cpp
        self.context = context
        self.reuse_context = reuse_context
        self._kept = None
        self.path = path
        self.threads = threads
        self.n_prompt = n_prompt
        self.n_gen = n_gen
        self.n_ctx = n_ctx
        self.flash_attn = flash_attn
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"failed to load {path}")
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.bos = llama_cpp.llama_vocab_bos(vocab)
        self.rng = random.Random(1234)

    def _ctx(self):
        L = self.L
        if self.reuse_context and self._kept is not None:
            # llama-bench style: one context per model, memory cleared between runs.
            L.llama_memory_clear(L.llama_get_memory(self._kept), True)
            return self._kept
        cp = L.llama_context_default_params()
        cp.n_ctx = self.n_ctx
        cp.n_batch = max(self.n_prompt, 512)
        cp.n_ubatch = 512
        cp.n_threads = self.threads
        cp.n_threads_batch = self.threads
        cp.no_perf = True
        if self.flash_attn is not None and hasattr(cp, "flash_attn_type"):
            cp.flash_attn_type = self.flash_attn
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise RuntimeError("failed to create context")
        if self.reuse_context:
            self._kept = ctx
        return ctx

    def _release(self, ctx):
        if not self.reuse_context:
            self.L.llama_free(ctx)

    def _tokens(self, n: int, first: bool):
        ids = [self.rng.randrange(self.n_vocab) for _ in range(n)]
        if first and self.add_bos and n:
            ids[0] = self.bos
        return (ctypes.c_int32 * n)(*ids)

    def _decode(self, ctx, arr, n: int) -> None:
        # llama_batch_get_one: positions continue from the context's memory, logits only for
        # the last token of the batch (batch.logits == NULL).
        batch = self.L.llama_batch_get_one(arr, n)
        rc = self.L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed: {rc}")

    def pp(self) -> float:
        """Seconds for one n_prompt-token prefill in a fresh context."""
        L = self.L
        ctx = self._ctx()
        try:
            arr = self._tokens(self.n_prompt, first=True)
            t0 = time.perf_counter()
            self._decode(ctx, arr, self.n_prompt)
            L.llama_synchronize(ctx)
            return time.perf_counter() - t0
        finally:
            self._release(ctx)

    def tg(self, n_gen: int | None = None, n_pre: int | None = None) -> float:
        """Seconds for n_gen single-token decodes after an untimed n_pre-token prompt (the
        --context, else 16 tokens), fed in batches of 512."""
        L = self.L
        n_gen = self.n_gen if n_gen is None else n_gen
        n_pre = (self.context or 16) if n_pre is None else n_pre
        ctx = self._ctx()
        try:
            for start in range(0, n_pre, 512):
                n = min(512, n_pre - start)
                self._decode(ctx, self._tokens(n, first=start == 0), n)
            L.llama_synchronize(ctx)
            toks = [self._tokens(1, first=False) for _ in range(n_gen)]
            t0 = time.perf_counter()
            for arr in toks:
                self._decode(ctx, arr, 1)
                L.llama_synchronize(ctx)
            return time.perf_counter() - t0
        finally:
            self._release(ctx)

    def close(self):
        if self._kept is not None:
            self.L.llama_free(self._kept)
        self.L.llama_model_free(self.model)


def label_of(path: Path) -> str:
    name = path.name
    if name.startswith(BASE_NAME + "."):
        return name[len(BASE_NAME) + 1:-len(".gguf")]
    return path.stem


def default_files() -> list[Path]:
    order = ["Q4_1", "Q8_0", "F16", "F32"]
    found = [MODELS_DIR / f"{BASE_NAME}.{t}.gguf" for t in order]
    return [p for p in found if p.exists()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path,
                    help="GGUF files (default: models/SmolLM2-135M-Instruct.{Q4_1,Q8_0,F16,F32}.gguf that exist)")
    ap.add_argument("--make-types", default=None,
                    help="comma list of f32,f16,q8_0,... to make from the Q4_1 model into models/, then exit "
                         "unless files are given or --bench")
    ap.add_argument("--source", type=Path, default=SOURCE_MODEL, help="model to convert from")
    ap.add_argument("--bench", action="store_true", help="benchmark even after --make-types")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--context", type=int, default=0,
                    help="tokens already in the context when the decode measurement starts (untimed)")
    ap.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto",
                    help="llama.cpp flash attention (llama-bench's default is auto)")
    ap.add_argument("--reuse-context", action="store_true",
                    help="one context per model, KV memory cleared between runs (as llama-bench "
                         "does) instead of a fresh context per run")
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    args = ap.parse_args()

    L = load_llama_cpp()
    L.llama_backend_init()
    # Silence llama.cpp's logging (loading chatter would interleave with the table).
    if hasattr(L, "llama_log_set"):
        cb = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(lambda *a: None)
        L.llama_log_set(cb, None)
        main._log_cb = cb  # keep it alive

    if args.make_types:
        if not args.source.exists():
            sys.exit(f"{args.source} missing; run tools/fetch_model.sh")
        make_types(L, args.make_types.split(","), args.source, args.threads)
        if not args.files and not args.bench:
            return 0

    files = args.files or default_files()
    if not files:
        sys.exit("no GGUF files to benchmark")
    fa = {"auto": -1, "on": 1, "off": 0}[args.flash_attn]
    n_ctx = max(args.n_prompt, max(args.context, 16) + args.n_gen) + 64

    benches = [Bench(L, p, args.threads, args.n_prompt, args.n_gen, n_ctx, fa, args.reuse_context, args.context)
               for p in files]
    for b in benches:  # warm-up: page in weights, let the thread pool spin up
        b.pp()
        b.tg(n_gen=8, n_pre=16)

    times = {label_of(b.path): {"pp": [], "tg": []} for b in benches}
    load = [os.getloadavg()[0]]
    for rep in range(args.repeats):
        for b in benches:
            lab = label_of(b.path)
            times[lab]["pp"].append(b.pp())
            times[lab]["tg"].append(b.tg())
        load.append(os.getloadavg()[0])
        print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr)
    for b in benches:
        b.close()

    pp_name, tg_name = f"pp{args.n_prompt}", f"tg{args.n_gen}"
    results = []
    for b in benches:
        lab = label_of(b.path)
        row = {"label": lab, "file": b.path.name, "size_bytes": b.path.stat().st_size}
        for phase, n, key in (("pp", args.n_prompt, pp_name), ("tg", args.n_gen, tg_name)):
            tps = [n / t for t in times[lab][phase]]
            row[key] = {
                "tokens_per_s_median": statistics.median(tps),
                "tokens_per_s_min": min(tps),
                "tokens_per_s_max": max(tps),
                "seconds": times[lab][phase],
            }
        results.append(row)

    # Median is the figure; "best" (fastest repeat) is shown too because on a shared machine
    # it is the least disturbed measurement.
    hdr = (f"| {'model':<6} | {'size MiB':>8} | {pp_name + ' t/s':>11} | {tg_name + ' t/s':>11} "
           f"| {pp_name + ' best':>11} | {tg_name + ' best':>11} |")
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for r in results:
        print(f"| {r['label']:<6} | {r['size_bytes'] / 2**20:>8.1f} | "
              f"{r[pp_name]['tokens_per_s_median']:>11.1f} | {r[tg_name]['tokens_per_s_median']:>11.1f} | "
              f"{r[pp_name]['tokens_per_s_max']:>11.1f} | {r[tg_name]['tokens_per_s_max']:>11.1f} |")
    info = ggml_version_info(L)
    print(f"\nthreads={args.threads} repeats={args.repeats} (median) flash_attn={args.flash_attn} "
          f"llama-cpp-python {info.get('llama_cpp_python')} ggml {info.get('ggml_version')} "
          f"({info.get('ggml_commit')}); context {'reused' if args.reuse_context else 'fresh'}; CPU: {cpu_model()}; loadavg {min(load):.2f}..{max(load):.2f}")

    if args.json:
        out = {
            "tool": "tools/bench_llamacpp.py",
            "threads": args.threads,
            "repeats": args.repeats,
            "statistic": "median",
            "n_prompt": args.n_prompt,
            "n_gen": args.n_gen,
            "flash_attn": args.flash_attn,
            "context": "reused, memory cleared" if args.reuse_context else "fresh per run",
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "loadavg_1min_during": load,
            "llama_cpp": info,
            "timed": (f"{pp_name}: one llama_decode of a {args.n_prompt}-token batch (+synchronize) "
                      f"in a fresh context; {tg_name}: {args.n_gen} single-token llama_decode "
                      f"(+synchronize) calls after an untimed 16-token prompt, fresh context"),
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
