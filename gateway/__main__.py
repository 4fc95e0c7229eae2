"""``python -m gateway``: the ``chatiq-gateway`` command (``gateway.server.cli``)."""

import sys

from gateway.server.cli import main

if __name__ == "__main__":
    sys.exit(main())
