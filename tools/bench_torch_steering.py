#!/usr/bin/env python3
"""The PyTorch peer for engram's steering overhead: decode speed with forward hooks, as repeng does.

repeng and steering-vectors steer a Hugging Face model with forward hooks on the decoder layers
that add a vector to each block's output. This script measures what that costs, on the same GGUF
loaded by transformers in float32 on the CPU with torch.set_num_threads(T): greedy decoding with
the KV cache (a manual loop of single-token forwards after one prefill of -p tokens), timing only
the -n decode steps, under these conditions, interleaved round by round:

  none                    no hooks
  steer                   a hook on every decoder layer adding that layer's vector to the block
                          output at all positions
  steer+capture+readout   the same hook also clones the last row of the block output (a capture
                          at every generated token) and computes its L2 norm and its projection on
                          the unit steering direction of that layer (the readout)
  batch8                  8 sequences of the same prompt length, decoded together, no hooks
  batch8-steer-per-seq    the same with a different vector per sequence (the hook adds a
                          [8, 1, hidden] tensor)

Reported per condition: decode tokens/s (for batch conditions, all 8 sequences' tokens: 8 * n /
time), median and IQR over rounds; and the overhead ratio time(condition) / time(baseline) per
round, median over rounds, where the baseline is `none` for single-sequence conditions and
`batch8` for batch8-steer-per-seq (its ratio vs `none` is given as well).

Requirements: the reference venv (torch, transformers >= 5, accelerate, gguf, numpy), the default
model (tools/fetch_model.sh). Nothing is downloaded (HF_HUB_OFFLINE=1).

Usage:
  /opt/refenv/bin/python tools/bench_torch_steering.py [--threads 2] [-p 32] [-n 64] [--rounds 5]
                                                       [--model M.gguf] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
REFERENCE = REPO_ROOT / "tests" / "fixtures" / "smollm2" / "reference.json"
BATCH = 8
CONDITIONS = ["none", "steer", "steer+capture+readout", "batch8", "batch8-steer-per-seq"]
BASELINE = {"none": "none", "steer": "none", "steer+capture+readout": "none",
            "batch8": "none", "batch8-steer-per-seq": "batch8"}


class Hooks:
    """Forward hooks on every decoder layer: add `vectors[i]` (shape [hidden] or [batch, 1, hidden])
    to the block output; with `readout`, also capture the last row and compute |h| and <h, u_i>."""

    def __init__(self, model, vectors: list[torch.Tensor], readout: bool):
        self.layers = model.model.layers
        self.vectors = vectors
        self.units = [v / torch.linalg.vector_norm(v, dim=-1, keepdim=True) for v in vectors]
        self.readout = readout
        self.captures: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.norms: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.projections: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.handles = []

    def _hook(self, i: int):
        v, u = self.vectors[i], self.units[i]
        readout = self.readout

        def hook(_mod, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            h = h + v
            if readout:
                last = h[:, -1].detach().clone()
                self.captures[i].append(last)
                self.norms[i].append(torch.linalg.vector_norm(last, dim=-1))
                self.projections[i].append((last * u.reshape(-1, last.shape[-1])).sum(-1))
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

        return hook

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


@torch.inference_mode()
def decode(model, prompt: torch.Tensor, n_gen: int) -> tuple[float, list[int]]:
    """Prefill `prompt` ([batch, p]), then n_gen greedy single-token steps over the KV cache;
    returns the seconds taken by the decode steps and the first sequence's tokens."""
    out = model(input_ids=prompt, use_cache=True)
    past = out.past_key_values
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [int(tok[0, 0])]
    t0 = time.perf_counter()
    for _ in range(n_gen):
        out = model(input_ids=tok, past_key_values=past, use_cache=True)
        past = out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(tok[0, 0]))
    return time.perf_counter() - t0, tokens


def prompt_ids(n_prompt: int, vocab: int) -> list[int]:
    """The first n_prompt token ids of reference.json's `long` case (repeated if needed);
    seeded random ids if the fixture is missing."""
    try:
        ids = next(c["token_ids"] for c in json.load(open(REFERENCE))["cases"] if c["name"] == "long")
    except (OSError, StopIteration, KeyError, ValueError):
        ids = np.random.RandomState(0).randint(100, vocab, size=n_prompt).tolist()
    while len(ids) < n_prompt:
        ids = ids + ids
    return ids[:n_prompt]


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q1, med, q3 = np.percentile(np.asarray(xs, dtype=np.float64), [25, 50, 75])
    return float(q1), float(med), float(q3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--threads", "-t", type=int, default=2)
    ap.add_argument("-p", "--n-prompt", type=int, default=32)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--scale", type=float, default=0.02,
                    help="vector norm = SCALE * 200 (200 ~ the typical mid-layer residual norm); cost does not depend on it")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model_path = args.model.absolute()
    if not model_path.exists():
        print(f"{model_path} missing; run tools/fetch_model.sh", file=sys.stderr)
        return 1
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    ).eval()
    cfg = model.config
    n_layers, hidden = cfg.num_hidden_layers, cfg.hidden_size

    ids = prompt_ids(args.n_prompt, cfg.vocab_size)
    single = torch.tensor([ids])
    # 8 different prompts of the same length: rotations of the one prompt
    batch = torch.tensor([ids[k:] + ids[:k] for k in range(BATCH)])

    g = torch.Generator().manual_seed(0)
    norm = args.scale * 200.0
    vecs = [torch.randn(hidden, generator=g) for _ in range(n_layers)]
    vecs = [v / torch.linalg.vector_norm(v) * norm for v in vecs]
    per_seq = [torch.randn(BATCH, 1, hidden, generator=g) for _ in range(n_layers)]
    per_seq = [v / torch.linalg.vector_norm(v, dim=-1, keepdim=True) * norm for v in per_seq]

    def run(cond: str, n_gen: int) -> tuple[float, int]:
        if cond == "none":
            return decode(model, single, n_gen)[0], 1
        if cond == "steer":
            with Hooks(model, vecs, readout=False):
                return decode(model, single, n_gen)[0], 1
        if cond == "steer+capture+readout":
            with Hooks(model, vecs, readout=True) as hk:
                secs = decode(model, single, n_gen)[0]
            # prefill + n_gen forwards: one capture, norm and projection each per layer
            assert all(len(c) == n_gen + 1 for c in hk.captures + hk.norms + hk.projections)
            return secs, 1
        if cond == "batch8":
            return decode(model, batch, n_gen)[0], BATCH
        if cond == "batch8-steer-per-seq":
            with Hooks(model, per_seq, readout=False):
                return decode(model, batch, n_gen)[0], BATCH
        raise ValueError(cond)

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
          f"p={args.n_prompt} n={args.n_gen} rounds={args.rounds}, {platform.processor() or platform.machine()}",
          file=sys.stderr)
    # warm-up (allocator, first-call overheads), untimed
    for cond in CONDITIONS:
        run(cond, min(8, args.n_gen))

    times: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    seqs: dict[str, int] = {}
    loads = []
    for r in range(args.rounds):
        order = CONDITIONS if r % 2 == 0 else list(reversed(CONDITIONS))
        for cond in order:
            secs, nseq = run(cond, args.n_gen)
            times[cond].append(secs)
            seqs[cond] = nseq
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{c} {seqs[c] * args.n_gen / times[c][-1]:.1f}" for c in CONDITIONS) + " tok/s", file=sys.stderr)

    results = []
    for cond in CONDITIONS:
        tps = [seqs[cond] * args.n_gen / t for t in times[cond]]
        q1, med, q3 = quartiles(tps)
        base = BASELINE[cond]
        ratios = [t / b for t, b in zip(times[cond], times[base])]
        ratios_none = [(t / seqs[cond]) / b for t, b in zip(times[cond], times["none"])]
        results.append({
            "condition": cond,
            "sequences": seqs[cond],
            "decode_tokens_per_second": {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1,
                                         "per_round": tps},
            "decode_seconds_per_round": times[cond],
            "baseline": base,
            "time_ratio_vs_baseline": {"median": statistics.median(ratios), "per_round": ratios},
            "time_per_sequence_token_ratio_vs_none": statistics.median(ratios_none),
        })

    print()
    print(f"| condition | seqs | decode tok/s (median) | IQR | time ratio vs baseline (median of rounds) |")
    print(f"|---|---:|---:|---:|---|")
    for r in results:
        d = r["decode_tokens_per_second"]
        print(f"| {r['condition']} | {r['sequences']} | {d['median']:.1f} | {d['q1']:.1f}-{d['q3']:.1f} | "
              f"{r['time_ratio_vs_baseline']['median']:.3f} vs {r['baseline']} |")
    print(f"\ntorch {torch.__version__}, transformers {transformers.__version__}, threads "
          f"{torch.get_num_threads()}, p={args.n_prompt}, n={args.n_gen}, rounds={args.rounds}, "
          f"load average after each round {', '.join(f'{x:.2f}' for x in loads)}")

    if args.json:
        report = {
            "tool": "tools/bench_torch_steering.py",
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "model_file": model_path.name,
            "dtype": "float32",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "n_prompt": args.n_prompt,
            "n_gen": args.n_gen,
            "rounds": args.rounds,
            "batch": BATCH,
            "vector_norm": norm,
            "cpu": _cpu_model(),
            "load_average_per_round": loads,
            "note": ("decode only (prefill untimed); tokens/s counts all sequences' tokens; "
                     "time ratio = decode time / baseline decode time in the same round"),
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _cpu_model() -> str | None:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


if __name__ == "__main__":
    sys.exit(main())
