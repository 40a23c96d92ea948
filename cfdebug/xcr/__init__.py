"""Paper B (XCR): explanation selector (``selector.py``), counterfactual retraining
(``retrain.py``), and the Tables 1–2 report: test images (``images.py``), calibration
(``calibration.py``), Table 1 (``explanations.py``), Table 2 on corrupted sets
(``robustness.py``), the cached report (``report.py``), the Occlusion benchmark (``bench.py``)
and the text tables (``text.py``).

The selector learns which ``k`` patches of an image suffice to classify it; its hard top-k
masks ``T(x)`` are the explanations and the counterfactual inputs for retraining.
"""

from . import bench, calibration, explanations, images, report, retrain, robustness, selector, text
from .bench import *  # noqa: F401,F403  (each module's __all__ is its public API)
from .calibration import *  # noqa: F401,F403
from .explanations import *  # noqa: F401,F403
from .images import *  # noqa: F401,F403
from .report import *  # noqa: F401,F403
from .retrain import *  # noqa: F401,F403
from .robustness import *  # noqa: F401,F403
from .selector import *  # noqa: F401,F403
from .text import *  # noqa: F401,F403

__all__ = [
    *selector.__all__, *retrain.__all__, *images.__all__, *calibration.__all__, *explanations.__all__,
    *robustness.__all__, *report.__all__, *bench.__all__, *text.__all__,
]
