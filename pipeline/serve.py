"""``python -m pipeline.serve [streamlit options]``: start the dashboard (``streamlit run app.py``).

The same server as ``streamlit run app.py``, with one difference that matters when others can
reach it: Streamlit looks up the machine's public IP address at checkip.amazonaws.com (to
print an "External URL", and to judge a WebSocket whose Origin is not a loopback name), so a
hostile page could make the dashboard send requests off the machine. Here the address is
known to be none before the server starts, and the lookup never happens. ``make run`` and the
browser tests start the dashboard this way.
"""

from __future__ import annotations

import sys
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "app.py"


def no_external_ip() -> None:
    """Make Streamlit's external-IP lookup answer "none" without a request."""
    from streamlit import net_util

    net_util._external_ip = ""  # cached answer: get_external_ip returns it and asks no one


def main(argv: list[str] | None = None) -> int:
    from streamlit.web import cli

    no_external_ip()
    args = list(sys.argv[1:] if argv is None else argv)
    sys.argv = ["streamlit", "run", str(APP), *args]
    try:
        cli.main()  # a click command: ends in SystemExit
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
