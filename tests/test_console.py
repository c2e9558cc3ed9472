"""The stage console: Ray's known noise is dropped where the driver prints worker output; the rest shows."""

import logging

from pipelines.core import console

NOISE = [
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. Continuing to monitor.",
    "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'step': 10}) from rank 0",
    "[2026-11-27 12:52:28,331 E 4849 4878] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'79c4' has constructor arguments in the object store and max_restarts > 0.",
]


def test_forwarded_noise_is_dropped_and_everything_else_printed():
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from pipelines.core.distributed import _drop_forwarded_noise

    printed = []
    saved = list(dispatcher.handlers)
    try:
        dispatcher.handlers = [("ray_print_logs", lambda data: printed.append(data["lines"]))]
        _drop_forwarded_noise()
        real = "RuntimeError: CUDA out of memory"
        dispatcher.emit({"lines": [*NOISE, real], "pid": 1, "is_err": True})
        dispatcher.emit({"lines": NOISE[:1], "pid": 1, "is_err": True})  # nothing left: nothing printed
    finally:
        dispatcher.handlers = saved
    assert printed == [[real]]


def test_the_token_notice_is_dropped_on_the_driver(caplog):
    console.quiet_driver()
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled ...")
        logger.warning("Token authentication failed: the token is invalid")
    assert [r.getMessage() for r in caplog.records] == ["Token authentication failed: the token is invalid"]


def test_summary_is_one_line_naming_the_stage(capsys, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "finetune@digits")
    console.summary("adapter r=4", "val loss 0.1234", "adapters/digits")
    assert capsys.readouterr().out == "finetune@digits: adapter r=4; val loss 0.1234 -> adapters/digits\n"
