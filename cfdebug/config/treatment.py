"""Fine-tuning and treatment configs (paper A, eq. 8): the schedule a sweep shares, one run's loss weights."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import CfdebugError
from .checks import check_choice, check_int, check_real

# Fine-tuning (cfdebug.treatment, cfdebug.xcr.retrain): which parameters train, and how.
TRAINABLE_CHOICES = ("block+head", "head", "all")
OPTIMIZER_CHOICES = ("sgd", "adam")


def check_schedule(config) -> None:
    """Validate the fields every fine-tuning config shares (see :class:`FinetuneConfig`).

    ``config`` is any object with ``epochs``, ``lr``, ``momentum``, ``weight_decay``,
    ``batch_size``, ``seed``, ``dropout``, ``trainable`` and ``optimizer``
    (:func:`cfdebug.treatment.finetune` checks the config it is given with this).
    """
    check_int(config.epochs, "epochs")
    check_real(config.lr, "lr", low=0.0, low_open=True)
    check_real(config.momentum, "momentum", 0.0, 1.0, high_open=True)
    check_real(config.weight_decay, "weight_decay", low=0.0)
    check_int(config.batch_size, "batch_size")
    check_int(config.seed, "seed", 0)
    check_real(config.dropout, "dropout", 0.0, 1.0, high_open=True)
    check_choice(config.trainable, "trainable", TRAINABLE_CHOICES)
    check_choice(config.optimizer, "optimizer", OPTIMIZER_CHOICES)


@dataclass(frozen=True)
class FinetuneConfig:
    """The schedule of a fine-tuning run (:func:`~cfdebug.treatment.finetune`), without any extra loss.

    ``trainable``: ``"block+head"`` (the target block and the head; the rest frozen),
    ``"head"`` or ``"all"``. ``dropout`` is applied to ``g(x)`` [B, C] before the pooled head
    (where the architecture has one). ``optimizer`` ``"sgd"`` uses ``momentum``; ``"adam"``
    ignores it. Validated on construction (:class:`~cfdebug.errors.CfdebugError`).
    """

    epochs: int = 10
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    seed: int = 0
    dropout: float = 0.5
    trainable: str = "block+head"
    optimizer: str = "sgd"

    def __post_init__(self):
        check_schedule(self)


@dataclass(frozen=True)
class TreatmentSchedule(FinetuneConfig):
    """What every run of a treatment sweep shares (METHODS.md "Treatment"): the fine-tuning
    schedule (:class:`FinetuneConfig`'s fields) and ``theta``, the thresholded-ReLU threshold on
    ``sigmoid(g)``.

    The loss weights are not part of it: a sweep's grids (``lambdas1``, ``lambdas2``) hold them,
    and :meth:`with_lambdas` makes one run's :class:`TreatmentConfig`. ``seed`` is replaced by
    each of the sweep's seeds, as ``XCRConfig.retrain``'s is.
    """

    theta: float = 0.5

    def __post_init__(self):
        check_real(self.theta, "theta", 0.0, 1.0, high_open=True)
        super().__post_init__()

    def with_lambdas(self, lambda1: float, lambda2: float, seed: int | None = None) -> "TreatmentConfig":
        """The :class:`TreatmentConfig` of one run on this schedule (``seed`` ``None`` keeps the schedule's)."""
        values = {f.name: getattr(self, f.name) for f in fields(TreatmentSchedule)}
        if seed is not None:
            values["seed"] = seed
        return TreatmentConfig(**values, lambda1=lambda1, lambda2=lambda2)


@dataclass(frozen=True)
class TreatmentConfig(TreatmentSchedule):
    """One treatment run (METHODS.md "Treatment"): the loss weights on a :class:`TreatmentSchedule`.

    ``lambda1`` rewards the true class's MC filters, ``lambda2`` penalises the others, both in
    ``[0, 1]`` (paper grid: λ1 1e-4…2e-3, λ2 1e-5…1e-4). The control is ``lambda1 = lambda2 = 0``
    (:func:`~cfdebug.treatment.control_config`). A sweep (:func:`~cfdebug.treatment.treatment_sweep`)
    takes the schedule and the grids instead, and makes one of these per run.
    """

    lambda1: float = 1e-3
    lambda2: float = 2e-5

    def __post_init__(self):
        check_real(self.lambda1, "lambda1", 0.0, 1.0)
        check_real(self.lambda2, "lambda2", 0.0, 1.0)
        super().__post_init__()

    @property
    def schedule(self) -> TreatmentSchedule:
        """This run's schedule, without the loss weights."""
        return TreatmentSchedule(**{f.name: getattr(self, f.name) for f in fields(TreatmentSchedule)})


def check_sweep_schedule(schedule) -> TreatmentSchedule:
    """``schedule`` if it is a :class:`TreatmentSchedule` without loss weights; a sweep's weights
    live in its grids only, so a :class:`TreatmentConfig` (which holds one pair) is refused."""
    if isinstance(schedule, TreatmentConfig) or not isinstance(schedule, TreatmentSchedule):
        raise CfdebugError(
            f"Expected the sweep's schedule as a TreatmentSchedule (its runs' λ1 and λ2 come from `lambdas1` and "
            f"`lambdas2`), but got a {type(schedule).__name__}; pass `config.schedule` for a TreatmentConfig."
        )
    return schedule
