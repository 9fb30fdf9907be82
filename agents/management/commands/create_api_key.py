"""Create an API key for a user (created if needed); the key is printed once, on the last line."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from agents.services import create_api_key


class Command(BaseCommand):
    help = "Create an API key for <username> (the user is created if needed). Prints it once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--name", default="", help="what the key is for")

    def handle(self, *args: Any, **options: Any) -> None:
        username = options["username"].strip()
        if not username or len(username) > 150:
            raise CommandError("username must be 1 to 150 characters")
        if len(options["name"]) > 100:
            raise CommandError("--name is at most 100 characters")
        user, created = get_user_model().objects.get_or_create(username=username)
        if created:
            user.set_unusable_password()
            user.save(update_fields=["password"])
        key, plain = create_api_key(user=user, name=options["name"])
        self.stderr.write(
            f"{'created user ' + username + '; ' if created else ''}API key {key.prefix}… "
            "created. It is shown once; only its hash is stored."
        )
        self.stdout.write(plain)
