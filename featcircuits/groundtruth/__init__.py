"""Ground truth to check circuit discovery against, kept outside the core.

``tracr_model`` compiles RASP programs into HookedTransformers whose dataflow is known; ``tracr_saes``
trains dictionaries on their residual streams (labelled directions: ground-truth features);
``tracr_truth`` turns the compiled program into contrastive tasks and the units a circuit should find.
They need the ``tracr-pypi`` package (a dev and benchmark dependency).
"""
