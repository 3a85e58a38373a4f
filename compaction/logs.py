"""One logger for jobs: Prefect's run logger inside a flow/task run, the standard one elsewhere."""

from __future__ import annotations

import logging


def get_logger(name: str = "compaction") -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect.context import FlowRunContext, TaskRunContext

        if TaskRunContext.get() or FlowRunContext.get():
            from prefect.logging import get_run_logger

            return get_run_logger()
    except ImportError:
        pass
    logger = logging.getLogger(name)
    if not logging.getLogger().handlers and not logger.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return logger
