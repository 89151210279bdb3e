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
