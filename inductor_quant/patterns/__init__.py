"""Post-grad pattern-matcher passes (dequantize+linear, optimizer chains), one family per file."""
