"""Data: datalists and their checks, the embedded demo dataset, semi-supervised batches, dataset converters."""

from medkd.data.datalist import check_datalist, image_shape, load_datalist, load_domains, read_label
from medkd.data.demo import DemoConfig, prepare_demo
from medkd.data.mixing import BatchMixing, MixedBatch, mixed_task_loss
from medkd.data.semi import (MarkLabelledd, SemiSupervisedDataset, epochs_for, label_free_entries, split_labelled,
                             steps_per_epoch)

__all__ = [
    "BatchMixing", "DemoConfig", "MarkLabelledd", "MixedBatch", "SemiSupervisedDataset", "check_datalist",
    "image_shape",
    "label_free_entries", "load_datalist", "load_domains", "mixed_task_loss", "prepare_demo", "read_label",
    "split_labelled", "steps_per_epoch", "epochs_for",
]
