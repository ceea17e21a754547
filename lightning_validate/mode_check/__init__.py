"""``ModeCheck``, the Lightning adapter over the check engine that checks every phase boundary of a run.

- ``callback``: the ``Callback`` itself; its hooks are one to three lines;
- ``hook_wrapping``: wrappers around the LightningModule's and other callbacks' hooks, put back exactly;
- ``attribution``: which hook made a change seen at the end of an evaluation;
- ``metric_tracking``: torchmetrics objects updated in two stages or never reset (LV401, LV402);
- ``probe``: a batch run twice in eval mode (LV103).
"""
