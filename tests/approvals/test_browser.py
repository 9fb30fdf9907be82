"""The review queue in a real browser: headless Chromium (Debian's package, /usr/bin/chromium)
driven by Playwright logs in as a reviewer, opens the queue, approves an item, and keeps
screenshots under artifacts/browser/: review-queue.png (the queue), review-page.png (the item's
review page) and approved.png (the queue after approving, with the confirmation).

Skipped, saying what is missing, where the ``playwright`` package or /usr/bin/chromium is absent
(``make browser-deps`` installs Chromium on Debian). Playwright's own browser downloads are never
used: ``playwright install`` is not needed."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Group, User

from agents.models import Agent, Run, Step
from agents.services import submit_run
from approvals.models import Approval
from harness.polling import poll
from harness.processes import ROOT

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts" / "browser"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PASSWORD = "browser-review-pass-8812"
CALC = [
    {"tool_calls": [{"name": "calculator", "arguments": {"expression": "{input}"}}]},
    {"text": "{tool_results}"},
]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True),
    # Checked before any fixture starts a worker or a server.
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="browser test skipped: the playwright Python package is not installed "
        "(pip install -e '.[dev]')",
    ),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"browser test skipped: Chromium is not installed at {CHROMIUM} "
        "(Debian: `make browser-deps`, or apt-get install chromium)",
    ),
]


def waiting(agent: Agent, text: str, owner: User) -> Approval:
    run = submit_run(agent=agent, input=text, owner=owner)
    poll(
        lambda: Run.objects.filter(pk=run.pk, status=Run.Status.WAITING_APPROVAL).exists(),
        timeout=60,
        what="the run to wait for a reviewer",
    )
    return Approval.objects.get(run=run)


def test_a_reviewer_approves_in_the_browser(celery_worker, api_server, make_agent):
    from playwright.sync_api import sync_playwright

    reviewer = User.objects.create_user(username="rita", password=PASSWORD, is_staff=True)
    reviewer.groups.add(Group.objects.get(name="reviewers"))
    carol = User.objects.create_user(username="carol")
    desk = make_agent(slug="calc-desk", grants={"calculator": "require_approval"}, script=CALC)
    payments = make_agent(
        slug="payments-desk",
        grants={"calculator": "require_approval"},
        escalation_policy={"priority": "high"},
        script=CALC,
    )
    approval = waiting(desk, "6*7", carol)
    other = waiting(payments, "100*3", carol)
    review_page = f"/admin/approvals/approval/{approval.pk}/change/"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    queue_png, page_png, approved_png = (
        ARTIFACTS / name for name in ("review-queue.png", "review-page.png", "approved.png")
    )
    for old in (queue_png, page_png, approved_png):
        old.unlink(missing_ok=True)

    # No database access inside: Playwright's sync API runs an event loop in this thread.
    seen: dict[str, Any] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.set_default_timeout(20_000)
            page.goto(f"{api_server.base_url}/admin/login/?next=/admin/approvals/approval/")
            page.fill("#id_username", "rita")
            page.fill("#id_password", PASSWORD)
            page.click("input[type=submit]")
            page.wait_for_url("**/admin/approvals/approval/")
            seen["title"] = page.title()
            seen["rows"] = page.locator("#result_list tbody tr").count()
            seen["first_row"] = page.inner_text("#result_list tbody tr:first-child")
            page.screenshot(path=str(queue_png), full_page=True)

            page.click(f'a[href="{review_page}"]')
            page.wait_for_selector("#approval_form")
            seen["arguments"] = page.inner_text("#approval-arguments")
            seen["input"] = page.inner_text("#approval-input")
            page.fill("#id_comment", "checked in the browser")
            page.screenshot(path=str(page_png), full_page=True)
            page.click("button[value=approve]")
            page.wait_for_url("**/admin/approvals/approval/")
            seen["message"] = page.inner_text("ul.messagelist")
            seen["rows_after"] = page.locator("#result_list tbody tr").count()
            page.screenshot(path=str(approved_png), full_page=True)
        finally:
            browser.close()

    assert seen["title"].startswith("Review queue")
    assert seen["rows"] == 2 and "payments-desk" in seen["first_row"]  # high priority first
    assert seen["input"] == "6*7"
    assert seen["arguments"] == '{\n  "expression": "6*7"\n}'
    assert "Approved calculator; the run resumes." in seen["message"]
    assert seen["rows_after"] == 1
    for png in (queue_png, page_png, approved_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    approval.refresh_from_db()
    assert approval.status == Approval.Status.APPROVED and approval.decided_by == reviewer
    assert approval.comment == "checked in the browser"
    poll(
        lambda: Run.objects.get(pk=approval.run_id).is_final,
        timeout=60,
        what=f"the approved run to finish (worker log:\n{celery_worker.log_tail()})",
    )
    step = Step.objects.get(run_id=approval.run_id, index=1)
    assert step.status == Step.Status.SUCCEEDED and step.response["result"] == 42
    other.refresh_from_db()
    assert other.status == Approval.Status.PENDING
