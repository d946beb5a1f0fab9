"""What researchers run after training: evaluation metrics, dead-latent statistics, dark-matter decomposition."""
