import pytest

from worker.matchers import parse_matcher

# (matcher, labels, expected): Alertmanager semantics, anchored regexes,
# absent label == empty string.
CASES = [
    ('alertname="ServiceDown"', {"alertname": "ServiceDown"}, True),
    ('alertname="ServiceDown"', {"alertname": "ServiceDownX"}, False),
    ('severity!="info"', {"severity": "critical"}, True),
    ('severity!="info"', {"severity": "info"}, False),
    ('severity!="info"', {}, True),
    ('severity=~"warn|crit"', {"severity": "crit"}, True),
    ('severity=~"warn|crit"', {"severity": "critical"}, False),  # anchored
    ('severity!~"warn|crit"', {"severity": "critical"}, True),
    ('env=""', {}, True),  # absent matches empty
    ('env=~".+"', {}, False),
    ("job=api", {"job": "api"}, True),  # unquoted value
    ('msg="a \\"quoted\\" word"', {"msg": 'a "quoted" word'}, True),
]


@pytest.mark.parametrize("text,labels,expected", CASES)
def test_matcher_semantics(text, labels, expected):
    assert parse_matcher(text).matches(labels) is expected


@pytest.mark.parametrize(
    "text,message",
    [
        ('alertname=="x"', 'unknown operator "=="'),
        ('alertname<>"x"', 'unknown operator "<>"'),
        ('x=~"("', "bad regular expression"),
        ("just words", "cannot parse matcher"),
        ('9bad="x"', "cannot parse matcher"),
    ],
)
def test_matcher_errors_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_matcher(text)


def test_matcher_round_trips_to_text():
    assert str(parse_matcher('a =~ "x.*"')) == 'a=~"x.*"'
