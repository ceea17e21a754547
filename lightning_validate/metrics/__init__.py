"""Metric helpers for the adapters: plain torch and torchmetrics, no Lightning.

By concern:

- ``accumulators``: exact epoch sums kept on the device (``LossAccumulator``, ``TargetRange``);
- ``collectives``: waiting until a collective's backend thread has let go of its tensors (clean exits);
- ``loss_terms``: each batch's loss and its weight, so that the epoch loss is the criterion on the whole set;
- ``loss_calls``: the torch loss calls inside code the library does not see into, and the terms of the one returned;
- ``perplexity``: ``exp`` of the exact epoch loss;
- ``padding``: the samples ``DistributedSampler`` repeats, kept out of evaluation values;
- ``batches``: sample counts from shapes, descriptions for messages, moving batches to a device;
- ``fast_accuracy``: ``FastMulticlassAccuracy``, the mixin's default metric;
- ``checks``: validating the metrics a user passes;
- ``states``: reading a running value, saving and restoring metric states.
"""
