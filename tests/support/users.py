"""Users the tests act as."""

from __future__ import annotations

from django.contrib.auth.models import Group, User

REVIEWER_PASSWORD = "review-pass-93xq"


def make_reviewer(username: str) -> User:
    """A staff user in the ``reviewers`` group (created by migrate), with ``REVIEWER_PASSWORD``."""
    user = User.objects.create_user(username=username, password=REVIEWER_PASSWORD, is_staff=True)
    user.groups.add(Group.objects.get(name="reviewers"))
    return User.objects.get(pk=user.pk)  # a fresh permission cache
