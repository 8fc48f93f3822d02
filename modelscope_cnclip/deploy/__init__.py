"""Deployment: export a checkpoint's towers to ONNX, OpenVINO IR or TensorRT engines, with int8 that is calibrated
and gated on the user's own data. The exported dir is a model source like any other (``load``, the pipeline, the
CLI, jobs and indexes); the runtimes that run it live in :mod:`modelscope_cnclip.runtime`.

* :mod:`.graphs` — torch -> ONNX per tower (dynamic batch and length), fp16, OpenVINO IR;
* :mod:`.int8` — calibration inputs, ONNX Runtime and NNCF quantization, the accuracy gate;
* :mod:`.exporter` — :func:`export`, the whole job, written atomically.

Needs the ``export`` extra (``pip install "modelscope_cnclip[export]"``); TensorRT also needs a CUDA GPU and the
``tensorrt`` package.
"""
from modelscope_cnclip.deploy.exporter import DEFAULT_MAX_BATCH, EXPORT_PRECISIONS, ExportReport, export
from modelscope_cnclip.deploy.int8 import DEFAULT_CALIBRATION, Calibration, Int8Gate, read_calibration

__all__ = ['export', 'ExportReport', 'Int8Gate', 'Calibration', 'read_calibration', 'EXPORT_PRECISIONS',
           'DEFAULT_MAX_BATCH', 'DEFAULT_CALIBRATION']
