"""Data stage: dataset adapters, dlib alignment, subject-disjoint splits, crop cache, `01_data/` artifacts."""
from flowsan_lib.data.adapters import (
           DataError,
           load_celeba,
           load_lfw,
           load_lfw_pairs,
           load_manifest,
           load_source,
           load_utkface,
           parse_utkface_name,
)
from flowsan_lib.data.align import align_image, chip_to_resolution, landmarks_to_resolution
from flowsan_lib.data.splits import assign_splits, is_subject_disjoint
from flowsan_lib.data.stage import FaceSet, load_faces, load_failures, run_data_stage

__all__ = ["DataError", "FaceSet", "align_image", "assign_splits", "chip_to_resolution", "is_subject_disjoint",
           "landmarks_to_resolution", "load_celeba", "load_failures", "load_faces", "load_lfw", "load_lfw_pairs",
           "load_manifest", "load_source", "load_utkface", "parse_utkface_name", "run_data_stage"]
