"""comoe inside the tools people already train and evaluate with (transformers Trainer, TRL)."""
