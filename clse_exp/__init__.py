"""clse-exp: config-driven experiments for training-free visual-token pruning."""
