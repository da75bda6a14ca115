"""One log format for every entry point; rank > 0 logs warnings only."""
import logging
import os


def setup_logging(level: str | None = None) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = level or os.environ.get("PTP_LOG_LEVEL", "INFO")
    logging.basicConfig(format=f"%(asctime)s ptp[rank{rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        level=level if rank == 0 else "WARNING")
