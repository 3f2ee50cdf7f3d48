"""The finetune stage's model shared by the stage tests: trained once per test run.

The calibration and sensitivity tests measure one ResNet18 fine-tuned on digits at 32x32
(``tests.helpers.TRAINED_SPEC``). The ``finetuned`` fixture runs the ingest and finetune stages
into a content-addressed store in a folder every pytest-xdist worker of the run shares, under a
file lock, so the first use trains and every later one is the finetune stage's cache hit.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers import Finetuned, finetune_once


def test_the_finetuned_model_is_trained_once_per_run(finetuned: Finetuned,
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    again = finetune_once(finetuned.folder)  # a second use, as another worker of the run makes it
    assert again.cached, "the second use trained again instead of finding the stored finetune output"
    assert again.manifest["outputs"]["state_dict"] == finetuned.manifest["outputs"]["state_dict"]
    builds = again.builds()  # every use in this run so far, from any worker
    assert [b["cached"] for b in builds].count(False) == 1, builds
    assert builds[-1]["cached"] is True and builds[-1]["pid"] == os.getpid(), builds
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the run's folder, not this worker's own
        assert finetuned.folder.parent == tmp_path_factory.getbasetemp().parent
