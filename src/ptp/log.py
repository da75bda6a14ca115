"""One log format for every entry point; rank > 0 logs warnings only."""
import logging
import os


def _format() -> tuple[int, str, str]:
    rank = int(os.environ.get("RANK", "0"))
    return rank, f"%(asctime)s ptp[rank{rank}] %(levelname)s %(message)s", "%H:%M:%S"


def setup_logging(level: str | None = None) -> None:
    """For the command lines, which own their process: the root logger, in ptp's format."""
    rank, fmt, datefmt = _format()
    level = level or os.environ.get("PTP_LOG_LEVEL", "INFO")
    logging.basicConfig(format=fmt, datefmt=datefmt, level=level if rank == 0 else "WARNING")


def setup_library_logging() -> None:
    """For `ptp.LLM` in someone else's program: where the program has configured no logging, ptp's own
    logger prints what start-up is doing, as the command lines do; the root logger is left alone."""
    logger = logging.getLogger("ptp")
    if logging.getLogger().handlers or logger.handlers or logger.level != logging.NOTSET:
        return  # the program decides where log records go
    rank, fmt, datefmt = _format()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(fmt, datefmt))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("PTP_LOG_LEVEL", "INFO") if rank == 0 else "WARNING")
    logger.propagate = False
