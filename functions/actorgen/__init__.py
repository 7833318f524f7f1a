"""Actor LoRA pipeline: the logic behind functions/main.py (and the schema the trainer shares)."""
