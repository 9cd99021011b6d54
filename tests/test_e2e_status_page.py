"""The status page in a real browser: Debian's headless Chromium, driven over WebDriver
(selenium with Debian's chromedriver; nothing is downloaded), against a live fleet
(gunicorn, a Celery worker, the embedded ledger and broker, the private dockerd) whose
runs are real: an alert the worker tried to act on and failed, an alert skipped for its
hostile label, a backup that ran all its steps and a signed GitHub push deployed to a
container. The same runs are checked in /metrics and in the Slack recorder's threads,
whose buttons lead to the pages. Screenshots go to test-artifacts/status-page/."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid

import pytest
import requests
import yaml

from tests.backup_support import make_documents
from tests.support.deploy import SHA, TAG, build_images, httpd_command, new_repository, remove_images, signed_push
from tests.support.fleet import REPO, Fleet, metric_value, service_down
from tests.support.servers import TEST_DOCKER_HOST, free_port
from worker.celery_factory import create_celery
from worker.config import load_config

pytestmark = pytest.mark.slow
ARTIFACTS = REPO / "test-artifacts" / "status-page"
HOSTILE = '<img src=x onerror="document.title=1">&<!channel>'
PHONE = (390, 844)
# A shell that exits on SIGTERM, so a restart takes milliseconds, not the stop timeout.
SERVICE_COMMAND = ("sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done")
SECRET = "status-page-github-secret"
IMAGES = new_repository()


@pytest.fixture
def app_container(dockerd):
    """A container of the deployed app running its first tag (v1); the images and it removed after."""
    built = build_images(dockerd, IMAGES)
    port, name = free_port(), f"opsfleet-e2e-status-{uuid.uuid4().hex[:8]}"
    dockerd.containers.run(f"{IMAGES}:v1", httpd_command(port), name=name, detach=True, network_mode="host")
    yield name, port
    for container in dockerd.containers.list(all=True, filters={"name": name}):
        container.remove(force=True)
    remove_images(dockerd, built)


@pytest.fixture
def browser(tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium, "chromium (Debian chromium) is missing: run bash scripts/services.sh"
    assert driver, "chromedriver (Debian chromium-driver) is missing: run bash scripts/services.sh"
    os.environ["SE_OFFLINE"] = "true"  # selenium must never fetch a browser or a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}",
        f"--window-size={PHONE[0]},{PHONE[1]}",
    ):
        options.add_argument(arg)
    session = webdriver.Chrome(service=Service(driver, log_output=str(tmp_path / "chromedriver.log")), options=options)
    session.set_page_load_timeout(30)
    yield session
    session.quit()


def shot(browser, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # The whole page at phone width: the window grows to the document's height.
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(PHONE[0], max(PHONE[1], min(height + 120, 4000)))
    assert browser.save_screenshot(str(ARTIFACTS / f"{name}.png"))
    browser.set_window_size(*PHONE)


def fits_a_phone(browser) -> bool:
    # Wide tables scroll inside their own box; the page itself never scrolls sideways.
    return browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")


def test_a_person_reads_runs_steps_backups_deploys_and_rules_in_chromium(
    tmp_path, browser, slack, app_container, make_container
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    # api: a real container the alert's restart acts on; ghost: one that is not there (a failed run).
    api = make_container(f"e2e-status-api-{uuid.uuid4().hex[:8]}", command=SERVICE_COMMAND)
    config = {
        "sweeper": {"interval_seconds": 1},
        "services": {
            "api": {"container": api.name},
            "ghost": {"container": "e2e-status-no-such-container"},
            "app": {"container": app_container[0], "health_url": f"http://127.0.0.1:{app_container[1]}/health"},
        },
        "deploy": {
            "environments": {
                "prod": {
                    "branch": "master",
                    "services": ["app"],
                    "image": IMAGES,
                    "tag_template": "main-{short_sha}",
                    "health": {"passes": 2, "interval_seconds": 0.2, "timeout_seconds": 3},
                    "stop_timeout_seconds": 1,
                    "min_free_bytes": 1024,
                }
            }
        },
        "remediation": {
            "defaults": {"cooldown_seconds": 0},
            "rules": [
                {
                    "name": "service-down",
                    "match": ['alertname="ServiceDown"'],
                    "playbook": "restart_service",
                    "target": {"service_label": "service"},
                    "params": {"verify_timeout_seconds": 2},
                },
            ],
        },
        "backup": {
            "root": str(tmp_path / "backups"),
            "min_free_bytes": 0,
            "step_timeout_seconds": 600,
            "series": {"documents": {"kind": "documents", "path": str(make_documents(tmp_path))}},
        },
    }
    env = {
        "DOCKER_HOST": TEST_DOCKER_HOST,
        "GITHUB_WEBHOOK_SECRET": SECRET,
        "SLACK_BOT_TOKEN": slack.token,
        "SLACK_API_URL": slack.base_url,
    }
    with Fleet(tmp_path, config, env=env) as fleet:
        # Slack's buttons link to this fleet's pages.
        written = yaml.safe_load(fleet.config_path.read_text())
        written["fleet"]["public_url"] = fleet.url
        fleet.config_path.write_text(yaml.safe_dump(written))
        fleet.start("web", "worker")
        assert fleet.post_alerts(service_down("00000000000000a1", "api")).status_code == 202
        assert fleet.post_alerts(service_down("00000000000000a3", "ghost")).status_code == 202
        assert fleet.post_alerts(service_down("00000000000000a2", HOSTILE)).status_code == 202
        app = create_celery(load_config(fleet.config_path, environ=fleet.env))
        app.send_task("opsfleet.schedule.trigger", args=("backup_set", "all"), kwargs={"slot_seconds": 3600})
        data, headers = signed_push(SECRET, "a", 1000)
        assert requests.post(f"{fleet.url}/hooks/github", data=data, headers=headers, timeout=10).status_code == 202
        fleet.wait(lambda: len(fleet.runs()) == 5 or None, 30, "five runs")
        runs = {(r["playbook"], r["target"]): r for r in fleet.runs() if r["status"] != "skipped"}
        for run in fleet.runs():
            fleet.wait_run(run["id"], timeout=90)
        acted = fleet.api(f"/runs/{runs['restart_service', 'api']['id']}")
        restart = fleet.api(f"/runs/{runs['restart_service', 'ghost']['id']}")
        runs = {playbook: run for (playbook, _), run in runs.items()}
        backup = fleet.api(f"/runs/{runs['backup_set']['id']}")
        deploy = fleet.api(f"/runs/{runs['deploy']['id']}")
        assert restart["status"] == "failed" and backup["status"] == "succeeded", (restart, backup)
        assert acted["status"] == "succeeded", acted  # the real container was restarted
        assert [s["name"] for s in acted["steps"]] == ["locate", "restart", "verify"]
        assert deploy["status"] == "succeeded", deploy

        # The runs list: five rows, newest first, each with its status as a person reads it.
        browser.get(f"{fleet.url}/")
        assert browser.title == "Runs · opsfleet"
        rows = browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
        assert len(rows) == 5
        seen = {row.find_element(By.CSS_SELECTOR, "td:nth-child(3)").text.splitlines()[0]: row.text for row in rows}
        assert "succeeded" in seen["backup_set"]
        restarts = [row.text for row in rows if "restart_service" in row.text and "skipped" not in row.text]
        assert sorted("succeeded" if "succeeded" in r else "failed" for r in restarts) == ["failed", "succeeded"]
        assert "succeeded" in seen["deploy"] and "prod" in seen["deploy"]
        skipped_row = next(row.text for row in rows if "skipped" in row.text)
        # The hostile label (in the alert's summary) is shown as the text it is, and made no element.
        assert HOSTILE in skipped_row and "unknown target" in skipped_row
        assert browser.find_elements(By.TAG_NAME, "img") == [] and browser.title == "Runs · opsfleet"
        assert fits_a_phone(browser)
        shot(browser, "runs")

        # Filter with the form, as a person would.
        Select(browser.find_element(By.NAME, "status")).select_by_visible_text("skipped")
        browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
        # The click starts a navigation; wait for it to land rather than read the old page.
        WebDriverWait(browser, 10).until(lambda b: "status=skipped" in b.current_url)
        filtered = browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
        assert len(filtered) == 1 and "unknown target" in filtered[0].text
        shot(browser, "runs-skipped")

        # A run's steps and their output.
        browser.get(f"{fleet.url}/")
        browser.find_element(By.LINK_TEXT, f"#{backup['id']}").click()
        WebDriverWait(browser, 10).until(lambda b: b.current_url.endswith(f"/runs/{backup['id']}"))
        assert browser.find_element(By.TAG_NAME, "h1").text == f"Run #{backup['id']}: backup_set on all"
        steps = [s.text.splitlines()[0] for s in browser.find_elements(By.CSS_SELECTOR, "section.step")]
        assert [s.split(" ")[1] for s in steps] == ["prepare", "dump", "verify", "commit", "retention"]
        assert all("succeeded" in s for s in steps)
        commit = next(s.text for s in browser.find_elements(By.CSS_SELECTOR, "section.step") if " commit " in s.text)
        assert "committed" in commit  # the step's output, as the worker wrote it
        assert fits_a_phone(browser)
        shot(browser, "run-backup")
        browser.get(f"{fleet.url}/runs/{restart['id']}")
        failed_step = browser.find_element(By.CSS_SELECTOR, "section.step").text
        assert "locate" in failed_step and "failed" in failed_step
        shot(browser, "run-failed")

        # Backups: the series with its newest verified set, its age and size.
        browser.get(f"{fleet.url}/backups")
        series = browser.find_element(By.CSS_SELECTOR, "#series tbody tr").text
        assert series.startswith("documents") and "fresh" in series and "ago" in series and "MB" in series
        assert "✓ verified" in browser.find_element(By.ID, "sets").text
        shot(browser, "backups")

        # Deploys: the environment's live release is the pushed commit, linked to its run.
        browser.get(f"{fleet.url}/deploys")
        prod = browser.find_element(By.ID, "env-prod").text
        assert "a push to master" in prod and SHA["a"][:12] in prod and f"#{deploy['id']}" in prod
        assert f"{IMAGES}:{TAG['a']}" in prod and "live" in prod
        assert fits_a_phone(browser)
        shot(browser, "deploys")

        # The same runs in /metrics: runs by outcome, the backup's gauges, the deploy, the worker's tasks.
        text = fleet.metrics()
        assert metric_value(text, "opsfleet_runs_total", playbook="restart_service", status="failed") == 1
        assert metric_value(text, "opsfleet_runs_total", playbook="restart_service", status="succeeded") == 1
        assert metric_value(text, "opsfleet_runs_total", playbook="restart_service", status="skipped") == 1
        assert metric_value(text, "opsfleet_runs_total", playbook="backup_set", status="succeeded") == 1
        assert metric_value(text, "opsfleet_alerts_held_back_total", outcome="skip", reason="unknown_target") == 1
        for outcome in ("succeeded", "failed", "skipped"):
            assert metric_value(text, "opsfleet_remediations_total", rule="service-down", outcome=outcome) == 1
        assert metric_value(text, "opsfleet_backup_max_age_seconds", series="documents") == 26 * 3600
        assert metric_value(text, "opsfleet_run_start_latency_seconds_count", trigger="alert") == 2
        assert metric_value(text, "celery_task_succeeded_total") >= 7  # start, 5 steps, finish, reports
        assert metric_value(text, "opsfleet_deploys_total", environment="prod", outcome="succeeded") == 1
        assert metric_value(text, "opsfleet_deploys_total", environment="prod", outcome="rolled_back") == 0
        assert metric_value(text, "opsfleet_release_info", environment="prod", sha=SHA["a"]) == 1
        assert metric_value(text, "celery_worker_up") == 1
        # Every domain metric this day touched, by its exported name.
        assert metric_value(text, "opsfleet_alerts_received_total", status="firing") == 3
        assert metric_value(text, "opsfleet_backup_size_bytes", kind="documents", series="documents") > 0
        assert metric_value(text, "opsfleet_backup_duration_seconds_count", kind="documents") == 1
        assert metric_value(text, "opsfleet_deploy_duration_seconds_count", environment="prod") == 1
        assert metric_value(text, "opsfleet_run_duration_seconds_count", playbook="deploy") == 1
        assert (
            metric_value(text, "opsfleet_steps_total", playbook="restart_service", step="restart", status="succeeded")
            == 1
        )
        assert (
            metric_value(text, "opsfleet_steps_total", playbook="restart_service", step="locate", status="failed") == 1
        )
        assert (
            metric_value(text, "opsfleet_rollbacks_total", environment="prod", kind="automatic", outcome="succeeded")
            == 0
        )

        # ...and in Slack: a thread per acted run (the skipped one is not posted), each parent's
        # button opening the run's page in the browser, each step a reply in its thread.
        every = (acted, restart, backup, deploy)

        def four_threads():
            threads = [t for t in slack.threads().values() if t["parent"]]
            finished = [
                t
                for t in threads
                if t["updates"] and any(w in t["updates"][-1]["text"] for w in ("*failed*", "*succeeded*"))
            ]
            replied = [t for t in threads if len(t["replies"]) >= 1]
            return threads if len(threads) == 4 and len(finished) == 4 and len(replied) == 4 else None

        threads = fleet.wait(four_threads, 30, "four Slack threads with their final status and steps")
        assert metric_value(fleet.metrics(), "opsfleet_reports_total", service="slack", outcome="delivered") >= 4
        assert HOSTILE not in json.dumps([t["parent"] for t in threads])
        buttons = {
            b["elements"][0]["url"] for t in threads for b in t["updates"][-1]["blocks"] if b["type"] == "actions"
        }
        assert buttons == {f"{fleet.url}/runs/{run['id']}" for run in every}
        by_run = {next(run["id"] for run in every if f"#{run['id']} " in t["parent"]["text"]): t for t in threads}
        for run in every:  # one reply per finished step, in order
            replies = [r["text"] for r in by_run[run["id"]]["replies"]]
            assert len(replies) == len(run["steps"]), (run["id"], replies)
            assert all(f"step `{s['name']}`" in r for s, r in zip(run["steps"], replies, strict=True))
        browser.get(f"{fleet.url}/runs/{restart['id']}")
        assert browser.find_element(By.TAG_NAME, "h1").text.startswith(f"Run #{restart['id']}")

        # Rules with what they did.
        browser.get(f"{fleet.url}/rules")
        rule = browser.find_element(By.ID, "rule-service-down").text
        assert f"#{restart['id']}" in rule and "failed" in rule and "skipped" in rule
        assert f"#{backup['id']}" not in rule  # the backup came from the schedule, not this rule
        assert fits_a_phone(browser)
        shot(browser, "rules")
