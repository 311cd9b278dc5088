"""medkd.io.MetaSafeSpacingd: MONAI's Spacingd, but data entries named like '<key>_*' that are not metadata
dictionaries (MONAI Label's 'image_path') pass through instead of failing."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Spacingd

from medkd.io import MetaSafeSpacingd


def nifti_image() -> MetaTensor:
    torch.manual_seed(0)
    return MetaTensor(torch.rand(1, 12, 10), meta={"filename_or_obj": "case.nii.gz"})


def test_same_result_and_inverse_as_spacingd_and_string_entries_pass_through():
    plain = Spacingd(keys="image", pixdim=(2.0, 1.5), mode="bilinear")
    safe = MetaSafeSpacingd(keys="image", pixdim=(2.0, 1.5), mode="bilinear")
    want = plain({"image": nifti_image()})["image"]
    got = safe({"image": nifti_image(), "image_path": "case.nii.gz", "image_meta_dict": {}})
    assert torch.equal(got["image"], want) and got["image"].shape[1:] == (6, 7)
    assert got["image_path"] == "case.nii.gz" and "filename_or_obj" in got["image_meta_dict"]
    assert safe.inverse(got)["image"].shape == (1, 12, 10)
    with pytest.raises(AttributeError):  # what MONAI Label's requests hit with the plain transform
        plain({"image": nifti_image(), "image_path": "case.nii.gz"})
