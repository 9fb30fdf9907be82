#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentsite.settings")
    from django.core.management import execute_from_command_line

    from agentsite.envfile import settings_or_exit

    # A bad setting is one line, not Django's traceback and a misleading "Unknown command".
    settings_or_exit()
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
