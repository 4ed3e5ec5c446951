"""LoRA adapters: applied to a model's tensors as they stream (`model+lora`), and extracted from a
fine-tune and its base (`python -m merger extract-lora`)."""
