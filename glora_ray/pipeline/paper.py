"""Numbers taken from the GLoRA paper (Chavan et al. 2023, arXiv:2306.07967; docs/method.md §2, §4)."""
from __future__ import annotations

# Appendix A, Table 4: supernet learning rate per VTAB-1k dataset. The table prints 18 values
# for 19 datasets; smallnorb_ele has none, so it takes smallnorb_azi's 1e-4 (same source images).
PAPER_LR: dict[str, float] = {
    "cifar": 5e-4, "caltech101": 5e-4, "dtd": 5e-4, "oxford_flowers102": 5e-4, "oxford_iiit_pet": 5e-4,
    "svhn": 5e-4, "sun397": 5e-4, "patch_camelyon": 5e-4, "eurosat": 5e-4, "resisc45": 5e-4,
    "diabetic_retinopathy": 1e-4, "clevr_count": 1e-4, "clevr_dist": 1e-4, "dmlab": 5e-4, "kitti": 5e-4,
    "dsprites_loc": 5e-4, "dsprites_ori": 5e-4, "smallnorb_azi": 1e-4, "smallnorb_ele": 1e-4,
}
DEFAULT_LR = 5e-4

# Table 1: GLoRA's test accuracy (%) on each VTAB-1k dataset, per supernet (its LoRA ranks) with the
# searched subnet's parameter count (M) and the average of the three group means.
_VTAB_ORDER = ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397",
               "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy", "clevr_count", "clevr_dist", "dmlab",
               "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele")
_TABLE1_ROWS = {
    (8, 4): (0.86, (76.4, 92.9, 74.6, 99.6, 92.5, 91.5, 57.8, 87.3, 96.8, 88.0, 76.0, 83.1, 67.3, 54.5, 86.2, 83.8,
                    52.9, 37.0, 41.4), 78.0),
    (4, 2): (0.44, (76.5, 92.3, 75.2, 99.6, 92.3, 91.2, 57.5, 87.3, 96.7, 88.1, 76.1, 80.6, 67.2, 53.4, 84.5, 83.5,
                    52.8, 35.2, 40.8), 77.6),
    (2,): (0.29, (76.1, 92.7, 75.3, 99.6, 92.4, 90.5, 57.2, 87.5, 96.7, 88.1, 76.1, 81.0, 66.2, 52.4, 84.9, 81.8, 53.3,
                  33.3, 39.8), 77.3),
}
PAPER_TABLE1: dict[tuple[int, ...], dict[str, object]] = {
    ranks: {"params_m": params, "accuracy": dict(zip(_VTAB_ORDER, accuracies)), "average": average}
    for ranks, (params, accuracies, average) in _TABLE1_ROWS.items()
}
