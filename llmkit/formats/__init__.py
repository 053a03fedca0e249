"""Files <-> (ModelConfig, tensors): Hugging Face folders (hf.py); GGUF comes later."""
