"""Plain torch modules (no Lightning): encoders, decoders, decoding, losses."""
