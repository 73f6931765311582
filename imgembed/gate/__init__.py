"""The parity gate: reference embeddings, the parity and calibration sets, the metrics and verdict."""
