"""The pipeline's stages, one module each: listing, decode, inference, write."""
