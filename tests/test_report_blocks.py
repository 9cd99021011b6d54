"""Slack Block Kit for run reports: escaped like the text, a button to the run's status page."""

from __future__ import annotations

import json

from tests.test_report_slack import HOSTILE, reporting  # noqa: F401  (fixture, used by name)
from worker.tasks.report import parent_blocks, step_blocks


def _run(**extra) -> dict:
    return {
        "id": 7,
        "playbook": "restart_service",
        "target": "api",
        "status": "failed",
        "summary": HOSTILE,
        "reason": "verify failed " + HOSTILE,
        "resolved_at": None,
        "trigger": "alert",
        "rule": "service-down",
        **extra,
    }


def test_parent_blocks_are_escaped_and_link_to_the_status_page():
    blocks = parent_blocks(_run(), "https://ops.example.com/")
    dumped = json.dumps(blocks)
    assert "<!channel>" not in dumped and "<@U024BE7LH>" not in dumped and "<https://evil" not in dumped
    assert "&lt;!channel&gt;" in dumped
    assert [b["type"] for b in blocks] == ["section", "section", "context", "actions"]
    assert "*failed*" in blocks[0]["text"]["text"]
    [button] = blocks[-1]["elements"]
    assert button["url"] == "https://ops.example.com/runs/7" and button["text"]["text"] == "Run #7"
    # Without a public URL there is nothing to link to.
    assert [b["type"] for b in parent_blocks(_run(), None)] == ["section", "section", "context"]


def test_a_deploy_parent_names_commit_ref_environment_and_who_escaped():
    run = _run(
        playbook="deploy",
        target="prod",
        status="rolled_back",
        trigger="github",
        rule=None,
        triggered_by="<@U024BE7LH>",
        params={"sha": "6113728f27ae82c7b1a177c8d03f9e96e0adf246", "ref": "refs/heads/<!here>"},
    )
    head = parent_blocks(run, None)[0]["text"]["text"]
    assert head.startswith(":leftwards_arrow_with_hook: Deploy #7 of `6113728` (refs/heads/&lt;!here&gt;) to prod")
    assert "*rolled_back*" in head and head.endswith("by &lt;@U024BE7LH&gt;")


def test_step_blocks_fit_a_section():
    [block] = step_blocks({"name": "verify", "status": "failed", "output": "x" * 10_000})
    assert len(block["text"]["text"]) <= 3000


def test_reports_post_and_update_blocks(reporting, slack):  # noqa: F811
    app, ledger, run_id, report = reporting
    assert report.apply(args=(run_id,)).get() == "delivered"
    [thread] = slack.threads().values()
    assert thread["parent"]["blocks"] and thread["replies"][0]["blocks"]
    assert "&lt;!channel&gt;" in json.dumps(thread["parent"]["blocks"])
