"""The CLI's progress bars print each state once: the first (0 of N) and the last (N of N) included."""

from __future__ import annotations

import re

from guardtune_cli._common import StageProgress


def test_each_state_is_printed_once(capsys):
    with StageProgress() as bar:
        for done in range(5):  # the callers report 0 first, then every step
            bar("train", "train", done, 4)
        bar("audit", "generate:base", 0, 2)
        bar("audit", "generate:base", 2, 2)
    err = capsys.readouterr().err
    states = re.findall(r"(train|audit: generate:base): +\d+%\|[^|]*\| (\d+)/(\d+)", err)
    assert states == [("train", str(i), "4") for i in range(5)] + [("audit: generate:base", "0", "2"),
                                                                      ("audit: generate:base", "2", "2")]


def test_loading_a_model_prints_no_weight_loading_bar_and_restores_the_setting(tiny_model_dir, capsys):
    from transformers.utils import logging as hf_logging

    from guardtune.models import load_model

    assert hf_logging.is_progress_bar_enabled()
    load_model(str(tiny_model_dir))
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # the caller's setting is back
