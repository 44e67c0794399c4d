//! The tokenizer stored in GGUF metadata (`tokenizer.ggml.*`), rebuilt as the Hugging Face
//! `tokenizer.json` and `tokenizer_config.json` it came from, so that one tokenizer code path
//! (the `tokenizers` crate) serves GGUF files and Hugging Face directories alike.
//!
//! Only byte-level BPE vocabularies (`tokenizer.ggml.model` = "gpt2") are rebuilt. The
//! pre-tokenizer is chosen from `tokenizer.ggml.pre`, the label llama.cpp's converter gives to
//! the Hugging Face pre-tokenizer it recognised, so that token ids agree with llama.cpp's.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::model::gguf::GgufFile;

/// llama.cpp token types (`tokenizer.ggml.token_type`).
/// An ordinary vocabulary token.
pub const TOKEN_TYPE_NORMAL: i64 = 1;
/// The unknown token.
pub const TOKEN_TYPE_UNKNOWN: i64 = 2;
/// A control token (BOS, EOS, `<|im_start|>`): special, never produced from text by BPE.
pub const TOKEN_TYPE_CONTROL: i64 = 3;
/// A user-defined token, matched whole in text.
pub const TOKEN_TYPE_USER_DEFINED: i64 = 4;
/// A reserved, unused slot.
pub const TOKEN_TYPE_UNUSED: i64 = 5;
/// A byte-fallback token (`<0x0A>`), SentencePiece vocabularies only.
pub const TOKEN_TYPE_BYTE: i64 = 6;

/// The pre-tokenizer of Llama 3 (`tokenizer.ggml.pre` = "llama-bpe", "llama3", ...), as in its
/// tokenizer.json (llama.cpp runs the same expression with `(?i:...)` spelled out).
pub const LLAMA3_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The pre-tokenizer of Qwen2/2.5/3 (`tokenizer.ggml.pre` = "qwen2"), as in its tokenizer.json.
pub const QWEN2_SPLIT_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a `tokenizer.ggml.pre` label splits text before BPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizerKind {
    /// GPT-2's byte-level regex (labels "gpt-2", "default", missing, and those llama.cpp treats alike).
    Gpt2,
    /// Every digit alone, then GPT-2's regex (StarCoder, SmolLM, Refact, CodeShell, ...).
    DigitsThenGpt2,
    /// Llama 3's regex (numbers in groups of up to three); BPE ignores merges for whole-word tokens.
    Llama3,
    /// Qwen2's regex (every digit alone).
    Qwen2,
}

impl PreTokenizerKind {
    /// The kind for a `tokenizer.ggml.pre` value; `None` (absent) means GPT-2's.
    pub fn from_label(label: Option<&str>) -> Result<Self> {
        Ok(match label {
            None | Some("default") | Some("gpt-2") | Some("gpt2") | Some("phi-2") | Some("mpt") | Some("olmo")
            | Some("jais") | Some("roberta-bpe") => PreTokenizerKind::Gpt2,
            Some("smollm") | Some("starcoder") | Some("refact") | Some("codeshell") | Some("command-r")
            | Some("exaone") | Some("minerva-7b") => PreTokenizerKind::DigitsThenGpt2,
            Some("llama-bpe") | Some("llama3") | Some("llama-v3") | Some("falcon3") => PreTokenizerKind::Llama3,
            Some("qwen2") | Some("megrez") | Some("deepseek-r1-qwen") => PreTokenizerKind::Qwen2,
            Some(other) => {
                return Err(Error::Unsupported(format!(
                    "GGUF pre-tokenizer '{other}' (supported: gpt-2/default, smollm/starcoder/refact/codeshell, \
                     llama-bpe/llama3, qwen2); use the model's Hugging Face directory instead"
                )))
            }
        })
    }

    /// The `pre_tokenizer` section of tokenizer.json.
    pub fn to_json(self) -> Value {
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
        match self {
            PreTokenizerKind::Gpt2 => byte_level(true),
            PreTokenizerKind::DigitsThenGpt2 => json!({
                "type": "Sequence",
                "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]
            }),
            PreTokenizerKind::Llama3 => {
                json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT_REGEX), byte_level(false)]})
            }
            PreTokenizerKind::Qwen2 => {
                json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT_REGEX), byte_level(false)]})
            }
        }
    }

    /// Whether llama.cpp (and the original tokenizer.json) looks whole words up before merging.
    pub fn ignore_merges(self) -> bool {
        self == PreTokenizerKind::Llama3
    }

    /// llama.cpp's default for `add_bos_token` when the file does not say.
    pub fn default_add_bos(self) -> bool {
        self == PreTokenizerKind::Llama3
    }
}

/// The parts of the GGUF tokenizer metadata the conversion uses.
struct GgufVocab<'a> {
    tokens: &'a [String],
    types: Vec<i64>,
    merges: &'a [String],
    pre: PreTokenizerKind,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}

fn read_vocab(file: &GgufFile) -> Result<GgufVocab<'_>> {
    let path = file.path();
    let model = file.get_str("tokenizer.ggml.model")?.ok_or_else(|| {
        Error::format(path, "missing tokenizer metadata: no 'tokenizer.ggml.model' (the file holds no tokenizer)")
    })?;
    match model {
        "gpt2" => {}
        "llama" => {
            return Err(Error::Unsupported(format!(
                "{}: SentencePiece ('llama') GGUF tokenizers are not supported; use the model's Hugging Face \
                 directory (tokenizer.json) for the tokenizer",
                path.display()
            )))
        }
        other => {
            return Err(Error::Unsupported(format!(
                "{}: GGUF tokenizer model '{other}' (only byte-level BPE, 'gpt2', is supported)",
                path.display()
            )))
        }
    }
    let tokens = file
        .get_str_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| Error::format(path, "missing tokenizer metadata: no 'tokenizer.ggml.tokens'"))?;
    if tokens.is_empty() {
        return Err(Error::format(path, "tokenizer.ggml.tokens is empty"));
    }
    let merges = file
        .get_str_array("tokenizer.ggml.merges")?
        .ok_or_else(|| Error::format(path, "missing tokenizer metadata: no 'tokenizer.ggml.merges'"))?;
    let types = match file.get_int_array("tokenizer.ggml.token_type")? {
        Some(t) if t.len() == tokens.len() => t,
        Some(t) => {
            return Err(Error::format(
                path,
                format!("tokenizer.ggml.token_type has {} entries for {} tokens", t.len(), tokens.len()),
            ))
        }
        None => vec![TOKEN_TYPE_NORMAL; tokens.len()],
    };
    let pre = PreTokenizerKind::from_label(file.get_str("tokenizer.ggml.pre")?).map_err(|e| {
        Error::Unsupported(format!("{}: {}", path.display(), e.to_string().trim_start_matches("unsupported: ")))
    })?;
    let id = |key: &str| -> Result<Option<u32>> {
        match file.get_u32(key)? {
            Some(id) if id as usize >= tokens.len() => {
                Err(Error::format(path, format!("{key} = {id} is outside the vocabulary of {}", tokens.len())))
            }
            other => Ok(other),
        }
    };
    Ok(GgufVocab {
        tokens,
        types,
        merges,
        pre,
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos: id("tokenizer.ggml.eos_token_id")?,
        unk: id("tokenizer.ggml.unknown_token_id")?,
        pad: id("tokenizer.ggml.padding_token_id")?,
        add_bos: file.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(pre.default_add_bos()),
        add_eos: file.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
    })
}

/// The token text llama.cpp uses for id `i` (empty tokens get a placeholder, as in llama.cpp).
fn token_text(tokens: &[String], i: usize) -> String {
    if tokens[i].is_empty() {
        format!("[EMPTY_{i}]")
    } else {
        tokens[i].clone()
    }
}

/// Builds the Hugging Face `tokenizer.json` equivalent to the GGUF tokenizer.
pub fn tokenizer_json_from_gguf(file: &GgufFile) -> Result<Value> {
    let v = read_vocab(file)?;
    let path = file.path();

    let mut vocab = serde_json::Map::with_capacity(v.tokens.len());
    let mut seen = HashSet::with_capacity(v.tokens.len());
    for i in 0..v.tokens.len() {
        let text = token_text(v.tokens, i);
        // A repeated token text keeps its first id (the others cannot be produced by encoding).
        if seen.insert(text.clone()) {
            vocab.insert(text, json!(i));
        }
    }
    let mut merges = Vec::with_capacity(v.merges.len());
    for (i, m) in v.merges.iter().enumerate() {
        // As llama.cpp: split at the first space after the first byte.
        let split = m.char_indices().skip(1).find(|&(_, c)| c == ' ').map(|(at, _)| at);
        match split {
            Some(at) => merges.push(json!([&m[..at], &m[at + 1..]])),
            None => {
                return Err(Error::format(
                    path,
                    format!("tokenizer merge {i} ({m:?}) is not two tokens separated by a space"),
                ))
            }
        }
    }
    let added_tokens: Vec<Value> = v
        .types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
        .map(|(i, &t)| {
            json!({
                "id": i,
                "content": token_text(v.tokens, i),
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": t == TOKEN_TYPE_CONTROL,
            })
        })
        .collect();

    let byte_level_post =
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
    let post_processor = if (v.add_bos && v.bos.is_some()) || (v.add_eos && v.eos.is_some()) {
        let bos = v.bos.filter(|_| v.add_bos).map(|id| (id, token_text(v.tokens, id as usize)));
        let eos = v.eos.filter(|_| v.add_eos).map(|id| (id, token_text(v.tokens, id as usize)));
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut special_tokens = serde_json::Map::new();
        for (seq, type_id) in [("A", 0), ("B", 1)] {
            let items = if seq == "A" { &mut single } else { &mut pair };
            if let Some((_, text)) = &bos {
                items.push(json!({"SpecialToken": {"id": text, "type_id": type_id}}));
            }
            items.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
            if let Some((_, text)) = &eos {
                items.push(json!({"SpecialToken": {"id": text, "type_id": type_id}}));
            }
        }
        let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
        for (id, text) in bos.iter().chain(eos.iter()) {
            special_tokens.insert(text.clone(), json!({"id": text, "ids": [id], "tokens": [text]}));
        }
        json!({
            "type": "Sequence",
            "processors": [
                byte_level_post,
                {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens}
            ]
        })
    } else {
        byte_level_post
    };

    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": v.pre.to_json(),
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": v.pre.ignore_merges(),
            "vocab": vocab,
            "merges": merges,
        }
    }))
}

/// Builds the Hugging Face `tokenizer_config.json` (special tokens, BOS/EOS policy, chat template).
pub fn tokenizer_config_from_gguf(file: &GgufFile) -> Result<Value> {
    let v = read_vocab(file)?;
    let text = |id: Option<u32>| id.map(|i| Value::String(token_text(v.tokens, i as usize))).unwrap_or(Value::Null);
    let mut added = serde_json::Map::new();
    for (i, &t) in v.types.iter().enumerate() {
        if t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED {
            added.insert(
                i.to_string(),
                json!({
                    "content": token_text(v.tokens, i),
                    "lstrip": false, "normalized": false, "rstrip": false, "single_word": false,
                    "special": t == TOKEN_TYPE_CONTROL,
                }),
            );
        }
    }
    let mut config = json!({
        "add_bos_token": v.add_bos,
        "add_eos_token": v.add_eos,
        "added_tokens_decoder": added,
        "bos_token": text(v.bos),
        "eos_token": text(v.eos),
        "unk_token": text(v.unk),
        "pad_token": text(v.pad),
        "clean_up_tokenization_spaces": false,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let Some(template) = file.get_str("tokenizer.chat_template")? {
        config["chat_template"] = json!(template);
    }
    if let Some(arch) = file.get_str("general.architecture")? {
        if let Some(ctx) = file.get_u64(&format!("{arch}.context_length"))? {
            config["model_max_length"] = json!(ctx);
        }
    }
    Ok(config)
}

/// The GGUF tokenizer as a ready `tokenizers::Tokenizer`.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<tokenizers::Tokenizer> {
    let json = tokenizer_json_from_gguf(file)?;
    tokenizers::Tokenizer::from_str(&json.to_string())
        .map_err(|e| Error::format(file.path(), format!("the tokenizer rebuilt from GGUF metadata does not load: {e}")))
}

/// Token ids by token text, for the control and user-defined tokens (what the text may name).
pub fn special_token_ids(file: &GgufFile) -> Result<HashMap<String, u32>> {
    let v = read_vocab(file)?;
    Ok(v.types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
        .map(|(i, _)| (token_text(v.tokens, i), i as u32))
        .collect())
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::model::gguf::{encode_gguf, GgufValue};
    use crate::model::gguf_model::testing::{kv, s, tiny_tokenizer_metadata};

    fn tiny_file(pre: Option<&str>, edit: impl FnOnce(&mut Vec<(String, GgufValue)>)) -> GgufFile {
        let mut md = vec![kv("general.architecture", s("llama")), kv("llama.context_length", GgufValue::U32(256))];
        md.extend(tiny_tokenizer_metadata(pre));
        edit(&mut md);
        GgufFile::from_bytes("tiny-tok.gguf", encode_gguf(&md, &[]).unwrap()).unwrap()
    }

    fn set(md: &mut Vec<(String, GgufValue)>, key: &str, value: GgufValue) {
        md.retain(|(k, _)| k != key);
        md.push(kv(key, value));
    }

    fn ids(tok: &tokenizers::Tokenizer, text: &str, special: bool) -> Vec<u32> {
        tok.encode(text, special).unwrap().get_ids().to_vec()
    }

    const B: u32 = 3; // id of byte 0 in the tiny vocabulary

    #[test]
    fn tiny_tokenizer_encodes_merges_specials_and_digits() {
        let f = tiny_file(Some("smollm"), |_| {});
        let tok = tokenizer_from_gguf(&f).unwrap();
        // "hello" -> hell + o; " world" -> Ġwor + l + d; control and user-defined tokens whole.
        let hell = B + 256 + 2;
        let gwor = B + 256 + 5;
        let expected = vec![hell, B + b'o' as u32, gwor, B + b'l' as u32, B + b'd' as u32, 2, 266, 1];
        assert_eq!(ids(&tok, "hello world<|im_end|><tool><|im_start|>", false), expected);
        // add_bos_token is false: no BOS even when special tokens are requested.
        assert_eq!(ids(&tok, "hello world<|im_end|><tool><|im_start|>", true), expected);
        // smollm splits digits one by one, so the "1 2" merge never applies.
        assert_eq!(ids(&tok, "a12", false), vec![B + b'a' as u32, B + b'1' as u32, B + b'2' as u32]);
        assert_eq!(tok.decode(&expected, false).unwrap(), "hello world<|im_end|><tool><|im_start|>");
        assert_eq!(tok.decode(&[B + 0xE2, B + 0x9C, B + 0x93], false).unwrap(), "✓");
        assert_eq!(ids(&tok, "✓", false), vec![B + 0xE2, B + 0x9C, B + 0x93]);
    }

    #[test]
    fn pre_tokenizer_follows_the_gguf_label() {
        // GPT-2's regex keeps "12" together, so its merge applies.
        for pre in [None, Some("gpt-2"), Some("default")] {
            let tok = tokenizer_from_gguf(&tiny_file(pre, |_| {})).unwrap();
            assert_eq!(ids(&tok, "a12", false), vec![B + b'a' as u32, B + 256 + 6], "{pre:?}");
        }
        // Qwen2 splits digits; Llama 3 groups up to three.
        let tok = tokenizer_from_gguf(&tiny_file(Some("qwen2"), |_| {})).unwrap();
        assert_eq!(ids(&tok, "a12 hello", false)[..3], [B + b'a' as u32, B + b'1' as u32, B + b'2' as u32]);
        let tok = tokenizer_from_gguf(&tiny_file(Some("llama-bpe"), |md| {
            set(md, "tokenizer.ggml.add_bos_token", GgufValue::Bool(true))
        }))
        .unwrap();
        assert_eq!(ids(&tok, "a12", true), vec![1, B + b'a' as u32, B + 256 + 6]);
        assert_eq!(ids(&tok, "a12", false), vec![B + b'a' as u32, B + 256 + 6]);
        // Without add_bos_token, llama3 defaults to adding BOS as llama.cpp does.
        let tok = tokenizer_from_gguf(&tiny_file(Some("llama3"), |md| {
            md.retain(|(k, _)| k != "tokenizer.ggml.add_bos_token")
        }))
        .unwrap();
        assert_eq!(ids(&tok, "hello", true), vec![1, B + 256 + 2, B + b'o' as u32]);

        match tokenizer_from_gguf(&tiny_file(Some("deepseek-coder"), |_| {})) {
            Err(Error::Unsupported(msg)) => {
                assert!(msg.contains("deepseek-coder") && msg.contains("tiny-tok.gguf"), "{msg}")
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }

    #[test]
    fn tokenizer_config_carries_template_and_special_tokens() {
        let f = tiny_file(Some("smollm"), |_| {});
        let c = tokenizer_config_from_gguf(&f).unwrap();
        assert_eq!(c["bos_token"], "<|im_start|>");
        assert_eq!(c["eos_token"], "<|im_end|>");
        assert_eq!(c["unk_token"], "<|endoftext|>");
        assert_eq!(c["pad_token"], "<|im_end|>");
        assert_eq!(c["add_bos_token"], false);
        assert_eq!(c["model_max_length"], 256);
        assert!(c["chat_template"].as_str().unwrap().contains("<|im_start|>"));
        assert_eq!(c["added_tokens_decoder"]["2"]["special"], true);
        assert_eq!(c["added_tokens_decoder"]["266"]["special"], false);
        let specials = special_token_ids(&f).unwrap();
        assert_eq!(specials.get("<tool>"), Some(&266));
        assert_eq!(specials.len(), 4);
    }

    fn expect_error(f: GgufFile, unsupported: bool, needle: &str) {
        for result in [tokenizer_json_from_gguf(&f).map(|_| ()), tokenizer_config_from_gguf(&f).map(|_| ())] {
            let err = result.expect_err("expected an error");
            let msg = err.to_string();
            assert_eq!(matches!(err, Error::Unsupported(_)), unsupported, "{msg}");
            assert_eq!(matches!(err, Error::Format { .. }), !unsupported, "{msg}");
            assert!(msg.contains("tiny-tok.gguf") && msg.contains(needle), "{msg} should mention {needle}");
        }
    }

    #[test]
    fn missing_or_unsupported_tokenizer_metadata() {
        expect_error(
            tiny_file(None, |md| md.retain(|(k, _)| !k.starts_with("tokenizer."))),
            false,
            "tokenizer.ggml.model",
        );
        expect_error(
            tiny_file(None, |md| md.retain(|(k, _)| k != "tokenizer.ggml.tokens")),
            false,
            "tokenizer.ggml.tokens",
        );
        expect_error(
            tiny_file(None, |md| md.retain(|(k, _)| k != "tokenizer.ggml.merges")),
            false,
            "tokenizer.ggml.merges",
        );
        expect_error(tiny_file(None, |md| set(md, "tokenizer.ggml.model", s("llama"))), true, "Hugging Face directory");
        expect_error(tiny_file(None, |md| set(md, "tokenizer.ggml.model", s("bert"))), true, "bert");
        expect_error(tiny_file(Some("chameleon"), |_| {}), true, "chameleon");
        expect_error(
            tiny_file(None, |md| set(md, "tokenizer.ggml.bos_token_id", GgufValue::U32(100_000))),
            false,
            "outside the vocabulary",
        );
        expect_error(
            tiny_file(None, |md| {
                set(md, "tokenizer.ggml.token_type", GgufValue::Array(crate::model::gguf::GgufArray::I32(vec![1; 3])))
            }),
            false,
            "token_type",
        );
        expect_error(
            tiny_file(None, |md| set(md, "tokenizer.ggml.tokens", s("not an array"))),
            false,
            "tokenizer.ggml.tokens",
        );
        let f = tiny_file(None, |md| {
            set(
                md,
                "tokenizer.ggml.merges",
                GgufValue::Array(crate::model::gguf::GgufArray::String(vec!["nospace".into()])),
            )
        });
        assert!(matches!(tokenizer_json_from_gguf(&f), Err(Error::Format { .. })));
        // A merge whose parts are not tokens: the built tokenizer does not load.
        let f = tiny_file(None, |md| {
            set(
                md,
                "tokenizer.ggml.merges",
                GgufValue::Array(crate::model::gguf::GgufArray::String(vec!["zz qq".into()])),
            )
        });
        match tokenizer_from_gguf(&f) {
            Err(e @ Error::Format { .. }) => assert!(e.to_string().contains("tiny-tok.gguf")),
            other => panic!("expected Format, got {:?}", other.map(|_| ())),
        }
    }

    fn model_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    }

    /// Token ids of the real model equal llama.cpp's (fixture from tools/make_tokenizer_fixture.py).
    #[test]
    fn real_model_tokenizes_like_llama_cpp() {
        let path = model_path();
        if !path.exists() {
            eprintln!("skipping: {} is absent", path.display());
            return;
        }
        let f = GgufFile::open(&path).unwrap();
        let tok = tokenizer_from_gguf(&f).unwrap();
        let fixture: Value = serde_json::from_str(
            &std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer_smollm2.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert!(cases.len() >= 10);
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let expected: Vec<u32> =
                case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            assert_eq!(ids(&tok, text, false), expected, "{text:?}");
            // add_bos_token is false for SmolLM2, so special-token handling adds nothing.
            assert_eq!(ids(&tok, text, true), expected, "{text:?}");
            assert_eq!(tok.decode(&expected, false).unwrap(), text, "{text:?}");
        }
        let config = tokenizer_config_from_gguf(&f).unwrap();
        assert_eq!(config["eos_token"], "<|im_end|>");
        assert_eq!(config["bos_token"], "<|im_start|>");
        assert!(config["chat_template"].as_str().unwrap().contains("<|im_start|>"));
    }
}
