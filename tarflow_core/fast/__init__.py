"""Fast backends for inverting the flow: the maths of `FlowBlock.reverse` (tarflow_core.model), laid
out for speed. `tarflow_core.sampling` chooses among them; nothing here checks user input.

* `weights`: a block's weights prepared once per model state for few-row products (plain (in, out)
  matrices for MKL, or oneDNN's packed layout on wide CPU models);
* `runner`: `BlockRunner`, one block's transformer as plain tensor functions over one token (the
  sequential step) or a window of tokens (a Jacobi pass), guidance batched as 2B rows;
* `inversion`: sequential, fixed-shape sequential, Jacobi and Gauss-Seidel-Jacobi inversion;
* `calibration`: each block's segment length chosen by timing;
* `graphs`: CUDA-graph replay of the fixed-shape steps.
"""
