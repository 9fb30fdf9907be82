"""Create an API key for a user (created if needed); the key is printed once, on the last line."""

from __future__ import annotations

from typing import Any, cast

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import models, transaction

from agents.jsonsafe import unstorable
from agents.services import create_api_key


class Command(BaseCommand):
    help = "Create an API key for <username> (the user is created if needed). Prints it once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--name", default="", help="what the key is for")

    def handle(self, *args: Any, **options: Any) -> None:
        User = get_user_model()
        username = User.normalize_username(options["username"].strip())
        if not username:
            raise CommandError("username must not be empty")
        # What the admin's user form accepts: its length and characters (letters, digits, @.+-_).
        field = cast("models.Field[Any, Any]", User._meta.get_field(User.USERNAME_FIELD))
        try:
            field.run_validators(username)
        except ValidationError as exc:
            shown = username if len(username) <= 40 else username[:40] + "…"
            raise CommandError(f"username {shown!r}: {' '.join(exc.messages)}") from None
        name = options["name"]
        if len(name) > 100:
            raise CommandError("--name is at most 100 characters")
        problem = unstorable(name)  # e.g. bytes that are not UTF-8 in the shell's argument
        if problem:
            raise CommandError(f"--name {problem}")
        with transaction.atomic():  # no user left behind by a key that could not be made
            user, created = User.objects.get_or_create(**{User.USERNAME_FIELD: username})
            if created:
                user.set_unusable_password()
                user.save(update_fields=["password"])
            key, plain = create_api_key(user=user, name=name)
        self.stderr.write(
            f"{'created user ' + username + '; ' if created else ''}API key {key.prefix}… "
            "created. It is shown once; only its hash is stored."
        )
        self.stdout.write(plain)
