"""Short fine-tuning of a patched model against its unpatched original (``tools/finetune.py``).

One concept per module: ``schedule`` (keep-rate and learning-rate curves, pure functions of the
step), ``loss`` (distillation + optional cross-entropy), ``data`` (images, augmentation, a
resumable sampler), ``checkpoint`` (atomic save, exact resume), ``distributed`` (torchrun), and
``loop`` (the epoch loop that ties them together).
"""
