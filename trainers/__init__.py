"""Consumers of dataset versions: LoRA SFT, DPO and evaluation (one file per method)."""
