#!/usr/bin/env python3
"""Expected token ids for engram's GGUF tokenizer test, made independently of engram.

The reference is llama.cpp's tokenization of models/SmolLM2-135M-Instruct.Q4_1.gguf
(`tokenizer.ggml.pre` = "smollm", special tokens parsed in the text):
  * with llama-cpp-python when it is installed (llama_cpp.Llama(vocab_only=True).tokenize);
  * otherwise by re-doing llama.cpp's pipeline here: split out control/user-defined tokens
    written in the text, split the rest with llama.cpp's two "smollm" regexes in sequence
    ("\\p{N}" then the GPT-2 regex, as in llama-vocab.cpp), and byte-level-BPE each piece with
    the tokenizer transformers builds from the same GGUF (its own pre-tokenizer leaves such a
    piece whole; transformers alone does not split digits, so it is not used on whole texts).
Writes tests/fixtures/tokenizer_smollm2.json. Run: /opt/refenv/bin/python tools/make_tokenizer_fixture.py
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer_smollm2.json")

TEXTS = [
    "Hello world! 123",
    "In 2024, 12345 apples cost $3.50 (or 1,000.5 pears).",
    "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)\n",
    "Unicode: café, naïve, 日本語, Ελληνικά, русский, עברית",
    "Emojis 🤖🚀 and 👩\u200d👩\u200d👧 family ✨",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "  multiple   spaces\t\ttabs\n\n\nnewlines  ",
    "It's, we'll, I'D, they've; don't",
    "<|endoftext|>text<repo_name>x<file_sep>",
    "",
    " ",
    "x² + y³ = ½ and ٣ and ⅷ",
]

SMOLLM_REGEXES = [
    r"\p{N}",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
]


def regex_split(pieces, pattern):
    """llama.cpp's unicode_regex_split for one regex: matches become pieces and so do the gaps."""
    import regex

    out = []
    for piece in pieces:
        pos = 0
        for m in regex.finditer(pattern, piece):
            if m.start() > pos:
                out.append(piece[pos:m.start()])
            out.append(m.group())
            pos = m.end()
        if pos < len(piece):
            out.append(piece[pos:])
    return out


def with_llama_cpp():
    import llama_cpp

    llm = llama_cpp.Llama(model_path=MODEL, vocab_only=True, verbose=False)
    return {t: llm.tokenize(t.encode(), add_bos=False, special=True) for t in TEXTS}, "llama-cpp-python " + llama_cpp.__version__


def with_pipeline():
    import gguf
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(MODEL)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    specials = {tok: i for i, (tok, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}
    hf = AutoTokenizer.from_pretrained(os.path.dirname(MODEL), gguf_file=os.path.basename(MODEL))

    def encode(text):
        ids = []
        pos = 0
        while pos < len(text):
            # Longest special token starting here, else the text up to the next special token.
            match = max((s for s in specials if text.startswith(s, pos)), key=len, default=None)
            if match is not None:
                ids.append(specials[match])
                pos += len(match)
                continue
            end = min((i for i in (text.find(s, pos) for s in specials) if i >= 0), default=len(text))
            for piece in regex_split(regex_split([text[pos:end]], SMOLLM_REGEXES[0]), SMOLLM_REGEXES[1]):
                ids.extend(hf.encode(piece, add_special_tokens=False))
            pos = end
        return ids

    return {t: encode(t) for t in TEXTS}, "llama.cpp smollm regexes + transformers GGUF BPE per piece"


def main():
    if not os.path.exists(MODEL):
        sys.exit(f"{MODEL} is absent")
    try:
        ids, source = with_llama_cpp()
    except ImportError:
        ids, source = with_pipeline()
    cases = [{"text": t, "ids": ids[t]} for t in TEXTS]
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump({"model": os.path.basename(MODEL), "reference": source, "cases": cases}, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {OUT} ({source})")


if __name__ == "__main__":
    main()
