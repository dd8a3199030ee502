"""Data: sources (folders, file lists, Hugging Face), decoding, the decoded cache, the P x K sampler
and the loaders that hand uint8 batches to the training loop."""
