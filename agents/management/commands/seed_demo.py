"""Create the demo agents (with their tool grants) and knowledge base. Idempotent."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand
from django.db import transaction

from agents.models import Agent
from agents.services import save_agent
from tools.models import KnowledgeDocument

ARTICLES = [
    (
        "Refund policy",
        "refund,money back,return",
        "Refunds are issued to the original payment method within 5 business days of "
        "approval. Orders can be refunded up to 30 days after delivery.",
    ),
    (
        "Shipping times",
        "shipping,delivery,tracking",
        "Standard shipping takes 3 to 5 business days; express shipping takes 1 to 2. A tracking "
        "link is emailed when the parcel leaves the warehouse.",
    ),
    (
        "Resetting your password",
        "password,login,account",
        "Use 'Forgot password' on the sign-in page; the reset link is valid for 1 hour.",
    ),
    (
        "Changing an order",
        "order,change,cancel",
        "Orders can be changed or cancelled until they are packed, usually within 2 hours.",
    ),
    (
        "Contacting support",
        "support,contact,phone,hours",
        "Support answers by chat from 8:00 to 20:00 CET on weekdays.",
    ),
]

AGENTS: list[dict[str, Any]] = [
    {
        "slug": "support-assistant",
        "name": "Support assistant",
        "description": "Answers customer questions from the knowledge base.",
        "model_route": "scripted:demo",
        "system_prompt": (
            "You are a support assistant. Answer only from the knowledge base; search it with "
            "the knowledge_search tool before answering."
        ),
        "tools": ["knowledge_search", "calculator"],
        "max_steps": 10,
        "script": [
            {"tool_calls": [{"name": "knowledge_search", "arguments": {"query": "{input}"}}]},
            {"text": "Here is what the knowledge base says: {last_tool_result}"},
        ],
    },
    {
        "slug": "math-tutor",
        "name": "Math tutor",
        "description": "Works out arithmetic with the calculator tool.",
        "model_route": "scripted:demo",
        "system_prompt": "Use the calculator for any arithmetic.",
        "tools": ["calculator"],
        "max_steps": 6,
        "script": [
            {"tool_calls": [{"name": "calculator", "arguments": {"expression": "{input}"}}]},
            {"text": "The calculator says: {last_tool_result}"},
        ],
    },
]


AGENTS.append(
    {
        "slug": "refund-agent",
        "name": "Refund agent",
        "description": (
            "Refunds orders; a refund above 50 EUR, or past 100 EUR in a run, waits for a human "
            "reviewer (the review queue in the admin); at most 500 EUR and 5 refunds a run."
        ),
        "model_route": "scripted:demo",
        "system_prompt": (
            "You handle refund requests. Refund with the issue_refund tool; refunds above "
            "50 EUR are checked by a human first. Ask a human (escalate_to_human) when unsure."
        ),
        # Up to 500 EUR a refund and 500 EUR a run, five refunds a run at most; a refund above
        # 50 EUR, or one that takes the run's total above 100 EUR, needs a reviewer's approval
        # (so splitting a large refund into small ones gets it reviewed all the same).
        "tools": {
            "issue_refund": {
                "mode": "allow",
                "constraints": {
                    "amount": {
                        "max": 500,
                        "approve_above": 50,
                        "sum_max": 500,
                        "approve_sum_above": 100,
                        "per": "run",
                    },
                    "*": {"max_calls": 5, "per": "run"},
                },
            },
            "escalate_to_human": "require_approval",
        },
        "max_steps": 8,
        "escalation_policy": {"review_sla_minutes": 60, "on_expiry": "escalate"},
        "script": [
            {
                "tool_calls": [
                    {
                        "name": "issue_refund",
                        "arguments": {"order_id": "A-1001", "amount": 120, "reason": "{input}"},
                    }
                ]
            },
            {"text": "Refund done: {last_tool_result}"},
        ],
    }
)


class Command(BaseCommand):
    help = (
        "Create the demo agents (support-assistant, math-tutor, refund-agent) and the "
        "knowledge base."
    )

    @transaction.atomic
    def handle(self, *args: Any, **options: Any) -> None:
        for title, tags, body in ARTICLES:
            KnowledgeDocument.objects.update_or_create(
                title=title, defaults={"tags": tags, "body": body}
            )
        for spec in AGENTS:
            agent = Agent.objects.filter(slug=spec["slug"]).first() or Agent(slug=spec["slug"])
            config = dict(spec)
            grants = config.pop("tools")
            for field, value in config.items():
                setattr(agent, field, value)
            save_agent(agent=agent, grants=grants)
            self.stdout.write(f"agent {agent.slug}: {agent.current_version}")
        self.stdout.write(
            self.style.SUCCESS(f"seeded {len(ARTICLES)} articles, {len(AGENTS)} agents")
        )
