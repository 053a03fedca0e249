"""Files <-> (ModelConfig, tensors, Tokenizer): Hugging Face folders (hf.py), GGUF (gguf.py with
gguf_quants.py and gguf_tokenizer.py), model names (named.py), llama.cpp as reference (llamacpp.py)."""
