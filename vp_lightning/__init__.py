"""vp_lightning: discrete tokenizers (VQ-VAE, FSQ, VP-VAE, FSP) and WiSparse LLM activation sparsity on Lightning."""

__version__ = "0.1.0"
