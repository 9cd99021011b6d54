"""free_disk, run by an alert rule: the cleanup, rotation and backup jobs' own
steps, on real files and the private dockerd; nothing beyond their policies."""

from __future__ import annotations

from tests.backup_support import engine, make_documents, run_playbook
from tests.support.servers import TEST_DOCKER_HOST


def _site(tmp_path, live, documents, **log_set):
    """An engine with one log set (`live`, 5,000 lines, in a folder of its own), one documents
    series and the dangling-image prune: what free_disk's three jobs act on."""
    live.parent.mkdir()
    live.write_text("".join(f"line {i}\n" for i in range(5000)))
    return engine(
        tmp_path,
        {"root": str(tmp_path / "backup"), "series": {"documents": {"kind": "documents", "path": str(documents)}}},
        rotation={
            "sets": {
                "app": {
                    "paths": [str(live.parent / "*.log")],
                    "reopen": {"watched": True},
                    "max_size": "100M",
                    "compress": "zstd",
                    **log_set,
                }
            }
        },
        cleanup={"images": {"dangling": True}},
        logging={"files": False},
    )


def test_free_disk_rotates_compresses_and_applies_backup_retention(tmp_path, dockerd, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", TEST_DOCKER_HOST)
    live = tmp_path / "logs" / "app.log"
    app = _site(tmp_path, live, make_documents(tmp_path), keep=5)
    assert run_playbook(app, "backup_set")["status"] == "succeeded"

    run = run_playbook(app, "free_disk", {"force": True})
    assert run["status"] == "succeeded", run
    outputs = {s["name"]: s["output"] for s in run["steps"]}
    assert list(outputs) == ["dangling_images", "rotate_logs", "compress_logs", "backup_retention"]
    # forced: rotated although far below max_size, then compressed
    assert live.stat().st_size == 0
    rotated = sorted(p.name for p in live.parent.iterdir() if p.name != "app.log")
    assert len(rotated) == 1 and rotated[0].endswith(".zst")
    # the backup job's retention decided, and kept the newest verified backup
    assert (
        outputs["backup_retention"].startswith("backup retention:")
        and "keep   documents" in outputs["backup_retention"]
    )
    assert len(list((tmp_path / "backup").iterdir())) >= 1


def test_a_step_that_fails_does_not_keep_the_others_from_freeing_space(tmp_path):
    """No Docker daemon (engine's default): the image prune fails, the logs are still rotated
    and compressed and the backup retention still applied; the run ends failed, naming it."""
    live = tmp_path / "logs" / "app.log"
    app = _site(tmp_path, live, tmp_path)
    run = run_playbook(app, "free_disk", {"force": True})
    statuses = {s["name"]: s["status"] for s in run["steps"]}
    assert statuses == {
        "dangling_images": "failed",
        "rotate_logs": "succeeded",
        "compress_logs": "succeeded",
        "backup_retention": "succeeded",
    }, run
    assert run["status"] == "failed" and run["reason"].startswith("step dangling_images failed: ")
    assert live.stat().st_size == 0
    assert [p.name.endswith(".zst") for p in live.parent.iterdir() if p.name != "app.log"] == [True]
