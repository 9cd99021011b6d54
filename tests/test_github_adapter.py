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
