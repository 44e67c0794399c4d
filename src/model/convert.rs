//! Converting a GGUF model file into a Hugging Face model directory.
