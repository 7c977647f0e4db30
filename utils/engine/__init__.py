"""The engine: run set-up, training loop and step, optimiser, checkpoints, evaluation."""
