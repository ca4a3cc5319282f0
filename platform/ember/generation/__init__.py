"""Every sampler (text with a KV cache, image tokens, diffusion schedule + DDPM/DDIM + CFG, GAN), below train,
serve and evaluate, which all sample from models."""
