"""Teacher training and MeanFlow distillation (see the README's status table for what exists today)."""
