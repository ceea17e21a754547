"""Criteria and data for the exact-loss tests: each torch.nn loss called as ``criterion(outputs, target)``.

Each case is a whole evaluation set (``outputs``, ``target``) cut into consecutive batches of ``batch_size`` (the
last one shorter), and its reference is the criterion applied once to the whole set in float64. The segmentation
cases have a share of ``ignore_index`` pixels that varies per batch, with one batch entirely ignored; the
class-weighted cases have batches whose class mix differs (imbalanced).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

VOID = 255


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], nn.Module]
    outputs: Tensor
    target: Tensor
    batch_size: int

    def batches(self) -> list[tuple[Tensor, Tensor]]:
        n = self.outputs.shape[0]
        return [(self.outputs[i : i + self.batch_size], self.target[i : i + self.batch_size])
                for i in range(0, n, self.batch_size)]

    def reference(self) -> float:
        """The criterion on the whole set, in float64."""
        criterion = copy.deepcopy(self.make()).double()
        target = self.target.double() if self.target.is_floating_point() else self.target
        with torch.no_grad():
            return float(criterion(self.outputs.double(), target))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def segmentation(n: int = 15, classes: int = 4, size: int = 5, batch_size: int = 4, seed: int = 0
                 ) -> tuple[Tensor, Tensor]:
    """Logits (N, C, H, W) and targets (N, H, W): the share of void pixels varies per sample, batch 2 is all void."""
    g = _gen(seed)
    logits = torch.randn(n, classes, size, size, generator=g) * 2
    target = torch.randint(0, classes, (n, size, size), generator=g)
    share = torch.linspace(0.0, 0.95, n)[torch.randperm(n, generator=g)]  # 0% to 95% void per sample
    void = torch.rand(n, size, size, generator=g) < share[:, None, None]
    target[void] = VOID
    target[2 * batch_size : 3 * batch_size] = VOID  # one batch entirely ignored
    return logits, target


def imbalanced(n: int = 41, classes: int = 3, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Logits (N, C) and targets mostly class 0, sorted so that batches differ in their class mix."""
    g = _gen(seed)
    target = torch.multinomial(torch.tensor([0.75, 0.2, 0.05]), n, replacement=True, generator=g).sort().values
    target = target.roll(5)  # the last classes, rare, come first: each batch has its own mix
    return torch.randn(n, classes, generator=g) + 0.5, target


def _regression(seed: int, shape: tuple[int, ...] = (23, 3)) -> tuple[Tensor, Tensor]:
    g = _gen(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g) * 1.5


def _probs(seed: int, shape: tuple[int, ...], dim: int = 1) -> tuple[Tensor, Tensor]:
    g = _gen(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g).softmax(dim)


def _signs(seed: int, shape: tuple[int, ...] = (19, 3)) -> tuple[Tensor, Tensor]:
    g = _gen(seed)
    return torch.randn(*shape, generator=g), torch.randint(0, 2, shape, generator=g).float() * 2 - 1


def _cases() -> list[Case]:
    g = _gen(7)
    seg_x, seg_y = segmentation()
    imb_x, imb_y = imbalanced()
    class_w = torch.tensor([0.2, 1.0, 5.0])
    seg_w = torch.tensor([0.5, 1.0, 2.0, 4.0])
    cases = [
        Case("ce", nn.CrossEntropyLoss, torch.randn(37, 5, generator=g), torch.randint(0, 5, (37,), generator=g), 8),
        Case("ce_weight_imbalanced", lambda: nn.CrossEntropyLoss(weight=class_w), imb_x, imb_y, 8),
        Case("ce_segmentation_ignore", lambda: nn.CrossEntropyLoss(ignore_index=VOID), seg_x, seg_y, 4),
        Case("ce_segmentation_weight_ignore", lambda: nn.CrossEntropyLoss(weight=seg_w, ignore_index=VOID),
             seg_x, seg_y, 4),
        Case("ce_segmentation_smoothing", lambda: nn.CrossEntropyLoss(ignore_index=VOID, label_smoothing=0.1),
             seg_x, seg_y, 4),
        Case("ce_segmentation_weight_smoothing",
             lambda: nn.CrossEntropyLoss(weight=seg_w, ignore_index=VOID, label_smoothing=0.2), seg_x, seg_y, 4),
        Case("ce_weight_smoothing_imbalanced", lambda: nn.CrossEntropyLoss(weight=class_w, label_smoothing=0.1),
             imb_x, imb_y, 8),
        Case("ce_segmentation_sum", lambda: nn.CrossEntropyLoss(ignore_index=VOID, reduction="sum"), seg_x, seg_y, 4),
        Case("ce_sequence_negative_ignore", lambda: nn.CrossEntropyLoss(ignore_index=-1),
             torch.randn(13, 3, 6, generator=g), torch.randint(-1, 3, (13, 6), generator=g), 5),
        Case("ce_volume_ignore", lambda: nn.CrossEntropyLoss(weight=seg_w, ignore_index=VOID),
             seg_x[:, :, :2, None, :].repeat(1, 1, 1, 2, 1), seg_y[:, :2, None, :].repeat(1, 1, 2, 1), 4),
        Case("ce_probabilities_weight_smoothing", lambda: nn.CrossEntropyLoss(weight=seg_w, label_smoothing=0.2),
             *_probs(2, (17, 4, 3)), 5),
        Case("nll_weight_ignore_a_class", lambda: nn.NLLLoss(weight=class_w, ignore_index=0),
             imb_x.log_softmax(1), imb_y, 8),
        Case("bce_with_logits_weight_pos_weight",
             lambda: nn.BCEWithLogitsLoss(weight=torch.tensor([1.0, 2.0, 0.5]),
                                          pos_weight=torch.tensor([3.0, 1.0, 0.2])),
             *_probs(3, (21, 3)), 4),
        Case("bce_weight", lambda: nn.BCELoss(weight=torch.tensor([1.0, 2.0, 0.5])),
             torch.rand(21, 3, generator=g) * 0.98 + 0.01, torch.rand(21, 3, generator=g), 4),
        Case("mse", nn.MSELoss, *_regression(4), 5),
        Case("mse_sum", lambda: nn.MSELoss(reduction="sum"), *_regression(4), 5),
        Case("l1", nn.L1Loss, *_regression(5, (23, 2, 2)), 5),
        Case("smooth_l1", lambda: nn.SmoothL1Loss(beta=0.5), *_regression(6), 5),
        Case("huber", lambda: nn.HuberLoss(delta=0.7), *_regression(7), 5),
        Case("kl_div_batchmean", lambda: nn.KLDivLoss(reduction="batchmean"),
             _probs(8, (19, 4))[0].log_softmax(1), _probs(8, (19, 4))[1], 4),
        Case("kl_div_batchmean_log_target", lambda: nn.KLDivLoss(reduction="batchmean", log_target=True),
             _probs(9, (19, 4))[0].log_softmax(1), _probs(9, (19, 4))[1].log(), 4),
        Case("poisson_nll_full", lambda: nn.PoissonNLLLoss(full=True),
             torch.randn(22, 3, generator=g), torch.randint(0, 6, (22, 3), generator=g).float(), 4),
        Case("poisson_nll_rates", lambda: nn.PoissonNLLLoss(log_input=False),
             torch.rand(22, 3, generator=g) * 3, torch.randint(0, 6, (22, 3), generator=g).float(), 4),
        Case("hinge_embedding", lambda: nn.HingeEmbeddingLoss(margin=0.5), *_signs(10), 4),
        Case("soft_margin", nn.SoftMarginLoss, *_signs(11), 4),
        Case("multilabel_soft_margin_weight",
             lambda: nn.MultiLabelSoftMarginLoss(weight=torch.tensor([1.0, 3.0, 0.5])),
             torch.randn(19, 3, generator=g), torch.randint(0, 2, (19, 3), generator=g).float(), 4),
        Case("multilabel_margin", nn.MultiLabelMarginLoss, torch.randn(19, 4, generator=g),
             torch.tensor([[0, 2, -1, 0], [1, -1, 0, 0], [3, 0, 1, -1]]).repeat(7, 1)[:19], 4),
        Case("multi_margin_weight_p2", lambda: nn.MultiMarginLoss(p=2, weight=torch.tensor([1.0, 0.3, 2.0])),
             imb_x, imb_y, 8),
    ]
    linear = getattr(nn, "LinearCrossEntropyLoss", None)
    if linear is not None:  # new in torch 2.13: a Linear layer and cross-entropy in one module

        def make_linear() -> nn.Module:
            torch.manual_seed(3)
            return linear(6, 3, weight=class_w, ignore_index=VOID)

        features = torch.randn(29, 6, generator=g)
        labels = torch.randint(0, 3, (29,), generator=g)
        labels[8:16] = VOID
        cases.append(Case("linear_cross_entropy_weight_ignore", make_linear, features, labels, 8))
    return cases


CASES = _cases()
CASE_IDS = [case.name for case in CASES]
