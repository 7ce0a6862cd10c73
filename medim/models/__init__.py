"""Models: the MeDiM denoiser (`medim.py`), the VQGAN image tokenizer, and the loaders that build them
from upstream checkpoints."""
