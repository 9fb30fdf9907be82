"""Create (or update) a staff user in the ``reviewers`` group: the review queue, nothing else."""

from __future__ import annotations

import os
from typing import Any

from django.apps import apps
from django.contrib.auth import get_user_model, password_validation
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.validators import validate_email
from django.db import models, transaction

from approvals.apps import REVIEWER_PERMISSIONS, REVIEWERS_GROUP, ensure_reviewers_group


class Command(BaseCommand):
    help = (
        "Create or update <username> as a reviewer: a staff user in the 'reviewers' group, who "
        "sees and decides the review queue in the admin and nothing else. Without "
        "--password-from-env a new user gets no usable password (set one with "
        "`manage.py changepassword <username>`)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("--email", default=None, help="the reviewer's email address")
        parser.add_argument(
            "--password-from-env",
            metavar="VAR",
            default=None,
            help="set the password from this environment variable (never from the command "
            "line, where other users could read it)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        User = get_user_model()  # noqa: N806
        username = (options["username"] or "").strip()
        if not username:
            raise CommandError("the username is empty")
        username_field = User._meta.get_field(User.USERNAME_FIELD)
        assert isinstance(username_field, models.Field)
        try:
            username_field.run_validators(username)
        except ValidationError as exc:
            raise CommandError(f"invalid username {username!r}: {' '.join(exc.messages)}")

        email = options["email"]
        if email is not None:
            email = email.strip()
            try:
                validate_email(email)
            except ValidationError:
                raise CommandError(f"invalid --email {email!r}: not an email address")

        password = None
        variable = options["password_from_env"]
        if variable is not None:
            if not variable.strip():
                raise CommandError("--password-from-env needs the name of an environment variable")
            password = os.environ.get(variable)
            if not password:
                raise CommandError(
                    f"--password-from-env {variable}: the environment variable {variable} is "
                    "not set or is empty"
                )

        with transaction.atomic():
            group = self._reviewers_group()
            user = User.objects.filter(**{User.USERNAME_FIELD: username}).first()
            created = user is None
            if user is None:
                user = User(**{User.USERNAME_FIELD: username})
            if password is not None:
                try:
                    password_validation.validate_password(password, user)
                except ValidationError as exc:
                    raise CommandError(
                        f"the password in {variable} is refused: {' '.join(exc.messages)}"
                    )
                user.set_password(password)
            elif created:
                user.set_unusable_password()
            if email is not None:
                user.email = email
            user.is_staff = True
            user.save()
            user.groups.add(group)

        verb = "Created" if created else "Updated"
        self.stdout.write(
            f"{verb} reviewer {username!r}: staff, in the {REVIEWERS_GROUP!r} group "
            "(the review queue at /admin/approvals/approval/)."
        )
        if password is not None:
            self.stdout.write(f"Password set from ${variable}.")
        elif not user.has_usable_password():
            self.stdout.write(
                "No usable password yet: set one with "
                f"`python manage.py changepassword {username}` before logging in."
            )
        if not user.is_active:
            self.stderr.write(f"Note: {username!r} is inactive and cannot log in until activated.")
        if user.is_superuser:
            self.stderr.write(
                f"Note: {username!r} is a superuser and keeps every permission, not only the "
                "reviewer's."
            )

    def _reviewers_group(self) -> Group:
        """The reviewers group with exactly its permissions (as migrate leaves it)."""
        ensure_reviewers_group(apps.get_app_config("approvals"))
        group = Group.objects.get(name=REVIEWERS_GROUP)
        have = set(group.permissions.values_list("codename", flat=True))
        if have != set(REVIEWER_PERMISSIONS):
            raise CommandError(
                f"the {REVIEWERS_GROUP!r} group lacks its permissions "
                f"({', '.join(sorted(set(REVIEWER_PERMISSIONS) - have))}): run "
                "`python manage.py migrate` first"
            )
        return group
