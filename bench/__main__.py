"""``python -m bench``: see ``bench/README.md`` and ``python -m bench --help``."""

from bench.run import main

raise SystemExit(main())
