"""Hand-written Triton kernels and their launchers, one file per op family.

No torch.library glue lives here: launchers take tensors (inputs and preallocated outputs) and
launch kernels. ``inductor_quant.ops`` registers them as the ops' GPU kernels.
"""
