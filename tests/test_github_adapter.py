"""worker/adapters/github.py: GitHub's rate-limit answers, read as GitHub documents them
(docs.github.com, "Rate limits for the REST API" / "Troubleshooting the REST API")."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    "status,headers,body,wait",
    [
        (429, {"retry-after": "7"}, "", 7.0),
        (403, {"retry-after": "12"}, "", 12.0),
        (403, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1000090"}, "", 90.0),
        (403, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "999999"}, "", 1.0),  # reset passed: soon
        (403, {}, '{"message": "You have exceeded a secondary rate limit."}', 60.0),
        (429, {}, "", 60.0),
        (403, {"x-ratelimit-remaining": "12"}, '{"message": "Resource not accessible by integration"}', None),
        (502, {"retry-after": "5"}, "", None),  # not a rate limit (retried as a 5xx)
    ],
)
def test_githubs_rate_limit_answers(status, headers, body, wait):
    from worker.adapters.github import rate_limit_wait

    assert rate_limit_wait(status, headers, body, now=1_000_000.0) == wait


@pytest.mark.parametrize("repository", ["octo/../../orgs/x", "../x", "octo/..", "octo/repo/extra", "octo/re po", ""])
def test_a_repository_that_is_not_owner_name_is_never_put_in_a_url(repository):
    from tests.support.github_recorder import GitHubRecorder
    from worker.adapters.github import GitHubAdapter, GitHubError

    with GitHubRecorder() as github:
        adapter = GitHubAdapter(token=github.token, api_url=github.base_url, timeout_seconds=5)
        with pytest.raises(GitHubError, match="not owner/name") as refused:
            adapter.create_deployment(repository, ref="a" * 40, environment="prod", description="d", payload={})
        assert not refused.value.retryable
        with pytest.raises(GitHubError, match="not owner/name"):
            adapter.create_status(repository, 1, state="success", description="d", log_url=None, environment="prod")
        assert github.calls == []
        adapter.create_deployment(
            "Codertocat/Hello-World", ref="a" * 40, environment="prod", description="d", payload={}
        )
        assert [c.path for c in github.calls] == ["/repos/Codertocat/Hello-World/deployments"]
