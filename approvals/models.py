"""The human review queue (escalations and decisions) is built by the approvals issue."""
