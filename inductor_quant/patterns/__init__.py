"""Post-grad pattern-matcher passes (dequantize+linear, optimizer chains), one family per file.

* ``dequant_linear``: ``dequantize_4bit`` / ``dequantize_blockwise`` feeding ``mm``/``addmm`` (or
  the mul + sum a one-row ``mm`` decomposes into under ``coordinate_descent_tuning``) ->
  ``gemm_4bit`` / ``linear_8bit``;
* ``sibling_matmuls``: ``gemm_4bit`` calls that read the same activations (q/k/v, gate/up) ->
  one ``gemm_4bit_grouped`` (one GEMV launch for all of them at decode);
* ``swiglu_epilogue``: ``silu(gate) * up`` over a grouped gate/up matmul -> one
  ``gemm_4bit_swiglu`` (the SwiGLU computed in the GEMV's epilogue);
* ``optimizer_chain``: auto-functionalized mutating optimizer updates -> functional optimizer
  steps (which the lowerings fuse into one kernel per tensor);
* ``standalone``: quant ops whose hand-written kernel beats the generated code (GPU) -> marked so
  that their lowering calls the kernel: an 8-bit dequantize with no fusible neighbour, and every
  quantize except the end of a requantization chain (``dequantize_4bit`` stays generated code,
  its faster form);
* ``pass_manager``: :class:`~.pass_manager.QuantPassManager`, the one ``CustomGraphPass`` that runs
  them (chained with the user's own pass, stable ``uuid()`` for the FX graph cache), its
  :class:`~.pass_manager.QuantPassConfig` and ``install_options`` for ``torch.compile(options=...)``;
* ``records``: rewrite counters (``counters["inductor_quant"]``) and the fusion decisions with
  their reasons (``fusion_decisions()``, ``node.meta["inductor_quant"]``).
"""
