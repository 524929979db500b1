"""Model formats of other tools: Hugging Face directories (`hf`) and GGUF export (`gguf`)."""
