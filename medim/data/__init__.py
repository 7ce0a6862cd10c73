"""Data: image pre/post-processing, paired image-report datasets, the token cache, synthetic phantoms."""
