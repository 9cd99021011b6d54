"""The deploy parts of the ledger, on SQLite and PostgreSQL: deliveries recorded once,
releases (one per run, one current per environment), GitHub deployment states."""

from __future__ import annotations

from worker.adapters.ledger import NewRun


def _deploy_run(env="prod", key=None):
    return NewRun(trigger="github", playbook="deploy", target=env, params={"sha": "a" * 40}, dedup_key=key)


def test_a_delivery_is_recorded_once_and_a_redelivery_finds_its_runs(ledger):
    first, created = ledger.record_delivery(
        source="github", dedup_key="d-1", summary="s", body="{}", new_runs=[_deploy_run(key="github:d-1:prod")]
    )
    assert created and first.runs[0].created
    again, created_again = ledger.record_delivery(
        source="github", dedup_key="d-1", summary="s", body="{}", new_runs=[_deploy_run(key="github:d-1:prod")]
    )
    assert not created_again and again.event_id == first.event_id
    assert [r.id for r in again.runs] == [first.runs[0].id] and not again.runs[0].created
    assert ledger.count_events("github") == 1
    # Another source may use the same key.
    _, other = ledger.record_delivery(source="other", dedup_key="d-1", summary="", body="", new_runs=[])
    assert other
    # An ignored delivery (no runs) is recorded once too.
    ignored, created = ledger.record_delivery(source="github", dedup_key="d-2", summary="ignored", body="", new_runs=[])
    assert created and ignored.runs == []
    assert ledger.record_delivery(source="github", dedup_key="d-2", summary="", body="", new_runs=[])[1] is False


def test_releases_one_row_per_run_one_current_per_environment(ledger):
    ids = [
        ledger.record_event(source="t", summary="", body="", new_runs=[_deploy_run(env)]).runs[0].id
        for env in ("prod", "prod", "staging")
    ]
    for run_id, env, sha in zip(ids, ("prod", "prod", "staging"), ("a", "b", "c"), strict=True):
        release = ledger.start_release(
            environment=env,
            sha=sha * 40,
            ref="refs/heads/main",
            images={"api": f"r/api:{sha}"},
            previous_images={"api": "r/api:old"},
            run_id=run_id,
            order=(100.0, 50.5),
        )
        assert release["status"] == "deploying" and release["images"] == {"api": f"r/api:{sha}"}
    again = ledger.start_release(
        environment="prod", sha="z" * 40, ref="", images={}, previous_images={}, run_id=ids[0], order=(0, 0)
    )
    assert again["sha"] == "a" * 40  # a re-run finds the row written first
    ledger.make_current(ids[0])
    ledger.make_current(ids[2])
    assert ledger.current_release("prod")["run_id"] == ids[0]
    ledger.make_current(ids[1])
    assert ledger.current_release("prod")["run_id"] == ids[1]
    assert ledger.current_release("staging")["run_id"] == ids[2]  # another environment's current stays
    prod = ledger.list_releases("prod")
    assert [(r["run_id"], r["current"], r["status"]) for r in prod] == [(ids[1], True, "live"), (ids[0], False, "live")]
    assert (prod[0]["pushed_at"], prod[0]["committed_at"]) == (100.0, 50.5)
    ledger.set_release_status(ids[1], "rolled_back")
    assert ledger.release_of_run(ids[1])["status"] == "rolled_back"
    assert [r["id"] for r in ledger.active_deploys("prod")] == ids[:2]


def test_github_deployment_states_are_kept_in_order(ledger):
    run_id = ledger.record_event(source="t", summary="", body="", new_runs=[_deploy_run()]).runs[0].id
    assert ledger.github_deployment(run_id) is None
    ledger.set_github_deployment(run_id, "o/r", 2**40)
    ledger.set_github_deployment(run_id, "o/r", 7)  # the first one stays
    for state in ("queued", "in_progress", "success"):
        ledger.add_github_state(run_id, state)
    found = ledger.github_deployment(run_id)
    assert (found["deployment_id"], found["states"]) == (2**40, ["queued", "in_progress", "success"])


def test_pruning_old_runs_keeps_the_deploy_history(ledger):
    """Finished deploy runs named by a release or a GitHub deployment stay (the foreign keys,
    the current release and its rollback targets); other old runs of the same age go."""
    from datetime import timedelta

    from worker.adapters.ledger import PruneResult, utcnow

    released, reported, plain = (
        ledger.record_event(source="t", summary="", body="", new_runs=[_deploy_run(key=k)]).runs[0].id
        for k in ("released", "reported", "plain")
    )
    ledger.start_release(
        environment="prod",
        sha="a" * 40,
        ref="",
        images={"api": "r/api:a"},
        previous_images={},
        run_id=released,
        order=(1, 1),
    )
    ledger.make_current(released)
    ledger.set_github_deployment(reported, "o/r", 9)
    for run_id in (released, reported, plain):
        ledger.claim_run(run_id, "w", 60)
        ledger.finish_run(run_id, "succeeded" if run_id == released else "superseded", "")
    assert ledger.prune_runs(utcnow() + timedelta(seconds=1)) == PruneResult(1, 0, 1)  # plain and its event
    assert ledger.get_run(plain) is None
    assert ledger.get_run(released) is not None and ledger.get_run(reported) is not None
    assert ledger.current_release("prod")["run_id"] == released
    assert ledger.github_deployment(reported)["deployment_id"] == 9
