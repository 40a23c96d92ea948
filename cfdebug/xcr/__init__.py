"""Paper B (XCR): explanation selector (``selector.py``) on a patch grid (``patches.py``),
counterfactual retraining (``retrain.py``), and the Tables 1–2 report: test images
(``images.py``), calibration (``calibration.py``), Table 1 (``explanations.py``), Table 2 on
corrupted sets (``robustness.py``), the cached report (``report.py``), the Occlusion benchmark
(``bench.py``) and the text tables (``text.py``).

The selector learns which ``k`` patches of an image suffice to classify it; its hard top-k
masks ``T(x)`` are the explanations and the counterfactual inputs for retraining.

The names below are the package's API; the modules' other functions (the networks, the losses,
cache keys, …) stay importable from their modules but may change.
"""

from .bench import bench_xcr
from .calibration import calibration_metrics, evaluate_calibration, score_models
from .explanations import TABLE1_COLUMNS, explanation_images, explanation_table
from .images import predict_images, test_images
from .patches import check_patch_grid, num_patches
from .report import check_report_inputs, run_xcr_report
from .retrain import XCRConfig, counterfactual_retrain, default_xcr_config, override_xcr_config, vanilla_retrain, xcr_config_from_dict
from .robustness import TABLE2_COLUMNS, table2_results
from .selector import SelectorConfig, selector_masks, trained_selector
from .text import format_bench, format_table1, format_table2, print_table1, print_table2

__all__ = [
    # configs
    "SelectorConfig", "XCRConfig", "default_xcr_config", "override_xcr_config", "xcr_config_from_dict",
    # the patch grid
    "check_patch_grid", "num_patches",
    # the stages and the report
    "trained_selector", "selector_masks", "counterfactual_retrain", "vanilla_retrain", "run_xcr_report", "check_report_inputs",
    # test images and their calibration
    "test_images", "predict_images", "calibration_metrics", "evaluate_calibration", "score_models",
    # Tables 1–2 and the benchmark
    "TABLE1_COLUMNS", "TABLE2_COLUMNS", "explanation_table", "explanation_images", "table2_results", "bench_xcr",
    "format_table1", "format_table2", "format_bench", "print_table1", "print_table2",
]
