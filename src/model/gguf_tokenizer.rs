//! GGUF tokenizer metadata as Hugging Face tokenizer.json / tokenizer_config.json.
