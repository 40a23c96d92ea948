"""Paper B's configs: the XCR selector, and one XCR experiment (retraining and evaluation)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields, replace

from ..errors import CfdebugError
from .checks import check_choice, check_int, check_real, check_section, check_sequence
from .treatment import FinetuneConfig

# XCR selector (cfdebug.xcr.selector): the map that masks T(x), and what the approximator fits.
SELECTOR_MODES = ("Topk", "Softmax")
SELECTOR_TARGETS = ("labels", "blackbox")
SELECTOR_SCHEDULES = ("constant", "cosine")
SELECTOR_ESTIMATORS = ("straight-through", "relaxed")
# XCR evaluation (cfdebug.data.corruptions): CIFAR-10-C's 15 corruptions by group, 5 severities.
CORRUPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog"),
    "digital": ("brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
CORRUPTIONS: tuple[str, ...] = tuple(name for group in CORRUPTION_GROUPS.values() for name in group)
N_SEVERITIES = 5
#: Paper B's Table 1 grid (XCR, VIBI and random masks at every k × β): ``XCRConfig(**TABLE1_SWEEP)``.
TABLE1_SWEEP: dict[str, tuple] = {"table1_ks": (16, 32, 64), "table1_betas": (0.1, 0.01, 0.001)}
# XCR retraining (cfdebug.xcr.retrain): retrain the loaded model, or a seeded fresh one.
INIT_CHOICES = ("pretrained", "scratch")


@dataclass(frozen=True)
class SelectorConfig:
    """How the XCR selector is trained (defaults from METHODS.md, paper B).

    Attributes:
        k: patches kept per image (12.5 % of the 256 patches of a 32×32 image is 32).
        beta: weight of ``KL(p(z|x) ‖ Uniform(d))`` (the paper's grid: 0.1, 0.01, 0.001).
        patch_size: side ``p`` of a square patch in pixels; must divide the image size.
        tau: Gumbel-softmax temperature of the relaxed training sample.
        mode: which map masks ``T(x)`` after training: ``"Topk"`` (the hard k-hot map) or
            ``"Softmax"`` (the softmax map ``p(x)`` itself; rows sum to 1). Training is the
            same in both modes (the Gumbel training mask), so both share one trained selector.
        target: ``"labels"`` (XCR: fit the true labels) or ``"blackbox"`` (VIBI: fit the black
            box's predicted classes).
        estimator: the training mask: ``"straight-through"`` (the hard top-k of the relaxed
            sample forward, its gradient backward; the default, see METHODS.md) or
            ``"relaxed"`` (the relaxed sample itself, as in paper B).
        epochs, batch_size, lr: Adam training schedule. ``lr`` is the paper's 1e-4; see
            :meth:`demo` for the embedded demo's faster schedule.
        schedule: ``"cosine"`` (the learning rate decays from ``lr`` to 0 along half a cosine
            over all steps) or ``"constant"``.
        width: channel width of the selector and of the approximator's stem (both ResNet-style).
        seed: seeds the initial weights, the batch order and the Gumbel noise.
    """

    k: int = 32
    beta: float = 0.01
    patch_size: int = 2
    tau: float = 0.5
    estimator: str = "straight-through"
    mode: str = "Topk"
    target: str = "labels"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    schedule: str = "cosine"
    width: int = 32
    seed: int = 0

    @classmethod
    def demo(cls, **overrides) -> "SelectorConfig":
        """The schedule for the embedded demo beds: width 16, Adam lr 5e-3 (cosine), 15 epochs.

        Chosen on the VALIDATION split of Hard Digits (k = 32, β = 0.001, the straight-through
        mask; best-epoch top-k validation accuracy of the approximator, 180 images, seeds 0/1):
        width 16 with lr 1e-3: 0.57; 3e-3: 0.76/0.74; 5e-3: 0.83/0.72; 8e-3: 0.64/0.76;
        3e-3 for 10 or 20 epochs: 0.64, 0.76; a constant lr 3e-3: 0.71; width 24 (12 epochs):
        0.58; width 32 at 3e-3: 0.81 but 2.5× the time. With the paper's relaxed mask instead:
        at most 0.64 (width 16) / 0.71 (width 32). The paper's 1e-4 is far too slow for the
        demo's ~1,100 training images (17 steps per epoch). 15 epochs take about 40 s on one
        CPU thread. All other constants stay the paper's.
        """
        return cls(**{"epochs": 15, "lr": 5e-3, "width": 16, **overrides})

    def __post_init__(self):
        check_int(self.k, "k")
        check_int(self.patch_size, "patch_size")
        check_int(self.epochs, "epochs")
        check_int(self.batch_size, "batch_size")
        check_int(self.width, "width")
        check_int(self.seed, "seed", 0)
        check_real(self.beta, "beta", low=0.0)
        check_real(self.tau, "tau", low=0.0, low_open=True)
        check_real(self.lr, "lr", low=0.0, low_open=True)
        check_choice(self.mode, "mode", SELECTOR_MODES)
        check_choice(self.target, "target", SELECTOR_TARGETS)
        check_choice(self.schedule, "schedule", SELECTOR_SCHEDULES)
        check_choice(self.estimator, "estimator", SELECTOR_ESTIMATORS)


def _xcr_retrain_default() -> FinetuneConfig:
    # The paper retrains all layers with Adam and no dropout; `seed` is set per run from `seeds`.
    return FinetuneConfig(epochs=10, lr=1e-3, optimizer="adam", momentum=0.9, weight_decay=0.0, batch_size=64,
                          dropout=0.0, trainable="all")


#: :class:`FinetuneConfig` fields of ``XCRConfig.retrain`` that may be given flat (``epochs=3``):
#: :meth:`XCRConfig.demo`, ``override_xcr_config`` and run.json files written before ``retrain``
#: existed. ``seed`` is not one: the runs' seeds are ``XCRConfig.seeds``.
XCR_RETRAIN_FIELDS = ("epochs", "lr", "optimizer", "momentum", "weight_decay", "batch_size", "trainable", "dropout")


def route_retrain_fields(values: dict, retrain: FinetuneConfig) -> dict:
    """``values`` (XCRConfig keywords) with flat :data:`XCR_RETRAIN_FIELDS` moved into ``retrain``.

    Returns a new dict; when it held retraining fields, its ``retrain`` is ``retrain`` (or
    ``values["retrain"]``) with those fields replaced, validated as a :class:`FinetuneConfig`.
    """
    values = dict(values)
    flat = {name: values.pop(name) for name in XCR_RETRAIN_FIELDS if name in values}
    if flat:
        values["retrain"] = replace(values.get("retrain", retrain), **flat)
    return values


@dataclass(frozen=True)
class XCRConfig:
    """One XCR experiment: the selector, the retraining schedule, the evaluation.

    Attributes:
        selector: the :class:`SelectorConfig` whose masks ``T(x)`` are used for retraining
            (its ``k``, ``beta``, ``patch_size``, ``mode``; ``target`` ``"labels"`` is XCR).
        retrain: the :class:`FinetuneConfig` of the retraining, identical for the vanilla and
            the XCR run (default: Adam lr 1e-3, 10 epochs, all layers, no dropout).
            ``batch_size`` counts original images; an XCR batch holds twice as many (the
            originals and their ``T(x)``). Its ``seed`` is replaced by each of ``seeds``.
        init: ``"pretrained"`` (retrain the workspace's black box) or ``"scratch"`` (seeded
            random initialisation of the same architecture, as in the paper).
        seeds: one vanilla and one XCR run per seed; tables report the mean over seeds.
            The selector keeps its own seed (``selector.seed``): one explainer for all runs.
        random_baseline: also retrain with random k-hot masks ("Compare with Random").
        corruptions, severities, corruption_seed: the corrupted test sets (names from
            :data:`cfdebug.data.corruptions.CORRUPTIONS`, severities 1..5). Generated from the
            workspace's test images unless ``cifar10c_dir`` names a CIFAR-10-C folder (then
            its ``<name>.npy`` files are read, with the workspace's test labels).
        max_corrupt_images: evaluate corruptions on a seeded random subset of at most this many
            test images (``None``: all).
        table1_ks, table1_betas: the grid of Table 1 (XCR, VIBI and random masks). ``None``
            (the default): the selector's own ``k`` and ``β``, whose selector the retraining
            trains anyway, with the XCR and random-mask rows only, so Table 1 trains nothing
            more (VIBI needs a selector of its own); a grid given (``report`` gives
            ``(k,), (β,)``) has all three modes; paper B's sweep (:data:`TABLE1_SWEEP`: an XCR
            and a VIBI selector per pair) is an explicit choice; ``()``: no Table 1.
            :meth:`table1_grid` resolves them.
        n_bins: ECE / reliability bins (15, METHODS.md).
    """

    selector: SelectorConfig = field(default_factory=lambda: SelectorConfig(k=32, beta=0.001))
    retrain: FinetuneConfig = field(default_factory=_xcr_retrain_default)
    init: str = "pretrained"
    seeds: tuple[int, ...] = (0, 1, 2)
    random_baseline: bool = False
    corruptions: tuple[str, ...] = CORRUPTIONS
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    corruption_seed: int = 0
    cifar10c_dir: str | None = None
    max_corrupt_images: int | None = None
    table1_ks: tuple[int, ...] | None = None
    table1_betas: tuple[float, ...] | None = None
    n_bins: int = 15

    def __post_init__(self):
        check_section(self.selector, "selector", SelectorConfig)
        check_section(self.retrain, "retrain", FinetuneConfig)
        check_int(self.corruption_seed, "corruption_seed", 0)
        check_int(self.n_bins, "n_bins")
        check_choice(self.init, "init", INIT_CHOICES)
        if not isinstance(self.random_baseline, bool):
            raise CfdebugError(f"Expected `random_baseline` to be true or false, but got {self.random_baseline!r}.")
        seeds = check_sequence(self.seeds, "seeds", lambda s: check_int(s, "seeds", 0))
        if not seeds:
            raise CfdebugError("Expected `seeds` to hold at least one seed, but it is empty.")

        def corruption(name):
            if name not in CORRUPTIONS:
                raise CfdebugError(f"Expected `corruptions` to hold names from {', '.join(CORRUPTIONS)}, but got {name!r}.")
            return name

        def severity(s):
            if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 1 <= s <= N_SEVERITIES:
                raise CfdebugError(f"Expected `severities` to hold integers in 1..{N_SEVERITIES}, but got {s!r}.")
            return int(s)

        corruptions = check_sequence(self.corruptions, "corruptions", corruption)
        severities = check_sequence(self.severities, "severities", severity)
        if bool(corruptions) != bool(severities):
            raise CfdebugError("Expected both `corruptions` and `severities` to be empty (clean evaluation only) or both non-empty.")
        ks = None if self.table1_ks is None else check_sequence(self.table1_ks, "table1_ks", lambda k: check_int(k, "table1_ks"))
        betas = None if self.table1_betas is None else check_sequence(self.table1_betas, "table1_betas", lambda b: check_real(b, "table1_betas", low=0.0))
        if self.max_corrupt_images is not None:
            check_int(self.max_corrupt_images, "max_corrupt_images")
        if self.cifar10c_dir is not None and not isinstance(self.cifar10c_dir, str):
            raise CfdebugError(f"Expected `cifar10c_dir` to be a folder path, but got {self.cifar10c_dir!r}.")
        # Normalise lists (from JSON) to tuples so the frozen config hashes and compares.
        for name, value in (("seeds", seeds), ("corruptions", corruptions), ("severities", severities), ("table1_ks", ks), ("table1_betas", betas)):
            object.__setattr__(self, name, value)

    @property
    def k(self) -> int:
        return self.selector.k

    def table1_grid(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """Table 1's ``(ks, betas)``: the fields, or the selector's own ``(k,), (β,)`` where ``None``."""
        ks = (self.selector.k,) if self.table1_ks is None else self.table1_ks
        betas = (self.selector.beta,) if self.table1_betas is None else self.table1_betas
        return ks, betas

    @property
    def table1_sweep(self) -> bool:
        """Whether Table 1 trains selectors beyond the retraining's own (a grid, not ``None``)."""
        ks, betas = self.table1_grid()
        return bool(ks) and (set(ks) != {self.selector.k} or set(betas) != {self.selector.beta})

    @property
    def patch_size(self) -> int:
        return self.selector.patch_size

    @classmethod
    def demo(cls, **overrides) -> "XCRConfig":
        """The embedded demo's settings (see the README's Calibration section for the measured time).

        Selector: :meth:`SelectorConfig.demo` (width 16, Adam 5e-3, 15 epochs) at the paper's best
        ``k = 32, β = 0.001``. Retraining: 3 epochs, Adam 1e-3, all layers, from the trained
        demo CNN, one seed. Evaluation: all 15 corruptions at severities 1, 3 and 5. Table 1:
        at that one ``k, β`` (paper B's sweep is ``**TABLE1_SWEEP``). Every field can be
        overridden, the retraining's also flat (:data:`XCR_RETRAIN_FIELDS`), e.g.
        ``XCRConfig.demo(epochs=1, seeds=(0, 1, 2))``.
        """
        selector = overrides.pop("selector", None) or SelectorConfig.demo(k=32, beta=0.001)
        base = {
            "selector": selector,
            "retrain": replace(_xcr_retrain_default(), epochs=3),
            "seeds": (0,),
            "corruptions": CORRUPTIONS,
            "severities": (1, 3, 5),
        }
        return cls(**route_retrain_fields({**base, **overrides}, base["retrain"]))


def _known_keys(d: dict, cls: type, what: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise CfdebugError(f"Unknown {what} keys {', '.join(unknown)}; expected some of {', '.join(sorted(known))}.")


def xcr_config_from_dict(d: dict) -> XCRConfig:
    """Rebuild an :class:`XCRConfig` from ``config_dict(config)`` / ``asdict(config)`` (or JSON).

    The retraining schedule is read from ``retrain``, or flat (:data:`XCR_RETRAIN_FIELDS`) as
    run.json files written before ``retrain`` existed hold it; not both. Unknown keys raise
    :class:`CfdebugError` naming them; missing keys take the defaults.
    """
    if isinstance(d, XCRConfig):
        return d
    if not isinstance(d, dict):
        raise CfdebugError(f"Expected the XCR config to be a dict (asdict(XCRConfig)), but got {type(d).__name__}.")
    values = dict(d)
    flat = [name for name in XCR_RETRAIN_FIELDS if name in values]
    if flat and "retrain" in values:
        raise CfdebugError(f"Expected the retraining schedule under `retrain` or flat (an old run.json), but got both (`retrain` and {', '.join(flat)}).")
    _known_keys({k: v for k, v in values.items() if k not in flat}, XCRConfig, "XCR config")
    for name, cls, what in (("selector", SelectorConfig, "selector config"), ("retrain", FinetuneConfig, "retrain config")):
        if isinstance(values.get(name), dict):
            _known_keys(values[name], cls, what)
            values[name] = cls(**values[name])
    for name in ("seeds", "corruptions", "severities", "table1_ks", "table1_betas"):
        if isinstance(values.get(name), list):
            values[name] = tuple(values[name])
    return XCRConfig(**route_retrain_fields(values, _xcr_retrain_default()))
