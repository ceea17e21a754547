"""Metric helpers for the adapters: plain torch and torchmetrics, no Lightning.

By concern:

- ``accumulators``: exact epoch sums kept on the device (``LossAccumulator``, ``TargetRange``);
- ``loss_terms``: each batch's loss and its weight, so that the epoch loss is the criterion on the whole set;
- ``padding``: the samples ``DistributedSampler`` repeats, kept out of evaluation values;
- ``batches``: sample counts from shapes, descriptions for messages, moving batches to a device;
- ``fast_accuracy``: ``FastMulticlassAccuracy``, the mixin's default metric;
- ``checks``: validating the metrics a user passes;
- ``states``: reading a running value, saving and restoring metric states.
"""
