"""Inductor IR lowerings of the quant ops, so compiled graphs fuse them with their neighbours."""
