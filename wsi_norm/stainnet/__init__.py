"""Making StainNet checkpoints: training on pixel pairs and distillation from a fitted method.

Consumers of the pipeline (they fit slides and compile teacher maps), so they sit above it.
What a checkpoint *is* (the network, its weights files and its colour map) lives one stage
lower, in :mod:`wsi_norm.colormap.stainnet`, because applying one is a colour map like any
other.

* :mod:`~wsi_norm.stainnet.train`: the training loop on (input, target) pixel pairs;
* :mod:`~wsi_norm.stainnet.teacher`: pairs from a teacher method (fit + map) or from registered
  slide pairs, and ``distill_stainnet``.
"""
