"""Training: data, augmentation, optimisation and the training loop."""
