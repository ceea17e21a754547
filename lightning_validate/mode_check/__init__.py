"""``ModeCheck``, the Lightning adapter over the check engine that checks every phase boundary of a run.

- ``callback``: the ``Callback`` itself, a thin adapter: its hooks are one to three lines and route to the objects
  below;
- ``arguments``: ``ModeCheck``'s arguments, checked together;
- ``evaluation``: ``EvalRun``, one evaluation's baseline, marks, batch checks, end, restore check and give-back;
- ``training``: ``TrainingChecks``, the training-batch checks (LV301, LV302) and when torchmetrics objects are read;
- ``reporting``: ``Reporter``, the reporting policy (ignore, count, warn once or raise) and the ranks' agreement;
- ``report``: ``RunReport``, one run's findings with counts, boundaries, summary (logged) and JSON report;
- ``hook_wrapping``: which hooks of the LightningModule and other callbacks are wrapped, and putting them back
  exactly;
- ``attribution``: which hook made a change seen at the end of an evaluation;
- ``metric_tracking``: torchmetrics objects updated in two stages or never reset (LV401, LV402);
- ``rank_agreement``: findings shared across ranks at each sync (DDP, FSDP), and DDP's buffer broadcast;
- ``probe``: a batch run twice in eval mode (LV103).
"""
