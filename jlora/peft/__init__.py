"""Parameter-efficient fine-tuning methods, each a pure transform of the parameter tree."""
