"""In-process tests of the stages in ``pipeline/stages/table.py``, one module per stage.

A stage's module here runs it (``pipeline.stages.execute``) or the engine it wraps on tiny
models, with no broker and no worker process; the distributed path is tested at the top level
(test_distributed, test_faults, ...). Stages without a module here are tested elsewhere for now:
the benchmark's runtimes in tests/test_runtimes.py, QAT's devices and the training loop in
tests/test_gpu_workers.py (its ONNX export in test_qat.py here), and more of the report in
tests/test_report.py.
"""
