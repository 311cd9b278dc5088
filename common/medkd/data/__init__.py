"""Data: datalists and their checks, the embedded demo dataset, dataset converters."""

from medkd.data.datalist import check_datalist, image_shape, load_datalist, read_label
from medkd.data.demo import DemoConfig, prepare_demo

__all__ = ["DemoConfig", "check_datalist", "image_shape", "load_datalist", "prepare_demo", "read_label"]
