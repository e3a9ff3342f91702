"""Reward fine-tuning of diffusion models (DRaFT-K) with ICT / HP / ICT-HP and baselines."""
