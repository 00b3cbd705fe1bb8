"""Teacher training and MeanFlow distillation: the commands of docs/training.md."""
