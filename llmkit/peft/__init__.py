"""Parameter-efficient fine-tuning: LoRA / QLoRA (lora.py, qlora.py) and prompt tuning (prompt_tuning.py)."""
