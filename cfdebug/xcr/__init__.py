"""Paper B (XCR): explanation selector (``selector.py``), counterfactual retraining
(``retrain.py``) and the Tables 1–2 report with its benchmark (``report.py``).

The selector learns which ``k`` patches of an image suffice to classify it; its hard top-k
masks ``T(x)`` are the explanations and the counterfactual inputs for retraining.
"""

from . import report, retrain, selector
from .report import *  # noqa: F401,F403  (each module's __all__ is its public API)
from .retrain import *  # noqa: F401,F403
from .selector import *  # noqa: F401,F403

__all__ = [*selector.__all__, *retrain.__all__, *report.__all__]
