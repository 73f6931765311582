"""Text towers at inference: the tokenizer and image-text scoring."""
